"""Running `casfs` on a pseudo-terminal (Python's pty module), to see what a user at a
terminal sees (progress bars draw only there)."""
from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time

from tests.conftest import ROOT, CasEnv


class PtyRun:
    """`casfs ARGS` started with stdin, stdout and stderr on a new pseudo-terminal of
    120x40; :meth:`finish` collects everything it wrote and its exit status. The
    process is killed (by its pid) if it is still running when :meth:`finish` gives up."""

    def __init__(self, casenv: CasEnv, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=casenv.env,
                                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        finally:
            os.close(slave)
        self.out = bytearray()

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        """Read until the process exits and the terminal closes; (exit status, output)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = os.read(self.master, 65536)
                except OSError:        # EIO: every writer of the terminal is gone
                    break
                if not data:
                    break
                self.out += data
            rc = self.proc.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            os.close(self.master)
        return rc, self.out.decode(errors="replace")


def run_pty(casenv: CasEnv, *args: str, timeout: float = 300) -> tuple[int, str]:
    """Run `casfs ARGS` on a pseudo-terminal; (exit status, everything it wrote)."""
    return PtyRun(casenv, *args).finish(timeout)
