"""Train a tiny MultiMax Llama with ``hf_multimax.MultiMaxTrainer`` (a ``transformers.Trainer``); run alone or under
``accelerate launch`` / ``torchrun``.

Used by tests/test_distributed.py: after every optimizer step a callback gathers the MultiMax parameters of every
process and records the largest difference; the model is saved with ``Trainer.save_model`` and a ``worker.json``
holds the world size, the per-step differences and the training losses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

import hf_multimax  # noqa: F401  (registers "multimax")
from hf_multimax.integrations.trainer import MultiMaxTrainer
from hf_multimax.training import multimax_parameter_names
from hf_multimax.training.distributed import launched_without_accelerator


class ReplicaCheck(TrainerCallback):
    """Largest difference of the MultiMax parameters between processes after each step."""

    def __init__(self):
        self.diffs: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        names = multimax_parameter_names(model)
        params = dict(model.named_parameters())
        flat = torch.cat([params[n].detach().reshape(-1) for n in names])
        if dist.is_available() and dist.is_initialized():
            gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, flat)
            self.diffs.append(max((g - gathered[0]).abs().max().item() for g in gathered))
        else:
            self.diffs.append(0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--max_steps", type=int, default=4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        multimax_output=True,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="multimax")
    blocks = torch.randint(0, 64, (64, 32), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=launched_without_accelerator(),  # Trainer forms a gloo process group on CPUs only when told so
        ddp_find_unused_parameters=False,  # a parameter without a gradient would stop DDP with an error
    )
    check = ReplicaCheck()
    trainer = MultiMaxTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[check])
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        report = {"world_size": training_args.world_size, "replica_diffs": check.diffs, "losses": losses}
        Path(args.output_dir, "worker.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
