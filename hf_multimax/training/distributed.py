"""Data-parallel and sharded training helpers: start the right backend, check that replicas agree, gather to save.

Accelerate picks its process group from the launcher's environment, but on a machine without an accelerator it only
starts one when told to run on CPU: under ``torchrun`` / ``accelerate launch --multi_gpu`` it would otherwise run N
independent copies of the script. :func:`launched_without_accelerator` spots that case so that the fine-tuning scripts
start a gloo process group instead.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .optim import multimax_parameter_names

__all__ = ["launched_without_accelerator", "replica_divergence", "is_sharded", "full_state_dict"]


def launched_without_accelerator() -> bool:
    """True when a multi-process launcher (``torchrun``, ``accelerate launch --multi_gpu``, MPI) started this process
    on a machine with no accelerator: Accelerate then needs ``cpu=True`` to form the process group (gloo)."""
    world_size = max(int(os.environ.get(name, 1)) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if world_size < 2:
        return False
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return not has_accelerator


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: DTensors (FSDP2) are gathered, plain tensors returned as they are."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


def replica_divergence(accelerator, model: nn.Module, names: list[str] | None = None) -> tuple[float, str | None]:
    """Largest absolute difference of a parameter between processes, and the name of that parameter.

    Compares ``names`` (default: every MultiMax parameter, see
    :func:`~hf_multimax.training.optim.multimax_parameter_names`) as every process sees them (DTensors gathered whole);
    returns ``(0.0, None)`` when all processes hold identical values, as data parallelism requires after every step.
    One all-gather of those values: cheap for MultiMax's handful of scalars per layer. Call it on every process.
    """
    names = multimax_parameter_names(model) if names is None else names
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"`names` holds parameters the model does not have: {missing[:5]}")
    if not names or accelerator.num_processes < 2:
        return 0.0, None
    values = [_full(params[name]).detach().reshape(-1).double() for name in names]
    flat = torch.cat(values).to(accelerator.device)
    gathered = accelerator.gather(flat[None]).reshape(accelerator.num_processes, -1)
    spread = (gathered - gathered[0]).abs().amax(0)
    worst = int(spread.argmax())
    if spread[worst] == 0:
        return 0.0, None
    sizes = torch.tensor([v.numel() for v in values]).cumsum(0)
    return float(spread[worst]), names[int((sizes <= worst).sum())]


def is_sharded(accelerator) -> bool:
    """True when the prepared model's parameters are sharded across processes (FSDP or DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def full_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a prepared model for ``save_pretrained(state_dict=...)``: gathered from the shards
    under FSDP / ZeRO-3 (``accelerator.get_state_dict``, on every process), None otherwise (``save_pretrained`` then
    reads the unwrapped model itself)."""
    if not is_sharded(accelerator):
        return None
    return accelerator.get_state_dict(model)
