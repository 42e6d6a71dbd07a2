"""Optimizer parameter groups with upstream MultiMax's habit: no weight decay on its parameters (nor on the learned
parameters of any other registered attention implementation, e.g. α-EntMax's α), and the output layer's MultiMax
parameters in a group of their own so that clipping can treat them apart (:mod:`hf_multimax.training.clipping`)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .. import registry

__all__ = [
    "multimax_parameter_names",
    "output_multimax_parameter_names",
    "multimax_parameter_groups",
    "NO_DECAY_PATTERNS",
]

NO_DECAY_PATTERNS = ("bias", "norm", "layernorm", "rmsnorm")


def _parameter_names(model: nn.Module, role: str | None) -> list[str]:
    """Names of the parameters of every registered parameter module (SegLUs, α-EntMax's α...) with ``role``
    (``"attention"``, ``"output"``, or ``None`` for both)."""
    return [
        f"{found.name}.{param_name}"
        for found in registry.parameter_modules(model)
        if role is None or found.role == role
        for param_name, _ in found.module.named_parameters()
    ]


def multimax_parameter_names(model: nn.Module) -> list[str]:
    """Names of every MultiMax parameter (attention layers and output head) in ``model``, and of the parameters of
    other learnable attention functions (e.g. ``entmax_alpha``): all of them stay out of weight decay."""
    return _parameter_names(model, None)


def output_multimax_parameter_names(model: nn.Module) -> list[str]:
    """Names of the output-layer MultiMax parameters only."""
    return _parameter_names(model, "output")


def multimax_parameter_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    no_decay_patterns: Iterable[str] = NO_DECAY_PATTERNS,
    multimax_lr: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups with MultiMax parameters excluded from weight decay.

    Groups (empty ones dropped, only ``requires_grad`` parameters): ``"decay"`` (weight_decay), ``"no_decay"``
    (biases and norms), ``"multimax"`` (attention SegLU, no decay) and ``"multimax_output"`` (output-head SegLU, no
    decay, kept apart so :func:`clip_grad_norm_` can clip it on its own). ``multimax_lr`` sets a learning rate for the
    two MultiMax groups. Pass the result to any ``torch.optim`` optimizer.
    """
    output = set(output_multimax_parameter_names(model))
    attention = set(multimax_parameter_names(model)) - output
    patterns = tuple(p.lower() for p in no_decay_patterns)
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": weight_decay},
        "no_decay": {"params": [], "weight_decay": 0.0},
        "multimax": {"params": [], "weight_decay": 0.0},
        "multimax_output": {"params": [], "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in output:
            key = "multimax_output"
        elif name in attention:
            key = "multimax"
        elif any(p in name.lower() for p in patterns):
            key = "no_decay"
        else:
            key = "decay"
        groups[key]["params"].append(param)
    if multimax_lr is not None:
        groups["multimax"]["lr"] = groups["multimax_output"]["lr"] = multimax_lr
    return [dict(group, name=key) for key, group in groups.items() if group["params"]]
