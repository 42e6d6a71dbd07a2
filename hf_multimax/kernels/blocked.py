"""Pure-PyTorch MultiMax attention, blocked over queries: the fallback that always works (any device, any order).

Same algorithm and memory bound as the fused kernel, written with PyTorch operators: each block of ``block_rows``
queries sees its whole (causally trimmed) key range, so the forward needs no online softmax; only the row
log-sum-exp is kept for the backward, which recomputes the block's scores. At most one block of scores per head
(and a few temporaries of that size) is alive at any time. Key/value heads are never repeated for GQA: a block of
the ``n_rep`` query heads that share a key/value head is folded into the rows of one matrix product.
"""

from __future__ import annotations

import torch

from ..functional import seglu, seglu_backward
from .problem import AttentionProblem, dropout_threshold

__all__ = ["forward", "backward", "dropout_keep_scale", "block_rows"]

#: Scores (float32 elements) one block may hold, over all batches and heads.
BLOCK_ELEMENTS = 1 << 22
_M32 = 0xFFFFFFFF


def block_rows(p: AttentionProblem) -> int:
    return max(1, min(p.q_len, BLOCK_ELEMENTS // max(1, p.batch * p.heads * p.kv_len)))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_scale(p: AttentionProblem, i0: int, i1: int, j0: int, j1: int, device=None) -> torch.Tensor:
    """The dropout multiplier (0 or ``1/(1-p)``) of scores ``[:, :, i0:i1, j0:j1]``: a counter-based hash of
    ``(seed, batch, head, query, key)``, bit-identical to the fused kernel's, so forward and backward (and both
    backends) drop the same entries without storing a mask."""
    device = device if device is not None else p.q.device
    arange = lambda a, b: torch.arange(a, b, device=device, dtype=torch.int64)  # noqa: E731
    rows = (arange(0, p.batch)[:, None, None] * p.heads + arange(0, p.heads)[None, :, None]) * p.q_len
    rows = (rows + arange(i0, i1)[None, None, :]) & _M32
    key = _lowbias32((p.seed & _M32) ^ _lowbias32(rows))
    cols = _mul32(arange(j0, j1) & _M32, 0x9E3779B9)
    u = _lowbias32(key[..., None] ^ cols)
    keep = (u >> 8) >= dropout_threshold(p.dropout_p)
    return keep.to(p.dtype) * (1.0 / (1.0 - p.dropout_p))


def _grouped(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H, m, X) -> (B, Hkv, n_rep·m, X): the rows of a GQA group side by side (copies only the query block)."""
    b, h, m, last = x.shape
    return x.reshape(b, h // n_rep, n_rep * m, last)


def _ungrouped(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, hkv, rows, last = x.shape
    return x.reshape(b, hkv * n_rep, rows // n_rep, last)


def _block_scores(
    p: AttentionProblem, i0: int, i1: int, kv_end: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, z, excluded)`` for queries ``i0:i1`` and keys ``:kv_end``: s = scale·QKᵀ (+ bias), z = σ(s) with the mask
    applied as the reference does, ``excluded`` the entries whose gradient a bool/causal mask blocks (or None)."""
    q = _grouped(p.q[:, :, i0:i1], p.n_rep)
    s = _ungrouped(torch.matmul(q, p.k[:, :, :kv_end].transpose(2, 3)), p.n_rep) * p.scale
    if p.bias is not None:
        s = s + p.bias[:, :, i0:i1, :kv_end]
    z = seglu(s, p.ranges, p.ts)
    excluded = None
    if p.causal:
        rows = torch.arange(i0, i1, device=s.device)[:, None]
        excluded = torch.arange(kv_end, device=s.device)[None, :] > rows
    if p.mask is not None:
        m = p.mask[:, :, i0:i1, :kv_end]
        if m.dtype == torch.bool:
            excluded = ~m if excluded is None else excluded | ~m
        else:
            z = z + m
    if excluded is not None:
        z = z.masked_fill(excluded, float("-inf"))
    return s, z, excluded


def _row_stats(z: torch.Tensor) -> torch.Tensor:
    """``(2, ...)``: each row's maximum ``m`` and ``log Σ exp(z - m)``, kept apart (the layout of the fused kernel's
    statistics); ``m = -inf`` marks a row with nothing to attend."""
    if z.shape[-1] == 0:  # no keys at all: every row is empty
        return torch.stack((z.new_full(z.shape[:-1], float("-inf")), z.new_zeros(z.shape[:-1])))
    m = z.amax(dim=-1)
    empty = torch.isneginf(m)  # nothing to attend (only -inf scores): probabilities 0, never NaN
    m = m.masked_fill(empty, float("-inf"))
    log_l = torch.log(torch.exp(z - torch.where(empty, 0.0, m)[..., None]).sum(-1)).masked_fill(empty, 0.0)
    return torch.stack((m, log_l))


def _probabilities(z: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``exp((z - m) - log l)``; 0 on rows with nothing to attend."""
    m, log_l = stats
    empty = torch.isneginf(m)
    p = torch.exp((z - torch.where(empty, 0.0, m)[..., None]) - log_l[..., None])
    return p.masked_fill(empty[..., None], 0.0)


def forward(p: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Lq, H, Dv), stats (2, B, H, Lq))`` in the compute dtype ``p.dtype`` (see :func:`_row_stats`)."""
    out = torch.empty(p.batch, p.q_len, p.heads, p.v_dim, dtype=p.dtype, device=p.q.device)
    stats = torch.empty(2, p.batch, p.heads, p.q_len, dtype=p.dtype, device=p.q.device)
    rows = block_rows(p)
    for i0 in range(0, p.q_len, rows):
        i1 = min(p.q_len, i0 + rows)
        kv_end = min(p.kv_len, i1) if p.causal else p.kv_len
        _, z, _ = _block_scores(p, i0, i1, kv_end)
        block_stats = _row_stats(z)
        prob = _probabilities(z, block_stats)
        if p.dropout_p > 0:
            prob = prob * dropout_keep_scale(p, i0, i1, 0, kv_end)
        o = _ungrouped(torch.matmul(_grouped(prob, p.n_rep), p.v[:, :, :kv_end]), p.n_rep)
        out[:, i0:i1] = o.transpose(1, 2)
        stats[:, :, :, i0:i1] = block_stats
    return out, stats


def backward(
    p: AttentionProblem, out: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, need_bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`hf_multimax.kernels.cpu.backward`."""
    device = p.q.device
    delta = (dout * out).sum(-1).transpose(1, 2)  # (B, H, Lq): rowsum(dO ∘ O)
    dout = dout.transpose(1, 2)  # (B, H, Lq, Dv) view
    dq = torch.zeros(p.batch, p.heads, p.q_len, p.head_dim, dtype=p.dtype, device=device)
    dk = torch.zeros(p.batch, p.kv_heads, p.kv_len, p.head_dim, dtype=p.dtype, device=device)
    dv = torch.zeros(p.batch, p.kv_heads, p.kv_len, p.v_dim, dtype=p.dtype, device=device)
    sums = torch.zeros(p.heads, 4 * p.order, dtype=torch.float64, device=device)
    dbias = None
    if need_bias_grad:
        db, dh = p.bias_slots
        dbias = torch.zeros(db, dh, p.q_len, p.kv_len, dtype=p.dtype, device=device)
    rows = block_rows(p)
    for i0 in range(0, p.q_len, rows):
        i1 = min(p.q_len, i0 + rows)
        kv_end = min(p.kv_len, i1) if p.causal else p.kv_len
        s, z, excluded = _block_scores(p, i0, i1, kv_end)
        prob = _probabilities(z, stats[:, :, :, i0:i1])
        do = dout[:, :, i0:i1]
        keep = dropout_keep_scale(p, i0, i1, 0, kv_end) if p.dropout_p > 0 else None
        prob_kept = prob * keep if keep is not None else prob
        dv[:, :, :kv_end] += torch.matmul(_grouped(prob_kept, p.n_rep).transpose(2, 3), _grouped(do, p.n_rep))
        dprob = _ungrouped(torch.matmul(_grouped(do, p.n_rep), p.v[:, :, :kv_end].transpose(2, 3)), p.n_rep)
        if keep is not None:
            dprob = dprob * keep
        dz = prob * (dprob - delta[:, :, i0:i1, None])
        if excluded is not None:
            dz = dz.masked_fill(excluded, 0.0)
        ds, block_sums = seglu_backward(s, dz, p.ranges, p.ts, sum_dims=(0, 2, 3))
        sums += block_sums
        if dbias is not None:
            dbias[:, :, i0:i1, :kv_end] += ds.sum_to_size(dbias.shape[0], dbias.shape[1], *ds.shape[2:])
        ds = ds * p.scale
        dq[:, :, i0:i1] = _ungrouped(torch.matmul(_grouped(ds, p.n_rep), p.k[:, :, :kv_end]), p.n_rep)
        dk[:, :, :kv_end] += torch.matmul(_grouped(ds, p.n_rep).transpose(2, 3), _grouped(p.q[:, :, i0:i1], p.n_rep))
    return dq, dk, dv, sums, dbias
