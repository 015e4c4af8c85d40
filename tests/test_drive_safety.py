"""The Drive tier loses nothing and never sticks (issue 8, item 5), end to end: real
mounts, the real casfs CLI, the real google-api-python-client in the daemon, and
tools.drivesim in this process with faults injected.

Each test names the behaviour it guards; docs/cloud.md refers to them by name.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

from tests.conftest import CasEnv
from tests.test_drive import CHUNK, fsync_tree, make_tree, pack_files
from tests.treeutil import compare_trees
from tests.waiting import wait_for
from tools.drivesim import DriveSim


def auth(casenv: CasEnv, sim: DriveSim, vol: str, *extra: str) -> None:
    casenv.init(vol, chunk_size="64KiB")
    casenv.run("drive", "auth", "--endpoint", sim.url, "--pack-size", "256KiB", "--pack-age", "0",
               *extra, vol)


def status(casenv: CasEnv, vol: str = "vol") -> dict[str, Any]:
    return dict(json.loads(casenv.run("drive", "status", "--json", vol).stdout))


def stats(casenv: CasEnv, vol: str = "vol") -> dict[str, Any]:
    return dict(json.loads(casenv.run("stats", "--json", vol).stdout))


def drained(casenv: CasEnv, vol: str = "vol") -> bool:
    s = status(casenv, vol)
    return bool(s["queued_chunks"] == 0 and s["uploading_packs"] == 0)


def evict_all(casenv: CasEnv, mp: Path, vol: str = "vol") -> None:
    """Remount ``vol`` at ``mp`` with --local-limit 0 and wait until no chunk is local."""
    casenv.umount(mp)
    casenv.mount(vol, mp, "--local-limit", "0")
    wait_for(lambda: stats(casenv, vol)["local_bytes"] == 0, "eviction of every local chunk", 120, interval=0.3)


def uploaded_tree(casenv: CasEnv, drive_sim: DriveSim, seed: int, files: int) -> tuple[Path, Path]:
    """Volume "vol" on drivesim, mounted, holding a copy of a fresh tree at ``MP/t`` that
    is fsync'd and all on Drive. Returns (mountpoint, the source tree)."""
    auth(casenv, drive_sim, "vol")
    mp = casenv.mount("vol")
    src = casenv.tmp / "src"
    make_tree(src, seed=seed, files=files)
    shutil.copytree(src, mp / "t")
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 90, interval=0.3)
    return mp, src


# -- 1. two volumes, one Drive folder ------------------------------------------------------

def test_two_volumes_in_one_folder_gc_keeps_the_others_packs_and_auth_refuses_a_third(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    # Both are accepted: when they are set up the folder is still empty.
    auth(casenv, drive_sim, "va", "--folder", "shared")
    auth(casenv, drive_sim, "vb", "--folder", "shared")
    mpa, mpb = casenv.mount("va"), casenv.mount("vb")
    rnd = random.Random(11)
    data_a, data_b = rnd.randbytes(6 * CHUNK), rnd.randbytes(6 * CHUNK)
    (mpa / "a").write_bytes(data_a)
    (mpb / "b").write_bytes(data_b)
    fsync_tree(mpa)
    fsync_tree(mpb)
    for v in ("va", "vb"):
        wait_for(lambda v=v: drained(casenv, v), f"{v}'s upload queue to drain", 120, interval=0.3)
    folders = {f["parents"][0] for f in pack_files(drive_sim)}
    assert len(folders) == 1                                  # really one folder for both
    before = {f["id"] for f in pack_files(drive_sim)}
    assert len(before) == stats(casenv, "va")["cloud_packs"] + stats(casenv, "vb")["cloud_packs"]
    out = casenv.run("gc", "--grace", "0", "va").stdout
    assert "0 orphan objects" in out
    assert {f["id"] for f in pack_files(drive_sim)} == before  # vb's packs are not va's orphans
    evict_all(casenv, mpb, "vb")
    casenv.umount(mpb)
    mpb = casenv.mount("vb", mpb)
    assert (mpb / "b").read_bytes() == data_b                # read back from Drive
    # A third volume pointed at the folder is refused, and nothing of it changes.
    casenv.init("vc", chunk_size="64KiB")
    toml = (casenv.data_home / "vc" / "volume.toml").read_text()
    r = casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--folder", "shared", "vc", check=False)
    assert r.returncode == 1 and "already holds objects of another volume" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (casenv.data_home / "vc" / "volume.toml").read_text() == toml
    assert not status(casenv, "vc")["enabled"]
    assert {f["id"] for f in pack_files(drive_sim)} == before
    # Its own folder is fine.
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "vc")
    assert status(casenv, "vc")["enabled"]


