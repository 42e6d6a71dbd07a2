"""The fused CPU kernel: build (once, cached), load and call ``csrc/multimax_attention.cpp``.

The kernel is a plain C++ shared library without Torch headers, so it builds in about two seconds with the system
compiler (``$CXX`` or ``c++``), against ~45 s for a ``torch.utils.cpp_extension`` build. It is called through
:mod:`ctypes` with raw pointers and strides, and multiplies matrices with the BLAS ``sgemm_`` that ``libtorch_cpu``
exports (MKL on x86-64 wheels). The library is cached under ``$HF_MULTIMAX_CACHE`` (default
``~/.cache/hf_multimax``), keyed by the source, the flags, the compiler and the CPU, and checked against the
PyTorch path on a tiny problem before first use. Any failure (no compiler, no ``sgemm_``, a wrong result) logs one
warning and leaves the pure-PyTorch path (:mod:`hf_multimax.kernels.blocked`) in charge.

The build target is the host CPU (``-march=native``: AVX-512 code where the CPU has it, AVX2 where not, NEON on
ARM) unless ``HF_MULTIMAX_CPU_ARCH`` names another ``-march`` value, e.g. ``x86-64-v3`` to build and run the AVX2
code on an AVX-512 machine (for benchmarks and tests of that code path). Builds of several targets live side by side
in the cache and in one process (:func:`use_target`).

Set ``HF_MULTIMAX_CPU_KERNEL=0`` to never build or use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .problem import AttentionProblem

logger = logging.getLogger(__name__)

__all__ = [
    "cpu_kernel_available",
    "cpu_kernel_status",
    "forward",
    "backward",
    "seglu_cross_entropy_",
    "MAX_ORDER",
    "library_path",
    "cpu_target",
    "use_target",
    "vector_lanes",
    "host_cpu",
    "TARGET_ENV",
]

SOURCE = Path(__file__).with_name("csrc") / "multimax_attention.cpp"
FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
#: Environment variable that forces the ``-march`` target of the build (default ``native``).
TARGET_ENV = "HF_MULTIMAX_CPU_ARCH"
_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
#: Orders with a compiled specialisation (higher orders run on the PyTorch path).
MAX_ORDER = 4
BUILD_TIMEOUT_S = 300
# Tile sizes (rows of queries × keys): a tile of scores plus the K/V rows it reads stays in L2. Forward: 128 query
# rows halve the passes over K and V (attention forward at 4096 tokens, this project's benchmark: 0.96 of SDPA's time
# against 0.98 with 64 rows on AVX-512, 1.02 against 1.10 on AVX2; no change at 256 and 1024 tokens); the backward's
# tiles made no measurable difference (64/128 × 128/256).
BLOCK_Q_FORWARD, BLOCK_K_FORWARD = 128, 256
BLOCK_Q_BACKWARD, BLOCK_K_BACKWARD = 64, 128
# Few query rows (decoding): longer key blocks, so that each (batch, head) streams its keys and values in few sgemm
# calls (measured on 2048 cached keys, batch 4, 4 heads: 0.52 ms against 0.61 ms with 256-key blocks).
DECODE_ROWS, BLOCK_K_DECODE = 16, 2048

_LOCK = threading.Lock()
# Per build target: {"lib": CDLL, "ok": bool, "reason": str}.
_STATE: dict[str, dict[str, object]] = {}
_CURRENT: list[str] = []  # the target of use_target(), innermost last

_i64, _ptr, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double


class _Args(ctypes.Structure):
    """Mirror of ``struct MMArgs`` in the C++ source (every field 8 bytes: no padding surprises)."""

    _fields_ = [
        ("q", _ptr),
        ("q_sb", _i64),
        ("q_sh", _i64),
        ("q_sl", _i64),
        ("k", _ptr),
        ("k_sb", _i64),
        ("k_sh", _i64),
        ("k_sl", _i64),
        ("v", _ptr),
        ("v_sb", _i64),
        ("v_sh", _i64),
        ("v_sl", _i64),
        ("bias", _ptr),
        ("bias_sb", _i64),
        ("bias_sh", _i64),
        ("bias_sl", _i64),
        ("mask", _ptr),
        ("mask_kind", _i64),
        ("mask_sb", _i64),
        ("mask_sh", _i64),
        ("mask_sl", _i64),
        ("ranges", _ptr),
        ("ts", _ptr),
        ("order", _i64),
        ("out", _ptr),
        ("o_sb", _i64),
        ("o_sh", _i64),
        ("o_sl", _i64),
        ("stats", _ptr),
        ("dout", _ptr),
        ("do_sb", _i64),
        ("do_sh", _i64),
        ("do_sl", _i64),
        ("dq", _ptr),
        ("dk", _ptr),
        ("dv", _ptr),
        ("pacc", _ptr),
        ("dbias", _ptr),
        ("dbias_b", _i64),
        ("dbias_h", _i64),
        ("B", _i64),
        ("H", _i64),
        ("Hkv", _i64),
        ("Lq", _i64),
        ("Lk", _i64),
        ("D", _i64),
        ("Dv", _i64),
        ("scale", _f64),
        ("causal", _i64),
        ("dropout", _f64),
        ("seed", _i64),
        ("block_q", _i64),
        ("block_k", _i64),
        ("nthreads", _i64),
        ("kv_split", _i64),
    ]


class _CEArgs(ctypes.Structure):
    """Mirror of ``struct CEArgs``."""

    _fields_ = [
        ("logits", _ptr),
        ("rows", _i64),
        ("vocab", _i64),
        ("ld", _i64),
        ("labels", _ptr),
        ("ignore_index", _i64),
        ("ranges", _ptr),
        ("ts", _ptr),
        ("order", _i64),
        ("grad_scale", _f64),
        ("need_grad", _i64),
        ("loss", _ptr),
        ("pacc", _ptr),
        ("nthreads", _i64),
    ]


def _cache_dir() -> Path:
    root = os.environ.get("HF_MULTIMAX_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "hf_multimax" / "kernels"


def cpu_target() -> str:
    """The ``-march`` target of the kernel in use: the innermost :func:`use_target`, else ``$HF_MULTIMAX_CPU_ARCH``,
    else ``native``."""
    if _CURRENT:
        return _CURRENT[-1]
    return os.environ.get(TARGET_ENV, "").strip() or "native"


@contextmanager
def use_target(target: str) -> Iterator[None]:
    """Run the kernel built for ``target`` (a ``-march`` value such as ``native`` or ``x86-64-v3``) inside the block;
    it is built and self-tested on first use, and falls back to the PyTorch path with one warning if that fails."""
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise ValueError(f"target must be a -march value such as 'native' or 'x86-64-v3', got {target!r}")
    _CURRENT.append(target)
    try:
        yield
    finally:
        _CURRENT.pop()


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.readlines()
    except OSError:
        return []


def host_cpu() -> tuple[str, set[str]]:
    """``(model name, ISA flags)`` of this machine from ``/proc/cpuinfo`` (x86 ``flags`` or ARM ``Features``); the
    ``platform`` name and no flags where there is no such file."""
    model, flags = "", set()
    for line in _cpuinfo():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        elif line.startswith(("flags", "Features")) and not flags:
            flags = set(line.split(":", 1)[1].split())
    return model or platform.processor() or platform.machine(), flags


def _cpu_fingerprint() -> str:
    """CPU model and flags: a ``native`` build must not be handed from one CPU to another through a shared cache."""
    lines = [line for line in _cpuinfo() if line.startswith(("flags", "model name", "Features", "CPU part"))]
    return "".join(sorted(set(lines))) or platform.processor() + platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _flags(target: str) -> list[str]:
    if not _TARGET_RE.match(target):
        raise RuntimeError(f"{TARGET_ENV}={target!r} is not a -march value (e.g. native, x86-64-v3, x86-64-v4)")
    return [*FLAGS, f"-march={target}"]


def library_path(target: str | None = None) -> Path | None:
    """Where the cached library for this source, compiler, build target and CPU lives (``None`` without a
    compiler)."""
    target = target or cpu_target()
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = compiler
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_flags(target)).encode(), version.encode(), _cpu_fingerprint().encode()):
        digest.update(part)
    name = re.sub(r"[^A-Za-z0-9]+", "_", target)
    return _cache_dir() / f"multimax_attention_{name}_{digest.hexdigest()[:20]}.so"


def _build(target_path: Path, target: str) -> None:
    compiler = _compiler()
    target_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target_path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_flags(target), str(SOURCE), "-o", tmp]
        logger.info("Building the fused MultiMax CPU kernel: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"compiler exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target_path)  # atomic: concurrent builders never see a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _find_sgemm() -> int | None:
    """Address of the Fortran BLAS ``sgemm_`` linked into libtorch_cpu (MKL or OpenBLAS), if it is exported."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = lib_dir / name
        if not path.exists():
            continue
        try:
            return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            return None
    return None


