"""What an attention mask means, decided once for every implementation of this package.

A mask comes as Transformers passes it to an attention function: boolean (True = attend, as ``sdpa_mask`` builds it),
float and additive (as ``eager_mask`` builds it, ``finfo(dtype).min`` or ``-inf`` where masked), or ``None`` with
causality left to the function (``module.is_causal``). The rules, shared by the reference, the fused kernels and the
comparators:

* a key is *masked* where a boolean mask is False or a float mask is at or below half its dtype's minimum (so
  Transformers' ``finfo.min`` and ``-inf`` mean the same); masked scores become ``-inf`` after σ;
* other float-mask values are added to ``σ(scores)``;
* a query row with no unmasked key gets all-zero weights (and zero gradients), never NaN and never the uniform average
  of the values: as SDPA does for boolean masks on current PyTorch, and so garbage in padded positions cannot leak into
  the output.
"""

from __future__ import annotations

import torch

__all__ = ["masked_threshold", "score_mask", "additive_mask", "safe_softmax"]


def masked_threshold(dtype: torch.dtype) -> float:
    """Float-mask values at or below this count as masked: half the dtype's minimum."""
    return torch.finfo(dtype).min / 2


def score_mask(
    attention_mask: torch.Tensor | None, causal: bool, q_len: int, kv_len: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(valid, bias)``: ``valid`` is True where a key may be attended (broadcastable to the scores, or ``None``: no
    mask); ``bias`` is the finite part of a float mask (0 at masked entries), or ``None``."""
    valid = bias = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            valid = attention_mask
        else:
            valid = attention_mask > masked_threshold(attention_mask.dtype)
            bias = torch.where(valid, attention_mask, torch.zeros((), dtype=attention_mask.dtype, device=device))
    if causal:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        valid = keep if valid is None else valid & keep
    return valid, bias


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float mask in ``dtype`` to add to ``σ(scores)``: 0 / ``-inf`` for a boolean mask; for a float mask its values,
    with the masked ones (see :func:`masked_threshold`) set to ``-inf``."""
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(
            attention_mask, zero, torch.full((), float("-inf"), dtype=dtype, device=attention_mask.device)
        )
    masked = attention_mask <= masked_threshold(attention_mask.dtype)
    return attention_mask.to(dtype).masked_fill(masked, float("-inf"))


def safe_softmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``softmax(z)`` with all-zero rows where every entry is ``-inf`` (instead of NaN)."""
    row_max = z.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max).detach()
    exp = torch.exp(z - row_max)
    total = exp.sum(dim=dim, keepdim=True)
    return exp / torch.where(total > 0, total, torch.ones_like(total))
