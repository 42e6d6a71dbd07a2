"""MultiMax attention functions that Transformers' ``AttentionInterface`` calls.

It follows the standard backend signature ``(module, query, key, value, attention_mask, scaling, dropout, **kwargs)``
and reads the layer's MultiMax parameters off ``module.multimax`` (a :class:`~hf_multimax.modeling.SegLU`).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import multimax_attention
from .masking import additive_mask, safe_softmax
from .modeling import SEGLU_ATTRIBUTE

__all__ = ["multimax_attention_forward", "multimax_eager_attention_forward", "get_modulator", "UNSUPPORTED_KWARGS"]

#: Extras some models pass to attention backends that change the score function; MultiMax refuses them loudly
#: rather than silently ignoring them (soft-capping: Gemma 2/3, attention sinks: GPT-OSS).
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


def get_modulator(module: nn.Module):
    """Return the SegLU attached to an attention module, or explain how to get one."""
    modulator = getattr(module, SEGLU_ATTRIBUTE, None)
    if modulator is None:
        raise RuntimeError(
            f"{type(module).__name__} has no MultiMax parameters. Select MultiMax through Transformers so that they "
            "are "
            'created: `from_pretrained(..., attn_implementation="multimax")`, `from_config(config, '
            'attn_implementation="multimax")` or `model.set_attn_implementation("multimax")` (after `import '
            "hf_multimax`), rather than setting `config._attn_implementation` by hand."
        )
    return modulator


def check_extras(kwargs: dict, implementation: str = "multimax") -> None:
    """Refuse the score-changing extras in ``UNSUPPORTED_KWARGS``, naming the implementation."""
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"attn_implementation={implementation!r} does not support `{name}` (passed by this model's attention "
                'layer); use attn_implementation="eager" or "sdpa" for this model.'
            )


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), heads of one group adjacent."""
    if n_rep == 1:
        return hidden
    b, h, s, d = hidden.shape
    return hidden[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def resolve_causal(module: nn.Module, attention_mask: torch.Tensor | None, is_causal: bool | None, q_len: int) -> bool:
    """Whether a causal mask must be built here: Transformers' ``sdpa_mask`` returns ``None`` for a purely causal
    mask and leaves causality to the backend (as ``sdpa_attention_forward`` does), top-left aligned."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    return bool(attention_mask is None and is_causal and q_len > 1)


def apply_mask(z: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Mask ``σ(scores)`` as :mod:`hf_multimax.masking` defines: masked keys (boolean False, float at or below half
    the dtype minimum, above the diagonal when ``causal``) become ``-inf``, other float-mask values are added."""
    if causal:
        q_len, kv_len = z.shape[-2:]
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~keep, float("-inf"))
    if attention_mask is None:
        return z
    return z + additive_mask(attention_mask, z.dtype)


def dense_scores(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    position_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The full score matrix of the plain (non-fused) paths. Returns ``(scores, value, causal)``: ``Q·Kᵀ·scale +
    position_bias`` in at least float32 (as eager's softmax), ``value`` with its key/value heads repeated for GQA, and
    whether a causal mask must be built here."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = resolve_causal(module, attention_mask, is_causal, query.shape[2])
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if position_bias is not None:
        scores = scores + position_bias.to(scores.dtype)
    return scores, value, causal


def multimax_eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MultiMax attention (``"multimax_eager"``), the plain path every fast path is checked against:
    ``softmax(σ(Q·Kᵀ·scale + position_bias) + mask) · V``.

    σ sees the scaled scores plus any learned score bias (T5's ``position_bias``) and runs before the mask, because σ
    of a dtype-minimum mask value overflows. σ and SoftMax run in float32, as Transformers' eager path does. A query
    row with no key to attend gets zero weights (see :mod:`hf_multimax.masking`).
    Returns ``(attn_output (batch, q, heads, dim), attn_weights (batch, heads, q, k))``.
    """
    check_extras(kwargs)
    modulator = get_modulator(module)
    scores, value, causal = dense_scores(module, query, key, value, attention_mask, scaling, is_causal, position_bias)
    scores = apply_mask(modulator(scores), attention_mask, causal)
    weights = safe_softmax(scores, dim=-1).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def wants_attention_weights(module: nn.Module, kwargs: dict) -> bool:
    """Whether the caller asked for attention weights (``output_attentions``), which only the reference returns."""
    requested = kwargs.get("output_attentions")
    if requested is None:
        requested = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(requested)


def multimax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused MultiMax attention (``"multimax"``): the same function as :func:`multimax_eager_attention_forward`
    without ever materialising the (batch, heads, q, k) scores.

    Runs :func:`hf_multimax.kernels.multimax_attention` (fused C++ kernel on CPU, the Triton kernel on CUDA, blocked
    PyTorch otherwise), which keeps one log-sum-exp per query row and recomputes scores in the backward. GQA runs
    without repeating keys and values; purely causal attention skips the fully masked key tiles. When attention
    weights are requested (``output_attentions``) it defers to the reference, the only path that has them.
    Returns ``(attn_output (batch, q, heads, dim), None)``.
    """
    check_extras(kwargs)
    if wants_attention_weights(module, kwargs):
        return multimax_eager_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )
    modulator = get_modulator(module)
    n_rep = getattr(module, "num_key_value_groups", 1)
    if key.shape[1] * n_rep != query.shape[1]:
        raise ValueError(
            f"{type(module).__name__}.num_key_value_groups = {n_rep} but the query has {query.shape[1]} heads and the "
            f"key {key.shape[1]}"
        )
    causal = resolve_causal(module, attention_mask, is_causal, query.shape[2])
    out = multimax_attention(
        query,
        key,
        value,
        modulator.multimax_ranges,
        modulator.multimax_ts,
        scale=query.shape[-1] ** -0.5 if scaling is None else scaling,
        attention_mask=attention_mask,
        is_causal=causal,
        position_bias=position_bias,
        dropout_p=dropout if module.training else 0.0,
    )
    return out, None
