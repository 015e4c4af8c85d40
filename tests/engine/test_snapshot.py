"""Engine tests of the snapshot format (cas.tier.snapshot.dump / load) on the real MariaDB:
a dump loads into a fresh database from schema.sql with every row equal, and a
damaged or truncated dump is refused (docs/backup.md, "The snapshot format")."""
from __future__ import annotations

import io
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pymysql
import pytest
import zstandard

from cas.tier import snapshot
from cas.db.database import Database, parse_meta_url
from cas.tier.objstore import ObjectStoreError
from tests.engine.test_cloud import CloudEngine, ceng, rand  # noqa: F401 - the fixture
from tests.engine.test_fs import CS, make_file

KEYS = {"packs": "id", "meta": "k", "inodes": "id", "dentries": "parent, name", "symlinks": "inode",
        "xattrs": "inode, name", "chunks": "id", "manifests": "inode, slot", "pack_entries": "chunk"}


def rows(db: Database, table: str) -> list[tuple[Any, ...]]:
    where = " WHERE state = 'confirmed'" if table == "packs" else ""
    return db.query(f"SELECT * FROM `{table}`{where} ORDER BY {KEYS[table]}")


def drop_database(ceng: CloudEngine, name: str) -> bool:
    """Drop database ``name`` of the test server if it exists; True when it existed."""
    admin = pymysql.connect(unix_socket=str(ceng.server.socket), user="root", password="")
    try:
        with admin.cursor() as cur:
            existed = bool(cur.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                                       (name,)))
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.close()
    return existed


@contextmanager
def scratch_database(ceng: CloudEngine, suffix: str) -> Iterator[Database]:
    """A connection to an empty volume database (schema.sql, :func:`snapshot.create_database`)
    named after the engine's plus ``suffix``, on the same server; dropped at exit."""
    name = f"{ceng.dbname}_{suffix}"
    vol = replace(ceng.vol, meta_url=ceng.vol.meta_url.replace(ceng.dbname, name))
    snapshot.create_database(vol)
    db = Database(parse_meta_url(vol.meta_url))
    try:
        yield db
    finally:
        db.close()
        drop_database(ceng, name)


def test_dump_loads_into_a_fresh_database_row_for_row_and_damage_is_refused(ceng: CloudEngine) -> None:
    fs = ceng.fs
    make_file(fs, b"a", rand(5 * CS + 17, 1))
    ino = make_file(fs, b"b", rand(2 * CS, 2))
    fs.setxattr(ino, b"user.k", bytes(range(256)))
    fs.symlink(1, b"s", b"a", 0, 0)
    make_file(fs, b"sparse", b"x", offset=3 * CS)
    ceng.drain()
    src = Database(parse_meta_url(ceng.vol.meta_url))
    out = io.BytesIO()
    try:
        info = snapshot.dump(src, out, ceng.vol.uuid, 1)
        assert info.lacking_chunks == 0 and info.packs and info.rows["inodes"] == 5
        with scratch_database(ceng, "copy") as dst:
            loaded = snapshot.load(dst, out.getvalue())
            assert loaded.rows == info.rows
            for t in snapshot.TABLES:
                assert rows(dst, t) == rows(src, t), t
    finally:
        src.close()
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue())).read().decode()
    lines = text.splitlines()
    assert lines[2].startswith("[")                                # the first row of packs
    for damaged in (lines[:-1],                                    # no trailer
                    lines[:2] + lines[3:]):                        # a row missing
        blob = zstandard.ZstdCompressor().compress(("\n".join(damaged) + "\n").encode())
        with scratch_database(ceng, "bad") as bad, pytest.raises(snapshot.SnapshotError):
            snapshot.load(bad, blob)


