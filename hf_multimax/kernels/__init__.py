"""Fused MultiMax kernels: memory-efficient attention (CPU C++ kernel, CUDA FlexAttention, PyTorch fallback) and the
output layer's chunked σ + cross-entropy, as PyTorch operators (:mod:`.ops`, ``torch.ops.hf_multimax``);
:mod:`.dispatch` picks the backend."""

from .dispatch import BACKENDS, cross_entropy_kernel, select_backend
from .ops import linear_seglu_cross_entropy, multimax_attention

__all__ = ["BACKENDS", "cross_entropy_kernel", "linear_seglu_cross_entropy", "multimax_attention", "select_backend"]
