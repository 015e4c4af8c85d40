"""cas.config.keys: wrapping the master key, unlocking, sealed metadata blobs."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pymysql
import pytest

from cas.config import keys
from cas.errors import IntegrityError
from cas.db.server import EmbeddedServer
from cas.config.volume import Volume
from tests.engine.test_cloud import CloudEngine, ceng  # noqa: F401 - the fixture


def _vol(tmp_path: Path, table: dict) -> Volume:
    return Volume(path=tmp_path, name="v", uuid="u-1", chunk_size=1 << 20, compression="zstd:3",
                  encryption=table)


def test_wrap_unwrap_passphrase_and_key_file(tmp_path: Path) -> None:
    kf = tmp_path / "key"
    keys.create_key_file(kf)
    master = keys.new_master_key()
    table = keys.new_encryption_table(master, "correct horse", kf, volume_uuid="u-1")
    assert keys.unwrap_master(table, "correct horse", None) == master
    assert keys.unwrap_master(table, None, kf) == master
    with pytest.raises(keys.WrongPassphrase):
        keys.unwrap(table, "wrong horse", None)
    other = tmp_path / "other"
    keys.create_key_file(other)
    with pytest.raises(keys.WrongPassphrase):
        keys.unwrap(table, None, other)
    # a wrap moved to another volume's table does not open (uuid in the associated data)
    with pytest.raises(keys.WrongPassphrase):
        keys.unwrap({**table, "volume_uuid": "u-2"}, "correct horse", None)
    # same master -> same subkeys -> same chunk ids; a different master -> different ids
    a, b = keys.unwrap(table, "correct horse", None), keys.VolumeKeys(master)
    assert a.chunk_id(b"x" * 100) == b.chunk_id(bytearray(b"x" * 100)) != keys.VolumeKeys(
        keys.new_master_key()).chunk_id(b"x" * 100)
    assert len(a.chunk_id(memoryview(b"abc"))) == 32


def test_sealed_blob(tmp_path: Path) -> None:
    k = keys.VolumeKeys(keys.new_master_key())
    blob = k.seal_blob(b"snapshot bytes", b"aad-1")
    assert b"snapshot" not in blob and len(blob) == len(b"snapshot bytes") + 33
    assert k.open_blob(blob, b"aad-1") == b"snapshot bytes"
    with pytest.raises(IntegrityError):
        k.open_blob(blob, b"aad-2")
    bad = bytearray(blob)
    bad[-20] ^= 1
    with pytest.raises(IntegrityError):
        k.open_blob(bytes(bad), b"aad-1")
    with pytest.raises(IntegrityError):
        keys.VolumeKeys(keys.new_master_key()).open_blob(blob, b"aad-1")


def test_unlock_env_file_and_audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    master = keys.new_master_key()
    vol = _vol(tmp_path, keys.new_encryption_table(master, "pw", None, volume_uuid="u-1"))
    assert keys.unlock(_vol(tmp_path, {})) is None
    monkeypatch.setenv("CASFS_PASSPHRASE", "pw")
    assert keys.unlock(vol).master == master        # type: ignore[union-attr]
    pf = tmp_path / "pf"
    pf.write_text("nope\n")
    assert keys.passphrase_from_env_or_file(pf) == "nope"
    # listen on the audit logger itself: whether its records also reach the root logger
    # (and pytest's caplog) depends on what earlier tests of this process did to logging
    seen: list[logging.LogRecord] = []
    listener = logging.Handler(logging.DEBUG)
    listener.emit = seen.append  # type: ignore[method-assign]
    audit_logger = logging.getLogger("casfs.audit")
    audit_logger.addHandler(listener)
    try:
        with pytest.raises(keys.WrongPassphrase):
            keys.unlock(vol, passphrase=keys.passphrase_from_env_or_file(pf))
    finally:
        audit_logger.removeHandler(listener)
    assert len(seen) == 1 and seen[0].audit["op"] == "unlock" and seen[0].audit["result"] == "EACCES"  # type: ignore[attr-defined]
    assert "authentication failed" in (tmp_path / "log" / "mount.log").read_text()


def test_an_encrypted_volume_that_lost_its_table_is_refused(tmp_path: Path, mysql_server: EmbeddedServer) -> None:
    """F6: the database records that the volume is encrypted (at init; or, for a volume
    made before that row existed, at its next unlocked open); a volume.toml without the
    [encryption] table is then refused instead of going on as plain (docs/encryption.md)."""
    from dataclasses import replace

    import cas.db.database
    from cas.errors import VolumeError
    from cas.config.volume import create_volume_dir, open_volume
    from tests.engine.test_fs import CS, Engine
    url = f"mysql://root@localhost/tkeys_{os.getpid()}?unix_socket={mysql_server.socket}"
    vol = create_volume_dir(str(tmp_path / "new"), CS, "zstd:3", url)
    vol.encryption = keys.new_encryption_table(keys.new_master_key(), "pw", None, volume_uuid=vol.uuid)
    cas.db.database.initialize(vol, 0, 0)
    try:
        with cas.db.database.connect(vol) as m:             # not unlocked: connects (stats, drive status)
            assert dict(m.db.query("SELECT k, v FROM meta"))["encryption"] == "aes-256-gcm/blake3-keyed"
        with pytest.raises(VolumeError, match="no \\[encryption\\] table"):
            cas.db.database.connect(replace(vol, encryption={}))
    finally:
        admin = pymysql.connect(unix_socket=str(mysql_server.socket), user="root", password="")
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE `tkeys_{os.getpid()}`")
        admin.close()
    # a volume encrypted before the row existed: unknown until its next unlocked open
    e = Engine(tmp_path / "old", mysql_server)
    try:
        assert e.q("SELECT v FROM meta WHERE k = 'encryption'") == []
        cas.db.database.connect(replace(e.vol, encryption={})).close()       # unknown: no refusal
        e.vol.encryption = keys.new_encryption_table(keys.new_master_key(), "pw", None, volume_uuid=e.vol.uuid)
        e.vol.save()
        with cas.db.database.connect(e.vol):                  # locked: nothing recorded yet
            pass
        assert e.q("SELECT v FROM meta WHERE k = 'encryption'") == []
        keys.unlock(e.vol, "pw")
        e.reopen()
        assert e.q("SELECT v FROM meta WHERE k = 'encryption'") == [("aes-256-gcm/blake3-keyed",)]
        lost = open_volume(str(e.vol.path))
        lost.encryption = {}
        with pytest.raises(VolumeError, match="refusing to go on as plain"):
            cas.db.database.connect(lost)
    finally:
        e.close()


def test_rescue_records_are_bound_to_volume_and_name_and_scrypt_is_bounded(
        ceng: CloudEngine, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Sealed rescue records open only under their own volume uuid and file name; an
    encrypted volume that is not unlocked writes none; scrypt parameters beyond the
    bounds are refused before running (docs/encryption.md)."""
    from cas.engine import rescue
    from cas.errors import VolumeError
    from tests.engine.test_cloud_encrypted import encrypt
    from tests.engine.test_fs import CS
    encrypt(ceng)
    fs = ceng.fs
    ino = fs.create(1, b"f", 0o100644, 1000, 1000).ino
    assert fs.write(ino, 0, b"r" * (CS + 5)) == CS + 5
    [path] = rescue.spill(fs, ceng.vol.path / "rescue")
    blob = path.read_bytes()
    assert b"rrrr" not in blob
    assert rescue.decode(rescue._open(fs, blob, path.name)).header["ino"] == ino
    with pytest.raises(rescue.RescueError):
        rescue._open(fs, blob, f"{ino}.1{rescue.SUFFIX}")            # renamed
    monkeypatch.setattr(fs.meta.volume, "uuid", "another-volume")
    with pytest.raises(rescue.RescueError):
        rescue._open(fs, blob, path.name)                              # moved to another volume
    monkeypatch.undo()
    monkeypatch.setattr(fs.meta.volume, "keys", None)
    with pytest.raises(rescue.RescueError, match="not unlocked"):
        rescue._seal(fs, b"x", path.name)
    monkeypatch.undo()
    fs.release(ino)
    table = keys.new_encryption_table(keys.new_master_key(), "pw", None, volume_uuid="u-1")
    for n, r, p in ((2 ** 30, 8, 1), (2 ** 15, 1 << 20, 1), (2 ** 15, 8, 64), (2 ** 10, 8, 1)):
        bad = {**table, "wraps": [{**table["wraps"][0], "n": n, "r": r, "p": p}]}
        with pytest.raises(VolumeError, match="outside the accepted bounds"):
            keys.unwrap_master(bad, "pw", None)


def test_the_passphrase_leaves_the_environment_once_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/keycmd.unlock_volume pops $CASFS_PASSPHRASE after reading it: the mount's
    daemon and an embedded mariadbd started later do not inherit it (/proc/PID/environ)."""
    import os

    from tools.cli.keycmd import unlock_volume
    master = keys.new_master_key()
    vol = _vol(tmp_path, keys.new_encryption_table(master, "pw", None, volume_uuid="u-1"))
    monkeypatch.setenv("CASFS_PASSPHRASE", "pw")
    assert unlock_volume(vol).master == master                     # type: ignore[union-attr]
    assert "CASFS_PASSPHRASE" not in os.environ
