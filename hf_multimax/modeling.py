"""Modules and module trees: ``SegLU`` (one attention layer's, or one output head's, MultiMax parameters) and the
helpers that find attention modules, output heads and head counts in a Transformers model.

Nothing here imports ``transformers.modeling_utils`` at module level (only inside functions): this module is imported
while hf-multimax installs its hooks, which may happen as ``transformers.modeling_utils`` finishes importing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import initialization as init

from .config import INIT_METHODS, validate_flag
from .functional import seglu

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

__all__ = [
    "SegLU",
    "multimax_modules",
    "routes_through_interface",
    "governed_modules",
    "head_count",
    "placement",
    "output_head",
    "OUTPUT_HOOK",
    "SEGLU_ATTRIBUTE",
]

#: The child attribute that holds a SegLU on an attention module or an output head (``self_attn.multimax``).
SEGLU_ATTRIBUTE = "multimax"
#: Names of the attributes that may hold an attention module's number of (query) heads.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")
#: Attributes that hold a classification head on ``*ForSequenceClassification`` / ``*ForImageClassification``.
CLASSIFIER_ATTRIBUTES = ("score", "classifier", "classification_head")
#: Attribute of an output head that holds the forward hook applying σ to its logits: the marker of an output head
#: with MultiMax (its SegLU is the output layer's, not an attention layer's).
OUTPUT_HOOK = "_multimax_hook"


class SegLU(nn.Module):
    """The learnable modulator σ of MultiMax, with parameters ``multimax_ranges`` and ``multimax_ts``.

    Args:
        order: SegLU order ``N``; both parameters have ``2N`` entries.
        num_heads: ``None`` for one set shared by all heads (shape ``(2N,)``, the paper's layout) or the number of
            heads for one set per head (shape ``(num_heads, 2N)``).
        init_method: ``"identity"`` (every entry 0, σ is the identity) or ``"paper"`` (trunc-normal, std 0.02, cut at
            ±2 as upstream and timm).
        device, dtype: where and how to create the parameters.
    """

    PARAMETER_NAMES = ("multimax_ranges", "multimax_ts")

    def __init__(
        self,
        order: int = 2,
        num_heads: int | None = None,
        init_method: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        validate_flag("multimax_order", order)
        validate_flag("multimax_init", init_method)
        self.order = order
        self.num_heads = num_heads
        self.init_method = init_method
        shape = (2 * order,) if num_heads is None else (num_heads, 2 * order)
        self.multimax_ranges = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.multimax_ts = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if self.multimax_ranges.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the parameters per ``init_method``; tensors already loaded from a checkpoint are kept
        (``transformers.initialization`` skips tensors flagged ``_is_hf_initialized``)."""
        for param in (self.multimax_ranges, self.multimax_ts):
            if self.init_method == "identity":
                init.zeros_(param)
            elif self.init_method == "paper":
                init.trunc_normal_(param, std=0.02)
            else:  # unreachable: validated in __init__
                raise ValueError(f"`multimax_init` must be one of {INIT_METHODS}, got {self.init_method!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """σ(x), computed in the dtype of ``x`` (parameters are cast to it)."""
        return seglu(x, self.multimax_ranges.to(x.dtype), self.multimax_ts.to(x.dtype))

    def extra_repr(self) -> str:
        heads = "shared" if self.num_heads is None else f"per_head={self.num_heads}"
        return f"order={self.order}, {heads}, init={self.init_method!r}"


def multimax_modules(model: nn.Module) -> dict[str, SegLU]:
    """Every SegLU in ``model`` by module name (attention layers and output head)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SegLU)}


def _is_pretrained_model(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


@functools.cache
def routes_through_interface(cls: type) -> bool:
    """Whether a module class dispatches its attention through Transformers' ``ALL_ATTENTION_FUNCTIONS``: some
    ``forward`` in its class hierarchy (past decorators such as ``deprecate_kwarg``) reads that global, looked up in
    the compiled code, so installs without source files work too. Models themselves never qualify."""
    import inspect

    from transformers import PreTrainedModel

    if issubclass(cls, PreTrainedModel):
        return False
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        forward = klass.__dict__.get("forward")
        code = getattr(inspect.unwrap(forward), "__code__", None) if forward is not None else None
        if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
            return True
    return False


def governed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, PreTrainedConfig]]:
    """Yield ``(name, module, config)`` for every module, with the config that selects its attention: the module's
    own ``config`` if it has one, else that of the nearest enclosing ``PreTrainedModel``."""
    from transformers import PreTrainedConfig

    stack: list[tuple[str, nn.Module, PreTrainedConfig]] = [("", model, model.config)]
    while stack:
        name, module, config = stack.pop()
        if _is_pretrained_model(module):
            config = module.config
        own = getattr(module, "config", None)
        yield name, module, own if isinstance(own, PreTrainedConfig) else config
        for child_name, child in reversed(list(module.named_children())):
            stack.append((f"{name}.{child_name}" if name else child_name, child, config))


def head_count(module: nn.Module, config: PreTrainedConfig) -> int:
    """The number of (query) heads of an attention module (its own attribute, else the config's)."""
    for attribute in HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "num_attention_heads", None)
    if isinstance(value, int) and value > 0:
        return value
    raise ValueError(
        f"the number of heads of {type(module).__name__} is needed (per-head parameters), but it has none of the "
        f"attributes {HEAD_COUNT_ATTRIBUTES} and its config has no `num_attention_heads`"
    )


def placement(owner: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` keyword arguments for parameters that join ``owner`` (its first parameter's; the meta
    device inside ``from_pretrained``)."""
    reference = next(owner.parameters(recurse=True), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    return {"device": device, "dtype": dtype}


def output_head(model: PreTrainedModel) -> nn.Module | None:
    """The module whose output is the model's logits: the LM head, or a classification head (None for base models)."""
    head = model.get_output_embeddings()
    if isinstance(head, nn.Module):
        return head
    for attribute in CLASSIFIER_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module):
            return head
    return None
