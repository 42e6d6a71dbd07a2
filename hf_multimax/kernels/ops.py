"""MultiMax's fused kernels as PyTorch operators (``torch.library``), so ``torch.compile`` and ``torch.export`` see them
whole: one node each, with fake (meta) implementations that give the exact output shapes, dtypes and strides, and
their backward registered through ``register_autograd``.

* ``hf_multimax::attention`` (forward) and ``hf_multimax::attention_backward``: memory-efficient MultiMax attention.
  The forward returns the output and each query row's statistics (maximum, log-sum of exponentials) that the backward
  needs to recompute the probabilities tile by tile.
* ``hf_multimax::linear_seglu_cross_entropy``: the output layer's σ + cross-entropy over chunks of rows, which
  returns the loss and the gradients it computes on the way (the backward scales them).

The operators' implementations run the kernel :mod:`hf_multimax.kernels.dispatch` picks, at run time:
building the C++ kernel, its lock and its ctypes structures stay out of any traced region. The Python functions users
call (:func:`multimax_attention`, :func:`linear_seglu_cross_entropy`) are thin and traceable: they check their inputs
from shapes and dtypes only, and draw the dropout seed as a tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .problem import check_inputs, parameter_grads

__all__ = ["multimax_attention", "linear_seglu_cross_entropy", "OPS"]

NAMESPACE = "hf_multimax"


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _build(query, key, value, ranges, ts, bias, mask, seed, scale, causal, dropout_p) -> dict:
    """The keyword arguments of :meth:`AttentionProblem.build` for one call."""
    return dict(
        q=query,
        k=key,
        v=value,
        ranges=ranges,
        ts=ts,
        scale=scale,
        mask=mask,
        causal=causal,
        bias=bias,
        dropout_p=dropout_p,
        seed=int(seed.item()),
    )


# ---------------------------------------------------------------------------------------------------------------------
# hf_multimax::attention


@torch.library.custom_op(f"{NAMESPACE}::attention", mutates_args=())
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    ranges: Tensor,
    ts: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    seed: Tensor,
    scale: float,
    causal: bool,
    dropout_p: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """``(out (B, Lq, H, Dv), stats (2, B, H, Lq))`` in the compute dtype (float32; float64 for float64 inputs)."""
    out, stats = dispatch.run_forward(
        backend, _build(query, key, value, ranges, ts, bias, mask, seed, scale, causal, dropout_p)
    )
    return out.contiguous(), stats.contiguous()


@attention.register_fake
def _(query, key, value, ranges, ts, bias, mask, seed, scale, causal, dropout_p, backend):
    b, h, lq, _ = query.shape
    dtype = _compute_dtype(query)
    return (query.new_empty((b, lq, h, value.shape[-1]), dtype=dtype), query.new_empty((2, b, h, lq), dtype=dtype))


@torch.library.custom_op(f"{NAMESPACE}::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    ranges: Tensor,
    ts: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    seed: Tensor,
    out: Tensor,
    stats: Tensor,
    scale: float,
    causal: bool,
    dropout_p: float,
    need_bias_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(d query, d key, d value, d ranges, d ts, d bias)`` in the inputs' dtypes and shapes (contiguous); ``d bias``
    is empty when it is not needed."""
    build = _build(query, key, value, ranges, ts, bias, mask, seed, scale, causal, dropout_p)
    problem, (dq, dk, dv, sums, dbias) = dispatch.run_backward(
        backend, build, out, stats, grad_out, need_bias_grad and bias is not None
    )
    d_ranges, d_ts = parameter_grads(problem, sums, ranges.dtype)
    d_bias = problem.reduce_bias_grad(dbias).to(bias.dtype).contiguous() if dbias is not None else query.new_empty(0)
    return (
        dq.to(query.dtype).contiguous(),
        dk.to(key.dtype).contiguous(),
        dv.to(value.dtype).contiguous(),
        d_ranges.to(ranges.dtype).contiguous(),
        d_ts.to(ts.dtype).contiguous(),
        d_bias,
    )


@attention_backward.register_fake
def _(
    grad_out,
    query,
    key,
    value,
    ranges,
    ts,
    bias,
    mask,
    seed,
    out,
    stats,
    scale,
    causal,
    dropout_p,
    need_bias_grad,
    backend,
):
    def like(x: Tensor) -> Tensor:
        return x.new_empty(x.shape)

    d_bias = like(bias) if need_bias_grad and bias is not None else query.new_empty(0)
    return like(query), like(key), like(value), like(ranges), like(ts), d_bias


