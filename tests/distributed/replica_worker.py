"""``--check_replicas`` catches processes whose MultiMax parameters drifted apart.

Prepares a tiny MultiMax Llama for DDP, checks that the replicas agree, then shifts one MultiMax parameter on rank 1
only (what unsynchronised gradients would do) and checks that
:func:`hf_multimax.training.distributed.replica_divergence` names it and that the training loop's check stops with an
error. Rank 0 writes what it saw to the JSON path given.
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import hf_multimax  # noqa: F401
from hf_multimax.finetune.loop import TrainResult, check_replicas
from hf_multimax.training.distributed import launched_without_accelerator, replica_divergence

TARGET = "model.layers.1.self_attn.multimax.multimax_ts"


def main(path: str) -> None:
    accelerator = Accelerator(cpu=launched_without_accelerator())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = accelerator.prepare(LlamaForCausalLM._from_config(config, attn_implementation="multimax"))
    report = {"num_processes": accelerator.num_processes, "before": replica_divergence(accelerator, model)}
    target = accelerator.unwrap_model(model).get_parameter(TARGET)
    with torch.no_grad():
        if accelerator.process_index == 1:
            target[2] += 0.25
    report["after"] = replica_divergence(accelerator, model)
    try:
        check_replicas(accelerator, model, TrainResult(completed_steps=7))
        report["error"] = None
    except RuntimeError as error:
        report["error"] = str(error)
    if accelerator.is_main_process:
        with open(path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
