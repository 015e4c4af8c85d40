"""Engine tests of the snapshot format (cas.snapshot.dump / load) on the real MariaDB:
a dump loads into a fresh database from schema.sql with every row equal, and a
damaged or truncated dump is refused (docs/backup.md, "The snapshot format")."""
from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import pymysql
import pytest
import zstandard

from cas import snapshot
from cas.meta import Database, parse_meta_url
from tests.engine.test_cloud import CloudEngine, ceng, rand  # noqa: F401 - the fixture
from tests.engine.test_fs import CS, make_file

KEYS = {"packs": "id", "meta": "k", "inodes": "id", "dentries": "parent, name", "symlinks": "inode",
        "xattrs": "inode, name", "chunks": "id", "manifests": "inode, slot", "pack_entries": "chunk"}


def rows(db: Database, table: str) -> list[tuple[Any, ...]]:
    where = " WHERE state = 'confirmed'" if table == "packs" else ""
    return db.query(f"SELECT * FROM `{table}`{where} ORDER BY {KEYS[table]}")


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
        name = f"{ceng.dbname}_copy"
        vol2 = replace(ceng.vol, meta_url=ceng.vol.meta_url.replace(ceng.dbname, name))
        snapshot.create_database(vol2)
        dst = Database(parse_meta_url(vol2.meta_url))
        try:
            loaded = snapshot.load(dst, out.getvalue())
            assert loaded.rows == info.rows
            for t in snapshot.TABLES:
                assert rows(dst, t) == rows(src, t), t
        finally:
            dst.close()
            admin = pymysql.connect(unix_socket=str(ceng.server.socket), user="root", password="")
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE `{name}`")
            admin.close()
    finally:
        src.close()
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(out.getvalue())).read().decode()
    lines = text.splitlines()
    assert lines[2].startswith("[")                                # the first row of packs
    for damaged in (lines[:-1],                                    # no trailer
                    lines[:2] + lines[3:]):                        # a row missing
        blob = zstandard.ZstdCompressor().compress(("\n".join(damaged) + "\n").encode())
        vol3 = replace(ceng.vol, meta_url=ceng.vol.meta_url.replace(ceng.dbname, f"{ceng.dbname}_bad"))
        snapshot.create_database(vol3)
        bad = Database(parse_meta_url(vol3.meta_url))
        try:
            with pytest.raises(snapshot.SnapshotError):
                snapshot.load(bad, blob)
        finally:
            bad.close()
            admin = pymysql.connect(unix_socket=str(ceng.server.socket), user="root", password="")
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE `{ceng.dbname}_bad`")
            admin.close()
