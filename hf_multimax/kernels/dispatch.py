"""Which backend runs a MultiMax attention call or an output layer's σ + cross-entropy, and what it falls back to.

This is the only module that picks a backend and falls back from one to another; the backends never call back into
it, and the operators of :mod:`.ops` ask it at run time (never while ``torch.compile`` traces them).

Attention backends (all compute ``softmax(σ(scale·Q·Kᵀ + bias) + mask)·V`` with σ and SoftMax in float32, like the
reference; float64 inputs are computed in float64 by the ``"torch"`` backend, for ``gradcheck``):

* ``"cpu"``: the fused C++ kernel (:mod:`.cpu`), flash-attention style tiles, σ and σ' fused into the tile passes.
* ``"flex"``: CUDA, :func:`torch.nn.attention.flex_attention.flex_attention` with σ as ``score_mod`` (:mod:`.flex`).
* ``"torch"``: pure PyTorch, blocked over queries (:mod:`.blocked`); always available, any device.

``backend=None`` (``"auto"`` inside the operator) picks ``"cpu"`` on CPU when the kernel builds (float32/16
inputs, orders up to 4), ``"flex"`` on CUDA without dropout, ``"torch"`` otherwise. ``HF_MULTIMAX_BACKEND``
(``cpu`` / ``flex`` / ``torch``) overrides the choice. A C++ kernel that fails to build, and a compiled FlexAttention
kernel that fails, fall back to ``"torch"`` with one warning; the result is never wrong.
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
    "kernel_for",
    "select_backend",
    "cross_entropy_kernel",
]

BACKENDS = ("cpu", "flex", "torch")
T = TypeVar("T")


def requested_backend(backend: str | None) -> str | None:
    """``backend``, else ``$HF_MULTIMAX_BACKEND``, validated; ``None`` for the automatic choice."""
    backend = backend or os.environ.get("HF_MULTIMAX_BACKEND") or None
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown MultiMax attention backend {backend!r}; choose one of {BACKENDS} (or None)")
    return backend


def uses_flex(query: torch.Tensor, dropout_p: float, requested: str | None) -> bool:
    """Whether the call goes to FlexAttention rather than to the ``hf_multimax::attention`` operator. Decided from the
    device and flags only, so that it is traceable."""
    if requested is not None:
        return requested == "flex"
    if query.device.type != "cuda" or dropout_p != 0.0:
        return False
    from . import flex

    return flex.flex_available()


def with_flex_fallback(flex_call: Callable[[], T], fallback: Callable[[], T]) -> T:
    """``flex_call()``; when the compiled FlexAttention kernel fails, say so once (it is not tried again in this
    process) and return ``fallback()``."""
    from . import flex

    try:
        return flex_call()
    except flex.FlexCompileError as error:
        logger.warning("%s; MultiMax attention falls back to the blocked PyTorch path.", error)
        return fallback()


def kernel_for(requested: str | None, problem: AttentionProblem) -> ModuleType:
    """The kernel module (``forward``/``backward``) that runs ``problem``, at run time: the C++ kernel for CPU float32
    problems of order <= 4 when it builds (``"cpu"`` requested on anything else is a ``ValueError``), else the blocked
    PyTorch path."""
    if requested in (None, "auto", "cpu"):
        from . import cpu

        fits = problem.dtype == torch.float32 and problem.q.device.type == "cpu" and problem.order <= cpu.MAX_ORDER
        if requested == "cpu" and not fits:
            raise ValueError(
                f"the fused CPU kernel takes CPU tensors, float32/bfloat16/float16 and orders up to {cpu.MAX_ORDER}, got "
                f"{problem.q.device.type} {problem.dtype} of order {problem.order}; use backend='torch' (or None)"
            )
        if fits and cpu.cpu_kernel_available():  # builds on first use; a failed build warns once and falls back
            return cpu
        if requested == "cpu":
            raise RuntimeError(f"the fused CPU kernel is unavailable: {cpu.cpu_kernel_status()[1]}")
    return blocked


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