def _load(target: str) -> ctypes.CDLL:
    if os.environ.get("HF_MULTIMAX_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError("disabled by HF_MULTIMAX_CPU_KERNEL=0")
    if not SOURCE.exists():
        raise RuntimeError(f"kernel source {SOURCE} is missing from this installation")
    sgemm = _find_sgemm()
    if sgemm is None:
        raise RuntimeError("this PyTorch build exports no `sgemm_` from libtorch_cpu")
    path = library_path(target)
    if path is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    if not path.exists():
        try:
            _build(path, target)
        except OSError:  # unwritable cache: build into the temporary directory instead
            path = Path(tempfile.gettempdir()) / "hf_multimax" / path.name
            if not path.exists():
                _build(path, target)
    lib = ctypes.CDLL(str(path))
    lib.mm_set_sgemm.argtypes = [ctypes.c_void_p]
    lib.mm_attention_forward.argtypes = [ctypes.POINTER(_Args)]
    lib.mm_attention_backward.argtypes = [ctypes.POINTER(_Args)]
    lib.mm_seglu_cross_entropy.argtypes = [ctypes.POINTER(_CEArgs)]
    lib.mm_vector_lanes.restype = ctypes.c_int
    if not lib.mm_set_sgemm(sgemm):
        raise RuntimeError("could not hand `sgemm_` to the kernel")
    _STATE[target] = {"lib": lib}
    _self_test(target)
    return lib


def _self_test(target: str) -> None:
    """Compare with the PyTorch path on a tiny problem (catches e.g. an ILP64 BLAS, whose integers are 64-bit)."""
    from . import blocked

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 8, generator=gen) for _ in range(3))
    ranges, ts = torch.randn(4, generator=gen) * 0.5, torch.randn(4, generator=gen) * 0.3
    problem = AttentionProblem.build(q, k, v, ranges, ts, scale=0.3, mask=None, causal=True, bias=None, dropout_p=0.0)
    expected, _ = blocked.forward(problem)
    with use_target(target):
        got, _ = forward(problem)
    if not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"self-test mismatch (max abs error {(got - expected).abs().max().item():.3g})")


