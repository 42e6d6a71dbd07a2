"""hf_multimax.clip_grad_norm_ on sharded gradients: PyTorch FSDP1 (use_orig_params=True, transformer-layer wrapping)
and FSDP2 (``fully_shard`` per decoder layer, then the root), on CPU processes with gloo.

Every process also builds the same model unwrapped and runs the whole global batch: the norm each ``output_clip``
mode returns, and the clipped MultiMax gradients, must match that single-process reference. FSDP1 without
``use_orig_params`` must be refused. Launch with ``torchrun --nproc_per_node 2 clip_worker.py OUT.json``; rank 0
writes the largest differences to OUT.json.
"""

from __future__ import annotations

import copy
import functools
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import hf_multimax
from hf_multimax.training import OUTPUT_CLIP_MODES


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        multimax_init="paper",
        multimax_output=True,
        multimax_per_head=True,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="multimax")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # large logits: the output σ gradient dominates, as in a trained LM
    return model


def shard(model: LlamaForCausalLM, version: int):
    if version == 1:
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
        return FullyShardedDataParallel(
            model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
        )
    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def multimax_grads(model) -> dict[str, torch.Tensor]:
    """Whole MultiMax gradients by clean name (FSDP1 leaves a parameter whole on one rank and empty on the other)."""
    grads = {}
    for name, param in model.named_parameters():
        if "multimax" in name and param.grad is not None:
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[name.replace("_fsdp_wrapped_module.", "")] = grad.clone()
    return grads


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(0, 512, (2 * world, 16), generator=torch.Generator().manual_seed(3))
    local = batch.chunk(world)[rank]
    report = {}
    for version in (1, 2):
        for mode in OUTPUT_CLIP_MODES:
            reference = build()
            reference(input_ids=batch, labels=batch).loss.backward()
            expected_norm = hf_multimax.clip_grad_norm_(reference, 1.0, output_clip=mode)
            expected = multimax_grads(reference)

            model = shard(copy.deepcopy(build()), version)
            model(input_ids=local, labels=local).loss.backward()
            norm = hf_multimax.clip_grad_norm_(model, 1.0, output_clip=mode)
            got = multimax_grads(model)
            compared = [n for n in got if got[n].shape == expected[n].shape]
            if version == 2 and len(compared) != len(expected):
                raise AssertionError(f"FSDP2 lost MultiMax gradients: {sorted(set(expected) - set(compared))}")
            grad_diff = max((got[n] - expected[n]).abs().max().item() for n in compared) if compared else 0.0
            counts = torch.tensor([len(compared)])
            dist.all_reduce(counts)
            worst = torch.tensor([grad_diff])
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # over every rank's whole gradients
            grad_diff = worst.item()
            report[f"fsdp{version}_{mode}"] = {
                "norm": float(norm),
                "expected_norm": float(expected_norm),
                "norm_rel_diff": abs(float(norm) - float(expected_norm)) / float(expected_norm),
                "grad_max_abs_diff": grad_diff,
                "multimax_grads_compared_all_ranks": int(counts),
            }
    # FSDP1 without original parameters hides the output head's σ parameters in flat parameters: clipping says so.
    model = FullyShardedDataParallel(build(), use_orig_params=False, device_id=torch.device("cpu"))
    model(input_ids=local, labels=local).loss.backward()
    try:
        hf_multimax.clip_grad_norm_(model, 1.0)
        report["flat_params_error"] = None
    except ValueError as error:
        report["flat_params_error"] = str(error)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