def _attention_setup(ctx, inputs, output) -> None:
    query, key, value, ranges, ts, bias, mask, seed, scale, causal, dropout_p, backend = inputs
    out, stats = output
    ctx.save_for_backward(query, key, value, ranges, ts, bias, mask, seed, out, stats)
    ctx.options = (scale, causal, dropout_p, backend)


def _attention_grad(ctx, grad_out, grad_stats):
    query, key, value, ranges, ts, bias, mask, seed, out, stats = ctx.saved_tensors
    scale, causal, dropout_p, backend = ctx.options
    need_bias_grad = bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, d_ranges, d_ts, d_bias = attention_backward(
        grad_out.contiguous(),
        query,
        key,
        value,
        ranges,
        ts,
        bias,
        mask,
        seed,
        out,
        stats,
        scale,
        causal,
        dropout_p,
        need_bias_grad,
        backend,
    )
    return dq, dk, dv, d_ranges, d_ts, (d_bias if need_bias_grad else None), None, None, None, None, None, None


attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def multimax_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    ranges: Tensor,
    ts: Tensor,
    *,
    scale: float | None = None,
    attention_mask: Tensor | None = None,
    is_causal: bool = False,
    position_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """Memory-efficient MultiMax attention: ``softmax(σ(scale·Q·Kᵀ + position_bias) + mask)·V``.

    Args:
        query: (batch, heads, q_len, head_dim); float16, bfloat16, float32 or float64.
        key, value: (batch, kv_heads, kv_len, head_dim / v_dim), ``heads % kv_heads == 0`` (GQA without copies).
        ranges, ts: SegLU parameters, (2N,) shared or (heads, 2N) per head; gradients are exact.
        scale: score scale, default ``head_dim ** -0.5``.
        attention_mask: bool (True = attend) or float (added after σ; values at or below half the dtype minimum
            mean masked), broadcastable to (batch, heads, q_len, kv_len). A row with no key to attend gives zeros
            (see :mod:`hf_multimax.masking`).
        is_causal: top-left aligned causal mask (query ``i`` sees keys ``j <= i``); fully masked key tiles are skipped.
        position_bias: float score bias added before σ (T5), broadcastable to (batch, heads, q_len, kv_len); it gets
            a gradient when it requires one.
        dropout_p: dropout on the attention probabilities (reproducible under ``torch.manual_seed``).
        backend: ``"cpu"``, ``"triton"``, ``"flex"``, ``"torch"`` or ``None`` (automatic, see
            :mod:`hf_multimax.kernels.dispatch`).

    Returns:
        (batch, q_len, heads, v_dim) in the dtype of ``query``: the layout attention modules reshape from.

    Raises:
        TypeError / ValueError: inputs of a dtype, shape or device the kernels do not take, naming the argument.
    """
    check_inputs(query, key, value, ranges, ts, mask=attention_mask, bias=position_bias, dropout_p=dropout_p)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    requested = dispatch.requested_backend(backend)

    def through_operator() -> Tensor:
        seed = (
            torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
        )
        out, _ = attention(
            query,
            key,
            value,
            ranges,
            ts,
            position_bias,
            attention_mask,
            seed,
            float(scale),
            bool(is_causal),
            float(dropout_p),
            "torch" if requested == "flex" else requested or "auto",
        )
        return out.to(query.dtype)

    if not dispatch.uses_flex(query, dropout_p, requested):
        return through_operator()
    from . import flex

    return dispatch.with_flex_fallback(
        lambda: flex.flex_multimax_attention(
            query,
            key,
            value,
            ranges,
            ts,
            scale=scale,
            attention_mask=attention_mask,
            is_causal=is_causal,
            position_bias=position_bias,
        ),
        through_operator,
    )


# ---------------------------------------------------------------------------------------------------------------------
# hf_multimax::linear_seglu_cross_entropy


