"""MultiMax configuration flags: names, defaults and validation.

The flags live on the model's Transformers config (``config.multimax_order`` and friends) so that they are passed as
``from_pretrained`` keyword arguments, set before ``from_config`` and written to ``config.json``. They are validated
the moment they are set, so a wrong value fails before any weight is created or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MultiMaxSettings", "FLAG_DEFAULTS", "INIT_METHODS", "validate_flag"]

INIT_METHODS = ("identity", "paper")

#: Every flag with its default. ``multimax_output`` switches on output-layer MultiMax (independent of attention).
FLAG_DEFAULTS: dict[str, Any] = {
    "multimax_order": 2,
    "multimax_init": "identity",
    "multimax_per_head": False,
    "multimax_output": False,
}


def validate_flag(name: str, value: Any) -> Any:
    """Check one flag and return it; raise ``ValueError`` naming the flag, the value and what is allowed."""
    if name == "multimax_order":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`multimax_order` must be an int >= 1, got {value!r}")
    elif name == "multimax_init":
        if value not in INIT_METHODS:
            raise ValueError(f"`multimax_init` must be one of {INIT_METHODS}, got {value!r}")
    elif name in ("multimax_per_head", "multimax_output"):
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be a bool (True or False), got {value!r}")
    else:
        raise ValueError(f"unknown MultiMax flag {name!r}; known flags: {sorted(FLAG_DEFAULTS)}")
    return value


@dataclass(frozen=True)
class MultiMaxSettings:
    """The resolved MultiMax flags of one config.

    Attributes:
        order: SegLU order ``N`` (``2N`` ranges and ``2N`` slopes), ``>= 1``. The paper uses 2.
        init: ``"identity"`` (all slopes 0: MultiMax starts as SoftMax, right for fine-tuning) or ``"paper"``
            (trunc-normal, std 0.02, as the authors train from scratch).
        per_head: one parameter set per head instead of one per layer (the paper's choice).
        output: apply σ to the logits of the output head (LM, seq2seq-LM and classification heads).
    """

    order: int = FLAG_DEFAULTS["multimax_order"]
    init: str = FLAG_DEFAULTS["multimax_init"]
    per_head: bool = FLAG_DEFAULTS["multimax_per_head"]
    output: bool = FLAG_DEFAULTS["multimax_output"]

    def __post_init__(self) -> None:
        for name in FLAG_DEFAULTS:
            validate_flag(name, getattr(self, name.removeprefix("multimax_")))

    @classmethod
    def from_config(cls, config: Any) -> MultiMaxSettings:
        """Read the flags off a Transformers config (defaults for the ones it does not set)."""
        return cls(
            **{name.removeprefix("multimax_"): getattr(config, name, FLAG_DEFAULTS[name]) for name in FLAG_DEFAULTS}
        )

    def write_to(self, config: Any) -> None:
        """Store every flag on ``config`` explicitly, so that ``config.json`` records them."""
        for name in FLAG_DEFAULTS:
            setattr(config, name, getattr(self, name.removeprefix("multimax_")))


def flag_property(name: str) -> property:
    """A config property for one flag: validated on set, stored in the instance ``__dict__`` so that
    ``PreTrainedConfig.to_dict`` serialises it, and defaulted on read."""

    def fget(self: Any) -> Any:
        return self.__dict__.get(name, FLAG_DEFAULTS[name])

    def fset(self: Any, value: Any) -> None:
        self.__dict__[name] = validate_flag(name, value)

    return property(fget, fset, doc=f"MultiMax flag (default {FLAG_DEFAULTS[name]!r}); see `hf_multimax.config`.")
