"""The cloud tier on an S3-compatible store end to end: real mounts, the real casfs CLI,
boto3 in the daemon, and moto's S3 server in a subprocess (tests/s3_fixture.py).

What the bucket holds is read back with casfs's S3 store from the test (keys, sizes,
properties); what casfs believes comes from `casfs stats --json` and `casfs s3 status
--json`. The two must agree.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from cas.tier.cloud import VOLUME_PROPERTY
from cas.tier.s3 import S3ObjectStore
from tests.conftest import CasEnv
from tests.s3_fixture import ACCESS_KEY, SECRET_KEY, S3Server, s3_server, write_credentials  # noqa: F401
from tests.treeutil import compare_trees
from tests.waiting import wait_for

CHUNK = 64 * 1024


def make_tree(root: Path, seed: int, files: int = 16) -> None:
    """Random files (one repeating two others' bytes) in two directories."""
    rnd = random.Random(seed)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    blobs = [rnd.randbytes(rnd.randrange(1, 5 * CHUNK)) for _ in range(files)]
    for i, blob in enumerate(blobs):
        (root / ("a" if i % 2 else "b") / f"f{i}").write_bytes(blob)
    (root / "a" / "copy").write_bytes(blobs[0] + blobs[1])


def fsync_tree(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def status(casenv: CasEnv) -> dict[str, Any]:
    return dict(json.loads(casenv.run("s3", "status", "--json", "vol").stdout))


def stats(casenv: CasEnv) -> dict[str, Any]:
    return dict(json.loads(casenv.run("stats", "--json", "vol").stdout))


def drained(casenv: CasEnv) -> bool:
    s = status(casenv)
    return bool(s["queued_chunks"] == 0 and s["uploading_packs"] == 0)


def volume_uuid(casenv: CasEnv, name: str = "vol") -> str:
    text = (casenv.data_home / name / "volume.toml").read_text()
    return text.split('uuid = "')[1].split('"')[0]


def test_s3_upload_evict_read_back_and_restore(casenv: CasEnv, s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.new_bucket()
    creds = write_credentials(casenv.tmp / "aws-credentials")
    casenv.init("vol", chunk_size="64KiB")
    uuid = volume_uuid(casenv)
    out = casenv.run("s3", "enable", "vol", "--bucket", bucket, "--endpoint", s3_server.url,
                     "--credentials-file", str(creds), "--pack-size", "256KiB", "--pack-age", "0").stdout
    assert f"cloud tier in s3://{bucket}/casfs-{uuid}/ at {s3_server.url}" in out
    toml = (casenv.data_home / "vol" / "volume.toml").read_text()
    assert "[s3]" in toml and "[drive]" not in toml
    assert ACCESS_KEY not in toml and SECRET_KEY not in toml          # the path only, never the keys

    # upload: the queue drains, the bucket holds exactly the confirmed packs, each chunk once
    mp = casenv.mount("vol")
    src = casenv.tmp / "src"
    make_tree(src, seed=7)
    shutil.copytree(src, mp / "t")
    fsync_tree(mp)
    wait_for(lambda: drained(casenv), "the upload queue to drain", 120, interval=0.3)
    st = stats(casenv)
    objects = list(S3ObjectStore(s3_server.client(), bucket, f"casfs-{uuid}/").list())
    packs = [o for o in objects if o.name.startswith("casfs-pack-")]
    assert st["live_chunks"] > 0 and len(packs) == st["cloud_packs"] > 1
    assert sum(o.size for o in packs) == st["cloud_bytes"] == st["stored_bytes"]
    assert all(o.properties[VOLUME_PROPERTY] == uuid and o.id.startswith(f"casfs-{uuid}/") for o in objects)
    text = casenv.run("s3", "status", "vol").stdout
    assert f"store        s3://{bucket}/casfs-{uuid}/ at {s3_server.url}" in text
    assert "queue        0 chunks" in text and f"{st['cloud_packs']} packs" in text

    # evict: with --local-limit 0 every confirmed chunk leaves the local store
    casenv.umount(mp)
    casenv.mount("vol", mp, "--local-limit", "0")
    wait_for(lambda: stats(casenv)["local_bytes"] == 0, "eviction of every local chunk", 120, interval=0.3)
    st = stats(casenv)
    assert st["cloud_only_chunks"] == st["live_chunks"]
    casenv.umount(mp)
    assert not any(p.is_file() for p in (casenv.data_home / "vol" / "chunks").rglob("*"))

    # read back byte-exact: every byte comes from the bucket (no local chunk file is left)
    casenv.mount("vol", mp, "--local-limit", "0")
    assert compare_trees(src, mp / "t", mtimes=False) == []
    casenv.umount(mp)

    # restore: the local store is lost; `casfs restore` rebuilds it from the bucket
    shutil.rmtree(casenv.data_home / "vol" / "chunks")
    out = casenv.run("restore", "--all", "vol").stdout
    assert f"restored {st['live_chunks']} chunks" in out and "0 lost" in out
    rep = json.loads(casenv.run("fsck", "--json", "vol").stdout)
    assert rep["clean"] and rep["cloud_only"] == 0
    assert json.loads(casenv.run("fsck", "--cloud", "--json", "vol").stdout)["clean"]
    casenv.mount("vol", mp)
    assert compare_trees(src, mp / "t", mtimes=False) == []

    # the whole volume lost (config, database, chunks): `casfs s3 restore` recreates it from
    # the bucket's metadata snapshot on a new database; reads fetch from the bucket
    casenv.run("s3", "push", "vol")                  # a snapshot, unless the last unmount's is current
    snap = status(casenv)["snapshot"]
    assert snap["generation"] >= 1 and snap["changes_since"] == 0 and snap["lacking_chunks"] == 0
    casenv.umount(mp)
    out = casenv.run("s3", "restore", "vol2", "--bucket", bucket, "--endpoint", s3_server.url,
                     "--credentials-file", str(creds), "--meta", casenv.meta_url(f"t{os.getpid()}_s3_restored")).stdout
    assert "restored volume vol2" in out and f"from generation {snap['generation']}" in out, out
    assert volume_uuid(casenv, "vol2") == uuid
    mp2 = casenv.mount("vol2")
    assert compare_trees(src, mp2 / "t", mtimes=False) == []
    assert json.loads(casenv.run("fsck", "--json", "vol2").stdout)["clean"]


def test_s3_enable_refuses_what_would_mix_stores(casenv: CasEnv, s3_server: S3Server) -> None:  # noqa: F811
    creds = write_credentials(casenv.tmp / "aws-credentials")
    bucket = s3_server.new_bucket()
    base = ["--endpoint", s3_server.url, "--credentials-file", str(creds)]

    def one_line_error(r: Any, *words: str) -> None:
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert all(w in r.stderr for w in words), r.stderr

    casenv.init("vol", chunk_size="64KiB")
    one_line_error(casenv.run("s3", "enable", "vol", "--bucket", "no-such-bucket", *base, check=False),
                   "no-such-bucket does not exist")
    one_line_error(casenv.run("s3", "enable", "vol", "--bucket", bucket, "--endpoint", s3_server.url,
                              "--credentials-file", str(casenv.tmp / "nope"), check=False), "does not exist")
    assert "[s3]" not in (casenv.data_home / "vol" / "volume.toml").read_text()
    # a prefix holding another volume's object is refused; its own prefix is fine
    S3ObjectStore(s3_server.client(), bucket, "shared/").put("casfs-pack-x", b"x", {VOLUME_PROPERTY: "other"})
    one_line_error(casenv.run("s3", "enable", "vol", "--bucket", bucket, "--prefix", "shared", *base, check=False),
                   "another volume", "other")
    out = casenv.run("s3", "enable", "vol", "--bucket", f"{bucket}-new", "--create-bucket", *base).stdout
    assert "bucket created" in out
    # one store per volume: Drive's auth refuses an S3 volume
    one_line_error(casenv.run("drive", "auth", "--endpoint", "http://127.0.0.1:1/", "vol", check=False),
                   "one cloud store")