# -- 2. a pack never stays "uploading" -------------------------------------------------------

def test_failed_upload_and_failed_recovery_are_retried_until_the_queue_drains(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    auth(casenv, drive_sim, "vol")
    # The upload gets a 503, and so do the list calls its recovery needs: the first two
    # recovery attempts (right after the failure, and after the backoff) both fail.
    drive_sim.inject("server_error", times=1, match="upload_multipart")
    drive_sim.inject("server_error", times=3, match="list")
    mp = casenv.mount("vol")
    data = os.urandom(3 * CHUNK)
    (mp / "f").write_bytes(data)
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 90, interval=0.3)
    assert drive_sim.counters.faults.get("server_error", 0) == 4
    s = status(casenv)
    assert "503" in s["last_error"] and s["last_error_at"]        # kept, not wiped by a quiet round
    assert s["oldest_queued_s"] == 0
    text = casenv.run("drive", "status", "vol").stdout
    assert "(uploads succeeded since)" in text and "last error   TryAgain" in text
    assert len(pack_files(drive_sim)) == stats(casenv)["cloud_packs"] == 1
    evict_all(casenv, mp)
    assert (mp / "f").read_bytes() == data


def test_a_mount_recovers_a_pack_whose_lease_expires_while_it_runs(casenv: CasEnv, drive_sim: DriveSim) -> None:
    from cas.db.database import connect
    from cas.config.volume import open_volume
    auth(casenv, drive_sim, "vol", "--pack-size", "64MiB", "--pack-age", "3600")   # the mount waits
    mp = casenv.mount("vol")
    (mp / "f").write_bytes(os.urandom(3 * CHUNK))
    fsync_tree(mp)
    wait_for(lambda: status(casenv)["oldest_queued_s"] > 0, "the queue age to show", 120, interval=0.3)
    assert "oldest not yet on Drive: " in casenv.run("drive", "status", "vol").stdout
    # An uploader on another host claims the queue and is never heard of again; its lease
    # runs out a few seconds from now, long after this mount's uploader started.
    with connect(open_volume("vol")) as meta:
        def claim(cur: Any) -> None:
            cur.execute("INSERT INTO packs (name, state, size, md5, sha256, owner, lease_until) VALUES "
                        "('casfs-pack-elsewhere', 'uploading', 0, %s, %s, 'elsewhere.example:1:feed', "
                        "NOW(6) + INTERVAL 3 SECOND)", (b"\0" * 16, b"\0" * 32))
            cur.execute("UPDATE upload_queue SET pack = %s, pos = 0, length = 1", (cur.lastrowid,))
        meta.db.transaction(claim)
    assert status(casenv)["uploading_packs"] == 1
    wait_for(lambda: status(casenv)["uploading_packs"] == 0, "the expired pack to be released", 60, interval=0.3)
    with connect(open_volume("vol")) as meta:
        assert meta.db.query("SELECT COUNT(*) FROM upload_queue WHERE pack IS NOT NULL")[0][0] == 0
    casenv.run("drive", "push", "--timeout", "60", "vol")
    assert drained(casenv) and len(pack_files(drive_sim)) == stats(casenv)["cloud_packs"] == 1


# -- 3. no dependence on sha256Checksum ------------------------------------------------------

