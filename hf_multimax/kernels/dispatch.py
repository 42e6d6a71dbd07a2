"""Which backend runs a MultiMax attention call or an output layer's σ + cross-entropy, and what it falls back to.

This is the only module that picks a backend and falls back from one to another; the backends never call back into
it, and the operators of :mod:`.ops` ask it at run time (never while ``torch.compile`` traces them).

Attention backends (all compute ``softmax(σ(scale·Q·Kᵀ + bias) + mask)·V`` with σ and SoftMax in float32, like the
reference; float64 inputs are computed in float64 by the ``"torch"`` backend, for ``gradcheck``):

* ``"cpu"``: the fused C++ kernel (:mod:`.cpu`), flash-attention style tiles, σ and σ' fused into the tile passes.
* ``"triton"``: Triton kernels (:mod:`.triton_kernel`): CUDA, or CPU tensors in Triton's interpreter with
  ``TRITON_INTERPRET=1`` (how CI checks them).
* ``"flex"``: CUDA, :func:`torch.nn.attention.flex_attention.flex_attention` with σ as ``score_mod`` (:mod:`.flex`);
  only when asked for.
* ``"torch"``: pure PyTorch, blocked over queries (:mod:`.blocked`); always available, any device.

``backend=None`` (``"auto"`` inside the operator) picks ``"cpu"`` on CPU when the kernel builds (float32/16
inputs, orders up to 4), ``"triton"`` on CUDA, ``"torch"`` otherwise. ``HF_MULTIMAX_BACKEND`` (``cpu`` / ``triton`` /
``flex`` / ``torch``) overrides the choice. A C++ kernel that fails to build, a Triton kernel that does not take a
problem (order, head dimension, device, failed self-test) or fails to compile or launch, and a compiled FlexAttention
kernel that fails all fall back to ``"torch"`` with one warning; the result is never wrong.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch

from . import blocked
from .problem import AttentionProblem

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "requested_backend",
    "uses_flex",
    "with_flex_fallback",
    "run_forward",
    "run_backward",
    "select_backend",
    "cross_entropy_kernel",
]

BACKENDS = ("cpu", "triton", "flex", "torch")
#: The kernel that can fail to compile or launch at run time (and then falls back to the blocked path).
TRITON_MODULE = f"{__package__}.triton_kernel"
T = TypeVar("T")


def requested_backend(backend: str | None) -> str | None:
    """``backend``, else ``$HF_MULTIMAX_BACKEND``, validated; ``None`` for the automatic choice."""
    backend = backend or os.environ.get("HF_MULTIMAX_BACKEND") or None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown MultiMax attention backend {backend!r}; choose one of {BACKENDS} (or None)")
    return backend


def uses_flex(query: torch.Tensor, dropout_p: float, requested: str | None) -> bool:
    """Whether the call goes to FlexAttention rather than to the ``hf_multimax::attention`` operator: only when asked
    for, without dropout (FlexAttention has none), on a device where it runs. Decided from the device and flags only,
    so that it is traceable."""
    if requested != "flex" or dropout_p != 0.0:
        return False
    from . import flex

    return flex.flex_available() or query.device.type == "cpu"  # on CPU: FlexAttention's eager forward


def with_flex_fallback(flex_call: Callable[[], T], fallback: Callable[[], T]) -> T:
    """``flex_call()``; when the compiled FlexAttention kernel fails, say so once (it is not tried again in this
    process) and return ``fallback()``."""
    from . import flex

    try:
        return flex_call()
    except flex.FlexCompileError as error:
        logger.warning("%s; MultiMax attention falls back to the blocked PyTorch path.", error)
        return fallback()


def _prepare(requested: str | None, build: dict) -> tuple[ModuleType, AttentionProblem]:
    """The kernel module (``forward``/``backward``) for one call and the problem in the form it takes, at run time.

    CPU: the C++ kernel for float32/bfloat16/float16 problems of order <= 4 when it builds (``"cpu"`` requested on
    anything else is a ``ValueError``). CUDA (or ``"triton"`` requested): the Triton kernel when it takes the problem
    (``"triton"`` requested where Triton cannot run at all is a ``RuntimeError``). Else, and for ``"torch"``: the
    blocked PyTorch path.
    """
    query, order = build["q"], build["ranges"].shape[-1] // 2
    device = query.device.type
    if requested == "torch" or (requested in (None, "auto") and device not in ("cpu", "cuda")):
        return blocked, AttentionProblem.build(**build)
    if requested == "triton" or (requested in (None, "auto") and device == "cuda"):
        from . import triton_kernel

        available, why = triton_kernel.triton_status(device)
        if not available and requested == "triton":  # asked for by name: say so rather than run something else
            raise RuntimeError(f"the Triton MultiMax kernel is unavailable: {why}")
        problem = AttentionProblem.build(**build, native_dtype=triton_kernel.NATIVE_DTYPE)
        if problem.is_empty:
            return blocked, problem.in_compute_dtype()
        reason = triton_kernel.unsupported(problem)
        if reason is None:
            return triton_kernel, problem
        _warn_once(
            f"Triton MultiMax attention cannot run {triton_kernel.describe(problem)}: {reason}; using the "
            "blocked PyTorch path."
        )
        return blocked, problem.in_compute_dtype()
    from . import cpu

    problem = AttentionProblem.build(**build)
    fits = problem.dtype == torch.float32 and device == "cpu" and order <= cpu.MAX_ORDER
    if requested == "cpu" and not fits:
        raise ValueError(
            f"the fused CPU kernel takes CPU tensors, float32/bfloat16/float16 and orders up to {cpu.MAX_ORDER}, got "
            f"{device} {query.dtype} of order {order}; use backend='torch' (or None)"
        )
    if fits and cpu.cpu_kernel_available():  # builds on first use; a failed build warns once (cpu.py) and falls back
        return cpu, problem
    if requested == "cpu":
        raise RuntimeError(f"the fused CPU kernel is unavailable: {cpu.cpu_kernel_status()[1]}")
    return blocked, problem


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _launch_failed(kernel: ModuleType, problem: AttentionProblem, error: Exception) -> AttentionProblem:
    """A Triton kernel that failed to compile or launch: say so once; the problem for the blocked path."""
    from . import triton_kernel

    _warn_once(
        f"Triton MultiMax attention failed on {triton_kernel.describe(problem)} ({type(error).__name__}: "
        f"{error}); using the blocked PyTorch path."
    )
    return problem.in_compute_dtype()


def run_forward(requested: str | None, build: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` of the attention call described by ``build`` (the keyword arguments of
    :meth:`AttentionProblem.build`), on the kernel :func:`_prepare` picks."""
    kernel, problem = _prepare(requested, build)
    if kernel.__name__ != TRITON_MODULE:
        return kernel.forward(problem)
    try:
        return kernel.forward(problem)
    except Exception as error:  # compile or launch error of the Triton kernel: the PyTorch path is always right
        return blocked.forward(_launch_failed(kernel, problem, error))