def cpu_kernel_status(target: str | None = None) -> tuple[bool, str]:
    """``(available, reason)`` of the build for ``target`` (default :func:`cpu_target`): builds and loads it on first
    call."""
    target = target or cpu_target()
    with _LOCK:
        state = _STATE.get(target)
        if state is None or "ok" not in state:
            try:
                _load(target)
                _STATE[target].update(ok=True, reason=f"loaded (-march={target}, {vector_lanes(target)} lanes)")
            except Exception as error:  # any failure means: use the PyTorch path
                reason = f"{type(error).__name__}: {error}"
                _STATE[target] = {"ok": False, "reason": reason}
                logger.warning(
                    "The fused MultiMax CPU kernel (-march=%s) is unavailable (%s); using the pure-PyTorch blocked "
                    "path, which is exact but slower.",
                    target,
                    reason,
                )
        state = _STATE[target]
        return bool(state["ok"]), str(state["reason"])


def cpu_kernel_available(target: str | None = None) -> bool:
    """Whether the compiled CPU kernel (for ``target``, default :func:`cpu_target`) can run; builds it on first
    call."""
    return cpu_kernel_status(target)[0]


def vector_lanes(target: str | None = None) -> int | None:
    """float32 lanes per vector of the loaded build (16 for AVX-512, 8 for AVX2, 4 for NEON/SSE), ``None`` when it
    is not loaded."""
    state = _STATE.get(target or cpu_target(), {})
    lib = state.get("lib")
    return int(lib.mm_vector_lanes()) if lib is not None else None


