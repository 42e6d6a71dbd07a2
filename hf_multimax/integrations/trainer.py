"""``transformers.Trainer`` with MultiMax's training habits, opt-in: weight decay stays off MultiMax parameters (and
every registered attention implementation's, e.g. α-EntMax's α), and output-layer MultiMax is clipped as
:func:`hf_multimax.clip_grad_norm_` does (its σ gradient sums over the vocabulary and would dwarf the rest under one
global norm).

* :class:`MultiMaxTrainer` / :class:`MultiMaxSeq2SeqTrainer`: drop-in subclasses of ``Trainer`` / ``Seq2SeqTrainer``.
* :func:`patch_trainer` for code that cannot change its Trainer class (e.g. TRL's trainers): installs the same two
  methods on a class you name, undone by :func:`unpatch_trainer`.

``import hf_multimax`` changes no Trainer. A stock ``Trainer`` trains MultiMax models too; it just decays
``multimax_ts`` (Trainer decays every parameter that is not a bias or a norm) and clips output-layer MultiMax globally.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..training.clipping import OUTPUT_CLIP_MODES, check_output_clip, clip_grad_norm_, default_output_clip
from ..training.optim import multimax_parameter_names, output_multimax_parameter_names

__all__ = [
    "MultiMaxTrainerMixin",
    # Built on first access by the module's __getattr__, so that importing this module imports no Trainer code.
    "MultiMaxTrainer",  # noqa: F822
    "MultiMaxSeq2SeqTrainer",  # noqa: F822
    "patch_trainer",
    "unpatch_trainer",
    "TRAINER_METHODS",
    "check_trainer_compatibility",
]

#: The Trainer methods the mixin overrides, with the leading parameters it relies on (checked by
#: :func:`check_trainer_compatibility`; a Transformers release that changes them makes that check name the method).
TRAINER_METHODS = {"get_decay_parameter_names": ("self", "model"), "_clip_grad_norm": ("self", "model")}


class MultiMaxTrainerMixin:
    """The two Trainer methods MultiMax changes. ``multimax_output_clip`` (``"separate"``, ``"scaled"`` or
    ``"global"``; default :func:`hf_multimax.training.clipping.default_output_clip`) is how output-layer MultiMax is
    clipped (see :func:`hf_multimax.clip_grad_norm_`); Trainer's logged ``grad_norm`` is then the norm that function
    returns. Models without output-layer MultiMax, DeepSpeed, XLA, SageMaker model parallelism and mixed-mesh (tensor
    + data parallel) runs keep Trainer's own clipping."""

    multimax_output_clip: str | None = None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return _without_multimax(model, super().get_decay_parameter_names(model))

    def _clip_grad_norm(self, model: nn.Module):
        return _clip(self, model, super()._clip_grad_norm)


def _without_multimax(model: nn.Module, names: list[str]) -> list[str]:
    excluded = set(multimax_parameter_names(model))
    return [name for name in names if name not in excluded]


def _clip(trainer, model: nn.Module, trainer_clip):
    """Clip as :func:`clip_grad_norm_` does when the model has output-layer MultiMax, else ``trainer_clip(model)``."""
    from accelerate.utils import DistributedType

    mode = trainer.multimax_output_clip or default_output_clip()
    if (
        mode == "global"
        or trainer.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.XLA)
        or getattr(trainer.optimizer, "clip_master_grads", None) is not None  # SageMaker model parallelism
        or (hasattr(trainer, "_has_mixed_mesh_grads") and trainer._has_mixed_mesh_grads(model))  # TP + FSDP meshes
        or not output_multimax_parameter_names(model)
    ):
        return trainer_clip(model)
    trainer.accelerator.unscale_gradients()  # what accelerator.clip_grad_norm_ does first (fp16 loss scaling)
    return clip_grad_norm_(model, trainer.args.max_grad_norm, output_clip=mode)


def _init_with_output_clip(base: type):
    def __init__(self, *args: Any, multimax_output_clip: str | None = None, **kwargs: Any) -> None:
        if multimax_output_clip is not None:
            self.multimax_output_clip = check_output_clip(multimax_output_clip)
        base.__init__(self, *args, **kwargs)

    __init__.__doc__ = f"Arguments of ``{base.__name__}``, plus ``multimax_output_clip`` (one of {OUTPUT_CLIP_MODES})."
    return __init__


