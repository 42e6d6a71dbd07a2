"""Fused MultiMax kernels: memory-efficient attention (CPU C++ kernel, the Triton kernel on CUDA, FlexAttention on
request, a blocked PyTorch path) and the output layer's chunked σ + cross-entropy, as PyTorch operators (:mod:`.ops`,
``torch.ops.hf_multimax``). :mod:`.dispatch` picks the backend, falls back only when a kernel cannot take a problem
(with a :class:`KernelFallbackWarning`), and records what ran (:func:`record_backends`, :func:`last_backend`)."""

from .dispatch import (
    BACKENDS,
    BackendCall,
    KernelFallbackWarning,
    cross_entropy_kernel,
    last_backend,
    record_backends,
    select_backend,
)
from .ops import linear_seglu_cross_entropy, multimax_attention

__all__ = [
    "BACKENDS",
    "BackendCall",
    "KernelFallbackWarning",
    "cross_entropy_kernel",
    "last_backend",
    "linear_seglu_cross_entropy",
    "multimax_attention",
    "record_backends",
    "select_backend",
]
