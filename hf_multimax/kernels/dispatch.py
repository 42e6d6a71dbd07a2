"""``multimax_attention``: the memory-efficient MultiMax attention with exact gradients, and the choice of backend.

This is the only module that picks a backend and falls back from one to another (attention and the output layer's
σ + cross-entropy alike); the backends themselves never call back into it.

Backends (all compute ``softmax(σ(scale·Q·Kᵀ + bias) + mask)·V`` with σ and SoftMax in float32, like the reference;
the ``"torch"`` backend computes float64 inputs in float64, for ``gradcheck``):

* ``"cpu"``: the fused C++ kernel (:mod:`.cpu`), flash-attention style tiles, σ and σ' fused into the tile passes.
* ``"flex"``: CUDA, :func:`torch.nn.attention.flex_attention.flex_attention` with σ as ``score_mod`` (:mod:`.flex`).
* ``"torch"``: pure PyTorch, blocked over queries (:mod:`.blocked`); always available, any device.

``backend=None`` picks ``"cpu"`` on CPU when the kernel builds (orders up to 4), ``"flex"`` on CUDA without dropout,
``"torch"`` otherwise. ``HF_MULTIMAX_BACKEND`` (``cpu`` / ``flex`` / ``torch``) overrides the choice.
"""

from __future__ import annotations

import logging
import os

import torch

from . import blocked
from .problem import AttentionProblem, parameter_grads

logger = logging.getLogger(__name__)

__all__ = ["multimax_attention", "MultiMaxAttentionFunction", "select_backend", "cross_entropy_kernel", "BACKENDS"]

BACKENDS = ("cpu", "flex", "torch")


def select_backend(query: torch.Tensor, order: int, dropout_p: float, backend: str | None = None) -> str:
    """The backend that will run, given the device, the SegLU order and dropout (see the module docstring)."""
    backend = backend or os.environ.get("HF_MULTIMAX_BACKEND") or None
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown MultiMax attention backend {backend!r}; choose one of {BACKENDS}")
        return backend
    if query.device.type == "cpu":
        from . import cpu

        if query.dtype != torch.float64 and order <= cpu.MAX_ORDER and cpu.cpu_kernel_available():
            return "cpu"
        return "torch"
    if query.device.type == "cuda" and dropout_p == 0.0:
        from . import flex

        if flex.flex_available():
            return "flex"
    return "torch"


def _kernel(backend: str, problem: AttentionProblem):
    if backend == "cpu":
        from . import cpu

        if problem.dtype != torch.float32 or problem.q.device.type != "cpu" or problem.order > cpu.MAX_ORDER:
            raise ValueError(
                f"the fused CPU kernel takes CPU tensors, float32/bfloat16/float16 and orders up to {cpu.MAX_ORDER}; use "
                "backend='torch' (or None) for this call"
            )
        if not cpu.cpu_kernel_available():
            raise RuntimeError(f"the fused CPU kernel is unavailable: {cpu.cpu_kernel_status()[1]}")
        return cpu
    return blocked


