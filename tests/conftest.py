"""Shared fixtures: a real MariaDB server, isolated casfs data dirs, real FUSE mounts.

Everything a fixture starts it also stops, even when the test fails: mounts are
unmounted with `casfs umount` (falling back to `fusermount3 -u -z`), daemons and
embedded MariaDB servers are stopped by process id, never by name.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cas.db.server import EmbeddedServer, pid_running  # noqa: E402
from fusefront.mountpoint import find_mount, is_dead_mount  # noqa: E402
from tools.cli.mountcmd import registry_file  # noqa: E402
from tests.drivesim_fixture import drive_sim  # noqa: E402,F401 - the Drive test server fixture

_db_counter = itertools.count()


@contextlib.contextmanager
def running_server(d: Path) -> Iterator[EmbeddedServer]:
    """A real MariaDB server with its datadir, run and log directories under ``d``, on a
    unix socket; stopped at exit, and killed by its pid if it is still there."""
    srv = EmbeddedServer(d / "data", d / "run", d / "log")
    srv.acquire()
    try:
        yield srv
    finally:
        srv.release()
        pid = srv.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mysql_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One real MariaDB server for the session, on a unix socket."""
    with running_server(tmp_path_factory.mktemp("mariadb")) as srv:
        yield srv


@dataclass
class CasEnv:
    """An isolated casfs world for one test: its own XDG_DATA_HOME and databases."""

    tmp: Path
    server: EmbeddedServer
    env: dict[str, str]
    mounts: list[Path] = field(default_factory=list)
    embedded_volumes: list[Path] = field(default_factory=list)

    @property
    def data_home(self) -> Path:
        return Path(self.env["XDG_DATA_HOME"]) / "casfs"

    def run(self, *args: str, check: bool = True, timeout: float = 900,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run `casfs ARGS` as a subprocess; with ``check`` fail on non-zero exit."""
        r = subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"casfs {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def meta_url(self, db: str) -> str:
        return f"mysql://root@localhost/{db}?unix_socket={self.server.socket}"

    def init(self, name: str = "vol", chunk_size: str = "1MiB", embedded: bool = False) -> str:
        """Create a volume; by default on the session server, else with its own MariaDB."""
        args = ["init", "--chunk-size", chunk_size]
        if embedded:
            self.embedded_volumes.append(self.data_home / name)
        else:
            args += ["--meta", self.meta_url(f"t{os.getpid()}_{next(_db_counter)}")]
        self.run(*args, name)
        return name

    def mount(self, volume: str = "vol", mp: Path | None = None, *extra: str) -> Path:
        """Mount ``volume`` (returns when ready) at ``mp`` or a new directory."""
        if mp is None:
            mp = self.tmp / f"mnt{len(self.mounts)}"
            mp.mkdir()
        if mp not in self.mounts:
            self.mounts.append(mp)
        self.run("mount", str(mp), volume, *extra)
        assert find_mount(mp) is not None
        return mp

    def umount(self, mp: Path) -> None:
        self.run("umount", str(mp))

    def daemon_pid(self, mp: Path) -> int:
        """Pid of the daemon serving ``mp``, from the mount registry."""
        return int(json.loads(registry_file(mp).read_text())["pid"])

    def cleanup(self) -> None:
        for mp in self.mounts:
            pid = None
            try:
                pid = self.daemon_pid(mp)
            except (OSError, ValueError, KeyError):
                pass
            if find_mount(mp) is not None or is_dead_mount(mp):
                r = self.run("umount", "--timeout", "60", str(mp), check=False)
                if r.returncode != 0 and (find_mount(mp) is not None or is_dead_mount(mp)):
                    subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            if pid is not None and pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        for vol in self.embedded_volumes:
            srv = EmbeddedServer(vol / "mysql", vol / "run", vol / "log")
            pid = srv.pid()
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 60
                while pid_running(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if pid_running(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def casenv(tmp_path: Path, mysql_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[CasEnv]:
    """A CasEnv whose mounts and servers are all stopped at teardown."""
    data = tmp_path / "xdg"
    data.mkdir()
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(data)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    ce = CasEnv(tmp=tmp_path, server=mysql_server, env=env)
    try:
        yield ce
    finally:
        ce.cleanup()


@pytest.fixture
def mounted(casenv: CasEnv) -> Callable[..., Path]:
    """Create a volume on the session server and mount it; returns the mountpoint."""
    def make(chunk_size: str = "1MiB", name: str = "vol") -> Path:
        casenv.init(name, chunk_size=chunk_size)
        return casenv.mount(name)
    return make