def _trainer_classes() -> tuple[type, type]:
    from transformers import Seq2SeqTrainer, Trainer

    return Trainer, Seq2SeqTrainer


def __getattr__(name: str):
    # The subclasses are built on first use: importing transformers.trainer costs seconds, and `import hf_multimax`
    # must not pay for it.
    if name in ("MultiMaxTrainer", "MultiMaxSeq2SeqTrainer"):
        trainer, seq2seq = _trainer_classes()
        base = trainer if name == "MultiMaxTrainer" else seq2seq
        cls = type(
            name,
            (MultiMaxTrainerMixin, base),
            {
                "__init__": _init_with_output_clip(base),
                "__doc__": f"``transformers.{base.__name__}`` with MultiMax's training habits (see "
                ":mod:`hf_multimax.integrations.trainer`); takes ``multimax_output_clip=`` besides "
                f"{base.__name__}'s arguments.",
                "__module__": __name__,
            },
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: trainer class -> {method name: what the class itself defined before (or _MISSING)}.
_PATCHED: dict[type, dict[str, Any]] = {}
_MISSING = object()


def patch_trainer(trainer_class: type | None = None, output_clip: str | None = None) -> type:
    """Give ``trainer_class`` (default ``transformers.Trainer``; also its subclasses, e.g. ``Seq2SeqTrainer`` or TRL's
    ``SFTTrainer``) MultiMax's weight-decay and clipping behaviour, in place; return it. ``output_clip`` sets its
    clipping mode. :func:`unpatch_trainer` undoes it. Prefer :class:`MultiMaxTrainer` where you choose the class."""
    if trainer_class is None:
        trainer_class = _trainer_classes()[0]
    problems = check_trainer_compatibility(trainer_class)
    if problems:
        raise RuntimeError("cannot patch " + trainer_class.__name__ + ": " + "; ".join(problems))
    if trainer_class in _PATCHED:
        if output_clip is not None:
            trainer_class.multimax_output_clip = check_output_clip(output_clip)
        return trainer_class
    saved = {name: trainer_class.__dict__.get(name, _MISSING) for name in (*TRAINER_METHODS, "multimax_output_clip")}
    originals = {name: getattr(trainer_class, name) for name in TRAINER_METHODS}

    def get_decay_parameter_names(self, model):
        return _without_multimax(model, originals["get_decay_parameter_names"](self, model))

    def _clip_grad_norm(self, model):
        return _clip(self, model, lambda m: originals["_clip_grad_norm"](self, m))

    trainer_class.get_decay_parameter_names = get_decay_parameter_names
    trainer_class._clip_grad_norm = _clip_grad_norm
    trainer_class.multimax_output_clip = check_output_clip(output_clip) if output_clip is not None else None
    _PATCHED[trainer_class] = saved
    return trainer_class


def unpatch_trainer(trainer_class: type | None = None) -> None:
    """Undo :func:`patch_trainer` on ``trainer_class`` (default ``transformers.Trainer``)."""
    if trainer_class is None:
        trainer_class = _trainer_classes()[0]
    saved = _PATCHED.pop(trainer_class, None)
    if saved is None:
        return
    for name, previous in saved.items():
        if previous is _MISSING:
            delattr(trainer_class, name)
        else:
            setattr(trainer_class, name, previous)


def check_trainer_compatibility(trainer_class: type | None = None) -> list[str]:
    """One message per overridden Trainer method that is missing or whose signature changed; empty when all fit."""
    if trainer_class is None:
        trainer_class = _trainer_classes()[0]
    problems = []
    for name, expected in TRAINER_METHODS.items():
        method = getattr(trainer_class, name, None)
        if method is None:
            problems.append(f"transformers.Trainer.{name} does not exist in this Transformers version")
            continue
        parameters = inspect.signature(inspect.unwrap(method)).parameters
        names = tuple(parameters)
        required_extra = [
            p
            for p in list(parameters.values())[len(expected) :]
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if names[: len(expected)] != expected or required_extra:  # the mixin calls them with exactly these
            problems.append(
                f"transformers.Trainer.{name} now takes ({', '.join(names)}); hf-multimax expects "
                f"({', '.join(expected)})"
            )
    return problems
