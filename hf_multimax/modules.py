"""``SegLU``: the module that holds one attention layer's (or one output head's) MultiMax parameters."""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .config import INIT_METHODS, validate_flag
from .functional import seglu

__all__ = ["SegLU"]


class SegLU(nn.Module):
    """The learnable modulator σ of MultiMax, with parameters ``multimax_ranges`` and ``multimax_ts``.

    Args:
        order: SegLU order ``N``; both parameters have ``2N`` entries.
        num_heads: ``None`` for one set shared by all heads (shape ``(2N,)``, the paper's layout) or the number of
            heads for one set per head (shape ``(num_heads, 2N)``).
        init_method: ``"identity"`` (every entry 0, σ is the identity) or ``"paper"`` (trunc-normal, std 0.02, cut at ±2 as upstream and timm).
        device, dtype: where and how to create the parameters.
    """

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
