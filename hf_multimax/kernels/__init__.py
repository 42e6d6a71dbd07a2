"""Fused MultiMax kernels: memory-efficient attention (CPU C++ kernel, CUDA FlexAttention, PyTorch fallback)."""

from .function import BACKENDS, MultiMaxAttentionFunction, multimax_attention, select_backend

__all__ = ["BACKENDS", "MultiMaxAttentionFunction", "multimax_attention", "select_backend"]
