"""GPU path: FlexAttention with σ as ``score_mod``.

:func:`torch.nn.attention.flex_attention.flex_attention`, compiled, generates a fused Triton kernel (forward and
backward) from a score modification; σ, the score bias and the mask are expressed as one, and the gradients of the
captured ``ranges``/``ts`` (reductions over every score) come from FlexAttention's captured-buffer support. Causal
attention uses a block mask, so fully masked tiles are skipped; padding masks stay in the ``score_mod`` (masked
scores become ``-inf`` after σ, like the reference: a fully masked row gives zeros).

Dropout is not supported by FlexAttention: the dispatcher sends dropout to the blocked PyTorch path. A forward that
fails to compile falls back to that path with a warning (:mod:`.dispatch`); a backward that fails to compile raises
from ``backward()``, where PyTorch compiles it. On CPU, FlexAttention has no backward; there this module only serves
to check the ``score_mod`` against the reference.
"""

from __future__ import annotations

import functools

import torch

from ..functional import seglu_order
from ..masking import additive_mask

__all__ = [
    "flex_available",
    "flex_multimax_attention",
    "flex_softmax_attention",
    "seglu_score_mod",
    "FlexCompileError",
]

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _HAS_FLEX = True
except ImportError:  # torch < 2.5
    _HAS_FLEX = False

_BROKEN: list[str] = []


def flex_available() -> bool:
    """FlexAttention is importable, CUDA is present, and compiling it has not failed in this process."""
    return _HAS_FLEX and torch.cuda.is_available() and not _BROKEN


class FlexCompileError(RuntimeError):
    """The compiled FlexAttention kernel failed to compile (an error of Dynamo or Inductor); :func:`flex_available`
    is False from then on in this process. Other errors (out of memory, a failed launch) propagate as they are."""


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def seglu_score_mod(ranges: torch.Tensor, ts: torch.Tensor, bias=None, mask=None):
    """A FlexAttention ``score_mod``: ``σ(score + bias[b, h, q, k])`` then the mask (bool: ``where``, float: add).

    ``ranges``/``ts`` are (2N,) or (heads, 2N) float32; ``bias`` and ``mask`` are (B, H, Lq, Lk) views (broadcast
    dimensions with stride 0).
    """
    order = seglu_order(ranges, ts)
    per_head = ranges.dim() == 2

    def score_mod(score, b, h, q_idx, kv_idx):
        s = score if bias is None else score + bias[b, h, q_idx, kv_idx]
        z = s
        for n in range(1, order + 1):
            lo, hi = 2 * n - 2, 2 * n - 1
            r_lo, r_hi = (ranges[h, lo], ranges[h, hi]) if per_head else (ranges[lo], ranges[hi])
            t_lo, t_hi = (ts[h, lo], ts[h, hi]) if per_head else (ts[lo], ts[hi])
            below, above = torch.relu(r_lo - s), torch.relu(s - r_hi)
            if n > 1:
                below, above = below**n, above**n
            z = z + t_lo * below + t_hi * above
        if mask is not None:
            m = mask[b, h, q_idx, kv_idx]
            z = torch.where(m, z, float("-inf")) if mask.dtype == torch.bool else z + m
        return z

    return score_mod


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def _causal_block_mask(q_len: int, kv_len: int, device: torch.device):
    """Top-left aligned causal block mask (tiles above the diagonal are skipped), cached per shape."""
    return create_block_mask(_causal, None, None, q_len, kv_len, device=device)


def flex_multimax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ranges: torch.Tensor,
    ts: torch.Tensor,
    *,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    position_bias: torch.Tensor | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """MultiMax attention through FlexAttention; same contract as :func:`hf_multimax.kernels.multimax_attention`
    (without dropout). ``compile`` defaults to ``True`` on CUDA (the fused kernel) and ``False`` elsewhere."""
    if not _HAS_FLEX:
        raise RuntimeError("FlexAttention needs torch >= 2.5")
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    shape = (b, h, lq, lk)
    mask = None
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else additive_mask(attention_mask, torch.float32)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(shape)
    bias = None
    if position_bias is not None:
        bias = position_bias.float()
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(shape)
    score_mod = seglu_score_mod(ranges.float(), ts.float(), bias, mask)
    block_mask = _causal_block_mask(lq, lk, query.device) if is_causal else None
    compile = query.device.type == "cuda" if compile is None else compile
    if not compile:
        out = flex_attention(
            query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != h
        )
        return out.transpose(1, 2).contiguous()
    from torch._dynamo.exc import TorchDynamoException

    try:
        out = _compiled_flex()(
            query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != h
        )
    except TorchDynamoException as error:  # the compile stack (Dynamo, Inductor) failed
        _BROKEN.append(f"{type(error).__name__}: {error}")
        raise FlexCompileError(f"compiled FlexAttention failed: {type(error).__name__}: {error}") from error
    return out.transpose(1, 2).contiguous()


def flex_softmax_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float, is_causal: bool = False
) -> torch.Tensor:
    """Plain SoftMax attention through the same compiled FlexAttention and causal block mask as
    :func:`flex_multimax_attention`, without a ``score_mod``: what σ costs in FlexAttention is the difference (the GPU
    benchmark's baseline). Returns (batch, heads, q_len, v_dim), FlexAttention's layout."""
    if not _HAS_FLEX:
        raise RuntimeError("FlexAttention needs torch >= 2.5")
    block_mask = _causal_block_mask(query.shape[2], key.shape[2], query.device) if is_causal else None
    return _compiled_flex()(
        query, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
    )
