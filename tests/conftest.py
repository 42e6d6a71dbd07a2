"""Fixtures shared by the test modules."""

import pytest

from scripts import reset_accelerate_state


@pytest.fixture
def fresh_accelerate_state():
    """Each script run builds its own Accelerator, as separate processes would."""
    yield
    reset_accelerate_state()
