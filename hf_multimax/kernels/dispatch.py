"""Which backend runs a MultiMax attention call or an output layer's σ + cross-entropy, what it falls back to, and a
record of what ran.

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
``flex`` / ``torch``) overrides the choice.

The fallback contract. A call falls back to ``"torch"`` only when the kernel chosen for it *cannot take this problem
here*, and then says so with a :class:`KernelFallbackWarning` naming the shapes, the dtype and the reason:

* Triton is not installed or cannot run on this device (automatic choice on CUDA; ``backend="triton"`` asked for by
  name where Triton cannot run at all raises ``RuntimeError`` instead);
* an order or a head dimension past the kernel's limits (Triton: orders 1-4, head dimension 256; the C++ kernel:
  orders up to 4);
* the Triton kernel failed its first-use self-test on this device (a tiny problem against the blocked path);
* the Triton kernel failed to compile for this problem: Triton's ``CompilationError``, ``OutOfResources`` (shared
  memory, registers or threads past this GPU's limits), ``PTXASError``, or any error raised inside Triton's
  ``compile()``; the variant is remembered, so it is not compiled again in this process;
* the compiled FlexAttention kernel failed to compile (``backend="flex"``).

Everything else propagates, as SDPA's own errors do: ``torch.OutOfMemoryError`` (never retried on a slower path that
needs more memory), a launch that fails for another reason (a CUDA error, a kernel bug), and ``ValueError`` /
``TypeError`` from the inputs. A C++ kernel that fails to build says so once in the log (:mod:`.cpu`) and its calls
are recorded as fallbacks.

:func:`record_backends` and :func:`last_backend` say which backend computed each forward and backward call (a
:class:`BackendCall`), so that tests and benchmarks can check that the kernel they mean is the one that ran.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple, TypeVar

import torch

from . import blocked
from .problem import AttentionProblem

__all__ = [
    "BACKENDS",
    "BackendCall",
    "KernelFallbackWarning",
    "record_backends",
    "last_backend",
    "requested_backend",
    "uses_flex",
    "with_flex_fallback",
    "run_forward",
    "run_backward",
    "select_backend",
    "cross_entropy_kernel",
]

BACKENDS = ("cpu", "triton", "flex", "torch")
#: The kernel that can fail to compile at run time (and then falls back to the blocked path).
TRITON_MODULE = f"{__package__}.triton_kernel"
T = TypeVar("T")


class KernelFallbackWarning(UserWarning):
    """A MultiMax attention call ran on the blocked PyTorch path because the kernel chosen for it cannot take the
    problem here; the message names the problem and the reason. ``warnings.simplefilter("error",
    KernelFallbackWarning)`` turns every fallback into an error."""


@dataclass(frozen=True)
class BackendCall:
    """One attention call as it ran.

    Attributes:
        op: ``"forward"`` or ``"backward"``.
        backend: the backend that computed it: ``"cpu"``, ``"triton"``, ``"flex"`` or ``"torch"``.
        wanted: the backend chosen for it (asked for, or the automatic choice); differs from ``backend`` on a fallback.
        fallback: why ``wanted`` did not run it, or ``None`` when it did.
    """

    op: str
    backend: str
    wanted: str
    fallback: str | None = None


_RECORD_LOCK = threading.Lock()
_RECORDERS: list[list[BackendCall]] = []
_LAST: list[BackendCall] = []  # the last call, process-wide (the backward may run on autograd's device thread)
_FLEX_FAILED = threading.local()  # why FlexAttention failed, for the record of the fallback call made right after


def _record(call: BackendCall) -> None:
    with _RECORD_LOCK:
        _LAST[:] = [call]
        for seen in _RECORDERS:
            seen.append(call)


@contextmanager
def record_backends() -> Iterator[list[BackendCall]]:
    """Collect a :class:`BackendCall` for every attention forward and backward computed inside the block, in any
    thread (autograd runs a CUDA backward on its own thread)::

        with hf_multimax.kernels.record_backends() as seen:
            loss = model(**batch).loss
            loss.backward()
        assert all(call.backend == "triton" for call in seen), seen

    FlexAttention calls (``backend="flex"``) are recorded once, as their forward; their backward runs inside
    FlexAttention.
    """
    seen: list[BackendCall] = []
    with _RECORD_LOCK:
        _RECORDERS.append(seen)
    try:
        yield seen
    finally:
        with _RECORD_LOCK:
            _RECORDERS[:] = [other for other in _RECORDERS if other is not seen]


def last_backend() -> BackendCall | None:
    """The :class:`BackendCall` of the last attention forward or backward computed in this process, or ``None``."""
    with _RECORD_LOCK:
        return _LAST[0] if _LAST else None


def _warn(message: str) -> None:
    """A :class:`KernelFallbackWarning` (Python shows each distinct message once per location by default)."""
    warnings.warn(message, KernelFallbackWarning, stacklevel=3)


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
    """``flex_call()``; when the compiled FlexAttention kernel fails to compile, say so (it is not tried again in this
    process) and return ``fallback()``. Any other error (out of memory included) propagates."""
    from . import flex

    try:
        result = flex_call()
    except flex.FlexCompileError as error:
        _warn(f"{error}; MultiMax attention falls back to the blocked PyTorch path.")
        _FLEX_FAILED.reason = str(error)
        try:
            return fallback()
        finally:
            _FLEX_FAILED.reason = None
    if not torch.compiler.is_compiling():
        _record(BackendCall("forward", "flex", "flex"))
    return result


class _Plan(NamedTuple):
    """How one call runs: the kernel module (``forward``/``backward``), the problem in the form it takes, and what
    to record."""

    kernel: ModuleType
    problem: AttentionProblem
    backend: str
    wanted: str
    fallback: str | None = None

    def record(self, op: str) -> None:
        wanted, fallback = self.wanted, self.fallback
        flex_failure = getattr(_FLEX_FAILED, "reason", None)
        if flex_failure and op == "forward":
            wanted, fallback = "flex", flex_failure
        _record(BackendCall(op, self.backend, wanted, fallback))


def _plan(requested: str | None, build: dict, op: str) -> _Plan:
    """The kernel for one call and the problem in the form it takes, at run time.

    CPU: the C++ kernel for float32/bfloat16/float16 problems of order <= 4 when it builds (``"cpu"`` requested on
    anything else is a ``ValueError``). CUDA (or ``"triton"`` requested): the Triton kernel when it takes the problem
    (``"triton"`` requested where Triton cannot run at all is a ``RuntimeError``). Else, and for ``"torch"``: the
    blocked PyTorch path.
    """
    query, order = build["q"], build["ranges"].shape[-1] // 2
    device = query.device.type
    automatic = requested in (None, "auto")
    if requested == "torch" or (automatic and device not in ("cpu", "cuda")):
        return _Plan(blocked, AttentionProblem.build(**build), "torch", "torch")
    if requested == "triton" or (automatic and device == "cuda"):
        from . import triton_kernel

        available, why = triton_kernel.triton_status(device)
        if not available and requested == "triton":  # asked for by name: say so rather than run something else
            raise RuntimeError(f"the Triton MultiMax kernel is unavailable: {why}")
        problem = AttentionProblem.build(**build, native_dtype=triton_kernel.NATIVE_DTYPE)
        if problem.is_empty:
            return _Plan(blocked, problem.in_compute_dtype(), "torch", "triton")
        reason = triton_kernel.unsupported(problem, op)
        if reason is None:
            return _Plan(triton_kernel, problem, "triton", "triton")
        _warn(f"Triton MultiMax attention cannot run {problem.describe()}: {reason}; using the blocked PyTorch path.")
        return _Plan(blocked, problem.in_compute_dtype(), "torch", "triton", reason)
    from . import cpu

    problem = AttentionProblem.build(**build)
    fits = problem.dtype == torch.float32 and device == "cpu" and order <= cpu.MAX_ORDER
    if requested == "cpu" and not fits:
        raise ValueError(
            f"the fused CPU kernel takes CPU tensors, float32/bfloat16/float16 and orders up to {cpu.MAX_ORDER}, got "
            f"{device} {query.dtype} of order {order}; use backend='torch' (or None)"
        )
    if problem.dtype != torch.float32:  # float64 (gradcheck): the blocked path by design
        return _Plan(blocked, problem, "torch", "torch")
    if not fits:
        reason = f"order {order} (the fused CPU kernel has orders 1 to {cpu.MAX_ORDER})"
        _warn(f"The fused CPU kernel cannot run {problem.describe()}: {reason}; using the blocked PyTorch path.")
        return _Plan(blocked, problem, "torch", "cpu", reason)
    if cpu.cpu_kernel_available():  # builds on first use; a failed build is logged once (cpu.py)
        return _Plan(cpu, problem, "cpu", "cpu")
    reason = f"the fused CPU kernel is unavailable: {cpu.cpu_kernel_status()[1]}"
    if requested == "cpu":
        raise RuntimeError(reason)
    return _Plan(blocked, problem, "torch", "cpu", reason)


def _cannot_take(plan: _Plan, op: str, error: Exception) -> _Plan | None:
    """The blocked path's plan when ``error`` from the Triton kernel means it cannot take this problem here (a compile
    error: say so, and remember the variant), else ``None`` (the error propagates)."""
    reason = plan.kernel.cannot_take(error)
    if reason is None:
        return None
    plan.kernel.remember_failure(plan.problem, op, reason)
    _warn(
        f"Triton MultiMax attention failed to compile the {op} of {plan.problem.describe()} ({reason}); "
        "using the blocked PyTorch path."
    )
    return _Plan(blocked, plan.problem.in_compute_dtype(), "torch", "triton", reason)


def run_forward(requested: str | None, build: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, stats)`` of the attention call described by ``build`` (the keyword arguments of
    :meth:`AttentionProblem.build`), on the kernel :func:`_plan` picks."""
    plan = _plan(requested, build, "forward")
    try:
        result = plan.kernel.forward(plan.problem)
    except Exception as error:
        fallback = _cannot_take(plan, "forward", error) if plan.kernel.__name__ == TRITON_MODULE else None
        if fallback is None:
            raise
        plan, result = fallback, blocked.forward(fallback.problem)
    plan.record("forward")
    return result


def run_backward(
    requested: str | None, build: dict, out: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, need_bias_grad: bool
):
    """``(problem, (dq, dk, dv, sums, dbias))`` of the attention call described by ``build``, given the forward's
    output and statistics and the output's gradient."""
    plan = _plan(requested, build, "backward")

    def args(problem: AttentionProblem) -> tuple:  # dO as it came for the Triton kernel's bfloat16/float16 operands
        return out.to(problem.dtype), stats.to(problem.dtype), dout.to(problem.q.dtype), need_bias_grad

    try:
        result = plan.kernel.backward(plan.problem, *args(plan.problem))
    except Exception as error:
        fallback = _cannot_take(plan, "backward", error) if plan.kernel.__name__ == TRITON_MODULE else None
        if fallback is None:
            raise
        plan, result = fallback, blocked.backward(fallback.problem, *args(fallback.problem))
    plan.record("backward")
    return plan.problem, result


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
