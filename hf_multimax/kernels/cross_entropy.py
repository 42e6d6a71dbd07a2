"""σ + cross-entropy over one chunk of logits, in place: the PyTorch backend (any device, float64 for ``gradcheck``).

The fused CPU backend with the same contract is :func:`hf_multimax.kernels.cpu.seglu_cross_entropy_`;
:func:`hf_multimax.kernels.dispatch.cross_entropy_kernel` picks between them, and :mod:`hf_multimax.loss` runs them
chunk by chunk.
"""

from __future__ import annotations

import torch

from ..functional import seglu, seglu_backward, seglu_order

__all__ = ["seglu_cross_entropy_"]


def seglu_cross_entropy_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ranges: torch.Tensor,
    ts: torch.Tensor,
    ignore_index: int,
    grad_scale: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``σ(logits)`` per row: ``(loss (rows,), sums (4N,) float64)``.

    ``logits`` (rows, vocab); with ``need_grad`` it is overwritten by the gradient w.r.t. the logits of
    ``grad_scale · Σ loss`` (ignored rows: 0), and ``sums`` are the parameter sums of
    :func:`hf_multimax.functional.seglu_backward`.
    """
    order = seglu_order(ranges, ts)
    r, t = ranges.detach().to(logits.dtype), ts.detach().to(logits.dtype)
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    z = seglu(logits, r, t)
    lse = torch.logsumexp(z, dim=-1)
    loss = (lse - z.gather(1, safe[:, None])[:, 0]).masked_fill(~valid, 0.0)
    if not need_grad:
        return loss, torch.zeros(4 * order, dtype=torch.float64, device=logits.device)
    dz = torch.exp(z - lse[:, None])
    del z
    dz.scatter_add_(1, safe[:, None], torch.full_like(lse[:, None], -1.0))
    dz.mul_((valid.to(dz.dtype) * grad_scale)[:, None])
    ds, sums = seglu_backward(logits, dz, r, t, sum_dims=(0, 1))
    logits.copy_(ds)
    return loss, sums
