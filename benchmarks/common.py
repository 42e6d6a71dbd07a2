"""Shared pieces of the benchmark scripts: interleaved median timing, peak memory in a fresh process, reports.

Timing runs every implementation round-robin in one process (so a busy neighbour slows all of them alike) and
reports medians. Peak memory is the resident-set high-water mark (``VmHWM``) of a fresh subprocess per
implementation and size, reset just before the measured step (``/proc/self/clear_refs``) and reported relative to the
resident set at that moment, with glibc told to return large blocks to the system on free (so the resident set is
the live tensors, not an allocator cache): tracemalloc does not see PyTorch's CPU allocations, RSS does.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (seconds) of each function, called round-robin ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def measure_peak_mb(step: Callable[[], object]) -> float:
    """Peak resident memory (MiB) ``step()`` adds on top of what the process holds when it starts."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        step()
        peak = _status_kb("VmHWM")
        if before is not None and peak is not None:
            return (peak - before) / 1024
    except OSError:
        pass
    import resource  # fallback: the lifetime high-water mark (includes imports)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def peak_in_subprocess(script: str, args: list[str], timeout: float = 900) -> float | None:
    """Run ``script --child ARGS`` in a fresh interpreter; it prints ``{"peak_mb": ...}`` as its last line."""
    # Large blocks are mmap'ed and unmapped on free, so the resident set follows the live tensors instead of what
    # glibc keeps cached from earlier steps (which would hide part of the measured step's peak).
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        print(f"  memory child {args} failed: {proc.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def child_report(peak_mb: float) -> None:
    print(json.dumps({"peak_mb": round(peak_mb, 1)}))


#: What ``--emulate-avx2`` sets: the kernel's AVX2 build, PyTorch's AVX2 kernels (SDPA's flash kernel included) and
#: MKL limited to AVX2, so an AVX-512 machine runs every contender as an AVX2 CPU would.
AVX2_ENV = {"HF_MULTIMAX_CPU_ARCH": "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
_AVX2_MARK = "HF_MULTIMAX_BENCH_AVX2"


def add_isa_argument(parser) -> None:
    parser.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="run every implementation as on an AVX2 CPU (the kernel built with -march=x86-64-v3, "
        "PyTorch at CPU capability AVX2, MKL limited to AVX2); results get the suffix _avx2",
    )


def apply_isa(args) -> None:
    """Re-run this script in a process with :data:`AVX2_ENV` set when ``--emulate-avx2`` asks for it (PyTorch and
    MKL read their switches once, at start-up)."""
    if getattr(args, "emulate_avx2", False) and os.environ.get(_AVX2_MARK) != "1":
        env = {**os.environ, **AVX2_ENV, _AVX2_MARK: "1"}
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def check_positive(parser, args, *names: str) -> None:
    """``parser.error`` (one line, exit code 2) for a size flag below 1."""
    for name in names:
        value = getattr(args, name)
        values = value if isinstance(value, list) else [value]
        if value is not None and any(v < 1 for v in values):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def result_name(base: str, args) -> str:
    return f"{base}_avx2" if getattr(args, "emulate_avx2", False) else base


def isa_description() -> str:
    """Host ISA, the ISA PyTorch's kernels run at, MKL's switch, and the fused kernel's build target and lanes."""
    from hf_multimax.kernels import cpu as cpu_kernel

    _, flags = cpu_kernel.host_cpu()
    host = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags else "other"
    available, reason = cpu_kernel.cpu_kernel_status()
    kernel = (
        f"-march={cpu_kernel.cpu_target()} ({cpu_kernel.vector_lanes()} float lanes)"
        if available
        else f"unavailable ({reason})"
    )
    mkl = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "default")
    return (
        f"host ISA {host}, PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}, MKL instructions "
        f"{mkl}, fused kernel build {kernel}"
    )


def environment() -> str:
    from hf_multimax.kernels import cpu as cpu_kernel

    model, _ = cpu_kernel.host_cpu()
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {model} ({os.cpu_count()} logical cores); "
        f"{isa_description()}; load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def sgemm_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Median ``torch.mm`` throughput (GFLOP/s) on a square problem, at the current thread count on CPU: the rate
    that bounds an attention kernel whose work is matrix products."""
    a, b = (torch.randn(size, size).to(device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        samples.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(samples) / 1e9


def expected_backend(device: str, order: int) -> str:
    """The kernel a ``multimax`` benchmark claims to time: Triton on CUDA, the fused C++ kernel on the CPU where it
    builds and takes the order, else the blocked PyTorch path."""
    if device == "cuda":
        return "triton"
    from hf_multimax.kernels import cpu

    return "cpu" if order <= cpu.MAX_ORDER and cpu.cpu_kernel_available() else "torch"


def backend_mismatch(seen: list, expected: str) -> str | None:
    """Why the attention calls ``seen`` (:func:`hf_multimax.kernels.record_backends`) are not all computed by the
    ``expected`` backend ("ran on [...]", with the first fallback's reason), or ``None`` when they are. No call at
    all is a mismatch too: the timed code did not reach the kernels."""
    wrong = [call for call in seen if call.backend != expected]
    if seen and not wrong:
        return None
    ran = sorted({call.backend for call in seen}) or "no MultiMax kernel"
    why = next((call.fallback for call in wrong if call.fallback), None)
    return f"ran on {ran}, not on the {expected!r} kernel" + (f" (fell back: {why})" if why else "")


def on_backend(run: Callable[[], object], expected: str, label: str) -> Callable[[], object]:
    """``run`` that exits the benchmark (``SystemExit``: a message, exit code 1) when an attention call inside it was
    not computed by the ``expected`` backend, or when none was made: a timing of a fallback must never pass for one of
    the kernel."""
    from hf_multimax.kernels import record_backends

    def checked():
        with record_backends() as seen:
            result = run()
        mismatch = backend_mismatch(seen, expected)
        if mismatch:
            raise SystemExit(f"error: {label} {mismatch}; refusing to report its times")
        return result

    return checked


def fmt_ratio(value: float | None, base: float | None) -> str:
    return "–" if value is None or base in (None, 0) else f"{value / base:.2f}"


def fmt(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if unit == "s" else f"{value:.0f} MiB"


def write_report(out_dir: Path, name: str, title: str, sections: list[str], data: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    note = (
        f"Load average after the run: {load}. The machine is shared: a load well above the thread count means "
        "other processes competed for the cores, which inflates absolute times (ratios are measured round-robin "
        "and suffer less)."
    )
    path.write_text(f"# {title}\n\n" + "\n\n".join([*sections, note]) + "\n", encoding="utf-8")
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
