"""MultiMax attention in Triton: ``softmax(σ(scale·Q·Kᵀ + bias) + mask)·V`` with exact gradients.

The CUDA default of ``multimax_attention`` (and ``backend="triton"``). On CUDA it compiles for the GPU; on CPU tensors
with ``TRITON_INTERPRET=1`` (set before :mod:`triton` is first imported) the same kernels run in Triton's interpreter,
which is how the tests check them without a GPU. Triton is optional: without it this module imports,
:func:`triton_available` is False and ``backend="triton"`` raises.

Algorithm (flash-attention 2, same contract as :mod:`.blocked` and :mod:`.cpu`):

* ``_fwd_kernel``, grid (query tiles, batch·heads): one program holds a ``BLOCK_M × D`` query tile and streams key/value
  tiles of ``BLOCK_N`` rows (causal: only up to the tile's last query, later tiles are skipped), computes
  ``s = scale·q·kᵀ + bias``, ``z = σ(s)`` then the mask (bool: ``-inf`` where False; float: added after σ), and keeps
  an online softmax (row max ``m``, running sum ``l``, output accumulator, all float32 or float64). It writes the
  output (B, Lq, H, Dv) and the statistics (2, B, H, Lq) = (m, log l); ``m = -inf`` marks a row with nothing to
  attend, whose output is 0.
* ``_bwd_delta_kernel``: ``rowsum(dO ⊙ O)`` of each query row, accumulated in float32, for the two below.
* ``_bwd_dkdv_kernel``, grid (key tiles, batch·kv_heads): one program holds a key/value tile and loops over the query
  heads of its GQA group (key/value heads are never copied) and over the query tiles that can see it (causal: from
  the diagonal on), recomputes the probabilities from the statistics, and accumulates ``dV = Pᵀ·dO`` and
  ``dK = scale·dSᵀ·Q`` in registers, with ``dP = dO·Vᵀ``, ``dZ = P ⊙ (dP − rowsum(dO ⊙ O))`` and
  ``dS = dZ ⊙ σ'(s)``.
* ``_bwd_dq_kernel``, grid (query tiles, groups): one program holds a query tile, recomputes the same tiles along the
  key axis and accumulates ``dQ = scale·dS·K``; it also produces the score-bias gradient and the ``ranges``/``ts``
  reductions (below). A group is one (batch, head) pair, or, when the bias is broadcast over batch and/or heads and
  its gradient is wanted, all the pairs that share one slice of the bias gradient: that program is the slice's only
  writer and adds each pair's ``dS`` into it in a fixed order (no atomics, no races).

dQ and dK/dV come from separate kernels, so no tile is written by two programs and the backward needs no atomics
(FlashAttention-2 adds dQ with atomics); the price is recomputing ``Q·Kᵀ`` and ``dO·Vᵀ`` once more (7 tile matrix
products instead of 5), which the deterministic result is worth by default.

Opt-in instead (:data:`BACKWARD` ``= "atomic"``): FlashAttention-2's one-kernel backward. The dK/dV kernel also
adds each tile's ``scale·dS·K`` into a float32 dQ buffer (and the bias gradient, and each row's ``Σ P·dP`` and
``Σ P·f`` for the ranges/ts correction) with atomics, and the dQ kernel does not run: 5 tile products instead of 7,
at the price of results that vary in the last bits between runs.

The ranges/ts reduction: each ``_bwd_dq_kernel`` program sums, per query row and in float32, ``dZ·a^n`` and
``dZ·a^(n-1)`` over the row's keys (``a = relu(r − s)`` below, ``relu(s − r)`` above, ``a^0`` the indicator), corrects
each row with its exact ``Σ P·dP`` (below), sums its rows in float64 and stores the 4N partial sums of its (batch,
head, query tile) into its own row of a (B, H, query tiles, 4N) float64 buffer; one PyTorch reduction over batches
and tiles then gives the (H, 4N) sums of :func:`~hf_multimax.kernels.problem.parameter_grads`. Partial sums rather
than float32 atomics, because the result is then bit-identical from run to run (atomics add in arrival order) and a
sum over every score of a long sequence (millions of terms) keeps float64 accuracy across rows; the buffer is tiny.

Tiles (:data:`TILES_BY_HEAD_DIM`): 64 × 64 query × key rows in the forward and dK/dV kernels and 64 × 32 in the dQ
kernel up to head dimension 64, 64 × 64 with 8 warps in all three above it, 32 × 64 with 8 warps for the one-kernel
backward; chosen from the compiler's register and spill report for sm_90, not yet timed on a GPU
(``$HF_MULTIMAX_TRITON_TILES`` or :data:`TILES` replace them). Halved with one stage on the GPU when a tile row of the
operands exceeds 512 bytes, i.e. float32 past head dimension 128, so that the shared memory stays within an H100/H200
SM's 227 KB. The head dimension is padded to a power of two, at least 16, as ``tl.dot`` wants. Lengths need not be
multiples of the tiles: rows and columns past the end are masked to ``-inf`` (probability 0, gradient 0) and never
stored, so no NaN can arise there. :func:`compile_offline` compiles the kernels for sm_90 without a GPU and reports
their registers, spills, shared memory and tensor-core instructions.

Precision: σ, σ', the softmax and every accumulator are float32 (float64 for float64 inputs, so ``gradcheck``
works); float32 inputs multiply in IEEE float32 (not TF32). bfloat16/float16 inputs (kept in their dtype by
``AttentionProblem.build(native_dtype=True)``) are multiplied as they come, with float32 accumulation; ``P`` and
``dS`` are rounded to that dtype for the output's ``P·V``, ``dV = Pᵀ·dO``, ``dK`` and ``dQ``, as FlashAttention does.
The ``ranges``/``ts`` gradients are sums over every score, where that rounding would not average out:
``rowsum(dO ⊙ O)`` comes from the rounded ``P``, so a row's ``dZ`` no longer sums to zero against the float32
probabilities the backward recomputes, and the sums drifted by up to ~2e-2 of their scale in bfloat16. So the dQ
kernel also accumulates each row's exact ``Σ P·dP`` and corrects its sums with it (two row vectors per slot; see
``_bwd_dq_kernel``): they are then as accurate as with float32 probabilities (~3e-3 in bfloat16), at no extra matrix
product. :data:`PRECISION` ``["split_pv"]`` (off by default) splits the output's ``P`` into its rounded value and the
rounding error, two products, for an output nearer float32 (~1.5e-3 instead of ~2e-3 in bfloat16; one more product
in the forward); ``PRECISION["split_ds"]`` splits ``dS`` the same way for ``dQ``/``dK`` (float32-level gradients, two
more products).
The interpreter's ``tl.dot`` cannot multiply bfloat16 (it sees the raw 16-bit patterns), so there the operands are
widened to float32 first: products of bfloat16 values are exact in float32, so the result is the one a GPU's
float32-accumulating products give.

Dropout uses the counter-based hash of :func:`hf_multimax.kernels.blocked.dropout_keep_scale` (and the C++ kernel),
bit for bit (32-bit integer arithmetic in the kernel): the three backends drop the same entries for the same seed, and
the backward regenerates the mask instead of storing it.

Bad input never gives a wrong result: orders above :data:`MAX_ORDER`, head dimensions above :data:`MAX_HEAD_DIM`,
tensors on a device Triton cannot run on here, a failed first-use self-test (a tiny problem compared with the
PyTorch path) or an earlier compile error of the same variant make :func:`unsupported` say why, and
:mod:`hf_multimax.kernels.dispatch` sends the call to the blocked PyTorch path with a warning naming the shapes and
the dtype. A compile error at launch (:func:`cannot_take`) does the same; any other launch failure, and an
out-of-memory error, propagates.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading

import torch

from . import blocked
from .problem import AttentionProblem, dropout_threshold

logger = logging.getLogger(__name__)

__all__ = [
    "triton_available",
    "triton_status",
    "unsupported",
    "describe",
    "cannot_take",
    "remember_failure",
    "forward",
    "backward",
    "compile_offline",
    "MAX_ORDER",
    "MAX_HEAD_DIM",
    "TILES",
    "TILES_BY_HEAD_DIM",
    "BACKWARD",
    "backward_mode",
    "PRECISION",
    "NATIVE_DTYPE",
]

#: The kernels multiply bfloat16/float16 operands as they come (``AttentionProblem.build(native_dtype=True)``).
NATIVE_DTYPE = True

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as _error:  # optional dependency
    triton = tl = None
    _IMPORT_ERROR = f"{type(_error).__name__}: {_error}"

#: Orders with a compiled path (higher orders use the blocked PyTorch path).
MAX_ORDER = 4
#: Largest head dimension (query/key and value) the kernels take: register tiles of 64 × 256 float32 per program.
MAX_HEAD_DIM = 256
#: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, by the padded head dimension (the larger of query/key and
#: value; the first entry at least as large). Chosen without a GPU from the compiler's report for sm_90 (triton 3.6,
#: bfloat16; ``benchmarks/kernel_resources.py``, ``benchmarks/results/kernel_resources_sm90.md``): configurations that
#: keep the tensor-core instructions (wgmma) and spill the fewest registers; not yet timed on a GPU. Not autotuned
#: (the dQ kernel's read-add-write of a shared bias gradient would need ``reset_to_zero`` under the autotuner).
#: ``"atomic"``: the one-kernel backward's (:data:`BACKWARD`; it holds dK, dV and a dQ tile at once).
TILES_BY_HEAD_DIM = {
    64: {"forward": (64, 64, 4, 2), "dkdv": (64, 64, 8, 2), "dq": (64, 32, 4, 2), "atomic": (32, 64, 8, 2)},
    256: {"forward": (64, 64, 8, 2), "dkdv": (64, 64, 8, 2), "dq": (64, 64, 8, 2), "atomic": (32, 64, 8, 2)},
}
#: ``{kernel: tiles}`` for every problem instead of :data:`TILES_BY_HEAD_DIM` (tests, tuning); ``None``: by head
#: dimension. The environment variable ``HF_MULTIMAX_TRITON_TILES`` (the same as JSON) takes precedence, so a
#: benchmark can time other tiles without code. The interpreter ignores warps and stages.
TILES: dict[str, tuple[int, int, int, int]] | None = None
TILES_ENV = "HF_MULTIMAX_TRITON_TILES"
_KERNELS = ("forward", "dkdv", "dq", "atomic")
#: The backward: ``"deterministic"`` (default: a dK/dV kernel and a dQ kernel, no atomics, two runs bit-identical)
#: or ``"atomic"`` (opt-in, FlashAttention-2's: one kernel that adds dQ, the bias gradient and the ranges/ts row
#: corrections with float atomics: two fewer matrix products per tile, results that vary in the last bits from run
#: to run). ``$HF_MULTIMAX_TRITON_BACKWARD`` takes precedence; ``torch.use_deterministic_algorithms(True)`` keeps
#: the deterministic one whatever is asked.
BACKWARD = "deterministic"
BACKWARD_ENV = "HF_MULTIMAX_TRITON_BACKWARD"
BACKWARD_MODES = ("deterministic", "atomic")
#: Two-product splits for bfloat16/float16 operands (see the module docstring).
PRECISION = {"split_pv": False, "split_ds": False}

_LOCK = threading.Lock()
_OFFLINE = threading.local()  # .gpu: compile_offline is choosing tiles for a GPU from CPU tensors
_VERIFIED: dict[str, str | None] = {}  # device type -> None (self-test passed) or the reason it failed
_FAILED: dict[tuple, str] = {}  # (op, variant) -> the compile error of those kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _knobs_interpret() -> bool:
    """What ``@triton.jit`` decides now: interpreter or compiler."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: the environment variable
        return _interpreting()