def test_drive_without_sha256_uploads_adopts_after_a_crash_and_restores(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    drive_sim.sha256 = False                      # Drive gives sha256Checksum only "if available"
    mp, src = uploaded_tree(casenv, drive_sim, seed=21, files=12)
    assert all("sha256Checksum" not in f for f in pack_files(drive_sim))
    packs = len(pack_files(drive_sim))
    assert packs == stats(casenv)["cloud_packs"] > 0
    # The daemon dies while Drive is still taking an upload whose bytes all arrived.
    slow = drive_sim.inject("slow", delay=6.0, match="upload_multipart")
    received = drive_sim.counters.bytes_received
    late = os.urandom(3 * CHUNK)
    (mp / "late").write_bytes(late)
    fsync_tree(mp)
    wait_for(lambda: slow.fired == 1 and drive_sim.counters.bytes_received > received,
             "an upload's bytes to reach Drive", 60, interval=0.3)
    pid = casenv.daemon_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the daemon to die", 30, interval=0.3)
    casenv.umount(mp)
    wait_for(lambda: len(pack_files(drive_sim)) == packs + 1, "the upload to complete on Drive", 30, interval=0.3)
    assert status(casenv)["uploading_packs"] == 1
    created = drive_sim.counters.files_created
    casenv.mount("vol", mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain after remount", 90, interval=0.3)
    assert drive_sim.counters.files_created == created         # adopted on size + md5, not sent again
    assert len(pack_files(drive_sim)) == stats(casenv)["cloud_packs"] == packs + 1
    casenv.umount(mp)
    shutil.rmtree(casenv.data_home / "vol" / "chunks")         # the disk is lost
    out = casenv.run("restore", "vol").stdout
    assert "0 lost" in out
    casenv.mount("vol", mp)
    assert compare_trees(src, mp / "t", mtimes=False) == []
    assert (mp / "late").read_bytes() == late


# -- 4. the daily cap, told by reason ----------------------------------------------------

def test_daily_cap_is_told_by_reason_push_names_it_and_a_remount_is_not_stale_paused(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    auth(casenv, drive_sim, "vol")
    # A per-minute rate limit worded like the daily cap: its reason says what it is.
    drive_sim.inject("rate_limit", times=2, match="upload_multipart", reason="rateLimitExceeded",
                     message="User rate limit exceeded.")
    mp = casenv.mount("vol")
    (mp / "a").write_bytes(os.urandom(3 * CHUNK))
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 60, interval=0.3)
    assert drive_sim.counters.faults.get("rate_limit", 0) == 2
    assert status(casenv)["paused_until"] == ""
    # The daily cap by its documented reason, whatever its wording: the mount pauses.
    drive_sim.inject("daily_limit", times=1000, match="upload_multipart", reason="dailyLimitExceeded",
                     message="Daily Limit Exceeded")
    (mp / "b").write_bytes(os.urandom(3 * CHUNK))
    fsync_tree(mp)
    wait_for(lambda: bool(status(casenv)["paused_until"]), "the pause", 60, interval=0.3)
    assert "PAUSED until" in casenv.run("drive", "status", "vol").stdout
    casenv.umount(mp)
    r = casenv.run("drive", "push", "--timeout", "30", "vol", check=False)
    assert r.returncode == 1 and "daily upload limit" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert status(casenv)["queued_chunks"] == 3
    # The cap lifts; a new mount does not show the old mount's pause, and uploads.
    drive_sim.clear_faults()
    casenv.mount("vol", mp)
    assert status(casenv)["paused_until"] == ""
    assert "uploads      running" in casenv.run("drive", "status", "vol").stdout
    wait_for(lambda: drained(casenv), "the upload queue to drain", 60, interval=0.3)
    assert status(casenv)["paused_until"] == ""
    assert len(pack_files(drive_sim)) == stats(casenv)["cloud_packs"] == 2


# -- 5. restore keeps going ------------------------------------------------------------------

def test_restore_skips_a_pack_drive_will_not_give_reports_it_and_counts_cloud_only_chunks(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    from cas.db.database import connect
    from cas.config.volume import open_volume
    mp, src = uploaded_tree(casenv, drive_sim, seed=31, files=16)
    evict_all(casenv, mp)
    casenv.umount(mp)
    live = stats(casenv)["live_chunks"]
    with connect(open_volume("vol")) as meta:
        packs = meta.db.query("SELECT p.name, p.object_id, COUNT(*) FROM packs p JOIN pack_entries e "
                              "ON e.pack = p.id GROUP BY p.id ORDER BY p.id")
    assert len(packs) >= 3
    bad_name, bad_oid, bad_chunks = packs[0][0], packs[0][1], int(packs[0][2])
    # Plain restore leaves evicted chunks in the cloud and says how many.
    out = casenv.run("restore", "vol").stdout
    assert f"{live} chunks stay cloud-only" in out
    # Drive keeps failing the reads of one pack: the others are restored all the same.
    drive_sim.inject("server_error", times=10_000, match=f"GET /drive/v3/files/{bad_oid}")
    r = casenv.run("restore", "--all", "vol", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"not restored: {bad_chunks} chunks in 1 packs" in r.stdout and f"pack {bad_name}: " in r.stdout
    assert drive_sim.counters.faults["server_error"] >= 2 * 5          # retried, and retried again later
    st = stats(casenv)
    assert st["cloud_only_chunks"] == bad_chunks and st["both_chunks"] == live - bad_chunks
    # Drive gives it again: the next restore finishes the job.
    drive_sim.clear_faults()
    out = casenv.run("restore", "--all", "vol").stdout
    assert f"restored {bad_chunks} chunks" in out and "0 lost" in out and "0 chunks stay cloud-only" in out
    casenv.mount("vol", mp)
    assert compare_trees(src, mp / "t", mtimes=False) == []


# -- 6. fsck --cloud -----------------------------------------------------------------------

def test_fsck_cloud_finds_missing_and_damaged_packs_and_names_the_files(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    import hashlib
    import urllib.request

    from cas.db.database import connect
    from cas.config.volume import open_volume
    mp, src = uploaded_tree(casenv, drive_sim, seed=41, files=16)
    out = casenv.run("fsck", "--cloud", "vol").stdout
    assert "0 missing or different" in out
    with connect(open_volume("vol")) as meta:
        packs = [(str(n), str(o), {bytes(c) for (c,) in meta.db.query(
                    "SELECT chunk FROM pack_entries WHERE pack = %s", (pid,))})
                 for pid, n, o in meta.db.query("SELECT id, name, object_id FROM packs ORDER BY id")]
    assert len(packs) >= 3
    (gone, gone_oid, gone_chunks), (cut, cut_oid, cut_chunks) = packs[0], packs[1]
    req = urllib.request.Request(f"{drive_sim.url}drive/v3/files/{gone_oid}", method="DELETE")
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 204
    drive_sim.replace_content(cut_oid, drive_sim.file_bytes(cut_oid)[:-100])   # truncated on Drive

    def depending(chunks: set[bytes]) -> set[str]:
        """Files of the source tree with a 64 KiB slot whose SHA-256 is one of ``chunks``."""
        out = set()
        for p in src.rglob("*"):
            data = p.read_bytes() if p.is_file() else b""
            ids = {hashlib.sha256(data[i:i + CHUNK]).digest() for i in range(0, len(data), CHUNK)}
            if ids & chunks:
                out.add("/t/" + str(p.relative_to(src)))
        return out
    r = casenv.run("fsck", "--cloud", "vol", check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 missing or different" in r.stdout
    assert f"pack {gone} ({gone_oid}): missing; {len(gone_chunks)} chunks" in r.stdout
    assert f"pack {cut} ({cut_oid}): size " in r.stdout
    listed = {line.strip() for line in r.stdout.splitlines() if line.startswith("    /")}
    assert listed == depending(gone_chunks) | depending(cut_chunks) and listed
    rep = json.loads(casenv.run("fsck", "--cloud", "--json", "vol", check=False).stdout)
    assert not rep["cloud"]["clean"] and {p["name"] for p in rep["cloud"]["problems"]} == {gone, cut}
