"""Clipping with output-layer MultiMax: the σ parameters of an output head get a gradient summed over every logit (the
whole vocabulary); once logits are large it outweighs the rest of the model, and under one global clip-norm it shrinks
every other update. :func:`clip_grad_norm_` offers upstream's two remedies (clip them apart, or count them 1/sqrt(V))
and works on plain, DDP, FSDP1 and FSDP2 models alike."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import registry
from ..modeling import OUTPUT_HOOK
from .optim import output_multimax_parameter_names

__all__ = ["clip_grad_norm_", "OUTPUT_CLIP_MODES", "default_output_clip", "set_default_output_clip"]

#: How :func:`clip_grad_norm_` treats output-layer MultiMax parameters (see its docstring).
OUTPUT_CLIP_MODES = ("separate", "scaled", "global")
_DEFAULT_OUTPUT_CLIP = ["separate"]


def default_output_clip() -> str:
    """The mode MultiMax trainers (:mod:`hf_multimax.integrations.trainer`) clip with when given none."""
    return _DEFAULT_OUTPUT_CLIP[0]


def set_default_output_clip(mode: str) -> None:
    """Set :func:`default_output_clip` (one of :data:`OUTPUT_CLIP_MODES`)."""
    _DEFAULT_OUTPUT_CLIP[0] = check_output_clip(mode)


def check_output_clip(mode: str) -> str:
    if mode not in OUTPUT_CLIP_MODES:
        raise ValueError(f"`output_clip` must be one of {OUTPUT_CLIP_MODES}, got {mode!r}")
    return mode


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def _fsdp1_process_group(model: nn.Module):
    """The process group of an FSDP1-wrapped model (its gradients are local shards), else None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return module.process_group
    return None


def _group_norm(grads: list[torch.Tensor], norm_type: float, shard_group, device: torch.device) -> torch.Tensor:
    """The ``norm_type`` norm of ``grads`` over all processes that hold a piece of them.

    DTensor gradients (FSDP2) are reduced by DTensor itself; plain gradients are local shards under FSDP1
    (``shard_group`` set), whose norms are all-reduced; otherwise (one process, DDP) they are whole and local. Every
    rank calls the same collectives, also when it holds no piece of the group (FSDP1 may leave a rank without one).
    """
    dtensors = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    inf = math.isinf(norm_type)
    parts = []
    if dtensors:
        norm = torch.nn.utils.get_total_norm(dtensors, norm_type)
        parts.append((norm.full_tensor() if _is_dtensor(norm) else norm).float())
    if plain or shard_group is not None:
        norm = torch.nn.utils.get_total_norm(plain, norm_type).float() if plain else torch.zeros((), device=device)
        if shard_group is not None:
            import torch.distributed as dist

            norm = norm.to(device) if inf else norm.to(device).pow(norm_type)
            dist.all_reduce(norm, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=shard_group)
            norm = norm if inf else norm.pow(1.0 / norm_type)
        parts.append(norm)
    return _combine(parts, norm_type) if parts else torch.zeros((), device=device)


def _combine(norms: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of the concatenation of groups with the given norms."""
    stacked = torch.stack([norm.to(norms[0].device) for norm in norms])
    return stacked.max() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def _scale_(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Multiply ``grads`` in place by ``min(1, max_norm / total)`` (DTensors through their local shard)."""
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        local = grad.to_local() if _is_dtensor(grad) else grad
        local.mul_(coefficient.to(device=local.device, dtype=local.dtype))


def _logit_count(owner: nn.Module) -> int:
    """Number of logits the output head's σ runs over (vocabulary size or number of labels): the output width of the
    head's last linear layer."""
    linears = [m for m in owner.modules() if hasattr(m, "out_features") and isinstance(m.out_features, int)]
    if not linears:
        raise ValueError(
            f"cannot tell the number of logits of the output head {type(owner).__name__}: it has no "
            "linear layer with `out_features`; use output_clip='separate' or 'global'"
        )
    return linears[-1].out_features


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    norm_type: float = 2.0,
    output_clip: str = "separate",
) -> torch.Tensor:
    """Clip gradients like ``torch.nn.utils.clip_grad_norm_``, with a remedy for output-layer MultiMax.

    The σ parameters of an output head get a gradient summed over every logit (the whole vocabulary); with large
    logits it dwarfs the rest, so under one global norm it shrinks every other update. ``output_clip``:

    * ``"separate"`` (default): clip the output-layer MultiMax parameters to ``max_norm`` in a group of their own and
      everything else in another; returns the norm of everything else.
    * ``"scaled"``: one global clip in which the output-layer MultiMax gradients count ``1/sqrt(V)`` (``V`` logits
      per position); returns that norm.
    * ``"global"``: one global clip over all parameters, as ``torch.nn.utils.clip_grad_norm_``; returns its norm.

    Works on the model as ``accelerator.prepare`` returns it: plain, DDP (gradients already averaged), FSDP2
    (DTensor gradients) and FSDP1 with ``use_orig_params=True`` (local shards: norms are all-reduced), so every
    process clips by the same factor. Without output-layer MultiMax all three modes are the global clip.
    """
    check_output_clip(output_clip)
    shard_group = _fsdp1_process_group(model)
    heads = [found for found in registry.parameter_modules(model) if found.role == "output"]
    output = set(output_multimax_parameter_names(model))
    params = dict(model.named_parameters())
    if (
        not output
        and any(getattr(m, OUTPUT_HOOK, None) is not None for m in model.modules())
        and any("_flat_param" in name for name in params)
    ):
        raise ValueError(
            "clip_grad_norm_ needs the output-layer MultiMax parameters by name, but this FSDP model flattens them "
            "(use_orig_params=False); set `fsdp_use_orig_params: true` in the Accelerate config "
            "(FullyShardedDataParallelPlugin(use_orig_params=True))"
        )
    device = next(iter(params.values())).device if params else torch.device("cpu")
    main = [p.grad for name, p in params.items() if p.grad is not None and name not in output]
    out_grads = [p.grad for name, p in params.items() if p.grad is not None and name in output]
    # Every rank runs the same collectives: whether a group exists depends on the names (identical everywhere), not
    # on which gradients happen to be local (FSDP1 can leave a rank without a piece of a group).
    main_norm = _group_norm(main, norm_type, shard_group, device)
    if not output:
        _scale_(main, max_norm, main_norm)
        return main_norm
    out_norm = _group_norm(out_grads, norm_type, shard_group, device)
    if output_clip == "separate":
        _scale_(out_grads, max_norm, out_norm)
        _scale_(main, max_norm, main_norm)
        return main_norm
    if output_clip == "scaled":
        width = max(_logit_count(model.get_submodule(found.owner_name)) for found in heads)
        out_norm = out_norm / math.sqrt(width)
    total = _combine([main_norm, out_norm], norm_type)
    _scale_(main + out_grads, max_norm, total)
    return total