def _args(p: AttentionProblem, block_q: int, block_k: int) -> _Args:
    a = _Args()
    a.q, (a.q_sb, a.q_sh, a.q_sl) = p.q.data_ptr(), p.q.stride()[:3]
    a.k, (a.k_sb, a.k_sh, a.k_sl) = p.k.data_ptr(), p.k.stride()[:3]
    a.v, (a.v_sb, a.v_sh, a.v_sl) = p.v.data_ptr(), p.v.stride()[:3]
    if p.bias is not None:
        a.bias, (a.bias_sb, a.bias_sh, a.bias_sl) = p.bias.data_ptr(), p.bias.stride()[:3]
    if p.mask is not None:
        a.mask, a.mask_kind = p.mask.data_ptr(), 1 if p.mask.dtype == torch.bool else 2
        a.mask_sb, a.mask_sh, a.mask_sl = p.mask.stride()[:3]
    a.ranges, a.ts, a.order = p.ranges_per_head.data_ptr(), p.ts_per_head.data_ptr(), p.order
    a.B, a.H, a.Hkv, a.Lq, a.Lk, a.D, a.Dv = p.batch, p.heads, p.kv_heads, p.q_len, p.kv_len, p.head_dim, p.v_dim
    a.scale, a.causal, a.dropout, a.seed = p.scale, int(p.causal), p.dropout_p, p.seed
    a.block_q, a.block_k, a.nthreads = block_q, block_k, max(1, torch.get_num_threads())
    return a


def _run(name: str, args: ctypes.Structure) -> None:
    lib = _STATE.get(cpu_target(), {}).get("lib")
    if lib is None:
        raise RuntimeError(f"the fused MultiMax CPU kernel (-march={cpu_target()}) is not loaded")
    code = getattr(lib, name)(ctypes.byref(args))
    if code != 0:
        raise RuntimeError(f"{name} failed with code {code}")


