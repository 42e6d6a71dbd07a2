"""Run ``examples/run_clm.py`` under Accelerate's FSDP2 plugin, configured by examples/accelerate_configs/fsdp2.yaml,
on CPU processes (gloo), in float32.

Accelerate turns its FSDP plugin on only for accelerator devices; on CPU processes it quietly trains with DDP.
PyTorch's FSDP2 (``fully_shard``) itself runs on CPU with gloo, so this worker flips Accelerate's distributed type to
FSDP right after the ``Accelerator`` is built: from there on Accelerate's own FSDP code runs unchanged
(``fsdp2_prepare_model`` with the transformer-layer wrap policy, ``clip_grad_norm_`` over DTensor gradients,
``get_state_dict`` gathering the shards for ``save_pretrained``). Launch with ``torchrun --nproc_per_node 2`` or
``accelerate launch --multi_gpu --num_processes 2``; the arguments are those of run_clm.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from hf_multimax.finetune import pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import run_clm  # noqa: E402

build_accelerator = pipeline.make_accelerator


def plugin_from_config(path: Path) -> FullyShardedDataParallelPlugin:
    """The plugin ``accelerate launch --config_file PATH`` would build (the ``fsdp_`` keys without their prefix)."""
    fsdp = load_config_from_file(str(path)).fsdp_config
    return FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        state_dict_type=fsdp["fsdp_state_dict_type"],
        cpu_offload=fsdp["fsdp_offload_params"],
        cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
        activation_checkpointing=fsdp["fsdp_activation_checkpointing"],
    )


def make_fsdp_accelerator(args):
    accelerator = build_accelerator(args)
    plugin = plugin_from_config(EXAMPLES / "accelerate_configs" / "fsdp2.yaml")
    # Both shared states: AcceleratorState re-reads PartialState's whenever another one is constructed.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return accelerator


if __name__ == "__main__":
    pipeline.make_accelerator = make_fsdp_accelerator  # what finetune.run() calls
    run_clm.main(sys.argv[1:])
