"""Sync status per file (docs/status.md) on a real mount with drivesim: the virtual xattr
``user.casfs.status``, `casfs status`, `casfs drive wait`, and the progress of `drive
push` and `restore` on a terminal."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, CasEnv
from tests.ptyrun import PtyRun, run_pty
from tests.waiting import wait_for
from tools.drivesim import FOLDER_MIME, DriveSim

CHUNK = 64 * 1024
XATTR = "user.casfs.status"


def xstatus(path: Path) -> dict[str, Any]:
    return dict(json.loads(os.getxattr(path, XATTR)))


def stats(casenv: CasEnv) -> dict[str, Any]:
    return dict(json.loads(casenv.run("stats", "--json", "vol").stdout))


def write_fsynced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def test_status_pending_then_synced_by_push_then_cloud_only(casenv: CasEnv, drive_sim: DriveSim) -> None:
    casenv.init("vol", chunk_size="64KiB")
    # pack age of an hour: the mount never uploads these few chunks by itself
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "3600", "vol")
    mp = casenv.mount("vol")
    (mp / "d").mkdir()
    f, g = mp / "d" / "f", mp / "d" / "g"
    data = os.urandom(3 * CHUNK)
    with open(f, "wb") as fh:
        fh.write(data)
        s = xstatus(f)                                  # written, maybe still in RAM
        assert s["state"] == "pending" and s["queued_bytes"] + s["dirty_bytes"] > 0
        os.fsync(fh.fileno())
    write_fsynced(g, data[:CHUNK])                      # shares f's first chunk
    s = xstatus(f)
    assert s == {"state": "pending", "where": "local", "chunks": 3, "local_chunks": 3, "cloud_chunks": 0,
                 "queued_chunks": 3, "queued_bytes": s["queued_bytes"], "dirty_bytes": 0}
    assert s["queued_bytes"] >= 3 * CHUNK

    # virtual: not listed (cp -a does not copy it), read-only for everyone, never stored
    assert XATTR not in os.listxattr(f)
    for call in (lambda: os.setxattr(f, XATTR, b"synced"), lambda: os.removexattr(f, XATTR)):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        os.getxattr(mp / "d", XATTR)                    # only regular files have it
    assert ei.value.errno == errno.ENODATA
    os.setxattr(f, "user.other", b"1")                  # other user.* names work as before
    assert os.listxattr(f) == ["user.other"]

    out = casenv.run("status", str(f)).stdout
    assert re.fullmatch(r"pending +local +\d+\.\d+ KiB queued  " + re.escape(str(f)) + "\n", out), out
    top = json.loads(casenv.run("status", "--json", str(mp)).stdout)
    assert top[0]["files"] == 0 and top[0]["state"] == "synced"    # no file directly in the root
    top = json.loads(casenv.run("status", "--json", "-r", str(mp)).stdout)
    assert top[0]["files"] == 2 and top[0]["states"] == {"pending": 2} and top[0]["where"] == {"local": 2}
    r = casenv.run("status", str(f), str(casenv.tmp), check=False)
    assert r.returncode == 1 and r.stdout.startswith("pending")
    assert r.stderr.count("\n") == 1 and "not inside a casfs mount" in r.stderr, r.stderr

    # nothing uploads: drive wait times out with exit 1 and one line
    r = casenv.run("drive", "wait", "--timeout", "1", str(f), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "timed out after 1 s: 1 of 1 files not on Drive yet" in r.stderr

    # drive wait returns 0 once drivesim holds the packs, not before
    waiter = subprocess.Popen([sys.executable, "-m", "tools.cli", "drive", "wait", "--timeout", "300", str(mp / "d")],
                              cwd=ROOT, env=casenv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = drive_sim.inject("slow", match="upload_multipart", delay=2.0)
        push = PtyRun(casenv, "drive", "push", "vol")   # on a terminal: a progress bar
        try:
            wait_for(lambda: held.fired == 1, "drivesim to hold the upload")
            assert waiter.poll() is None                # the pack is not on Drive yet
        finally:
            rc, out = push.finish()
        assert rc == 0 and "uploaded 1 packs" in out, out
        assert re.search(r"drive push: 100%\|.*\| [\d.]+k/[\d.]+k \[[^\]]*, *[\d.]+[kM]?B/s\]", out), out
        assert waiter.wait(120) == 0, waiter.communicate()
        packs = [p for p in drive_sim.files() if p["mimeType"] != FOLDER_MIME and p["name"].startswith("casfs-pack-")]
        st = stats(casenv)
        assert packs and sum(int(p["size"]) for p in packs) == st["cloud_bytes"] == st["stored_bytes"]
        assert waiter.stdout is not None and waiter.stdout.read() == "2 files synced to Drive\n"
    finally:
        if waiter.poll() is None:
            waiter.kill()
        waiter.communicate()
    assert xstatus(f) == {"state": "synced", "where": "both", "chunks": 3, "local_chunks": 3, "cloud_chunks": 3,
                          "queued_chunks": 0, "queued_bytes": 0, "dirty_bytes": 0}
    assert casenv.run("status", str(g)).stdout.startswith("synced   both ")

    # evicted under --local-limit: cloud-only
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: xstatus(f)["where"] == "cloud-only", "eviction of f's chunks")
    assert xstatus(f)["state"] == "synced" and xstatus(f)["local_chunks"] == 0
    assert casenv.run("status", str(g)).stdout.startswith("synced   cloud-only ")
    casenv.umount(mp)

    # restore --all brings the evicted chunks back, with a progress bar on a terminal
    rc, out = run_pty(casenv, "restore", "--all", "vol")
    assert rc == 0 and "restored 3 chunks" in out, out
    assert re.search(r"restore: 100%\|.*\[[^\]]*, *[\d.]+[kM]?B/s\]", out), out
    mp = casenv.mount("vol", mp)
    assert xstatus(f)["where"] == "both" and (mp / "d" / "f").read_bytes() == data


def test_drive_wait_polls_only_pending_files_with_backoff(casenv: CasEnv, drive_sim: DriveSim) -> None:
    """`drive wait` reads the status of a synced file once, and looks at the pending ones
    less and less often while nothing moves (it used to read every file every 0.5 s).
    The mount's own getxattr count (/metrics) is the measure."""
    from tests.test_observe import free_port, scrape
    casenv.init("vol", chunk_size="64KiB")
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "3600", "vol")
    port = free_port()
    mp = casenv.mount("vol", None, "--metrics", str(port))
    (mp / "d").mkdir()
    synced = 10
    for i in range(synced):
        write_fsynced(mp / "d" / f"s{i}", os.urandom(CHUNK // 4))
    casenv.run("drive", "push", "vol")
    write_fsynced(mp / "d" / "p", os.urandom(CHUNK))   # pending: the pack age is an hour
    key = 'casfs_fuse_operations_total{op="getxattr"}'
    before = scrape(port).get(key, 0.0)
    xstatus(mp / "d" / "p")        # requests per status read (Python asks with 128 bytes, then more)
    per_read = scrape(port)[key] - before
    assert per_read >= 1
    before += per_read
    r = casenv.run("drive", "wait", "--timeout", "3", str(mp / "d"), check=False)
    assert r.returncode == 1 and f"1 of {synced + 1} files not on Drive yet" in r.stderr, r.stderr
    reads = (scrape(port)[key] - before) / per_read
    # one look at every file, then at most one per pause (0.5 + 1 + 2 s > 3 s) at the
    # pending one; every 0.5 s at every file would be at least twice the files
    assert synced + 1 <= reads <= synced + 1 + 4, reads
    casenv.umount(mp)
