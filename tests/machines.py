"""Two machines on one box: the ``two_machines`` fixture (docs/sharing.md).

A "machine" is a :class:`tests.conftest.CasEnv` with its own XDG_DATA_HOME,
XDG_RUNTIME_DIR and HOME (so its own volume directories, local chunk store, run/ and log/,
mount registry and mountpoints), all of them on the session's MariaDB server. Side A
makes the volume with `casfs init --meta URL [--shared]` in a fresh database of that
server; side B is made with the real `casfs join` (:meth:`Machines.join_b`). Both sides
get a short session timeout (env ``CASFS_SESSION_TIMEOUT_S``, :data:`SESSION_TIMEOUT_S`)
unless a test sets another one.

Use it by importing the fixture into a test module
(``from tests.machines import two_machines``); the ``drive_sim`` fixture gives a Drive
for :meth:`Machines.drive_auth`; :meth:`Machines.join_another` adds a third machine.
Everything is unmounted and stopped in the finalizer, further machines first, then B, then
A, even when the test fails (CasEnv.cleanup: `casfs umount`, then
``fusermount3 -u -z``, then SIGKILL of the daemon by pid).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest

from cas.db.server import EmbeddedServer
from tests.conftest import ROOT, CasEnv
from tools.cli.mountcmd import registry_file

#: the session timeout both sides run with (seconds): a killed mount is reaped quickly
SESSION_TIMEOUT_S = "6"
_counter = itertools.count()


class Machine(CasEnv):
    """A CasEnv whose mount registry is under its own XDG_DATA_HOME (the test process's
    environment names no machine)."""

    def daemon_pid(self, mp: Path) -> int:
        """Pid of the daemon serving ``mp``, from this machine's mount registry."""
        reg = self.data_home / "mounts" / registry_file(mp).name
        return int(json.loads(reg.read_text())["pid"])


def machine(tmp: Path, server: EmbeddedServer, label: str) -> Machine:
    """A CasEnv for machine ``label`` under ``tmp/label``: its own XDG_DATA_HOME,
    XDG_RUNTIME_DIR and HOME."""
    base = tmp / label
    for sub in ("xdg", "runtime", "home"):
        (base / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(base / "xdg")
    env["XDG_RUNTIME_DIR"] = str(base / "runtime")
    env["HOME"] = str(base / "home")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CASFS_SESSION_TIMEOUT_S"] = SESSION_TIMEOUT_S
    # each side names its own host in its session rows: a dead mount of the other side is
    # then found by its heartbeat's age, as across real machines (cas.db.sessions.this_host)
    env["CASFS_SESSION_HOST"] = f"machine-{label}"
    return Machine(tmp=base, server=server, env=env)


@dataclass
class Machines:
    """Sides A and B of one volume, the name of its database, and any further machine
    (:meth:`join_another`)."""

    a: Machine
    b: Machine
    database: str
    more: list[Machine] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The volume's meta URL (the session server's unix socket)."""
        return self.a.meta_url(self.database)

    def init_a(self, name: str = "vol", chunk_size: str = "1MiB", shared: bool = True, *extra: str) -> str:
        """`casfs init --meta URL [--shared]` on A; returns the volume name."""
        args = ["init", "--chunk-size", chunk_size, "--meta", self.url, *extra]
        if shared:
            args.append("--shared")
        self.a.run(*args, name)
        return name

    def join_b(self, name: str = "vol", *extra: str, check: bool = True) -> Any:
        """`casfs join NAME --meta URL` on B (the CompletedProcess)."""
        return self.b.run("join", name, "--meta", self.url, *extra, check=check)

    def shared_volume(self, name: str = "vol", chunk_size: str = "1MiB") -> str:
        """A shared volume with both sides made: init --shared on A, join on B."""
        self.init_a(name, chunk_size)
        self.join_b(name)
        return name

    def join_another(self, label: str, name: str = "vol", **env: str) -> Machine:
        """A further machine ``label`` (its own XDG dirs, ``env`` added to its environment)
        with `casfs join NAME --meta URL` run on it; the fixture's finalizer cleans it up
        first."""
        c = machine(self.a.tmp.parent, self.a.server, label)
        c.env.update(env)
        self.more.append(c)
        c.run("join", name, "--meta", self.url)
        return c

    def drive_auth(self, sim_url: str, name: str = "vol", *extra: str) -> None:
        """Give the volume a Drive tier on A (`casfs drive auth --endpoint`), before B joins:
        join copies the [drive] table A records (tools/cli/joincmd.py)."""
        self.a.run("drive", "auth", name, "--endpoint", sim_url, *extra)

    def sessions(self, side: CasEnv, name: str = "vol") -> list[dict[str, Any]]:
        """`casfs sessions --json` run on ``side``: the session objects."""
        out = side.run("sessions", name, "--json")
        return list(json.loads(out.stdout)["sessions"])


@pytest.fixture
def two_machines(tmp_path: Path, mysql_server: EmbeddedServer) -> Iterator[Machines]:
    """Two machines A and B (see the module docstring) and a fresh database name, dropped
    in the finalizer after both sides are unmounted."""
    a = machine(tmp_path, mysql_server, "A")
    b = machine(tmp_path, mysql_server, "B")
    m = Machines(a, b, f"m{os.getpid()}_{next(_counter)}")
    try:
        yield m
    finally:
        try:
            for c in m.more:
                c.cleanup()
        finally:
            try:
                b.cleanup()
            finally:
                try:
                    a.cleanup()
                finally:
                    drop_database(mysql_server, m.database)


def drop_database(server: EmbeddedServer, name: str) -> None:
    """``DROP DATABASE IF EXISTS name`` on ``server`` (root over its unix socket)."""
    conn = pymysql.connect(unix_socket=str(server.socket), user="root", password="", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()