def test_a_snapshot_whose_upload_started_keeps_its_pins(ceng: CloudEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """F2: the object may be on the store although put failed (a lost reply): the pins of
    its generation stay, so gc keeps the packs it names (docs/backup.md)."""
    make_file(ceng.fs, b"a", rand(3 * CS, 3))
    ceng.drain()
    tier = ceng.tier()
    real_put = tier.objects.put

    def put_then_lose_reply(name: str, data: bytes, properties: dict[str, str] | None = None) -> Any:
        real_put(name, data, properties)
        raise ObjectStoreError("connection reset (reply lost)")
    monkeypatch.setattr(tier.objects, "put", put_then_lose_reply)
    with pytest.raises(ObjectStoreError):
        snapshot.take(tier, 5)
    assert [o.name for o in tier.objects.list() if o.name.startswith(snapshot.SNAPSHOT_PREFIX)]
    assert ceng.q("SELECT DISTINCT generation FROM snapshot_packs") == [(1,)]


def test_a_write_committed_after_the_dump_is_not_lost_by_the_mark(ceng: CloudEngine) -> None:
    """F3: a write buffered in RAM (ctime taken at the write) and committed after a dump
    whose newest ctime is later is not counted by the ctime mark, but the mount
    snapshots again (periodic and unmount) because it committed after the dump started
    (docs/backup.md, "The recovery point")."""
    fs = ceng.fs
    a = fs.create(1, b"a", 0o100644, 1000, 1000).ino
    assert fs.write(a, 0, b"buffered") == 8             # ctime in RAM now; not committed
    make_file(fs, b"b", b"committed")                    # a later ctime, committed first
    ceng.drain()
    tier = ceng.tier()
    snapshot.take(tier, 5)
    snapper = snapshot.Snapshotter(tier, 0.0, 5, last_commit_ns=lambda: fs.db.last_commit_ns)
    assert not snapper._changed()
    fs.fsync(a)                                          # the buffered write commits now
    fs.release(a)
    assert ceng.q("SELECT size FROM inodes WHERE id = %s", (a,)) == [(8,)]
    assert snapshot.recovery_point(tier.db).changes_since == 0   # the mark cannot see it
    assert snapper._changed()
    got = snapper.final(10.0)                            # so the unmount snapshots it
    assert got is not None and got.generation == 2 and not snapper._changed()


def test_the_mount_snapshots_again_when_the_last_one_lacked_chunks(ceng: CloudEngine) -> None:
    """F4: a snapshot taken while chunks were still queued is replaced by the mount."""
    make_file(ceng.fs, b"a", rand(2 * CS, 4))
    ceng.fs.sync()
    tier = ceng.tier()
    assert snapshot.take(tier, 5).lacking_chunks > 0
    snapper = snapshot.Snapshotter(tier, 0.0, 5)
    assert snapper._changed()
    tier.drain(30)
    got = snapper.final(10.0)
    assert got is not None and got.lacking_chunks == 0 and not snapper._changed()


def test_damaged_unsealed_snapshots_are_refused_with_one_line(
        ceng: CloudEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """F1: an unsealed snapshot carries a zstd content checksum (a bit flip never loads
    other values), the listing's md5 is compared on download, base64 is strict; damaged
    but valid JSON is a SnapshotError, never a traceback, and column names are checked
    against the table's real columns (docs/backup.md, "The snapshot format")."""
    make_file(ceng.fs, b"a", rand(3 * CS, 5))
    ceng.drain()
    tier = ceng.tier()
    snapshot.take(tier, 5)
    snap = snapshot.plan_restore(tier.objects).chosen
    assert snap.md5
    blob = tier.objects.get(snap.id)
    want = list(snapshot._lines(blob))
    rng = random.Random(7)
    for _ in range(300):
        bad = bytearray(blob)
        bit = rng.randrange(len(bad) * 8)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            got = list(snapshot._lines(bytes(bad)))
        except snapshot.SnapshotError:
            continue
        # the same documents, or a prefix of them (a truncation: load refuses it, no trailer)
        assert got == want[:len(got)], f"bit {bit} changed the content silently"
    # damaged on the way: same size, other bytes -> the listing's md5 catches it
    real_get = tier.objects.get
    monkeypatch.setattr(tier.objects, "get", lambda oid, *a: bytes([real_get(oid, *a)[0] ^ 1]) + real_get(oid, *a)[1:])
    with pytest.raises(snapshot.SnapshotError, match="md5"):
        snapshot._open_blob(tier.objects, snap, ceng.vol.uuid, None)
    monkeypatch.undo()
    # valid JSON, wrong content
    import json
    docs = [json.loads(x) for x in zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read().splitlines()]
    assert docs[1]["table"] == "packs" and isinstance(docs[2], list)
    md5_at = docs[1]["columns"].index("md5")

    def variant(i: int, doc: Any) -> bytes:
        out = list(docs)
        out[i] = doc
        return zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in out).encode())
    row = list(docs[2])
    row[md5_at] = "***"
    variants = [variant(0, {**docs[0], "version": "x"}),
                variant(1, {**docs[1], "columns": docs[1]["columns"][:-1] + ["name` = 1; DROP TABLE inodes; --"]}),
                variant(1, {**docs[1], "columns": 5}),
                variant(1, {**docs[1], "binary": [99]}),
                variant(2, row[:-1]),
                variant(2, row)]
    with scratch_database(ceng, "dmg") as bad_db:
        for v in variants:
            with pytest.raises(snapshot.SnapshotError, match="damaged|not supported"):
                snapshot.load(bad_db, v)
        for v in (variants[2], variant(2, [])):
            with pytest.raises(snapshot.SnapshotError, match="damaged"):
                snapshot.pack_names(v)
        assert bad_db.query("SELECT COUNT(*) FROM packs")[0][0] == 0


