"""Drive as a complete backup (docs/backup.md): metadata snapshots on drivesim, restore
of a whole volume on a "fresh machine" (the volume directory deleted), an older
generation after gc, retention, and the recovery point. Real mounts, the real casfs
CLI, the real google-api-python-client talking to tools.drivesim.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat as S
from pathlib import Path
from typing import Any

from tests.conftest import CasEnv
from tests.test_drive import fsync_tree, pack_files
from tests.waiting import wait_for
from tools.drivesim import DriveSim

MiB = 1 << 20


def write_tree(root: Path, seed: int) -> None:
    """Contents, modes, mtimes, a symlink, a hard link, xattrs, an empty and a sparse file."""
    rnd = __import__("random").Random(seed)
    (root / "d" / "sub").mkdir(parents=True)
    for i in range(6):
        (root / "d" / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 300_000)))
    (root / "d" / "dup").write_bytes((root / "d" / "f1").read_bytes())
    (root / "d" / "sub" / "empty").write_bytes(b"")
    with open(root / "d" / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 * MiB)
        f.write(rnd.randbytes(1000))
    os.symlink("../f0", root / "d" / "sub" / "link")
    os.link(root / "d" / "f2", root / "d" / "sub" / "hard")
    os.chmod(root / "d" / "f3", 0o600)
    os.chmod(root / "d" / "sub", 0o750)
    os.setxattr(root / "d" / "f4", "user.color", b"blue")
    os.setxattr(root / "d" / "sub", "user.tag", bytes(range(40)))
    os.utime(root / "d" / "f5", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))


def facts(root: Path) -> dict[str, Any]:
    """Everything the restore must bring back, per path below ``root``: type and mode,
    size, mtime (ns), SHA-256 of the bytes, symlink target, xattrs; and which paths are
    hard links of one another."""
    out: dict[str, Any] = {}
    groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            f: dict[str, Any] = {"mode": st.st_mode, "mtime": st.st_mtime_ns}
            if S.S_ISLNK(st.st_mode):
                f["target"] = os.readlink(p)
            else:
                f["xattrs"] = {a: os.getxattr(p, a) for a in sorted(os.listxattr(p))}
            if S.S_ISREG(st.st_mode):
                f["size"] = st.st_size
                f["sha"] = hashlib.sha256(p.read_bytes()).hexdigest()
                groups.setdefault(st.st_ino, []).append(rel)
            out[rel] = f
    out["#links"] = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    return out


def setup(casenv: CasEnv, sim: DriveSim, name: str = "vol", embedded: bool = False, *extra: str) -> None:
    casenv.init(name, chunk_size="64KiB", embedded=embedded)
    casenv.run("drive", "auth", "--endpoint", sim.url, "--pack-size", "256KiB", "--pack-age", "0", *extra, name)


def status(casenv: CasEnv, name: str = "vol") -> dict[str, Any]:
    return dict(json.loads(casenv.run("drive", "status", "--json", name).stdout))


def snapshot_names(sim: DriveSim) -> list[str]:
    return sorted(f["name"] for f in sim.files() if f["name"].startswith("casfs-meta-"))


def test_total_loss_restore_from_drive_brings_back_the_whole_tree(casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup(casenv, drive_sim, embedded=True)
    mp = casenv.mount("vol")
    write_tree(mp, seed=7)
    fsync_tree(mp)
    before = facts(mp)
    out = casenv.run("drive", "push", "vol").stdout
    assert "uploaded metadata snapshot generation 1" in out
    st = status(casenv)
    assert st["snapshot"]["generation"] == 1 and st["snapshot"]["lacking_chunks"] == 0
    assert st["snapshot"]["changes_since"] == 0
    assert snapshot_names(drive_sim)[0].startswith("casfs-meta-00000001-")
    assert any(f["name"] == "casfs-volume.json" for f in drive_sim.files())
    casenv.umount(mp)

    # total loss: config, database, chunks
    vol_dir = casenv.data_home / "vol"
    folder = "casfs-" + (vol_dir / "volume.toml").read_text().split('uuid = "')[1].split('"')[0]
    shutil.rmtree(vol_dir)
    # another volume's folder on the same Drive: the restore must be told which one
    setup(casenv, drive_sim, "other")
    amb = casenv.run("restore", "--from-drive", "--endpoint", drive_sim.url, "vol", check=False)
    assert amb.returncode == 1 and "several casfs folders" in amb.stderr and folder in amb.stderr
    assert len(amb.stderr.strip().splitlines()) == 1 and not vol_dir.exists()
    r = casenv.run("restore", "--from-drive", "--endpoint", drive_sim.url, "--folder", folder, "vol")
    assert "from generation 1" in r.stdout and "loaded inodes:" in r.stdout, r.stdout
    # the restored volume is recognised as it was, and is refused as a restore target now
    again = casenv.run("restore", "--from-drive", "--endpoint", drive_sim.url, "--folder", folder, "vol",
                       check=False)
    assert again.returncode == 1 and "refusing to restore" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert not any(p.is_file() for p in (vol_dir / "chunks").rglob("*")), "a lazy restore downloads no chunk"

    mp2 = casenv.mount("vol")
    after = facts(mp2)
    assert after == before
    fsck = casenv.run("fsck", "vol")
    assert "0 missing files, 0 corrupt" in fsck.stdout, fsck.stdout
    casenv.umount(mp2)


def test_older_generation_restores_after_gc(casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup(casenv, drive_sim)
    mp = casenv.mount("vol")
    write_tree(mp / "A", seed=11)
    fsync_tree(mp)
    tree_a = facts(mp)
    assert "generation 1" in casenv.run("drive", "push", "vol").stdout
    gen1_packs = {f["name"] for f in pack_files(drive_sim) if f["name"].startswith("casfs-pack-")}
    # every chunk of tree A becomes garbage: its packs would be deleted by gc
    shutil.rmtree(mp / "A")
    write_tree(mp / "B", seed=12)
    fsync_tree(mp)
    assert "generation 2" in casenv.run("drive", "push", "vol").stdout
    gc = casenv.run("gc", "--grace", "0", "vol").stdout
    assert "freed 0 chunks" not in gc, gc
    left = {f["name"] for f in pack_files(drive_sim)}
    assert gen1_packs <= left, "gc deleted a pack that generation 1 names"

    bad = casenv.run("restore", "--from-drive", "--generation", "9", "--endpoint", drive_sim.url, "nine",
                     check=False)
    assert bad.returncode == 1 and "no generation 9 on the store; there are 1, 2" in bad.stderr, bad.stderr
    assert not (casenv.data_home / "nine").exists()
    url = casenv.meta_url(f"t{os.getpid()}_restored")
    r = casenv.run("restore", "--from-drive", "--generation", "1", "--endpoint", drive_sim.url,
                   "--meta", url, "--eager", "old")
    assert "from generation 1" in r.stdout and "chunks downloaded" in r.stdout, r.stdout
    mp_old = casenv.mount("old")
    assert facts(mp_old) == tree_a
    assert "0 missing files, 0 corrupt" in casenv.run("fsck", "old").stdout
    casenv.umount(mp_old)
    casenv.umount(mp)


def test_recovery_point_mount_snapshots_retention_and_unmount_snapshot(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    setup(casenv, drive_sim, "vol", False, "--keep-generations", "2")
    mp = casenv.mount("vol")
    (mp / "d").mkdir()
    fsync_tree(mp)
    st = status(casenv)
    assert st["snapshot"]["generation"] == 0
    assert "none on Drive yet" in casenv.run("drive", "status", "vol").stdout
    casenv.run("drive", "push", "vol")
    assert status(casenv)["snapshot"]["changes_since"] == 0
    # a later change: two new files in d (and d itself) changed since generation 1
    (mp / "d" / "x").write_bytes(b"x" * 1000)
    (mp / "d" / "y").write_bytes(b"y" * 1000)
    fsync_tree(mp)
    st = status(casenv)
    assert st["snapshot"]["generation"] == 1 and st["snapshot"]["changes_since"] == 3
    text = casenv.run("drive", "status", "vol").stdout
    assert "generation 1, confirmed on Drive at" in text and "3 files and directories changed since" in text
    stats = casenv.run("stats", "vol").stdout
    assert "recovery point" in stats and "3 files and directories changed since" in stats
    casenv.umount(mp)   # the unmount uploads generation 2 (the change)
    assert status(casenv)["snapshot"]["generation"] == 2
    assert status(casenv)["snapshot"]["changes_since"] == 0

    # a mount with a short interval snapshots by itself after a change
    mp = casenv.mount("vol", mp, "--snapshot-interval", "0.2")
    (mp / "d" / "z").write_bytes(b"z")
    fsync_tree(mp)
    wait_for(lambda: status(casenv)["snapshot"]["generation"] >= 3, "the mount's own snapshot", timeout=120)
    # retention: keep_generations = 2
    wait_for(lambda: len(snapshot_names(drive_sim)) == 2, "retention to keep two generations", timeout=60)
    names = snapshot_names(drive_sim)
    gens = sorted(int(n.split("-")[2]) for n in names)
    assert gens == [gens[1] - 1, gens[1]] and gens[1] >= 3
    casenv.umount(mp)


def test_total_loss_of_an_encrypted_volume_restores_with_the_passphrase(
        casenv: CasEnv, drive_sim: DriveSim) -> None:
    import pymysql

    from cas.config.keys import BLOB_MAGIC
    from tests.test_encryption import PASS, init_encrypted
    casenv.env["CASFS_PASSPHRASE"] = PASS
    db = init_encrypted(casenv)
    casenv.run("drive", "auth", "--endpoint", drive_sim.url, "--pack-size", "256KiB", "--pack-age", "0", "vol")
    mp = casenv.mount("vol")
    write_tree(mp, seed=21)
    fsync_tree(mp)
    before = facts(mp)
    assert "uploaded metadata snapshot generation 1" in casenv.run("drive", "push", "vol").stdout
    casenv.umount(mp)
    snaps = [f for f in drive_sim.files() if f["name"].startswith("casfs-meta-")]
    assert snaps
    for f in snaps:   # sealed after compression: no name of the tree readable on Drive
        blob = drive_sim.file_bytes(f["id"])
        assert blob.startswith(BLOB_MAGIC) and b"sparse" not in blob and b"user.color" not in blob

    shutil.rmtree(casenv.data_home / "vol")
    admin = pymysql.connect(unix_socket=str(casenv.server.socket), user="root", password="")
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE `{db}`")
    admin.close()
    url = casenv.meta_url(db)
    casenv.env["CASFS_PASSPHRASE"] = "not the passphrase"
    bad = casenv.run("restore", "--from-drive", "--endpoint", drive_sim.url, "--meta", url, "vol", check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (casenv.data_home / "vol").exists()
    casenv.env["CASFS_PASSPHRASE"] = PASS
    r = casenv.run("restore", "--from-drive", "--endpoint", drive_sim.url, "--meta", url, "vol")
    assert "from generation 1" in r.stdout
    mp = casenv.mount("vol", mp)
    assert facts(mp) == before
    assert "0 missing files, 0 corrupt" in casenv.run("fsck", "vol").stdout
    casenv.umount(mp)
