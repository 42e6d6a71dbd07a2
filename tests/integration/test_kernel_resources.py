"""benchmarks/kernel_resources.py: the Triton kernels compiled for sm_90 without a GPU, their resources reported."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_resources.py"
HAS_NVIDIA_BACKEND = importlib.util.find_spec("triton") is not None and (
    importlib.util.find_spec("triton.backends.nvidia") is not None
)


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_MULTIMAX_TRITON_TILES")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs triton with its NVIDIA backend (no GPU)")
def test_reports_every_kernel_with_its_registers_spills_and_tensor_core_instructions(tmp_path):
    proc = run("--head-dims", "32", "--cases", "full", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "kernel_resources_sm90.json").read_text())
    kernels = {r["kernel"]: r for r in data["kernels"]}
    assert set(kernels) == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    for name, r in kernels.items():
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0 and 0 <= r["shared"] <= 227 * 1024, r
        if name != "_bwd_delta_kernel":  # a row sum, no matrix product
            assert r["wgmma"] > 0, r  # 64-row bf16 tiles: Hopper's tensor-core instructions
    table = (tmp_path / "kernel_resources_sm90.md").read_text()
    assert "| bf16 | 32 | full | fwd | 64×64 |" in table and data["environment"]["arch"] == "sm_90"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tiles", "{dq}"], "HF_MULTIMAX_TRITON_TILES"),
        (["--order", "5"], "--order 5"),
        (["--head-dims", "512"], "--head-dims"),
        (["--dtypes", "int8"], "invalid choice"),
    ],
)
def test_bad_flags_get_one_error_line(args, message, tmp_path):
    proc = run(*args, "--out", str(tmp_path))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


def test_help_reads():
    proc = run("--help")
    assert proc.returncode == 0 and "sm_90" in proc.stdout and "--tiles" in proc.stdout
