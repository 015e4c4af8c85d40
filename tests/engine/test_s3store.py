"""The S3 store's own behaviour, beyond the conformance suite it passes in
tests/engine/test_objstore.py: credentials refused by a server that checks signatures
(moto's server with authentication on), the translation of S3's error codes (a small
real HTTP server answering canned S3 error documents, and a closed port), what a PUT
sends (Content-MD5, x-amz-checksum-sha256), the md5 of an object whose ETag is not one,
and the prefix as the store's boundary.

No mocks: boto3 speaks HTTP to moto's server or to the canned server below.
"""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from cas.tier import s3
from cas.tier.objstore import CredentialsRefused, ObjectNotFound, ObjectStoreError, TryAgain
from tests.s3_fixture import S3Server, s3_bucket, s3_server, write_credentials  # noqa: F401


# -- credentials -----------------------------------------------------------------------

@pytest.fixture
def signed_server(s3_server: S3Server, tmp_path: Path,  # noqa: F811
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Server, Path, str]]:
    """moto's server with request authentication on, a bucket, and a credentials file of
    an IAM user allowed s3:*; authentication is turned off again in the finalizer. AWS
    credentials in the environment (which come before any file in the AWS chain) are
    hidden for the test."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    iam = boto3.client("iam", endpoint_url=s3_server.url, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    user = f"casfs-{tmp_path.name[-20:]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    good = write_credentials(tmp_path / "good", key["AccessKeyId"], key["SecretAccessKey"])
    bucket = s3_server.new_bucket()
    s3_server.enforce_auth()
    try:
        yield s3_server, good, bucket
    finally:
        s3_server.relax_auth()


def test_wrong_key_or_secret_is_credentials_refused(signed_server: tuple[S3Server, Path, str],
                                                    tmp_path: Path) -> None:
    server, good, bucket = signed_server
    st = s3.S3ObjectStore(server.client(good), bucket, "p/")
    info = st.put("pack", b"signed bytes", {"casfs_volume": "v"})
    assert st.get(info.id) == b"signed bytes"               # the right key works

    key = good.read_text().split("aws_access_key_id = ")[1].split()[0]
    for name, creds in [("unknown key", write_credentials(tmp_path / "unknown", "AKIAUNKNOWN0000000000", "x")),
                        ("wrong secret", write_credentials(tmp_path / "wrong", key, "not-the-secret"))]:
        bad = s3.S3ObjectStore(server.client(creds), bucket, "p/")
        for call in (lambda: bad.put("x", b"data"), lambda: bad.get(info.id), lambda: bad.stat(info.id),
                     lambda: list(bad.list())):
            with pytest.raises(CredentialsRefused) as e:
                call()
            assert "HTTP 403" in str(e.value) and "\n" not in str(e.value), name
    assert st.get(info.id) == b"signed bytes"               # nothing was changed by them


def test_unusable_credentials_file_or_profile_is_credentials_refused(s3_server: S3Server, tmp_path: Path) -> None:
    with pytest.raises(CredentialsRefused) as e:
        s3.make_client(s3_server.url, credentials_file=tmp_path / "missing")
    assert "missing" in str(e.value)
    creds = write_credentials(tmp_path / "creds", profile="other")
    with pytest.raises(CredentialsRefused):
        s3.make_client(s3_server.url, credentials_file=creds, profile="nosuchprofile")


# -- the prefix is the store's boundary ----------------------------------------------------

def test_prefix_bounds_the_store_and_names_round_trip(s3_server: S3Server, s3_bucket: str) -> None:  # noqa: F811
    a = s3.S3ObjectStore(s3_server.client(), s3_bucket, "vol-a")
    b = s3.S3ObjectStore(s3_server.client(), s3_bucket, "vol-a-more/")
    names = ["a/b", "..", ".", "", "~", "x y%2F~", "casfs-pack-0001"]
    infos = {n: a.put(n, n.encode()) for n in names}
    other = b.put("a/b", b"other")
    for n, info in infos.items():
        assert info.id.startswith("vol-a/") and info.id.count("/") == 2
        assert info.name == n and a.get(info.id) == n.encode()
        assert [o.id for o in a.find(n)] == [info.id]
    assert {o.id for o in a.list()} == {i.id for i in infos.values()}
    assert [o.id for o in b.list()] == [other.id]
    for oid in (other.id, "vol-a/", "vol-a//x", "vol-a/../vol-a-more/x", "x/vol-a/y"):
        with pytest.raises(ObjectNotFound):
            a.stat(oid)
        with pytest.raises(ObjectNotFound):
            a.delete(oid)
    assert b.get(other.id) == b"other"


# -- error translation against a canned S3 endpoint ---------------------------------------

@dataclass
class Canned:
    """A real HTTP server answering every request with ``answer(method, path, headers,
    body)`` -> (status, headers, body); ``requests`` records (method, path, headers, body)."""

    url: str
    answer: Callable[[str, str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)


def error_xml(code: str, message: str = "canned") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>r</RequestId></Error>").encode()


@pytest.fixture
def canned() -> Iterator[Canned]:
    box: list[Canned] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            c = box[0]
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            c.requests.append((self.command, self.path, headers, body))
            status, out_headers, out = c.answer(self.command, self.path, headers, body)
            if status == 0:                       # drop the connection without a reply
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(status)
            for k, v in out_headers.items():
                self.send_header(k, v)
            if "Content-Length" not in out_headers:
                self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    box.append(Canned(f"http://127.0.0.1:{server.server_address[1]}", lambda *a: (500, {}, b"")))
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=10)


def canned_store(c: Canned, tmp_path: Path) -> s3.S3ObjectStore:
    client = s3.make_client(c.url, credentials_file=write_credentials(tmp_path / "creds"), timeout_s=5.0)
    return s3.S3ObjectStore(client, "bucket", "p/")


OID = "p/pack/0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("status,code,retry_after,kind", [
    (503, "SlowDown", "7", TryAgain), (503, "ServiceUnavailable", None, TryAgain),
    (500, "InternalError", None, TryAgain), (400, "RequestTimeout", None, TryAgain),
    (429, "TooManyRequests", "2.5", TryAgain), (400, "BadDigest", None, TryAgain),
    (403, "InvalidAccessKeyId", None, CredentialsRefused), (403, "SignatureDoesNotMatch", None, CredentialsRefused),
    (403, "AccessDenied", None, CredentialsRefused), (401, "Unauthorized", None, CredentialsRefused),
    (404, "NoSuchKey", None, ObjectNotFound), (404, "NoSuchBucket", None, ObjectStoreError),
    (400, "EntityTooLarge", None, ObjectStoreError), (403, "InvalidObjectState", None, ObjectStoreError)])
def test_s3_error_codes_map_onto_the_interface(canned: Canned, tmp_path: Path, status: int, code: str,
                                               retry_after: str | None, kind: type[Exception]) -> None:
    headers = {"Content-Type": "application/xml"} | ({"Retry-After": retry_after} if retry_after else {})
    canned.answer = lambda *a: (status, headers, error_xml(code))
    st = canned_store(canned, tmp_path)
    with pytest.raises(ObjectStoreError) as e:
        st.get(OID)
    assert type(e.value) is kind, e.value
    assert f"HTTP {status} {code}" in str(e.value) and "\n" not in str(e.value)
    if kind is TryAgain:
        assert isinstance(e.value, TryAgain)
        assert e.value.retry_after == (float(retry_after) if retry_after else None)
    assert len(canned.requests) == 1                        # botocore did not retry on its own


@pytest.mark.parametrize("status,kind", [(404, ObjectNotFound), (403, CredentialsRefused), (503, TryAgain),
                                         (500, TryAgain), (400, ObjectStoreError)])
def test_bodyless_head_errors_map_by_status(canned: Canned, tmp_path: Path, status: int,
                                            kind: type[Exception]) -> None:
    canned.answer = lambda *a: (status, {}, b"")
    with pytest.raises(ObjectStoreError) as e:
        canned_store(canned, tmp_path).stat(OID)
    assert type(e.value) is kind, e.value


def test_refused_and_dropped_connections_are_try_again(canned: Canned, tmp_path: Path) -> None:
    canned.answer = lambda *a: (0, {}, b"")
    with pytest.raises(TryAgain) as e:
        canned_store(canned, tmp_path).get(OID)
    assert "network error" in str(e.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]                          # bound, not listening: refused
        client = s3.make_client(f"http://127.0.0.1:{closed}", credentials_file=write_credentials(tmp_path / "c"),
                                timeout_s=5.0)
        with pytest.raises(TryAgain):
            s3.S3ObjectStore(client, "bucket", "p/").stat(OID)


def test_put_sends_content_md5_and_sha256_and_md5_falls_back_when_etag_is_not_one(
        canned: Canned, tmp_path: Path) -> None:
    data = b"pack bytes " * 1000
    md5 = hashlib.md5(data)

    def answer(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if method == "PUT":
            return 200, {"ETag": '"kms-style-etag-not-an-md5"'}, b""
        put = next(r for r in canned.requests if r[0] == "PUT")
        return 200, {"ETag": '"kms-style-etag-not-an-md5"', "Content-Length": str(len(put[3])),
                     "Last-Modified": "Fri, 27 Nov 2026 10:00:00 GMT",
                     "x-amz-checksum-sha256": put[2]["x-amz-checksum-sha256"],
                     **{k: v for k, v in put[2].items() if k.startswith("x-amz-meta-")}}, b""

    canned.answer = answer
    info = canned_store(canned, tmp_path).put("pack", data, {"casfs_volume": "v1"})
    method, path, headers, body = canned.requests[0]
    assert (method, body) == ("PUT", data)
    assert headers["content-md5"] == base64.b64encode(md5.digest()).decode()
    assert headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert path.startswith("/bucket/p/pack/")
    assert (info.md5, info.sha256, info.properties) == (md5.hexdigest(), hashlib.sha256(data).hexdigest(),
                                                        {"casfs_volume": "v1"})


# -- the [s3] table of volume.toml ---------------------------------------------------------

def test_s3_table_round_trips_and_bad_tables_are_refused(tmp_path: Path) -> None:
    import uuid as uuidlib

    from cas.config.volume import Volume, open_volume
    from cas.errors import VolumeError
    from cas.tier.cloud import CloudConfig

    vol = Volume(path=tmp_path / "v", name="v", uuid=str(uuidlib.uuid4()), chunk_size=1 << 20, compression="zstd:3")
    vol.path.mkdir()
    vol.s3 = {"bucket": "b", "endpoint_url": "http://127.0.0.1:9/", "credentials_file": "creds",
              "pack_size": 1 << 20, "fetch_ahead": 4}
    vol.save()
    v = open_volume(str(vol.path))
    cfg = CloudConfig.from_volume(v)
    assert (cfg.kind, cfg.endpoint, cfg.pack_size, cfg.fetch_ahead) == ("s3", "http://127.0.0.1:9/", 1 << 20, 4)
    assert cfg.s3 == {"bucket": "b", "endpoint_url": "http://127.0.0.1:9/", "credentials_file": "creds",
                      "prefix": f"casfs-{v.uuid}/"}
    assert cfg.label() == f"s3://b/casfs-{v.uuid}/ at http://127.0.0.1:9/"
    v.s3 = cfg.as_table()                                   # what `s3 enable` writes reads back the same
    assert CloudConfig.from_volume(v) == cfg
    assert "folder" not in v.s3 and "endpoint" not in v.s3
    cfg.s3["prefix"] = ""                                   # the bucket's root stays the root
    v.s3 = cfg.as_table()
    assert CloudConfig.from_volume(v).s3["prefix"] == ""
    for bad, words in [({"endpoint_url": "http://x/"}, "no bucket"), ({"bucket": "b", "folder": "f"}, "'folder'"),
                       ({"bucket": "b", "endpoint": "http://x/"}, "endpoint_url"),
                       ({"bucket": "b", "pack_size": "big"}, "[s3] pack_size")]:
        v.s3 = bad
        with pytest.raises(VolumeError) as e:
            CloudConfig.from_volume(v)
        assert words in str(e.value)
    v.s3, v.drive = {"bucket": "b"}, {"endpoint": "http://127.0.0.1:1/"}
    with pytest.raises(VolumeError) as e:
        CloudConfig.from_volume(v)
    assert "both [drive] and [s3]" in str(e.value)


# -- the cloud tier's gc on an S3 store (invariant 9) ------------------------------------------

def test_gc_on_s3_deletes_dead_packs_and_own_orphans_only(tmp_path: Path, mysql_server: Any,
                                                          s3_server: S3Server, s3_bucket: str) -> None:  # noqa: F811
    import random

    import cas.maint.gc
    from tests.engine.test_cloud import CloudEngine
    from tests.engine.test_fs import CS, make_file

    e = CloudEngine(tmp_path, mysql_server)
    try:
        store = e.objects = s3.S3ObjectStore(s3_server.client(), s3_bucket, f"casfs-{e.vol.uuid}/")  # type: ignore[assignment]
        make_file(e.fs, b"a", random.Random(5).randbytes(3 * CS))
        assert e.drain() > 0
        packs = {o.id for o in store.list()}
        assert packs and all(o.properties["casfs_volume"] == e.vol.uuid for o in store.list())
        stray = store.put("casfs-pack-stray", b"x" * 1000, {"casfs_volume": e.vol.uuid})
        other = store.put("casfs-pack-other", b"y" * 10, {"casfs_volume": "another-volume"})
        nobody = store.put("casfs-pack-nobody", b"z" * 10)
        t = e.tier()
        r = cas.maint.gc.collect_cloud(t, grace_s=0)
        assert (r.orphans_deleted, r.orphan_bytes_deleted, r.packs_deleted) == (1, 1000, 0)
        assert {o.id for o in store.list()} == packs | {other.id, nobody.id}
        e.fs.unlink(1, b"a")
        e.gc(0)                                            # the chunks die: their packs are dead
        r = cas.maint.gc.collect_cloud(t, grace_s=0)
        assert r.packs_deleted == len(packs)
        assert {o.id for o in store.list()} == {other.id, nobody.id}   # never another volume's
        with pytest.raises(ObjectNotFound):
            store.stat(stray.id)
    finally:
        e.close()


def test_join_settings_carry_the_s3_table_without_machine_credentials(tmp_path: Path) -> None:
    """`casfs join` copies a volume's [s3] table to a further machine, but not the first
    machine's credentials file or profile (each machine uses its own AWS chain)."""
    from cas.config.volume import Volume
    from tools.cli.joincmd import join_settings
    vol = Volume(path=tmp_path, name="v", uuid="0" * 8 + "-0000-4000-8000-" + "0" * 12, chunk_size=1 << 20,
                 compression="zstd:3", meta_url="mysql://u@h/db",
                 s3={"bucket": "b", "prefix": "p/", "endpoint_url": "http://127.0.0.1:9/",
                     "credentials_file": "/root/.aws/creds", "profile": "me"})
    got = json.loads(json.dumps(join_settings(vol)))
    assert got["s3"] == {"bucket": "b", "prefix": "p/", "endpoint_url": "http://127.0.0.1:9/"}
    assert got["drive"] == {}