def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(available, reason)``: Triton imports and can run here: CUDA is present (for CUDA tensors), or
    ``TRITON_INTERPRET=1`` (CPU tensors, in the interpreter). ``device`` narrows the question to one device type."""
    if triton is None:
        return False, f"triton is not installed ({_IMPORT_ERROR})"
    kind = None if device is None else torch.device(device).type
    cuda = torch.cuda.is_available()
    if kind == "cpu" or (kind is None and not cuda):
        if _INTERPRETED:
            return True, "interpreter (TRITON_INTERPRET=1)"
        if _interpreting():
            return False, "TRITON_INTERPRET=1 was set after hf_multimax.kernels.triton_kernel was imported"
        return False, "CPU tensors need TRITON_INTERPRET=1 (set before this module is imported)" + (
            "" if cuda else "; no CUDA device"
        )
    if kind not in (None, "cuda"):
        return False, f"Triton does not run on {kind} tensors"
    return (True, "CUDA") if cuda else (False, "no CUDA device")


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run: triton is importable and CUDA is present or ``TRITON_INTERPRET=1``."""
    return triton_status(device)[0]


# ----------------------------------------------------------------------------------------------------------------------
# kernels

if triton is not None:

    @triton.jit
    def _dot(a, b, DOT: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr):
        """``a @ b`` with operands in ``DOT`` and an ``ACC`` accumulator (``WIDEN``: operands widened to float32,
        for the interpreter)."""
        a = a.to(DOT)
        b = b.to(DOT)
        if WIDEN:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            return tl.dot(a, b, out_dtype=ACC, input_precision="ieee")
        return tl.dot(a, b, out_dtype=ACC)

    @triton.jit
    def _dot_split(a, b, DOT: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr, SPLIT: tl.constexpr):
        """``a @ b`` for a float32 ``a`` (probabilities, dS): with ``SPLIT`` and half-precision operands, ``a`` is
        split into a rounded part and its rounding error, two products whose sum is accurate to about 2^-16."""
        if SPLIT:  # set by the host only for bfloat16/float16 operands
            hi = a.to(DOT)
            lo = (a - hi.to(a.dtype)).to(DOT)
            return _dot(hi, b, DOT, ACC, WIDEN) + _dot(lo, b, DOT, ACC, WIDEN)
        return _dot(a, b, DOT, ACC, WIDEN)

    @triton.jit
    def _add_combine(a, b):
        return a + b

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    # The kernels reduce with ``tl.reduce`` rather than ``tl.sum``/``tl.max`` (and fill with ``tl.full``, not
    # ``tl.zeros``): those are ``@jit`` functions of ``triton.language``, decorated when triton is imported, so they
    # cannot run in the interpreter when triton was imported (by torch or transformers) before ``TRITON_INTERPRET=1``
    # was set. In the interpreter the combine functions are Triton's own, which it runs as numpy reductions (any other
    # runs element by element in Python); compiled, they are this module's, which work whatever mode triton.language
    # was decorated in (the same code as ``tl.sum``/``tl.max``).
    if _knobs_interpret():
        _SUM = tl.standard._sum_combine
        _MAX = tl.standard._elementwise_max
    else:
        _SUM, _MAX = _add_combine, _max_combine

    @triton.jit
    def _lowbias32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _keep(seed, bh, Lq, offs_m, offs_n, threshold):
        """Dropout keep mask of a tile: the hash of :func:`blocked.dropout_keep_scale`, bit for bit."""
        row = ((bh.to(tl.int64) * Lq + offs_m.to(tl.int64)) & 0xFFFFFFFF).to(tl.uint32)
        key = _lowbias32((seed.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32) ^ _lowbias32(row))
        cols = offs_n.to(tl.uint32) * 0x9E3779B9
        u = _lowbias32(key[:, None] ^ cols[None, :])
        return (u >> 8) >= threshold.to(tl.uint32)

    @triton.jit
    def _sigma(s, R, T, ORDER: tl.constexpr):
        """σ(s); powers by repeated products (helpers are inlined by hand: each nested call costs the interpreter)."""
        z = s
        for n in tl.static_range(1, ORDER + 1):
            below = tl.maximum(tl.load(R + 2 * n - 2).to(s.dtype) - s, 0.0)
            above = tl.maximum(s - tl.load(R + 2 * n - 1).to(s.dtype), 0.0)
            below_n = below
            above_n = above
            for _ in tl.static_range(n - 1):
                below_n = below_n * below
                above_n = above_n * above
            z += tl.load(T + 2 * n - 2).to(s.dtype) * below_n + tl.load(T + 2 * n - 1).to(s.dtype) * above_n
        return z

    @triton.jit
    def _sigma_backward(s, dz, p, R, T, rows_a, rows_b, offs_s, ORDER: tl.constexpr, SUMS: tl.constexpr):
        """``(dz·σ'(s), rows_a, rows_b)``; with ``SUMS``, per query row, ``rows_a`` gains this tile's Σ dz·a^n (slots
        0..2N-1) and Σ dz·a^(n-1) (slots 2N..4N-1) and ``rows_b`` the same sums of ``p`` instead of ``dz`` (the
        correction for the row's exact ``Σ P·dP``, see ``_bwd_dq_kernel``)."""
        deriv = tl.full(s.shape, 1.0, s.dtype)
        for n in tl.static_range(1, ORDER + 1):
            for side in tl.static_range(2):
                r = tl.load(R + 2 * n - 2 + side).to(s.dtype)
                t = tl.load(T + 2 * n - 2 + side).to(s.dtype)
                if side == 0:
                    a = tl.maximum(r - s, 0.0)
                else:
                    a = tl.maximum(s - r, 0.0)
                if n == 1:
                    a_prev = tl.where(a > 0, 1.0, 0.0).to(s.dtype)
                else:
                    a_prev = a
                    for _ in tl.static_range(n - 2):
                        a_prev = a_prev * a
                if side == 0:
                    deriv -= (n * t) * a_prev
                else:
                    deriv += (n * t) * a_prev
                if SUMS:
                    here = offs_s[None, :] == 2 * n - 2 + side  # slot of Σ ·a^n; + 2N: slot of Σ ·a^(n-1)
                    there = offs_s[None, :] == 2 * ORDER + 2 * n - 2 + side
                    w = dz * a_prev
                    rows_a += tl.where(here, tl.reduce(w * a, 1, _SUM)[:, None], 0.0)
                    rows_a += tl.where(there, tl.reduce(w, 1, _SUM)[:, None], 0.0)
                    w = p * a_prev
                    rows_b += tl.where(here, tl.reduce(w * a, 1, _SUM)[:, None], 0.0)
                    rows_b += tl.where(there, tl.reduce(w, 1, _SUM)[:, None], 0.0)
        return dz * deriv, rows_a, rows_b

    @triton.jit
    def _scores(
        q,
        k,
        b,
        h,
        offs_m,
        offs_n,
        Lq,
        Lk,
        scale,
        Bias,
        sbb,
        sbh,
        sbm,
        Mask,
        smb,
        smh,
        smm,
        R,
        T,
        CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ORDER: tl.constexpr,
        ACC: tl.constexpr,
        DOT: tl.constexpr,
        WIDEN: tl.constexpr,
    ):
        """``(s, z)`` of one tile: ``s = scale·q·kᵀ (+ bias)``, ``z = σ(s)`` masked (``-inf``: not attended)."""
        s = _dot(q, tl.trans(k), DOT, ACC, WIDEN) * scale
        inside = (offs_m < Lq)[:, None] & (offs_n < Lk)[None, :]
        rows = offs_m.to(tl.int64)[:, None]
        cols = offs_n[None, :]
        if HAS_BIAS:
            s += tl.load(Bias + b * sbb + h * sbh + rows * sbm + cols, mask=inside, other=0.0).to(ACC)
        z = _sigma(s, R, T, ORDER)
        valid = inside
        if CAUSAL:
            valid = valid & (cols <= offs_m[:, None])
        if MASK_KIND == 1:
            keep = tl.load(Mask + b * smb + h * smh + rows * smm + cols, mask=inside, other=0)
            valid = valid & (keep != 0)
        if MASK_KIND == 2:
            z += tl.load(Mask + b * smb + h * smh + rows * smm + cols, mask=inside, other=0.0).to(ACC)
        z = tl.where(valid, z, float("-inf"))
        return s, z

    @triton.jit
    def _probabilities(z, m, log_l):
        """``exp(z - m - log l)``, 0 where ``z = -inf`` and on rows with nothing to attend (``m = -inf``)."""
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        return tl.exp(z - m_safe[:, None] - log_l[:, None])

    @triton.jit
    def _bwd_delta_kernel(
        Out, DO, Delta, sob, som, soh, sdb, sdm, sdh, H, Lq, DV,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):  # fmt: skip
        """``Delta[b, h, i] = Σ_d dO ⊙ O`` of one (batch, head) and ``BLOCK_M`` query rows, accumulated in ``ACC``
        from the output's dtype (no widened copies of O and dO in memory)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_dv = tl.arange(0, BLOCK_DV)
        rows = offs_m.to(tl.int64)[:, None]
        inside = (offs_m < Lq)[:, None] & (offs_dv < DV)[None, :]
        o = tl.load(Out + b * sob + h * soh + rows * som + offs_dv[None, :], mask=inside, other=0.0).to(ACC)
        do = tl.load(DO + b * sdb + h * sdh + rows * sdm + offs_dv[None, :], mask=inside, other=0.0).to(ACC)
        tl.store(Delta + bh * Lq + offs_m, tl.reduce(o * do, 1, _SUM), mask=offs_m < Lq)

    @triton.jit(do_not_specialize=["seed", "threshold"])
    def _fwd_kernel(
        Q,
        K,
        V,
        Bias,
        Mask,
        R,
        T,
        C,
        Out,
        Stats,
        sqb,
        sqh,
        sqm,
        skb,
        skh,
        skn,
        svb,
        svh,
        svn,
        sbb,
        sbh,
        sbm,
        smb,
        smh,
        smm,
        sob,
        som,
        soh,
        B,
        H,
        N_REP,
        Lq,
        Lk,
        D,
        DV,
        seed,
        threshold,
        CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        ORDER: tl.constexpr,
        ACC: tl.constexpr,
        DOT: tl.constexpr,
        WIDEN: tl.constexpr,
        SPLIT_PV: tl.constexpr,
        SPLIT_DS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        kvh = h // N_REP
        scale = tl.load(C).to(ACC)
        keep_scale = tl.load(C + 1).to(ACC)
        R += h * 2 * ORDER
        T += h * 2 * ORDER
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        rows = offs_m.to(tl.int64)[:, None]
        q = tl.load(
            Q + b * sqb + h * sqh + rows * sqm + offs_d[None, :],
            mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.full([BLOCK_M], 0.0, ACC)
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, ACC)
        kv_end = Lk
        if CAUSAL:
            kv_end = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)  # later key tiles are fully masked: skipped
        for start_n in range(0, kv_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keys = offs_n.to(tl.int64)[:, None]
            k = tl.load(
                K + b * skb + kvh * skh + keys * skn + offs_d[None, :],
                mask=(offs_n < Lk)[:, None] & (offs_d < D)[None, :],
                other=0.0,
            )
            _, z = _scores(
                q,
                k,
                b,
                h,
                offs_m,
                offs_n,
                Lq,
                Lk,
                scale,
                Bias,
                sbb,
                sbh,
                sbm,
                Mask,
                smb,
                smh,
                smm,
                R,
                T,
                CAUSAL,
                MASK_KIND,
                HAS_BIAS,
                ORDER,
                ACC,
                DOT,
                WIDEN,
            )
            m_new = tl.maximum(m_i, tl.reduce(z, 1, _MAX))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(z - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            if DROPOUT:
                p = tl.where(_keep(seed, bh, Lq, offs_m, offs_n, threshold), p * keep_scale, 0.0)
            v = tl.load(
                V + b * svb + kvh * svh + keys * svn + offs_dv[None, :],
                mask=(offs_n < Lk)[:, None] & (offs_dv < DV)[None, :],
                other=0.0,
            )
            acc = acc * alpha[:, None] + _dot_split(p, v, DOT, ACC, WIDEN, SPLIT_PV)
            m_i = m_new
        empty = m_i == float("-inf")
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        log_l = tl.where(empty, 0.0, tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(
            Out + b * sob + h * soh + rows * som + offs_dv[None, :],
            out.to(Out.dtype.element_ty),
            mask=(offs_m < Lq)[:, None] & (offs_dv < DV)[None, :],
        )
        stat = Stats + (b * H + h) * Lq + offs_m
        tl.store(stat, m_i.to(Stats.dtype.element_ty), mask=offs_m < Lq)
        tl.store(stat + B * H * Lq, log_l.to(Stats.dtype.element_ty), mask=offs_m < Lq)

    @triton.jit(do_not_specialize=["seed", "threshold"])
    def _bwd_dkdv_kernel(
        Q,
        K,
        V,
        Bias,
        Mask,
        R,
        T,
        C,
        Stats,
        Delta,
        DO,
        DK,
        DV_,
        DQ,
        Partial,
        RowB,
        RowExact,
        DBias,
        sqb,
        sqh,
        sqm,
        skb,
        skh,
        skn,
        svb,
        svh,
        svn,
        sbb,
        sbh,
        sbm,
        smb,
        smh,
        smm,
        sdb,
        sdm,
        sdh,
        B,
        H,
        HKV,
        N_REP,
        Lq,
        Lk,
        D,
        DV,
        seed,
        threshold,
        DB_H,
        GROUP_B,
        GROUP_H,
        N_KB,
        CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        ATOMIC: tl.constexpr,
        BIAS_GRAD: tl.constexpr,
        ORDER: tl.constexpr,
        ACC: tl.constexpr,
        DOT: tl.constexpr,
        WIDEN: tl.constexpr,
        SPLIT_PV: tl.constexpr,
        SPLIT_DS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        NS: tl.constexpr,
    ):
        # With ATOMIC (the opt-in one-kernel backward, FlashAttention-2's): also adds this key tile's share of dQ, of
        # the bias gradient and of each row's Σ P·dP and Σ P·f (for the ranges/ts correction) into float32/float64
        # buffers with atomics, and stores its Σ dz·f per head into its own row of Partial; no dQ kernel runs.
        pid_n = tl.program_id(0)
        bkv = tl.program_id(1)
        b = (bkv // HKV).to(tl.int64)
        kvh = (bkv % HKV).to(tl.int64)
        scale = tl.load(C).to(ACC)
        keep_scale = tl.load(C + 1).to(ACC)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        keys = offs_n.to(tl.int64)[:, None]
        k = tl.load(
            K + b * skb + kvh * skh + keys * skn + offs_d[None, :],
            mask=(offs_n < Lk)[:, None] & (offs_d < D)[None, :],
            other=0.0,
        )
        v = tl.load(
            V + b * svb + kvh * svh + keys * svn + offs_dv[None, :],
            mask=(offs_n < Lk)[:, None] & (offs_dv < DV)[None, :],
            other=0.0,
        )
        dk = tl.full([BLOCK_N, BLOCK_D], 0.0, ACC)
        dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, ACC)
        offs_s = tl.arange(0, NS)
        unused = tl.full([1, NS], 0.0, ACC)
        start_m0 = 0
        if CAUSAL:
            start_m0 = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier query tiles see none of these keys
        for rep in range(0, N_REP):
            h = kvh * N_REP + rep
            Rh = R + h * 2 * ORDER
            Th = T + h * 2 * ORDER
            sums = tl.full([NS], 0.0, tl.float64)
            for start_m in range(start_m0, Lq, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                rows = offs_m.to(tl.int64)[:, None]
                in_q = offs_m < Lq
                q = tl.load(
                    Q + b * sqb + h * sqh + rows * sqm + offs_d[None, :],
                    mask=in_q[:, None] & (offs_d < D)[None, :],
                    other=0.0,
                )
                do = tl.load(
                    DO + b * sdb + h * sdh + rows * sdm + offs_dv[None, :],
                    mask=in_q[:, None] & (offs_dv < DV)[None, :],
                    other=0.0,
                )
                stat = Stats + (b * H + h) * Lq + offs_m
                m = tl.load(stat, mask=in_q, other=float("-inf")).to(ACC)
                log_l = tl.load(stat + B * H * Lq, mask=in_q, other=0.0).to(ACC)
                delta = tl.load(Delta + (b * H + h) * Lq + offs_m, mask=in_q, other=0.0).to(ACC)
                s, z = _scores(
                    q,
                    k,
                    b,
                    h,
                    offs_m,
                    offs_n,
                    Lq,
                    Lk,
                    scale,
                    Bias,
                    sbb,
                    sbh,
                    sbm,
                    Mask,
                    smb,
                    smh,
                    smm,
                    Rh,
                    Th,
                    CAUSAL,
                    MASK_KIND,
                    HAS_BIAS,
                    ORDER,
                    ACC,
                    DOT,
                    WIDEN,
                )
                p = _probabilities(z, m, log_l)
                dp = _dot(do, tl.trans(v), DOT, ACC, WIDEN)
                if DROPOUT:
                    keep = _keep(seed, b * H + h, Lq, offs_m, offs_n, threshold)
                    dv += _dot(tl.trans(tl.where(keep, p * keep_scale, 0.0)), do, DOT, ACC, WIDEN)
                    dp = tl.where(keep, dp * keep_scale, 0.0)
                else:
                    dv += _dot(tl.trans(p), do, DOT, ACC, WIDEN)
                dz = p * (dp - delta[:, None])
                if ATOMIC:
                    rows_a = tl.full([BLOCK_M, NS], 0.0, ACC)
                    rows_b = tl.full([BLOCK_M, NS], 0.0, ACC)
                    ds, rows_a, rows_b = _sigma_backward(s, dz, p, Rh, Th, rows_a, rows_b, offs_s, ORDER, True)
                    sums += tl.reduce(rows_a.to(tl.float64), 0, _SUM)
                    at = (b * H + h) * Lq + offs_m
                    tl.atomic_add(RowExact + at, tl.reduce(p * dp, 1, _SUM), mask=in_q)
                    tl.atomic_add(RowB + at[:, None] * NS + offs_s[None, :], rows_b, mask=in_q[:, None])
                    tl.atomic_add(
                        DQ + (b * H + h) * Lq * D + rows * D + offs_d[None, :],
                        _dot_split(ds, k, DOT, ACC, WIDEN, SPLIT_DS) * scale,
                        mask=in_q[:, None] & (offs_d < D)[None, :],
                    )
                    if BIAS_GRAD:  # slices shared by several (batch, head) pairs add up: atomics here too
                        cell = ((b // GROUP_B) * DB_H + h // GROUP_H) * Lq * Lk + rows * Lk + offs_n[None, :]
                        inside = in_q[:, None] & (offs_n < Lk)[None, :]
                        tl.atomic_add(DBias + cell, ds, mask=inside)
                else:
                    ds, _, _ = _sigma_backward(s, dz, p, Rh, Th, unused, unused, offs_s, ORDER, False)
                dk += _dot_split(tl.trans(ds), q, DOT, ACC, WIDEN, SPLIT_DS)
            if ATOMIC:
                tl.store(Partial + ((b * H + h) * N_KB + pid_n) * NS + offs_s, sums)
        mask_k = (offs_n < Lk)[:, None]
        tl.store(
            DK + (b * HKV + kvh) * Lk * D + keys * D + offs_d[None, :],
            (dk * scale).to(DK.dtype.element_ty),
            mask=mask_k & (offs_d < D)[None, :],
        )
        tl.store(
            DV_ + (b * HKV + kvh) * Lk * DV + keys * DV + offs_dv[None, :],
            dv.to(DV_.dtype.element_ty),
            mask=mask_k & (offs_dv < DV)[None, :],
        )

    @triton.jit(do_not_specialize=["seed", "threshold"])
    def _bwd_dq_kernel(
        Q,
        K,
        V,
        Bias,
        Mask,
        R,
        T,
        C,
        Stats,
        Delta,
        DO,
        DQ,
        Partial,
        DBias,
        sqb,
        sqh,
        sqm,
        skb,
        skh,
        skn,
        svb,
        svh,
        svn,
        sbb,
        sbh,
        sbm,
        smb,
        smh,
        smm,
        sdb,
        sdm,
        sdh,
        B,
        H,
        N_REP,
        Lq,
        Lk,
        D,
        DV,
        seed,
        threshold,
        DB_H,
        GROUP_B,
        GROUP_H,
        N_QB,
        CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DROPOUT: tl.constexpr,
        BIAS_GRAD: tl.constexpr,
        GROUPED: tl.constexpr,
        ORDER: tl.constexpr,
        ACC: tl.constexpr,
        DOT: tl.constexpr,
        WIDEN: tl.constexpr,
        SPLIT_PV: tl.constexpr,
        SPLIT_DS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        NS: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        group = tl.program_id(1)
        # The group's (batch, head) pairs: GROUP_B batches × GROUP_H heads that share one bias-gradient slice
        # (gb, gh) (GROUP_B = GROUP_H = 1 without a bias gradient or with a full one).
        gb = (group // DB_H).to(tl.int64)
        gh = (group % DB_H).to(tl.int64)
        scale = tl.load(C).to(ACC)
        keep_scale = tl.load(C + 1).to(ACC)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_s = tl.arange(0, NS)
        rows = offs_m.to(tl.int64)[:, None]
        in_q = offs_m < Lq
        kv_end = Lk
        if CAUSAL:
            kv_end = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
        members = 1  # a compile-time 1 unless GROUPED: the compiler then drops the loop (it spilled registers)
        if GROUPED:
            members = GROUP_B * GROUP_H
        for member in range(0, members):
            b = gb + member // GROUP_H
            h = gh + member % GROUP_H
            kvh = h // N_REP
            Rh = R + h * 2 * ORDER
            Th = T + h * 2 * ORDER
            q = tl.load(
                Q + b * sqb + h * sqh + rows * sqm + offs_d[None, :],
                mask=in_q[:, None] & (offs_d < D)[None, :],
                other=0.0,
            )
            do = tl.load(
                DO + b * sdb + h * sdh + rows * sdm + offs_dv[None, :],
                mask=in_q[:, None] & (offs_dv < DV)[None, :],
                other=0.0,
            )
            stat = Stats + (b * H + h) * Lq + offs_m
            m = tl.load(stat, mask=in_q, other=float("-inf")).to(ACC)
            log_l = tl.load(stat + B * H * Lq, mask=in_q, other=0.0).to(ACC)
            delta = tl.load(Delta + (b * H + h) * Lq + offs_m, mask=in_q, other=0.0).to(ACC)
            dq = tl.full([BLOCK_M, BLOCK_D], 0.0, ACC)
            rows_a = tl.full([BLOCK_M, NS], 0.0, ACC)
            rows_b = tl.full([BLOCK_M, NS], 0.0, ACC)
            exact = tl.full([BLOCK_M], 0.0, ACC)  # Σ P·dP of the row, from the probabilities recomputed here
            for start_n in range(0, kv_end, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                keys = offs_n.to(tl.int64)[:, None]
                k = tl.load(
                    K + b * skb + kvh * skh + keys * skn + offs_d[None, :],
                    mask=(offs_n < Lk)[:, None] & (offs_d < D)[None, :],
                    other=0.0,
                )
                v = tl.load(
                    V + b * svb + kvh * svh + keys * svn + offs_dv[None, :],
                    mask=(offs_n < Lk)[:, None] & (offs_dv < DV)[None, :],
                    other=0.0,
                )
                s, z = _scores(
                    q,
                    k,
                    b,
                    h,
                    offs_m,
                    offs_n,
                    Lq,
                    Lk,
                    scale,
                    Bias,
                    sbb,
                    sbh,
                    sbm,
                    Mask,
                    smb,
                    smh,
                    smm,
                    Rh,
                    Th,
                    CAUSAL,
                    MASK_KIND,
                    HAS_BIAS,
                    ORDER,
                    ACC,
                    DOT,
                    WIDEN,
                )
                p = _probabilities(z, m, log_l)
                dp = _dot(do, tl.trans(v), DOT, ACC, WIDEN)
                if DROPOUT:
                    keep = _keep(seed, b * H + h, Lq, offs_m, offs_n, threshold)
                    dp = tl.where(keep, dp * keep_scale, 0.0)
                dz = p * (dp - delta[:, None])
                exact += tl.reduce(p * dp, 1, _SUM)
                ds, rows_a, rows_b = _sigma_backward(s, dz, p, Rh, Th, rows_a, rows_b, offs_s, ORDER, True)
                if BIAS_GRAD:
                    # This program is the only writer of these rows of slice (gb, gh): a plain read-add-write.
                    inside = in_q[:, None] & (offs_n < Lk)[None, :]
                    ptr = DBias + (gb * DB_H + gh) * Lq * Lk + rows * Lk + offs_n[None, :]
                    if GROUPED:
                        ds_sum = ds + tl.load(ptr, mask=inside, other=0.0)
                    else:  # the slice's only pair: one write
                        ds_sum = ds
                    tl.store(ptr, ds_sum.to(DBias.dtype.element_ty), mask=inside)
                dq += _dot_split(ds, k, DOT, ACC, WIDEN, SPLIT_DS)
            tl.store(
                DQ + (b * H + h) * Lq * D + rows * D + offs_d[None, :],
                (dq * scale).to(DQ.dtype.element_ty),
                mask=in_q[:, None] & (offs_d < D)[None, :],
            )
            # dz used rowsum(dO ∘ O) (delta), whose O came from probabilities rounded for P·V; the ranges/ts sums
            # take the row's exact Σ P·dP instead: Σ P·(dP − exact)·f =
            # Σ dz·f + (delta − exact)·Σ P·f, so every row's dZ sums to zero as in float32 (dQ, dK and the bias
            # gradient keep delta, as FlashAttention does).
            per_row = rows_a + (delta - exact)[:, None] * rows_b
            sums = tl.reduce(per_row.to(tl.float64), 0, _SUM)
            tl.store(Partial + ((b * H + h) * N_QB + pid_m) * NS + offs_s, sums)


#: Whether the kernels were decorated for the interpreter (``TRITON_INTERPRET=1`` when this module was imported).
_INTERPRETED = triton is not None and type(_fwd_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------------------------------------------
# launchers


class _Unsupported(ValueError):
    """A problem the kernels do not take (routed to the blocked path)."""


def _check(p: AttentionProblem) -> None:
    ok, reason = triton_status(p.q.device)
    if not ok:
        raise _Unsupported(reason)
    if p.order < 1 or p.order > MAX_ORDER:
        raise _Unsupported(f"order {p.order} (the Triton kernel has orders 1 to {MAX_ORDER})")
    if p.head_dim > MAX_HEAD_DIM or p.v_dim > MAX_HEAD_DIM:
        raise _Unsupported(f"head dimension {p.head_dim}/{p.v_dim} above {MAX_HEAD_DIM}")
    if p.q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise _Unsupported(f"dtype {p.q.dtype}")
    if p.k.dtype != p.q.dtype or p.v.dtype != p.q.dtype:
        raise _Unsupported("query, key and value in different dtypes")


def _tiles(p: AttentionProblem, kind: str, gpu: bool | None = None) -> tuple[int, int, int, int]:
    """The tiles of kernel ``kind`` for ``p``: ``$HF_MULTIMAX_TRITON_TILES``, else :data:`TILES`, else
    :data:`TILES_BY_HEAD_DIM`; halved (4 warps, one pipeline stage) on the GPU when a tile row of the operands takes
    more than 512 bytes (float32 past head dimension 128, float64 past 64): float32 at head dimension 256 would need
    ~230-300 KB of shared memory with 64-row tiles, more than an H100/H200 SM has (227 KB)."""
    width = max(_pad(p.head_dim), _pad(p.v_dim))
    tiles = _env_tiles(os.environ.get(TILES_ENV, "")) or {}
    if kind not in tiles:
        tiles = TILES or next(t for dim, t in sorted(TILES_BY_HEAD_DIM.items()) if dim >= width or dim == MAX_HEAD_DIM)
        kind = kind if kind in tiles else "dkdv"  # TILES without "atomic": the dK/dV kernel's tiles
    block_m, block_n, warps, stages = tiles[kind]
    if (_for_gpu(p) if gpu is None else gpu) and width * p.q.element_size() > 512:
        return max(16, block_m // 2), max(16, block_n // 2), 4, 1
    return block_m, block_n, warps, stages


@functools.lru_cache(maxsize=8)
def _env_tiles(text: str) -> dict[str, tuple[int, int, int, int]] | None:
    """``$HF_MULTIMAX_TRITON_TILES`` parsed: ``{"forward": [BLOCK_M, BLOCK_N, warps, stages], "dkdv": ..., "dq":
    ...}`` (kernels left out keep their tiles); ``None`` when unset; ``ValueError`` naming the variable."""
    if not text.strip():
        return None
    try:
        given = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{TILES_ENV}={text!r} is not JSON ({error})") from None
    if not isinstance(given, dict) or not set(given) <= set(_KERNELS):
        raise ValueError(f"{TILES_ENV}={text!r}: expected an object with keys among {list(_KERNELS)}")
    tiles = {}
    for kernel, value in given.items():
        ok = isinstance(value, list) and len(value) == 4 and all(isinstance(x, int) and x > 0 for x in value)
        if not ok or value[0] < 16 or value[1] < 16 or any(x & (x - 1) for x in value[:3]):
            raise ValueError(
                f"{TILES_ENV}: {kernel}={value!r}; expected [BLOCK_M, BLOCK_N, num_warps, num_stages], positive "
                "integers, the first three powers of two and the blocks at least 16"
            )
        tiles[kernel] = tuple(value)
    return tiles


def backward_mode() -> str:
    """The backward the next call runs (:data:`BACKWARD`, ``$HF_MULTIMAX_TRITON_BACKWARD``); ``ValueError`` naming the
    setting for another value."""
    env = os.environ.get(BACKWARD_ENV, "").strip()
    mode, source = (env, BACKWARD_ENV) if env else (BACKWARD, "triton_kernel.BACKWARD")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"{source}={mode!r}; expected one of {list(BACKWARD_MODES)}")
    return "deterministic" if torch.are_deterministic_algorithms_enabled() else mode


def _for_gpu(p: AttentionProblem) -> bool:
    """Whether ``p``'s kernels are for a GPU: CUDA tensors, or :func:`compile_offline` compiling for one."""
    return p.q.device.type == "cuda" or getattr(_OFFLINE, "gpu", False)


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as float64 ``0 / -inf`` with the same broadcast (stride-0 dimensions stay stride 0)."""
    compact = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    filled = torch.zeros(compact.shape, dtype=torch.float64, device=mask.device).masked_fill(~compact, float("-inf"))
    return filled.expand(mask.shape)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _common(p: AttentionProblem) -> dict:
    """Arguments shared by the three kernels (pointers, strides, sizes, switches)."""
    dummy = p.q  # never read: the switches keep the kernels away from absent operands
    bias, mask = p.bias, p.mask
    if mask is not None and mask.dtype == torch.bool and p.dtype == torch.float64 and _for_gpu(p):
        # Triton 3.6 cannot compile a bool mask beside float64 products for sm_90 (an assertion in its MMA lowering,
        # "fp64 don't support largeK MMA"); the same mask as 0 / -inf added after σ computes the same function.
        mask = _additive(mask)
    acc = tl.float64 if p.dtype == torch.float64 else tl.float32
    dot = {torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(p.q.dtype, tl.float32)
    half = p.q.dtype in (torch.bfloat16, torch.float16)
    widen = half and _INTERPRETED
    consts = torch.tensor([p.scale, 1.0 / (1.0 - p.dropout_p)], dtype=p.dtype, device=p.q.device)
    return dict(
        tensors=(
            p.q,
            p.k,
            p.v,
            bias if bias is not None else dummy,
            mask if mask is not None else dummy,
            p.ranges_per_head,
            p.ts_per_head,
            consts,
        ),
        strides=(
            *p.q.stride()[:3],
            *p.k.stride()[:3],
            *p.v.stride()[:3],
            *(bias.stride()[:3] if bias is not None else (0, 0, 0)),
            *(mask.stride()[:3] if mask is not None else (0, 0, 0)),
        ),
        flags=dict(
            CAUSAL=p.causal,
            MASK_KIND=0 if mask is None else (1 if mask.dtype == torch.bool else 2),
            HAS_BIAS=bias is not None,
            DROPOUT=p.dropout_p > 0,
            ORDER=p.order,
            ACC=acc,
            DOT=dot,
            WIDEN=widen,
            SPLIT_PV=half and PRECISION["split_pv"],
            SPLIT_DS=half and PRECISION["split_ds"],
            BLOCK_D=_pad(p.head_dim),
            BLOCK_DV=_pad(p.v_dim),
        ),
        seed=p.seed,
        threshold=dropout_threshold(p.dropout_p),
    )


def _run(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel`` (compiling it on first use): the one place the launchers meet Triton's runtime."""
    kernel[grid](*args, **kwargs)


