"""The ``drive_sim`` pytest fixture: a started in-memory tools.drivesim.DriveSim per test.

Use it by importing it into a test module or a conftest
(``from tests.drivesim_fixture import drive_sim``). The server is stopped in the
finalizer, even when the test fails: its port closed, open connections shut, and its
threads joined.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.drivesim import DriveSim


@pytest.fixture
def drive_sim() -> Iterator[DriveSim]:
    """A started DriveSim (in memory, faults seeded) for one test; ``.url`` is its rootUrl."""
    sim = DriveSim(seed=20240601)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()
