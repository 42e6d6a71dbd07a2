"""Build targets of the C++ kernel: one vector register per ISA, builds side by side, the switch that forces one."""

from __future__ import annotations

import logging

import pytest
import torch
from kernel_backends import AVX2_TARGET, EXTRA_TARGETS

from hf_multimax.kernels import cpu, select_backend

needs_kernel = pytest.mark.skipif(not cpu.cpu_kernel_available("native"), reason="CPU kernel unavailable here")


@needs_kernel
def test_native_build_uses_one_register_of_the_host():
    _, flags = cpu.host_cpu()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    expected = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
    assert cpu.vector_lanes("native") == expected


@pytest.mark.skipif(not EXTRA_TARGETS, reason="the AVX2 target exists on x86-64 only")
def test_avx2_build_has_eight_lanes_and_its_own_library():
    assert cpu.cpu_kernel_available(AVX2_TARGET), cpu.cpu_kernel_status(AVX2_TARGET)[1]
    assert cpu.vector_lanes(AVX2_TARGET) == 8
    native, avx2 = cpu.library_path("native"), cpu.library_path(AVX2_TARGET)
    assert native != avx2 and "x86_64_v3" in avx2.name and avx2.exists()


@pytest.mark.skipif(not EXTRA_TARGETS, reason="the AVX2 target exists on x86-64 only")
def test_targets_give_the_same_attention():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 70, 24, generator=gen) for _ in range(3))
    ranges, ts = torch.randn(3, 4, generator=gen) * 0.5, torch.randn(3, 4, generator=gen) * 0.3
    from hf_multimax.kernels import multimax_attention

    outs = []
    for target in ("native", AVX2_TARGET):
        with cpu.use_target(target):
            outs.append(multimax_attention(q, k, v, ranges, ts, is_causal=True, backend="cpu"))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=2e-6)


def test_switch_selects_the_target_and_use_target_wins(monkeypatch):
    monkeypatch.delenv(cpu.TARGET_ENV, raising=False)
    assert cpu.cpu_target() == "native"
    monkeypatch.setenv(cpu.TARGET_ENV, "x86-64-v3")
    assert cpu.cpu_target() == "x86-64-v3"
    with cpu.use_target("native"):
        assert cpu.cpu_target() == "native"
    assert cpu.cpu_target() == "x86-64-v3"


@pytest.mark.parametrize("bad", ["", "-O0 -march=native", "native;rm", 3])
def test_use_target_refuses_what_is_not_a_march_value(bad):
    with pytest.raises(ValueError, match="target must be a -march value"):
        with cpu.use_target(bad):
            pass


@pytest.mark.skipif(cpu._compiler() is None, reason="no C++ compiler")
def test_unknown_target_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    """A target the compiler rejects never gives a wrong result: one warning, then the PyTorch path."""
    monkeypatch.setenv("HF_MULTIMAX_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu.TARGET_ENV, "no-such-cpu")
    with caplog.at_level(logging.WARNING, logger="hf_multimax.kernels.cpu"):
        ok, reason = cpu.cpu_kernel_status()
        assert not ok and "compiler exited" in reason
        assert select_backend(torch.zeros(1, 1, 2, 4), 2, 0.0) == "torch"
    assert sum("-march=no-such-cpu" in r.getMessage() for r in caplog.records) == 1
    cpu._STATE.pop("no-such-cpu", None)