def _launch_forward(p: AttentionProblem, launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    launch = launch or _run
    # The output in the compute dtype: the backward's rowsum(dO ∘ O) reads it, and from a bfloat16 O the dQ/dK
    # errors grow from ~4e-3 to ~1.6e-2 of float64 (measured in the interpreter), past the 1e-2 band.
    out = torch.empty(p.batch, p.q_len, p.heads, p.v_dim, dtype=p.dtype, device=p.q.device)
    stats = torch.empty(2, p.batch, p.heads, p.q_len, dtype=p.dtype, device=p.q.device)
    c = _common(p)
    block_m, block_n, warps, stages = _tiles(p, "forward")
    grid = (triton.cdiv(p.q_len, block_m), p.batch * p.heads)
    launch(
        _fwd_kernel,
        grid,
        *c["tensors"],
        out,
        stats,
        *c["strides"],
        *out.stride()[:3],
        p.batch,
        p.heads,
        p.n_rep,
        p.q_len,
        p.kv_len,
        p.head_dim,
        p.v_dim,
        c["seed"],
        c["threshold"],
        **c["flags"],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
    )
    return out, stats


def _launch_backward(p, out, stats, dout, need_bias_grad, launch=None):
    launch = launch or _run
    device = p.q.device
    # dO in the products' operand dtype (lossless: the gradient arrives in the dtype the model returned).
    dout = dout.to(p.q.dtype)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    stats = stats.to(p.dtype).contiguous()
    c = _common(p)
    # rowsum(dO ∘ O), accumulated in the compute dtype by a small kernel (no widened copies of O and dO).
    delta = torch.empty(p.batch, p.heads, p.q_len, dtype=p.dtype, device=device)
    block_dv = c["flags"]["BLOCK_DV"]
    rows = max(1, min(128, 8192 // block_dv))
    launch(
        _bwd_delta_kernel,
        (triton.cdiv(p.q_len, rows), p.batch * p.heads),
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], p.heads, p.q_len, p.v_dim,
        ACC=c["flags"]["ACC"], BLOCK_M=rows, BLOCK_DV=block_dv, num_warps=4, num_stages=1,
    )  # fmt: skip
    atomic = backward_mode() == "atomic"
    # The gradients in the operands' dtype, each element written once by one program (the atomic backward adds dQ
    # into a zeroed buffer in the compute dtype instead).
    dq = (
        torch.zeros(p.batch, p.heads, p.q_len, p.head_dim, dtype=p.dtype, device=device)
        if atomic
        else torch.empty(p.batch, p.heads, p.q_len, p.head_dim, dtype=p.q.dtype, device=device)
    )
    dk = torch.empty(p.batch, p.kv_heads, p.kv_len, p.head_dim, dtype=p.q.dtype, device=device)
    dv = torch.empty(p.batch, p.kv_heads, p.kv_len, p.v_dim, dtype=p.q.dtype, device=device)
    db, dh = p.bias_slots if need_bias_grad else (p.batch, p.heads)
    dbias = torch.zeros(db, dh, p.q_len, p.kv_len, dtype=p.dtype, device=device) if need_bias_grad else None
    ns = triton.next_power_of_2(4 * p.order)
    do_strides = (dout.stride()[0], dout.stride()[1], dout.stride()[2])  # (B, Lq, H, Dv)
    sizes = (p.q_len, p.kv_len, p.head_dim, p.v_dim, c["seed"], c["threshold"])

    group_b, group_h = p.batch // db, p.heads // dh
    block_m, block_n, warps, stages = _tiles(p, "atomic" if atomic else "dkdv")
    n_kb = triton.cdiv(p.kv_len, block_n)
    if atomic:  # Σ dz·f per (batch, head, key tile); each row's Σ P·dP and Σ P·f, added up by atomics
        partial = torch.zeros(p.batch, p.heads, n_kb, ns, dtype=torch.float64, device=device)
        row_b = torch.zeros(p.batch, p.heads, p.q_len, ns, dtype=p.dtype, device=device)
        row_exact = torch.zeros(p.batch, p.heads, p.q_len, dtype=p.dtype, device=device)
    launch(
        _bwd_dkdv_kernel,
        (n_kb, p.batch * p.kv_heads),
        *c["tensors"],
        stats,
        delta,
        dout,
        dk,
        dv,
        *((dq, partial, row_b, row_exact, dbias if dbias is not None else dq) if atomic else (dq,) * 5),
        *c["strides"],
        *do_strides,
        p.batch,
        p.heads,
        p.kv_heads,
        p.n_rep,
        *sizes,
        dh,
        group_b,
        group_h,
        n_kb,
        **c["flags"],
        ATOMIC=atomic,
        BIAS_GRAD=atomic and need_bias_grad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NS=ns,
        num_warps=warps,
        num_stages=stages,
    )
    if atomic:  # the rows' correction of the ranges/ts sums (see _bwd_dq_kernel), here in float64 after the kernel
        fix = ((delta - row_exact).double().unsqueeze(-1) * row_b.double()).sum((0, 2))
        return dq.to(p.q.dtype), dk, dv, (partial.sum((0, 2)) + fix)[:, : 4 * p.order], dbias

    block_m, block_n, warps, stages = _tiles(p, "dq")
    n_qb = triton.cdiv(p.q_len, block_m)
    partial = torch.zeros(p.batch, p.heads, n_qb, ns, dtype=torch.float64, device=device)
    launch(
        _bwd_dq_kernel,
        (n_qb, db * dh),
        *c["tensors"],
        stats,
        delta,
        dout,
        dq,
        partial,
        dbias if dbias is not None else dq,
        *c["strides"],
        *do_strides,
        p.batch,
        p.heads,
        p.n_rep,
        *sizes,
        dh,
        group_b,
        group_h,
        n_qb,
        **c["flags"],
        BIAS_GRAD=need_bias_grad,
        GROUPED=group_b * group_h > 1,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NS=ns,
        num_warps=warps,
        num_stages=stages,
    )
    sums = partial.sum((0, 2))[:, : 4 * p.order]
    return dq, dk, dv, sums, dbias


_SIGNATURE_TYPES = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.bool: "i1",
    torch.int64: "i64",
    torch.int32: "i32",
}


def compile_offline(p: AttentionProblem, arch: int = 90, need_bias_grad: bool | None = None) -> dict[str, dict]:
    """Compile (not run) the kernels that ``p`` would launch for NVIDIA compute capability ``arch`` (90: H100/
    H200), without a GPU: Triton's code generator, its NVIDIA backend and the bundled ``ptxas``. Returns, per kernel,
    ``{"tiles": (BLOCK_M, BLOCK_N), "num_warps", "num_stages", "shared": bytes of shared memory}`` and, read off the
    machine code with the ``cuobjdump`` Triton bundles (``None`` without it), ``"registers"`` per thread, ``"stack"``
    (bytes of stack frame per thread: spilled registers), ``"spill_ops"`` (local-memory loads and stores in the code),
    ``"wgmma"`` and ``"mma"`` (Hopper and older tensor-core instructions). A compile error raises. For CI and for
    preparing a GPU run; needs this module imported without ``TRITON_INTERPRET=1`` and ``p`` may hold CPU tensors
    (nothing is launched)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _INTERPRETED:
        raise RuntimeError("compile_offline needs the kernels imported without TRITON_INTERPRET=1")
    calls = []
    _OFFLINE.gpu = True  # the tiles a GPU would get
    try:
        _launch_backward(
            p,
            *_launch_forward(p, launch=lambda *a, **k: calls.append((a, k))),
            torch.zeros(p.batch, p.q_len, p.heads, p.v_dim, dtype=p.dtype, device=p.q.device),
            p.bias is not None if need_bias_grad is None else need_bias_grad,
            launch=lambda *a, **k: calls.append((a, k)),
        )
    finally:
        _OFFLINE.gpu = False
    target = GPUTarget("cuda", arch, 32)
    report = {}
    for (kernel, _grid, *args), kwargs in calls:
        bound = dict(zip(kernel.arg_names, args), **kwargs)
        options = {name: bound.pop(name) for name in ("num_warps", "num_stages")}
        signature, constants = {}, {}
        for param, name in zip(kernel.params, kernel.arg_names):
            value = bound[name]
            if param.is_constexpr:
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _SIGNATURE_TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            else:
                signature[name] = "fp32"
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=target, options=options)
        report[kernel.__name__] = {
            "tiles": (bound["BLOCK_M"], bound.get("BLOCK_N", bound.get("BLOCK_DV"))),
            **options,
            "shared": compiled.metadata.shared,
            **_machine_code_report(compiled.asm["cubin"]),
        }
    return report


def _machine_code_report(cubin: bytes) -> dict:
    """Registers, stack frame, local-memory instructions and tensor-core instructions of a cubin, by ``cuobjdump``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    empty = dict.fromkeys(("registers", "stack", "spill_ops", "wgmma", "mma"))
    if tool is None:
        return empty
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        return empty
    return {
        "registers": int(found.group(1)),
        "stack": int(found.group(2)),
        "spill_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "wgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "mma": len(re.findall(r"\bHMMA\b", sass)),
    }


# ----------------------------------------------------------------------------------------------------------------------
# what the kernels take, and the first-use check (the choice and the fallback are hf_multimax.kernels.dispatch's)


def describe(p: AttentionProblem) -> str:
    """The shapes, dtypes, order and device of ``p``, for messages."""
    return p.describe()


def _self_test(device: torch.device) -> str | None:
    """Compare with the blocked path on a tiny problem (causal, GQA, bool mask, bias, per-head order 2); ``None`` if
    it matches, else what went wrong."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=gen).to(device)
    k, v = (torch.randn(1, 1, 7, 8, generator=gen).to(device) for _ in range(2))
    ranges, ts = (torch.randn(2, 4, generator=gen).to(device) * 0.5 for _ in range(2))
    bias = torch.randn(1, 2, 5, 7, generator=gen).to(device)
    mask = (torch.rand(1, 1, 5, 7, generator=gen) > 0.2).to(device)
    p = AttentionProblem.build(q, k, v, ranges, ts, scale=0.3, mask=mask, causal=True, bias=bias, dropout_p=0.0)
    try:
        expected, stats = blocked.forward(p)
        dout = torch.randn(expected.shape, generator=gen).to(device)
        want = blocked.backward(p, expected, stats, dout, True)
        got_out, got_stats = _launch_forward(p)
        got = _launch_backward(p, got_out, got_stats, dout, True)
    except torch.OutOfMemoryError:  # the device is full, not the kernel broken: the caller sees it
        raise
    except Exception as error:  # a compile or launch failure
        return f"{type(error).__name__}: {error}"
    for name, a, b in zip(("out", "dq", "dk", "dv", "sums", "dbias"), (got_out, *got), (expected, *want)):
        if not torch.allclose(a.double(), b.double(), atol=1e-4, rtol=1e-4):
            return f"self-test mismatch in {name} (max abs error {(a.double() - b.double()).abs().max().item():.3g})"
    return None


def _verified(p: AttentionProblem) -> str | None:
    kind = p.q.device.type
    with _LOCK:
        if kind in _VERIFIED:
            return _VERIFIED[kind]
    reason = _self_test(p.q.device)
    with _LOCK:
        _VERIFIED.setdefault(kind, reason)
        return _VERIFIED[kind]


def unsupported(p: AttentionProblem, op: str = "forward") -> str | None:
    """Why the kernels cannot run ``p`` (triton missing, the device, the order, the head dimension, a failed
    first-use self-test, or an earlier compile error of the ``op`` kernels for this variant), or ``None`` when they
    can."""
    backward_mode()  # the settings first: a bad value is the user's ValueError, not a failed self-test
    _env_tiles(os.environ.get(TILES_ENV, ""))
    try:
        _check(p)
    except _Unsupported as error:
        return str(error)
    failed = _verified(p)
    if failed is not None:
        return f"the kernel failed its self-test ({failed})"
    with _LOCK:
        return _FAILED.get((op, *_variant(p)))


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Triton's exceptions for "this kernel cannot be built for this problem here" (the ones Triton's own autotuner
    treats as a configuration that cannot run): frontend errors, resources past the device's limits, ``ptxas``."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    return (
        CompilationError,
        *(getattr(errors, name) for name in ("OutOfResources", "PTXASError") if hasattr(errors, name)),
    )


def _raised_while_compiling(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``triton.compiler.compiler.compile`` (an MLIR pass or a backend stage that
    failed, which Triton raises as a plain ``RuntimeError``)."""
    tb = error.__traceback__
    suffix = os.path.join("triton", "compiler", "compiler.py")
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "compile" and code.co_filename.endswith(suffix):
            return True
        tb = tb.tb_next
    return False


def cannot_take(error: BaseException) -> str | None:
    """``"<type>: <message>"`` when ``error``, raised by :func:`forward` or :func:`backward`, means that the kernel
    cannot be built for this problem on this device (a compile error, see :mod:`.dispatch`), else ``None``:
    out-of-memory errors, launch failures and anything else are not the kernel's limits and must propagate."""
    if triton is None or isinstance(error, torch.OutOfMemoryError):
        return None
    if not isinstance(error, _compile_errors()) and not _raised_while_compiling(error):
        return None
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:400]}{'...' if len(message) > 400 else ''}"


