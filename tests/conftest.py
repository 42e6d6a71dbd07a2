"""Fixtures shared by the test modules."""

import pytest
from kernel_backends import BACKENDS, CPU_TARGETS, selected
from scripts import reset_accelerate_state

from hf_multimax.kernels import cpu


@pytest.fixture
def fresh_accelerate_state():
    """Each script run builds its own Accelerator, as separate processes would."""
    yield
    reset_accelerate_state()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each kernel backend that runs here (``torch``, ``cpu``, ``cpu@x86-64-v3``), its build target in force."""
    with selected(request.param) as name:
        yield name


@pytest.fixture(params=CPU_TARGETS)
def cpu_target(request):
    """Each build target of the C++ kernel that loads here (``native`` and, on x86-64, ``x86-64-v3``), in force."""
    with cpu.use_target(request.param):
        yield request.param