def run_backward(
    requested: str | None, build: dict, out: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, need_bias_grad: bool
):
    """``(problem, (dq, dk, dv, sums, dbias))`` of the attention call described by ``build``, given the forward's
    output and statistics and the output's gradient."""
    kernel, problem = _prepare(requested, build)
    args = (out.to(problem.dtype), stats.to(problem.dtype), dout.to(problem.dtype), need_bias_grad)
    if kernel.__name__ != TRITON_MODULE:
        return problem, kernel.backward(problem, *args)
    try:
        return problem, kernel.backward(problem, *args)
    except Exception as error:
        problem = _launch_failed(kernel, problem, error)
        return problem, blocked.backward(problem, *args)


def select_backend(query: torch.Tensor, order: int, dropout_p: float, backend: str | None = None) -> str:
    """The name of the backend that will run a call with these inputs (builds the CPU kernel to know)."""
    requested = requested_backend(backend)
    if uses_flex(query, dropout_p, requested):
        return "flex"
    if requested is not None:
        return requested
    if query.device.type == "cpu" and query.dtype != torch.float64:
        from . import cpu

        if order <= cpu.MAX_ORDER and cpu.cpu_kernel_available():
            return "cpu"
    if query.device.type == "cuda":
        from . import triton_kernel

        if triton_kernel.triton_available("cuda"):
            return "triton"
    return "torch"


def cross_entropy_kernel(backend: str | None, device: torch.device, dtype: torch.dtype, order: int):
    """The σ + cross-entropy chunk function for :mod:`hf_multimax.loss`: the fused CPU pass
    (:func:`hf_multimax.kernels.cpu.seglu_cross_entropy_`) on CPU when it builds, else the PyTorch one
    (:func:`hf_multimax.kernels.cross_entropy.seglu_cross_entropy_`; always for float64, which ``gradcheck`` uses)."""
    from . import cross_entropy

    if backend not in (None, "auto", "cpu", "torch"):
        raise ValueError(f"unknown σ + cross-entropy backend {backend!r}; choose 'cpu', 'torch' or None")
    if backend == "torch" or device.type != "cpu" or dtype == torch.float64:
        return cross_entropy.seglu_cross_entropy_
    from . import cpu

    if order <= cpu.MAX_ORDER and cpu.cpu_kernel_available():
        return cpu.seglu_cross_entropy_
    if backend == "cpu":
        raise RuntimeError(f"the fused CPU kernel is unavailable: {cpu.cpu_kernel_status()[1]}")
    return cross_entropy.seglu_cross_entropy_
