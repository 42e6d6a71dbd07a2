"""Training habits from upstream MultiMax: no weight decay on its parameters, and careful clipping of output-layer
MultiMax, whose parameter gradients grow like sqrt(vocabulary size)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch
from torch import nn

from .modules import SegLU

__all__ = [
    "multimax_parameter_names",
    "output_multimax_parameter_names",
    "multimax_parameter_groups",
    "clip_grad_norm_",
    "patch_trainer_weight_decay",
]

NO_DECAY_PATTERNS = ("bias", "norm", "layernorm", "rmsnorm")
#: The path PEFT's ``ModulesToSaveWrapper`` puts a SegLU under (``head.multimax.modules_to_save.default``): the SegLU's
#: owner is the module above the wrapper.
_PEFT_WRAPPER = re.compile(r"\.(modules_to_save\.[^.]+|original_module)$")


def _seglu_parameter_names(model: nn.Module, output: bool | None) -> list[str]:
    """Parameters of SegLUs (and, for ``output`` not True, of every other learnable attention-parameter module such as
    entmax-α's), filtered by whether they sit on the output head."""
    from .integration import parametric_module_types  # integration imports this module

    types = (SegLU,) if output else parametric_module_types()
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        owner_name = _PEFT_WRAPPER.sub("", module_name).rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        is_output = getattr(owner, "_multimax_hook", None) is not None
        if output is None or output == is_output:
            names += [f"{module_name}.{param_name}" for param_name, _ in module.named_parameters()]
    return names


def multimax_parameter_names(model: nn.Module) -> list[str]:
    """Names of every MultiMax parameter (attention layers and output head) in ``model``, and of the parameters of
    other learnable attention functions (e.g. ``entmax_alpha``): all of them stay out of weight decay."""
    return _seglu_parameter_names(model, None)


def output_multimax_parameter_names(model: nn.Module) -> list[str]:
    """Names of the output-layer MultiMax parameters only."""
    return _seglu_parameter_names(model, True)


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


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients like ``torch.nn.utils.clip_grad_norm_``, but clip output-layer MultiMax parameters in a group of
    their own: their gradient is a sum over the vocabulary and would otherwise dominate the global norm.

    Returns the total norm of the main group (everything except the output-layer MultiMax parameters).
    """
    output = set(output_multimax_parameter_names(model))
    main, separate = [], []
    for name, param in model.named_parameters():
        if param.grad is not None:
            (separate if name in output else main).append(param)
    if separate:
        torch.nn.utils.clip_grad_norm_(separate, max_norm, norm_type)
    return torch.nn.utils.clip_grad_norm_(main, max_norm, norm_type)


def patch_trainer_weight_decay() -> None:
    """Make ``transformers.Trainer`` (and ``Seq2SeqTrainer``) leave MultiMax parameters out of weight decay. By default
    Trainer decays every parameter whose name is not a bias or a norm, which includes ``multimax_ts``."""
    from transformers import Trainer

    original = Trainer.get_decay_parameter_names
    if getattr(original, "_multimax_patched", False):
        return

    @functools.wraps(original)
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        excluded = set(multimax_parameter_names(model))
        return [name for name in original(self, model) if name not in excluded]

    get_decay_parameter_names._multimax_patched = True
    Trainer.get_decay_parameter_names = get_decay_parameter_names
