"""Output-layer MultiMax + cross-entropy without the logits wall.

With ``config.multimax_output=True`` the LM head's logits go through σ (``lm_head.multimax``) before the loss. The plain
path materialises (batch·seq, vocab) float32 logits, σ of them, and everything autograd saves for σ's and the
loss's backward: several copies of the largest tensor in the model. :func:`fused_linear_seglu_cross_entropy` computes
the same loss chunk by chunk of rows (like Liger-Kernel's fused linear cross-entropy) and the gradients at the same
time: per chunk, logits -> σ -> log-sum-exp -> loss, and ``dS = (softmax(σ(s)) - onehot)·σ'(s)`` straight into
``grad_hidden`` and ``grad_weight``; σ's parameter gradients are reduced per chunk. On CPU the element-wise part is
one fused, in-place C++ pass per row (:func:`hf_multimax.kernels.cpu.seglu_cross_entropy_`); elsewhere it runs as
PyTorch operators on the chunk (:mod:`hf_multimax.kernels.cross_entropy`). Peak memory is one chunk of logits instead
of a handful of full ones. The whole computation is one PyTorch operator, ``hf_multimax::linear_seglu_cross_entropy``
(:mod:`hf_multimax.kernels.ops`), so ``torch.compile`` sees it as one node.

Opt in per training step with :func:`causal_lm_loss` (it runs the base model and this loss instead of
``model(..., labels=...)``); nothing is patched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .functional import seglu
from .kernels import linear_seglu_cross_entropy
from .modeling import SEGLU_ATTRIBUTE

__all__ = ["fused_linear_seglu_cross_entropy", "unfused_linear_seglu_cross_entropy", "causal_lm_loss"]

#: Default chunk: rows × vocab ≈ this many float32 logits (16 MiB).
CHUNK_ELEMENTS = 1 << 22


def unfused_linear_seglu_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ranges: torch.Tensor,
    ts: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The path a ``multimax_output`` model takes (the reference): LM head, σ in float32 (the head's forward hook)
    cast back to the logits' dtype, then Transformers' float32 cross-entropy. Materialises every logit."""
    logits = F.linear(hidden, weight, bias)
    logits = seglu(logits.float(), ranges.to(torch.float32), ts.to(torch.float32)).to(logits.dtype)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )


def fused_linear_seglu_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ranges: torch.Tensor,
    ts: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """``cross_entropy(σ(hidden·Wᵀ + b), labels)`` without materialising the logits; same value and gradients (for
    ``hidden``, ``weight``, ``bias``, ``ranges``, ``ts``) as :func:`unfused_linear_seglu_cross_entropy`.

    Args:
        hidden: (..., hidden_size), e.g. the base model's last hidden state.
        weight, bias: the LM head's (vocab, hidden_size) weight and optional (vocab,) bias.
        ranges, ts: the head's SegLU parameters (``lm_head.multimax``), shape (2N,).
        labels: (...,) class indices, already aligned with ``hidden`` (shift them for causal LM, see
            :func:`causal_lm_loss`); ``ignore_index`` entries do not count.
        chunk_size: rows per chunk; default ``2**22 // vocab`` (16 MiB of float32 logits).
        reduction: ``"mean"`` over non-ignored labels (Transformers' default) or ``"sum"``.
        backend: ``"cpu"`` (fused C++ pass), ``"torch"`` or ``None`` (``"cpu"`` on CPU when it builds).

    All-ignored labels give ``nan`` for ``"mean"``, like ``F.cross_entropy``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if ranges.dim() != 1:
        raise ValueError(f"output-layer SegLU parameters are shared, shape (2N,); got {tuple(ranges.shape)}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    if labels1d.shape[0] != hidden2d.shape[0]:
        raise ValueError(f"{labels1d.shape[0]} labels for {hidden2d.shape[0]} rows of hidden states")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return linear_seglu_cross_entropy(
        hidden2d, weight, bias, ranges, ts, labels1d, ignore_index, int(chunk_size), reduction, backend
    )


def causal_lm_loss(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    **model_inputs,
) -> torch.Tensor:
    """``model(**model_inputs, labels=labels).loss`` of a causal LM with ``multimax_output=True``, without the logits.

    Runs ``model.base_model`` (embeddings, layers, final norm) and the fused head loss, with Transformers' label shift
    (position ``i`` predicts ``labels[i + 1]``) and mean over non-ignored labels. For models whose logits are exactly
    ``lm_head(hidden_states)`` (Llama, Mistral, Qwen2, GPT-2, ...); not for heads that rescale or soft-cap logits.
    """
    head = model.get_output_embeddings()
    modulator = getattr(head, SEGLU_ATTRIBUTE, None)
    if not isinstance(head, nn.Linear) or modulator is None:
        raise ValueError(
            f"{type(model).__name__} has no output-layer MultiMax (an nn.Linear LM head with `.multimax`): build it "
            "with multimax_output=True"
        )
    hidden = model.base_model(**model_inputs)[0]
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fused_linear_seglu_cross_entropy(
        hidden,
        head.weight,
        head.bias,
        modulator.multimax_ranges,
        modulator.multimax_ts,
        shifted.to(hidden.device),
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