def test_the_volume_object_follows_key_passwd_on_disk(ceng: CloudEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """F5: `casfs key passwd` rewrites volume.toml while a mount keeps the old table in
    RAM; the volume object on the store is built from volume.toml on disk, so neither the
    mount's next snapshot nor `drive push` (refresh_volume_object) puts the old wraps
    back (docs/encryption.md, "Changing the passphrase"). F7: the dump of an encrypted
    volume never goes to a file (it is plaintext until sealed)."""
    import json
    import tempfile
    files: list[Any] = []
    real_tf = tempfile.TemporaryFile

    def recording(*a: Any, **kw: Any) -> Any:
        files.append(kw.get("dir"))
        return real_tf(*a, **kw)
    monkeypatch.setattr(tempfile, "TemporaryFile", recording)

    from cas.config import keys
    from cas.config.volume import open_volume
    from tests.engine.test_cloud_encrypted import encrypt
    encrypt(ceng)
    make_file(ceng.fs, b"a", rand(CS, 6))
    ceng.drain()
    tier = ceng.tier()

    def on_store() -> dict[str, Any]:
        vols = [o for o in tier.objects.list() if o.name == snapshot.VOLUME_OBJECT]
        assert len(vols) == 1
        return dict(json.loads(tier.objects.get(vols[0].id)))
    snapshot.take(tier, 5)
    assert on_store()["encryption"] == ceng.vol.encryption
    assert files == [] and not any(ceng.vol.run_dir.iterdir())
    # what `key passwd` does: the same master key wrapped under a new passphrase, on disk
    disk = open_volume(str(ceng.vol.path))
    master = keys.unlock(disk, "pw").master          # type: ignore[union-attr]
    disk.encryption = {**disk.encryption, "wraps": [keys.passphrase_wrap(master, "new pw", disk.uuid)]}
    disk.save()
    snapshot.refresh_volume_object(tier)
    assert on_store()["encryption"] == disk.encryption
    make_file(ceng.fs, b"b", b"later")
    ceng.drain()
    snapshot.take(tier, 5)                           # the tier's volume still has the old table
    assert tier.volume.encryption != disk.encryption and on_store()["encryption"] == disk.encryption
    restored = replace(disk, encryption=on_store()["encryption"], keys=None)
    assert keys.unlock(restored, "new pw").master == master     # type: ignore[union-attr]


def test_a_failed_restore_leaves_no_half_loaded_database(ceng: CloudEngine, tmp_path: Any) -> None:
    """restore --from-drive --meta URL: when the restore fails after the database was
    created and loaded (a chunk size that disagrees with the volume object's), the
    database it created is dropped again; an older generation that is garbage does not
    block the restore: its pins cover every pack of the folder (docs/backup.md,
    "Restore on a fresh machine")."""
    make_file(ceng.fs, b"a", rand(CS, 8))
    ceng.drain()
    tier = ceng.tier()
    old = snapshot.take(tier, 5)
    make_file(ceng.fs, b"b", b"b")
    ceng.drain()
    snapshot.take(tier, 5)
    name = f"{ceng.dbname}_rst"
    vol2 = replace(ceng.vol, path=tmp_path / "restored", meta_url=ceng.vol.meta_url.replace(ceng.dbname, name))
    # a volume object whose chunk size disagrees with the snapshot's is refused
    with pytest.raises(snapshot.SnapshotError, match="chunk size"):
        snapshot.restore_into(replace(vol2, chunk_size=2 * CS), tier.objects, tier.cfg, "folder",
                              snapshot.plan_restore(tier.objects))
    [obj] = [o for o in tier.objects.list() if o.name == old.name]
    (ceng.objdir / obj.id).write_bytes(b"garbage, not a zstd frame")
    plan = snapshot.plan_restore(tier.objects)
    # an older generation that cannot be read does not block the restore of the newest:
    # every pack of the folder is kept safe from gc for it
    said: list[str] = []
    snapshot.restore_into(vol2, tier.objects, tier.cfg, "folder", plan, progress=said.append)
    assert any("generation 1 cannot be read" in line for line in said), said
    dst = Database(parse_meta_url(vol2.meta_url))
    try:
        packs = {o.name for o in tier.objects.list() if not snapshot.is_backup_object(o.name)}
        assert packs and {str(r[0]) for r in dst.query(
            "SELECT pack FROM snapshot_packs WHERE generation = 1")} == packs
    finally:
        dst.close()
    assert drop_database(ceng, name)
    # the chunk size mismatch again, after the load: nothing is left
    with pytest.raises(snapshot.SnapshotError, match="chunk size"):
        snapshot.restore_into(replace(vol2, chunk_size=2 * CS), tier.objects, tier.cfg, "folder", plan)
    assert not drop_database(ceng, name)
