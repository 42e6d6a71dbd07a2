"""PEFT with learned attention parameters: what LoRA must train in full and save with the adapter.

A LoRA adapter trains low-rank updates of the targeted linear layers and nothing else; MultiMax's σ parameters (and
α-EntMax's α) are not linear layers, so they must be ``modules_to_save``: trained in full and written to
``adapter_model.safetensors``. :func:`lora_modules_to_save` derives that list from the registry
(:mod:`hf_multimax.registry`) and the model at hand, so every registered implementation's parameters are trained.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import registry

__all__ = ["lora_modules_to_save", "multimax_lora_config", "is_peft_model"]


def lora_modules_to_save(model: nn.Module) -> list[str]:
    """The child attributes that hold ``model``'s learned attention parameters (``["multimax"]``,
    ``["entmax_alpha"]``, ``["entmax_alpha", "multimax"]`` with an output-layer MultiMax...): pass them as
    ``LoraConfig(modules_to_save=...)`` (PEFT matches module names by suffix)."""
    return sorted({found.attribute for found in registry.parameter_modules(model)})


def multimax_lora_config(model: nn.Module, modules_to_save: list[str] | None = None, **lora_kwargs: Any):
    """A ``peft.LoraConfig`` whose ``modules_to_save`` hold ``model``'s learned attention parameters (plus
    ``modules_to_save``, e.g. a new classification head); other keyword arguments go to ``LoraConfig``."""
    from peft import LoraConfig

    modules = lora_modules_to_save(model)
    modules += [name for name in modules_to_save or () if name not in modules]
    return LoraConfig(modules_to_save=modules, **lora_kwargs)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing PEFT when it is not loaded)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)
