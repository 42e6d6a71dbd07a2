"""hf-multimax: MultiMax attention (Zhou, Fritz & Keuper, ICML 2024) for Hugging Face Transformers.

``import hf_multimax`` registers ``attn_implementation="multimax"`` and ``"multimax_eager"`` with Transformers and
installs the model-lifecycle hooks ``from_pretrained`` needs (:mod:`hf_multimax.integrations.transformers`); they are
installed the moment Transformers' modeling code is imported (at once if it already is), so the import itself is free.
``hf_multimax.unregister()`` removes them. The paper's comparators (SparseMax, EntMax, Ev-SoftMax) are registered on
request: :func:`hf_multimax.register_comparators`. The public names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .integrations import transformers as _transformers_hooks

#: public name -> module that defines it under that name (imported on first access).
_PUBLIC = {
    "FLAG_DEFAULTS": "hf_multimax.config",
    "MultiMaxSettings": "hf_multimax.config",
    "multimax": "hf_multimax.functional",
    "seglu": "hf_multimax.functional",
    "SegLU": "hf_multimax.modeling",
    "multimax_modules": "hf_multimax.modeling",
    "MULTIMAX": "hf_multimax.registry",
    "ParametricAttention": "hf_multimax.registry",
    "attach_parameters": "hf_multimax.registry",
    "register_comparators": "hf_multimax.integrations.transformers",
    "MultiMaxWarning": "hf_multimax.integrations.transformers",
    "register": "hf_multimax.integrations.transformers",
    "unregister": "hf_multimax.integrations.transformers",
    "register_attention": "hf_multimax.integrations.transformers",
    "clip_grad_norm_": "hf_multimax.training",
    "multimax_parameter_groups": "hf_multimax.training",
    "MultiMaxTrainer": "hf_multimax.integrations.trainer",
    "MultiMaxSeq2SeqTrainer": "hf_multimax.integrations.trainer",
    "patch_trainer": "hf_multimax.integrations.trainer",
    "unpatch_trainer": "hf_multimax.integrations.trainer",
    "lora_modules_to_save": "hf_multimax.integrations.peft",
    "multimax_lora_config": "hf_multimax.integrations.peft",
}

__all__ = [
    "__version__",
    "FLAG_DEFAULTS",
    "MultiMaxSettings",
    "multimax",
    "seglu",
    "SegLU",
    "multimax_modules",
    "MULTIMAX",
    "ParametricAttention",
    "attach_parameters",
    "register_comparators",
    "MultiMaxWarning",
    "register",
    "unregister",
    "register_attention",
    "clip_grad_norm_",
    "multimax_parameter_groups",
    "MultiMaxTrainer",
    "MultiMaxSeq2SeqTrainer",
    "patch_trainer",
    "unpatch_trainer",
    "lora_modules_to_save",
    "multimax_lora_config",
]

if TYPE_CHECKING:
    from .config import FLAG_DEFAULTS, MultiMaxSettings
    from .functional import multimax, seglu
    from .integrations.peft import lora_modules_to_save, multimax_lora_config
    from .integrations.trainer import MultiMaxSeq2SeqTrainer, MultiMaxTrainer, patch_trainer, unpatch_trainer
    from .integrations.transformers import (
        MultiMaxWarning,
        register,
        register_attention,
        register_comparators,
        unregister,
    )
    from .modeling import SegLU, multimax_modules
    from .registry import MULTIMAX, ParametricAttention, attach_parameters
    from .training import clip_grad_norm_, multimax_parameter_groups


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_transformers_hooks.install_when_imported()