def _variant(p: AttentionProblem) -> tuple:
    """What selects one compiled version of the kernels (besides the launch sizes)."""
    mask = "none" if p.mask is None else str(p.mask.dtype)
    return (
        str(p.q.device),
        p.q.dtype,
        _pad(p.head_dim),
        _pad(p.v_dim),
        p.order,
        p.causal,
        mask,
        p.bias is not None,
        p.dropout_p > 0,
        backward_mode(),
    )


def remember_failure(p: AttentionProblem, op: str, reason: str) -> None:
    """Record that the ``op`` (``"forward"``/``"backward"``) kernels of ``p``'s variant failed to compile, so that
    :func:`unsupported` says so from now on instead of compiling them again on every call."""
    with _LOCK:
        _FAILED[(op, *_variant(p))] = reason


def forward(p: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Lq, H, Dv), stats (2, B, H, Lq))`` in the compute dtype (see :mod:`.blocked`); raises when the
    kernel fails to compile or launch."""
    return _launch_forward(p)


def backward(
    p: AttentionProblem, out: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, need_bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`hf_multimax.kernels.blocked.backward`: ``(dq, dk, dv, sums (H, 4N) float64, dbias)``,
    the first three in the operands' dtype (``p.q.dtype``: no float32 copies for bfloat16 operands), the bias gradient
    in the compute dtype; ``dout`` may come in the operands' dtype; raises when the kernel fails to compile or
    launch."""
    return _launch_backward(p, out, stats, dout, need_bias_grad)
