"""Waiting on conditions with deadlines (tests must pass on a loaded machine: never a
fixed sleep standing in for a condition)."""
from __future__ import annotations

import time
from collections.abc import Callable

from cas.db.server import pid_running


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60.0,
             interval: float = 0.05) -> None:
    """Poll ``cond`` every ``interval`` seconds until it is true; raise AssertionError
    naming ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_exit(pid: int, timeout: float = 120.0) -> None:
    """Wait until process ``pid`` has exited (or is a zombie); AssertionError after
    ``timeout`` seconds."""
    wait_for(lambda: not pid_running(pid), f"process {pid} to exit", timeout)
