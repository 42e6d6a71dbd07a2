"""The CPU backends the kernel tests run on: the PyTorch path, the native C++ build and, on x86-64, the AVX2 build
(``-march=x86-64-v3``), so the AVX2 code is proven on AVX-512 machines too.

A backend id is ``torch``, ``cpu`` or ``cpu@TARGET``; :func:`selected` enters the build target of ``cpu@TARGET``.
"""

from __future__ import annotations

import platform
from contextlib import contextmanager, nullcontext

from hf_multimax.kernels import cpu

AVX2_TARGET = "x86-64-v3"
#: Build targets tested besides ``native``.
EXTRA_TARGETS = [AVX2_TARGET] if platform.machine().lower() in ("x86_64", "amd64") else []
CPU_TARGETS = ["native", *(t for t in EXTRA_TARGETS if cpu.cpu_kernel_available(t))]

BACKENDS = ["torch"] + (["cpu"] if cpu.cpu_kernel_available("native") else [])
BACKENDS += [f"cpu@{t}" for t in CPU_TARGETS[1:]]


@contextmanager
def selected(backend_id: str):
    """Yield the ``backend=`` name of ``backend_id`` with its build target in force."""
    name, _, target = backend_id.partition("@")
    with cpu.use_target(target) if target else nullcontext():
        yield name
