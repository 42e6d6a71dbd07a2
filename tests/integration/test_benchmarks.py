"""The benchmark scripts run end to end on tiny sizes (their numbers are not checked here: speed is measured by
running them, never in tests) and every table names the CPU, the ISA and the kernel's build target."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
X86 = platform.machine().lower() in ("x86_64", "amd64")

CASES = {
    "bench_attention": [
        "--seq",
        "64",
        "--repeats",
        "1",
        "--no-memory",
        "--profile-seq",
        "0",
        "--impls",
        "sdpa",
        "multimax",
    ],
    "bench_train_step": [
        "--seq",
        "32",
        "--repeats",
        "1",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--vocab",
        "128",
        "--decode-cache",
        "16",
        "--impls",
        "sdpa",
        "multimax",
    ],
    "bench_output_layer": ["--tokens", "16", "--vocab", "300", "--hidden", "16", "--repeats", "1", "--no-memory"],
}


def run(script: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("script", list(CASES))
def test_benchmark_writes_its_tables(script, tmp_path):
    proc = run(script, CASES[script], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / f"{script}.md").read_text()
    assert "host ISA" in report and "fused kernel build -march=native" in report
    assert "## Targets" in report and (tmp_path / f"{script}.png").stat().st_size > 0
    data = json.loads((tmp_path / f"{script}.json").read_text())
    assert "environment" in data
    if "--no-memory" not in CASES[script]:  # every fresh-process measurement came back
        peaks = [v for per_seq in data["memory"].values() for impls in per_seq.values() for v in impls.values()]
        assert peaks and all(isinstance(v, float) for v in peaks), data["memory"]


@pytest.mark.skipif(not X86, reason="AVX2 emulation is an x86-64 switch")
def test_emulate_avx2_runs_every_contender_at_avx2(tmp_path):
    proc = run("bench_attention", CASES["bench_attention"] + ["--emulate-avx2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "bench_attention_avx2.md").read_text()
    assert "PyTorch CPU capability AVX2" in report and "MKL instructions AVX2" in report
    assert "-march=x86-64-v3 (8 float lanes)" in report


def test_bad_flag_is_one_argparse_error(tmp_path):
    proc = run("bench_train_step", ["--decode-cache", "-1"], tmp_path)
    assert proc.returncode == 2 and "--decode-cache must be >= 0" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "script,flag",
    [("bench_attention", "--seq"), ("bench_output_layer", "--chunk-size"), ("bench_train_step", "--layers")],
)
def test_sizes_below_one_are_refused(script, flag, tmp_path):
    proc = run(script, [flag, "0"], tmp_path)
    assert proc.returncode == 2 and f"{flag} must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
