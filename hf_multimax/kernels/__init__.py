"""Fused MultiMax kernels: memory-efficient attention (CPU C++ kernel, CUDA FlexAttention, PyTorch fallback) and the
output layer's chunked σ + cross-entropy. :mod:`.dispatch` picks the backend."""

from .dispatch import BACKENDS, MultiMaxAttentionFunction, cross_entropy_kernel, multimax_attention, select_backend

__all__ = ["BACKENDS", "MultiMaxAttentionFunction", "cross_entropy_kernel", "multimax_attention", "select_backend"]
