"""Output-layer MultiMax + cross-entropy without the logits wall.

With ``config.multimax_output=True`` the LM head's logits go through σ (``lm_head.multimax``) before the loss. The plain
path materialises (batch·seq, vocab) float32 logits, σ of them, and everything autograd saves for σ's and the
loss's backward: several copies of the largest tensor in the model. :func:`fused_linear_seglu_cross_entropy` computes
the same loss chunk by chunk of rows (like Liger-Kernel's fused linear cross-entropy) and the gradients at the same
time: per chunk, logits -> σ -> log-sum-exp -> loss, and ``dS = (softmax(σ(s)) - onehot)·σ'(s)`` straight into
``grad_hidden`` and ``grad_weight``; σ's parameter gradients are reduced per chunk. On CPU the element-wise part is
one fused, in-place C++ pass per row (:func:`hf_multimax.kernels.cpu.seglu_cross_entropy_`); elsewhere it runs as
PyTorch operators on the chunk (:mod:`hf_multimax.kernels.cross_entropy`). Peak memory is one chunk of logits instead of a handful of full ones.

Opt in per training step with :func:`causal_lm_loss` (it runs the base model and this loss instead of
``model(..., labels=...)``); nothing is patched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .functional import seglu, seglu_order, seglu_parameter_grads
from .kernels import cross_entropy_kernel
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
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)  # fmt: skip


class _FusedLinearSegLUCrossEntropy(torch.autograd.Function):
    """Loss and all gradients in one chunked forward; the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ranges, ts, labels, ignore_index, chunk_size, reduction, backend):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        valid = labels != ignore_index
        n_valid = int(valid.sum())
        grad_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_params = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        need_grad = need_hidden or need_weight or need_bias or need_params
        if valid.any():
            bad = labels[valid]
            if int(bad.min()) < 0 or int(bad.max()) >= vocab:
                raise IndexError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        kernel = cross_entropy_kernel(backend, hidden.device, hidden.dtype, seglu_order(ranges, ts))
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        sums = torch.zeros(4 * seglu_order(ranges, ts), dtype=torch.float64, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=compute_dtype, device=weight.device) if need_bias else None
        for start in range(0, n_rows, chunk_size):
            h = hidden[start : start + chunk_size]
            # The head in the model's dtype, then float32 like the hook (float64 stays: gradcheck).
            logits = F.linear(h, weight, bias).to(compute_dtype)
            loss, chunk_sums = kernel(logits, labels[start : start + chunk_size], ranges, ts, ignore_index, grad_scale,
                                      need_grad)  # fmt: skip
            total += loss.sum(dtype=torch.float64)
            sums += chunk_sums
            if not need_grad:
                continue
            ds = logits  # overwritten in place by d(loss)/d(logits)
            ds_model = ds.to(weight.dtype)
            if need_hidden:
                grad_hidden[start : start + chunk_size] = ds_model @ weight
            if need_weight:
                if weight.dtype == compute_dtype:
                    grad_weight.addmm_(ds.t(), h)
                else:
                    grad_weight += (ds_model.t() @ h).to(compute_dtype)
            if need_bias:
                grad_bias += ds.sum(0)
            del logits, ds, ds_model
        loss = (total / n_valid if reduction == "mean" else total).to(compute_dtype)
        if need_params:
            grad_ranges, grad_ts = seglu_parameter_grads(sums, ts)
        else:
            grad_ranges = grad_ts = None
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
            grad_ranges.to(ranges.dtype) if grad_ranges is not None else None,
            grad_ts.to(ts.dtype) if grad_ts is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None)


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
    return _FusedLinearSegLUCrossEntropy.apply(
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
            f"{type(model).__name__} has no output-layer MultiMax (an nn.Linear LM head with `.multimax`): build it with "
            "multimax_output=True"
        )
    hidden = model.base_model(**model_inputs)[0]
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return fused_linear_seglu_cross_entropy(
        hidden, head.weight, head.bias, modulator.multimax_ranges, modulator.multimax_ts, shifted.to(hidden.device),
        ignore_index=ignore_index, chunk_size=chunk_size,
    )  # fmt: skip