@torch.library.custom_op(f"{NAMESPACE}::linear_seglu_cross_entropy", mutates_args=())
def linear_seglu_cross_entropy_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ranges: Tensor,
    ts: Tensor,
    labels: Tensor,
    ignore_index: int,
    chunk_size: int,
    mean: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    need_params: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss (), d hidden, d weight, d bias, d ranges, d ts)``: ``cross_entropy(σ(hidden·Wᵀ + b), labels)`` (mean over
    non-ignored labels, or sum) and the gradients of that loss that are asked for (empty tensors otherwise), chunk by
    chunk of ``chunk_size`` rows: the (rows, vocab) logits are never all in memory."""
    from ..functional import seglu_order, seglu_parameter_grads

    n_rows, vocab = hidden.shape[0], weight.shape[0]
    valid = labels != ignore_index
    n_valid = int(valid.sum())
    if n_valid:
        kept = labels[valid]
        if int(kept.min()) < 0 or int(kept.max()) >= vocab:
            raise IndexError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    grad_scale = 1.0 / max(n_valid, 1) if mean else 1.0
    need_grad = need_hidden or need_weight or need_bias or need_params
    compute_dtype = _compute_dtype(hidden)
    order = seglu_order(ranges, ts)
    kernel = dispatch.cross_entropy_kernel(None if backend == "auto" else backend, hidden.device, hidden.dtype, order)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    sums = torch.zeros(4 * order, dtype=torch.float64, device=hidden.device)
    empty = hidden.new_empty(0)
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden else empty
    grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if need_weight else empty
    grad_bias = torch.zeros(vocab, dtype=compute_dtype, device=weight.device) if need_bias else empty
    for start in range(0, n_rows, chunk_size):
        h = hidden[start : start + chunk_size]
        # The head in the model's dtype, then float32 like the hook (float64 stays: gradcheck).
        logits = torch.nn.functional.linear(h, weight, bias).to(compute_dtype)
        loss, chunk_sums = kernel(
            logits, labels[start : start + chunk_size], ranges, ts, ignore_index, grad_scale, need_grad
        )
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
    loss = (total / n_valid if mean else total).to(compute_dtype)
    grad_ranges = grad_ts = empty
    if need_params:
        grad_ranges, grad_ts = (g.to(ts.dtype) for g in seglu_parameter_grads(sums, ts))
    return (
        loss,
        grad_hidden,
        grad_weight.to(weight.dtype) if need_weight else empty,
        grad_bias.to(bias.dtype) if need_bias else empty,
        grad_ranges,
        grad_ts,
    )


@linear_seglu_cross_entropy_op.register_fake
def _(
    hidden,
    weight,
    bias,
    ranges,
    ts,
    labels,
    ignore_index,
    chunk_size,
    mean,
    need_hidden,
    need_weight,
    need_bias,
    need_params,
    backend,
):
    empty = hidden.new_empty(0)
    return (
        hidden.new_empty((), dtype=_compute_dtype(hidden)),
        hidden.new_empty(hidden.shape) if need_hidden else empty,
        weight.new_empty(weight.shape) if need_weight else empty,
        bias.new_empty(bias.shape) if need_bias else empty,
        ranges.new_empty(ranges.shape) if need_params else empty,
        ts.new_empty(ts.shape) if need_params else empty,
    )


def _cross_entropy_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[1:])
    ctx.needs = inputs[9:13]  # need_hidden, need_weight, need_bias, need_params


def _cross_entropy_grad(ctx, grad_loss, *unused):
    grad_hidden, grad_weight, grad_bias, grad_ranges, grad_ts = ctx.saved_tensors
    need_hidden, need_weight, need_bias, need_params = ctx.needs

    def scaled(grad: Tensor, needed: bool) -> Tensor | None:
        return grad * grad_loss.to(grad.dtype) if needed else None

    return (
        scaled(grad_hidden, need_hidden),
        scaled(grad_weight, need_weight),
        scaled(grad_bias, need_bias),
        scaled(grad_ranges, need_params),
        scaled(grad_ts, need_params),
    ) + (None,) * 9


linear_seglu_cross_entropy_op.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)


def linear_seglu_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ranges: Tensor,
    ts: Tensor,
    labels: Tensor,
    ignore_index: int,
    chunk_size: int,
    reduction: str,
    backend: str | None,
) -> Tensor:
    """The loss of ``hf_multimax::linear_seglu_cross_entropy``, with gradients for the inputs that need them (see
    :func:`hf_multimax.loss.fused_linear_seglu_cross_entropy`, which checks the arguments)."""
    grad = torch.is_grad_enabled()
    need_params = grad and (ranges.requires_grad or ts.requires_grad)
    loss, *_ = linear_seglu_cross_entropy_op(
        hidden,
        weight,
        bias,
        ranges,
        ts,
        labels,
        int(ignore_index),
        int(chunk_size),
        reduction == "mean",
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
        need_params,
        backend or "auto",
    )
    return loss


#: Every operator this module registers (``torch.ops.hf_multimax.*``), for ``torch.library.opcheck``.
OPS = (attention, attention_backward, linear_seglu_cross_entropy_op)