def forward(p: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Lq, H, Dv), stats (2, B, H, Lq))`` in float32; ``stats`` holds each row's maximum of
    ``σ(s) + mask`` and the log of its sum of exponentials relative to that maximum (see :mod:`.blocked`)."""
    out = torch.empty(p.batch, p.q_len, p.heads, p.v_dim, dtype=torch.float32)
    stats = torch.empty(2, p.batch, p.heads, p.q_len, dtype=torch.float32)
    if p.q_len <= DECODE_ROWS:
        a = _args(p, max(1, p.q_len), BLOCK_K_DECODE)
    else:
        a = _args(p, BLOCK_Q_FORWARD, BLOCK_K_FORWARD)
    a.out, (a.o_sb, a.o_sl, a.o_sh) = out.data_ptr(), out.stride()[:3]
    a.stats = stats.data_ptr()
    _run("mm_attention_forward", a)
    return out, stats


def backward(
    p: AttentionProblem, out: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, need_bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, sums (H, 4N) float64, dbias or None)``, gradients in float32 and the layouts of ``p``'s inputs
    (``dq`` (B, H, Lq, D), ``dk`` (B, Hkv, Lk, D), ``dv`` (B, Hkv, Lk, Dv)); ``sums`` are Σ dZ·a^n then Σ dZ·a^(n-1)
    per head (see :func:`hf_multimax.kernels.problem.parameter_grads`)."""
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    a = _args(p, BLOCK_Q_BACKWARD, BLOCK_K_BACKWARD)
    if need_bias_grad:
        db, dh = p.bias_slots
        a.dbias_b, a.dbias_h = db, dh
    a.kv_split = split = _kv_split(p, a, need_bias_grad)
    # Left uninitialised: each task zeroes the slices it owns (parallel first touch).
    dq = torch.empty(split, p.batch, p.heads, p.q_len, p.head_dim, dtype=torch.float32)
    dk = torch.empty(p.batch, p.kv_heads, p.kv_len, p.head_dim, dtype=torch.float32)
    dv = torch.empty(p.batch, p.kv_heads, p.kv_len, p.v_dim, dtype=torch.float32)
    pacc = torch.zeros(split, p.batch, p.heads, 4 * p.order, dtype=torch.float64)
    a.out, (a.o_sb, a.o_sl, a.o_sh) = out.data_ptr(), out.stride()[:3]
    a.stats = stats.data_ptr()
    a.dout, (a.do_sb, a.do_sl, a.do_sh) = dout.data_ptr(), dout.stride()[:3]
    a.dq, a.dk, a.dv, a.pacc = dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), pacc.data_ptr()
    dbias = None
    if need_bias_grad:
        dbias = torch.zeros(a.dbias_b, a.dbias_h, p.q_len, p.kv_len, dtype=torch.float32)
        a.dbias = dbias.data_ptr()
    _run("mm_attention_backward", a)
    return (dq[0] if split == 1 else dq.sum(0)), dk, dv, pacc.sum((0, 1)), dbias


def _kv_split(p: AttentionProblem, a: _Args, need_bias_grad: bool) -> int:
    """How many key-block ranges the backward splits each task into: enough tasks for two per thread. Tasks are
    (batch, key/value head) pairs, fewer when a broadcast bias gradient needs one owner per slot (see the C++)."""
    tasks = p.batch * p.kv_heads
    if need_bias_grad:
        tasks = (p.batch if a.dbias_b != 1 else 1) * (p.kv_heads if a.dbias_h != 1 else 1)
    key_blocks = -(-p.kv_len // a.block_k)
    wanted = -(-2 * a.nthreads // tasks)
    return max(1, min(key_blocks, wanted))


def seglu_cross_entropy_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ranges: torch.Tensor,
    ts: torch.Tensor,
    ignore_index: int,
    grad_scale: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``σ(logits)`` per row for one chunk, in place: ``(loss (rows,), sums (4N,) float64)``.

    ``logits`` (rows, vocab) float32 with unit last stride; with ``need_grad`` it is overwritten by the gradient
    w.r.t. the logits of ``grad_scale · Σ loss`` (ignored rows: 0), and ``sums`` are the parameter sums of
    :func:`hf_multimax.kernels.problem.parameter_grads`.
    """
    if logits.dtype != torch.float32 or logits.stride(-1) != 1 or logits.device.type != "cpu":
        raise ValueError("logits must be a float32 CPU tensor with a unit last stride")
    labels = labels.to(torch.int64).contiguous()
    order = ranges.shape[-1] // 2
    r32, t32 = ranges.detach().float().contiguous(), ts.detach().float().contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    pacc = torch.zeros(logits.shape[0], 4 * order, dtype=torch.float64)
    a = _CEArgs()
    a.logits, a.rows, a.vocab, a.ld = logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0)
    a.labels, a.ignore_index = labels.data_ptr(), ignore_index
    a.ranges, a.ts, a.order = r32.data_ptr(), t32.data_ptr(), order
    a.grad_scale, a.need_grad = grad_scale, int(need_grad)
    a.loss, a.pacc, a.nthreads = loss.data_ptr(), pacc.data_ptr(), max(1, torch.get_num_threads())
    _run("mm_seglu_cross_entropy", a)
    return loss, pacc.sum(0)
