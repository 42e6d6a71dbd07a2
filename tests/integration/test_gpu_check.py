"""The GPU check (``benchmarks/gpu_check.py``) runs here as its dry run: the same code on the CPU at tiny sizes, the
Triton kernel in Triton's interpreter, so that an import, shape or report error is found here and not on the scarce
GPU machine. And a benchmark refuses to report a ``multimax`` timing that did not run on the kernel it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_multimax.kernels import cpu

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
PARTS = ("correctness", "attention", "end_to_end", "tests")


def clean_env(**extra: str) -> dict:
    """The environment without the switches the check sets itself (or that would change what runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET", "HF_MULTIMAX_BACKEND")}
    return env | extra


def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    return out, gpu_check("--dry-run", "--output_dir", str(out))


def test_dry_run_runs_every_part_on_the_triton_kernel(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    data = json.loads((out / "gpu_check.json").read_text())
    assert list(data["parts"]) == list(PARTS) and all(p["passed"] for p in data["parts"].values())
    env = data["environment"]
    assert env["dry_run"] and env["triton"] and env["triton_status"].startswith("interpreter")

    cases = data["parts"]["correctness"]["cases"]
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16", "float16"}
    assert {c["kind"] for c in cases} == {"causal_gqa", "padding", "t5_bias", "dropout"}
    for case in cases:
        assert case["passed"] and case["backends"] == ["triton"] and case["deterministic"], case
        names = {"output", "dq", "dk", "dv", "d_ranges", "d_ts"} | ({"d_bias"} if case["kind"] == "t5_bias" else set())
        assert set(case["errors"]) == names and all(e["rel"] <= case["band"] for e in case["errors"].values())
        assert case["masked_rows_zero"] is (True if case["kind"] == "padding" else None)

    entries = data["parts"]["attention"]["entries"]
    multimax = [e for e in entries if e["impl"] == "multimax"]
    assert multimax and all(e["status"] == "ok" and e["backends"] == ["triton"] and e["ms"] > 0 for e in multimax)
    assert {e["mode"] for e in multimax} == {"fwd", "fwd+bwd"} and {e["causal"] for e in multimax} == {True, False}
    needs_cuda = [e for e in entries if e["impl"] in ("sdpa_cudnn", "flex_multimax", "flex_softmax")]
    assert needs_cuda and all(e["status"] == "skipped" and "needs CUDA" in e["error"] for e in needs_cuda)

    e2e = data["parts"]["end_to_end"]
    assert [e["impl"] for e in e2e["train"]] == ["sdpa", "multimax"] and all(e["step_ms"] > 0 for e in e2e["train"])
    assert e2e["train"][1]["backends"] == ["triton"]
    assert {(e["impl"], e["cache"]) for e in e2e["generate"]} == {
        (impl, cache) for impl in ("sdpa", "multimax") for cache in ("dynamic", "static")
    }
    assert all(e["status"] == "ok" and e["decode_tokens_per_s"] > 0 for e in e2e["generate"])
    assert len(e2e["output_layer"]) == 4 and all(e["ms"] > 0 for e in e2e["output_layer"])

    (run,) = data["parts"]["tests"]["runs"]
    assert run["status"] == "ok" and run["tests"] == 2 and run["failures"] == run["errors"] == 0

    names = {t["name"] for t in data["targets"]}
    assert any(n.startswith("attention fwd+bwd") for n in names) and "training step, multimax / sdpa" in names


def test_dry_run_writes_the_tables_the_figure_and_prints_the_summary_last(dry_run):
    out, proc = dry_run
    report = (out / "gpu_check.md").read_text()
    for heading in (
        "## Correctness on the hardware",
        "## Attention speed and memory",
        "## End to end",
        "## GPU tests",
        "## Targets (issue 23)",
        "**Dry run**",
    ):
        assert heading in report, heading
    assert (out / "gpu_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = proc.stdout.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("gpu_check: CPU (dry run)"))
    table = lines[start:]
    assert table[1].startswith("part") and [line.split()[0] for line in table[2:6]] == list(PARTS)
    assert table[6].startswith("targets:") and len(table) == 7 + len(
        json.loads((out / "gpu_check.json").read_text())["targets"]
    )


def test_report_from_merges_parts_run_apart(dry_run, tmp_path):
    """Parts run by separate commands come back as separate files; --report-from makes one report of them."""
    out, _ = dry_run
    data = json.loads((out / "gpu_check.json").read_text())
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({**data, "parts": {k: data["parts"][k] for k in PARTS[:2]}}))
    second.write_text(json.dumps({**data, "parts": {k: data["parts"][k] for k in PARTS[2:]}}))
    proc = gpu_check("--report-from", str(first), str(second), "--output_dir", str(tmp_path / "merged"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((tmp_path / "merged" / "gpu_check.json").read_text())
    assert merged["parts"] == data["parts"]
    assert (tmp_path / "merged" / "gpu_check.md").read_text() == (out / "gpu_check.md").read_text()


def test_a_multimax_timing_not_on_triton_is_failed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    from hf_multimax.kernels import multimax_attention

    q = torch.randn(1, 2, 5, 8)
    entry = {"status": "ok"}
    with gpu_check.expect_triton(entry):
        multimax_attention(q, q, q, torch.zeros(4), torch.zeros(4), backend="torch")
    assert (
        entry["status"] == "failed"
        and entry["backends"] == ["torch"]
        and "not on the 'triton' kernel" in entry["error"]
    )


@pytest.mark.skipif(not cpu.cpu_kernel_available(), reason="the C++ kernel is what the CPU benchmark claims to time")
def test_bench_attention_refuses_to_time_a_fallback(tmp_path):
    """``HF_MULTIMAX_BACKEND=torch`` sends multimax to the blocked path: the benchmark exits with an error naming it
    instead of writing a table whose 'multimax' column is the fallback's."""
    args = ["--seq", "64", "--repeats", "1", "--no-memory", "--profile-seq", "0", "--impls", "sdpa", "multimax"]
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_attention.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(HF_MULTIMAX_BACKEND="torch"),
    )
    assert proc.returncode == 1 and "ran on ['torch'], not on the 'cpu' kernel" in proc.stderr, proc.stderr
    assert not (tmp_path / "bench_attention.md").exists()


def test_help_reads_and_bad_flags_are_refused():
    proc = gpu_check("--help", timeout=60)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "--part" in proc.stdout
    proc = gpu_check("--dry-run", "--budget", "0", "--output_dir", "x", timeout=60)
    assert proc.returncode == 2 and "--budget must be > 0" in proc.stderr