class MultiMaxAttentionFunction(torch.autograd.Function):
    """Autograd for the ``"cpu"`` and ``"torch"`` backends: saves the inputs, the output and one log-sum-exp per
    query row; the backward recomputes scores tile by tile and returns exact gradients for query, key, value,
    ``ranges``, ``ts`` and the score bias (masks get none)."""

    @staticmethod
    def forward(ctx, query, key, value, ranges, ts, bias, mask, scale, causal, dropout_p, backend):
        problem = AttentionProblem.build(
            query, key, value, ranges, ts, scale=scale, mask=mask, causal=causal, bias=bias, dropout_p=dropout_p
        )
        kernel = _kernel(backend, problem)
        out, stats = kernel.forward(problem)
        result = out.to(query.dtype)
        ctx.kernel, ctx.seed, ctx.options = kernel, problem.seed, (scale, causal, dropout_p)
        # The caller's tensors are saved, not float32 copies of them. The output is kept in the compute dtype: the
        # backward's rowsum(dO ∘ O) must match the probabilities it recomputes, or every row's dZ stops summing to 0
        # and the parameter gradients (sums over all scores) drift (by ~10% in bfloat16).
        ctx.save_for_backward(query, key, value, ranges, ts, bias, mask, out, stats)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, ranges, ts, bias, mask, out, stats = ctx.saved_tensors
        scale, causal, dropout_p = ctx.options
        p = AttentionProblem.build(
            query, key, value, ranges, ts, scale=scale, mask=mask, causal=causal, bias=bias, dropout_p=dropout_p,
            seed=ctx.seed,
        )  # fmt: skip
        need_bias_grad = bias is not None and ctx.needs_input_grad[5]
        dq, dk, dv, sums, dbias = ctx.kernel.backward(p, out.to(p.dtype), stats, grad_out.to(p.dtype), need_bias_grad)
        grad_ranges, grad_ts = parameter_grads(p, sums, ranges.dtype)
        return (
            dq.to(query.dtype) if ctx.needs_input_grad[0] else None,
            dk.to(key.dtype) if ctx.needs_input_grad[1] else None,
            dv.to(value.dtype) if ctx.needs_input_grad[2] else None,
            grad_ranges.to(ranges.dtype) if ctx.needs_input_grad[3] else None,
            grad_ts.to(ts.dtype) if ctx.needs_input_grad[4] else None,
            p.reduce_bias_grad(dbias).to(bias.dtype) if dbias is not None else None,
            None, None, None, None, None,
        )  # fmt: skip


def multimax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ranges: torch.Tensor,
    ts: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    position_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Memory-efficient MultiMax attention: ``softmax(σ(scale·Q·Kᵀ + position_bias) + mask)·V``.

    Args:
        query: (batch, heads, q_len, head_dim).
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
        backend: ``"cpu"``, ``"flex"``, ``"torch"`` or ``None`` (automatic, see :func:`select_backend`).

    Returns:
        (batch, q_len, heads, v_dim) in the dtype of ``query``: the layout attention modules reshape from.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    order = ranges.shape[-1] // 2
    backend = select_backend(query, order, dropout_p, backend)
    if backend == "flex":
        from . import flex

        try:
            return flex.flex_multimax_attention(
                query, key, value, ranges, ts, scale=scale, attention_mask=attention_mask, is_causal=is_causal,
                position_bias=position_bias,
            )  # fmt: skip
        except flex.FlexCompileError as error:  # say so once (flex is not tried again) and run the blocked path
            logger.warning("%s; MultiMax attention falls back to the blocked PyTorch path.", error)
            backend = "torch"
    return MultiMaxAttentionFunction.apply(
        query, key, value, ranges, ts, position_bias, attention_mask, scale, is_causal, dropout_p, backend
    )


def cross_entropy_kernel(backend: str | None, device: torch.device, dtype: torch.dtype, order: int):
    """The σ + cross-entropy chunk function for :mod:`hf_multimax.loss`: the fused CPU pass
    (:func:`hf_multimax.kernels.cpu.seglu_cross_entropy_`) on CPU when it builds, else the PyTorch one
    (:func:`hf_multimax.kernels.cross_entropy.seglu_cross_entropy_`; always for float64, which ``gradcheck`` uses)."""
    from . import cross_entropy

    if backend not in (None, "cpu", "torch"):
        raise ValueError(f"unknown σ + cross-entropy backend {backend!r}; choose 'cpu', 'torch' or None")
    if backend == "torch" or device.type != "cpu" or dtype == torch.float64:
        return cross_entropy.seglu_cross_entropy_
    from . import cpu

    if order <= cpu.MAX_ORDER and cpu.cpu_kernel_available():
        return cpu.seglu_cross_entropy_
    if backend == "cpu":
        raise RuntimeError(f"the fused CPU kernel is unavailable: {cpu.cpu_kernel_status()[1]}")
    return cross_entropy.seglu_cross_entropy_
