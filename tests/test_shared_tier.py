"""Enabling the cloud tier on a shared volume (docs/sharing.md, "Data"): each side's files
reach the cloud from that side's store, whoever enabled the tier.

Two machines (tests/machines.py), one MariaDB database, one drivesim; real CLI, real FUSE
mounts, the google-api-python-client against tools.drivesim.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pymysql
import tomli_w

from cas.chunk.store import LocalStore
from tests.machines import Machine, Machines, two_machines  # noqa: F401 (fixture)
from tests.waiting import wait_for
from tools.drivesim import DriveSim

__all__ = ["two_machines"]


def sql(m: Machines, query: str, args: Any = None) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on the volume's database (a connection of the test's own)."""
    conn = pymysql.connect(unix_socket=str(m.a.server.socket), user="root", database=m.database,
                           autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def store_ids(side: Machine) -> set[bytes]:
    """Chunk ids with a file in ``side``'s local store of "vol"."""
    return set(LocalStore(side.data_home / "vol" / "chunks").iter_ids())


def store_id(side: Machine) -> str:
    """``side``'s store id (volume.toml ``store_id``, else the uuid's hex)."""
    cfg = tomllib.loads((side.data_home / "vol" / "volume.toml").read_text())
    return str(cfg.get("store_id") or cfg["uuid"].replace("-", ""))


def log_text(side: Machine) -> str:
    return "".join(p.read_text(errors="replace") for p in (side.data_home / "vol" / "log").glob("*")
                   if p.is_file())


def write_file(p: Path, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_tier_enabled_on_b_uploads_a_files_from_a_and_refuses_while_a_is_mounted(
        two_machines: Machines, drive_sim: DriveSim) -> None:
    m = two_machines
    a, b = m.a, m.b
    m.init_a("vol", "64KiB")
    m.join_b("vol")
    # both sides write without a tier: A's files are only in A's store, B's only in B's,
    # and the bytes both wrote are in both stores (B keeps its own copy)
    only_a, only_b, both = os.urandom(640 << 10), os.urandom(640 << 10), os.urandom(256 << 10)
    mp_a = a.mount("vol")
    write_file(mp_a / "a.bin", only_a)
    write_file(mp_a / "both_a.bin", both)
    mp_b = b.mount("vol")
    write_file(mp_b / "b.bin", only_b)
    write_file(mp_b / "both_b.bin", both)
    b.umount(mp_b)
    a_files, b_files = store_ids(a), store_ids(b)
    assert a_files - b_files and b_files - a_files

    # A is mounted: B may not enable the tier (A would write chunks with no queue row)
    r = b.run("drive", "auth", "vol", "--endpoint", drive_sim.url, check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "mounted by" in lines[0], r.stdout + r.stderr
    assert not sql(m, "SELECT 1 FROM upload_queue")
    a.umount(mp_a)

    b.run("drive", "auth", "vol", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "0")
    # B queued only the chunks whose file B's store holds, under B's store
    queued = {bytes(c): str(s) for c, s in sql(m, "SELECT chunk, store FROM upload_queue")}
    assert set(queued) == b_files and set(queued.values()) == {store_id(b)}
    # A gets the [drive] table (what `casfs join` copies); one of A's chunks is queued
    # under B's store as the old enable did: B keeps the row, A adopts it at its mount
    cfg_a = tomllib.loads((a.data_home / "vol" / "volume.toml").read_text())
    cfg_a["drive"] = tomllib.loads((b.data_home / "vol" / "volume.toml").read_text())["drive"]
    (a.data_home / "vol" / "volume.toml").write_bytes(tomli_w.dumps(cfg_a).encode())
    stray = sorted(a_files - b_files)[0]
    sql(m, "INSERT INTO upload_queue (chunk, store) VALUES (%s, %s)", (stray, store_id(b)))

    mp_b = b.mount("vol")
    wait_for(lambda: "is not here: the row is kept" in log_text(b), "B's uploader meets A's chunk", 120,
             interval=0.2)
    assert sql(m, "SELECT store FROM upload_queue WHERE chunk = %s", (stray,)) == [(store_id(b),)]

    mp_a = a.mount("vol")

    def all_confirmed() -> bool:
        return not sql(m, "SELECT 1 FROM upload_queue LIMIT 1") and not sql(
            m, "SELECT 1 FROM chunks c LEFT JOIN pack_entries p ON p.chunk = c.id WHERE p.chunk IS NULL LIMIT 1")
    wait_for(all_confirmed, "every chunk confirmed on Drive", 180, interval=0.2)
    for side, mp in ((a, mp_a), (b, mp_b)):
        assert (mp / "a.bin").read_bytes() == only_a and (mp / "b.bin").read_bytes() == only_b
        assert (mp / "both_a.bin").read_bytes() == both == (mp / "both_b.bin").read_bytes()
