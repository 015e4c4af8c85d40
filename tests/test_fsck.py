"""casfs fsck through the CLI: detection, repair, and refusing to repair a live mount."""
from __future__ import annotations

import json
import os
import stat

import pymysql

from tests.conftest import CasEnv


def _db(casenv: CasEnv, vol: str) -> pymysql.connections.Connection:
    import tomllib
    from urllib.parse import parse_qs, urlparse
    url = urlparse(tomllib.loads((casenv.data_home / vol / "volume.toml").read_text())["meta_url"])
    return pymysql.connect(unix_socket=parse_qs(url.query)["unix_socket"][0], user="root",
                           database=url.path.lstrip("/"), autocommit=True)


def test_fsck_finds_and_repairs_refcounts(casenv: CasEnv) -> None:
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    data = os.urandom(3 * 65536)
    (mp / "a").write_bytes(data)
    (mp / "b").write_bytes(data)          # same chunks: refcount 2 each
    os.link(mp / "a", mp / "c")
    r = casenv.run("fsck", "--repair", "vol", check=False)
    assert r.returncode == 1 and "unmount" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    casenv.umount(mp)
    assert casenv.run("fsck", "vol").returncode == 0
    conn = _db(casenv, "vol")
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE chunks SET refcount = refcount + 5 LIMIT 1")
            cur.execute("UPDATE inodes SET nlink = 7 WHERE mode & %s = %s LIMIT 1",
                        (stat.S_IFMT(0o170000), stat.S_IFREG))
        r = casenv.run("fsck", "--json", "vol", check=False)
        assert r.returncode == 1
        report = json.loads(r.stdout)
        assert len(report["refcount_mismatches"]) == 1 and report["refcount_mismatches"][0][1:] == [7, 2]
        assert len(report["nlink_mismatches"]) == 1
        assert casenv.run("fsck", "--repair", "vol").returncode == 0
        assert casenv.run("fsck", "vol").returncode == 0
        with conn.cursor() as cur:
            cur.execute("SELECT refcount FROM chunks")
            assert sorted(r[0] for r in cur.fetchall()) == [2, 2, 2]
    finally:
        conn.close()
    mp = casenv.mount("vol", mp)
    assert (mp / "a").read_bytes() == data and (mp / "c").read_bytes() == data
    assert os.stat(mp / "a").st_nlink == 2
