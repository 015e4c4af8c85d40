"""The object-store conformance suite, run on every ObjectStore implementation
(cas.tier.objstore.DirObjectStore, cas.tier.drive.DriveObjectStore against tools.drivesim,
cas.tier.s3.S3ObjectStore against moto's S3 server), and
then the Drive store's own behaviour: error translation, resumable uploads surviving
faults, timeouts, retrying with Retry-After, batch deletes, paging, folders, credentials.

No mocks: the Drive store is the real google-api-python-client speaking HTTP to the test
server. Expected values come from hashlib and the bytes put, never from the store.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cas.tier.drive import (CHUNK_UNIT, MULTIPART_MAX, DriveObjectStore, build_service, ensure_folder,
                       load_credentials)
from cas.tier.objstore import (DailyLimit, DirObjectStore, ObjectInfo, ObjectNotFound, ObjectStore,
                          ObjectStoreError, TryAgain, now_utc, retrying)
from cas.tier.s3 import S3ObjectStore
from tests.s3_fixture import S3Server, s3_server  # noqa: F401 - moto's S3 server (a subprocess)
from tools.drivesim import FOLDER_MIME, DriveSim

CHUNK = CHUNK_UNIT                      # small resumable chunks keep the tests quick
BIG = 5 * 1024 * 1024 + 12345           # above the multipart limit: a resumable upload


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 7919 + n).randbytes(n)


def drive_store(sim: DriveSim, *, timeout: float = 10.0, chunk_size: int = CHUNK,
                folder: str = "casfs-test", **kw: Any) -> DriveObjectStore:
    """A DriveObjectStore on ``sim`` in folder ``folder`` (created), quick to back off."""
    svc = build_service(sim.url, None, timeout=10.0)
    try:
        folder_id = ensure_folder(svc, folder)
    finally:
        svc.close()
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("backoff_cap_s", 0.05)
    return DriveObjectStore(lambda: build_service(sim.url, None, timeout=timeout), folder_id,
                            chunk_size=chunk_size, **kw)


@pytest.fixture(params=["dir", "drive", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """Each ObjectStore implementation, empty."""
    if request.param == "dir":
        yield DirObjectStore(tmp_path / "objects")
        return
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        yield S3ObjectStore(server.client(), server.new_bucket(), "casfs-test/")
        return
    sim: DriveSim = request.getfixturevalue("drive_sim")
    with drive_store(sim) as st:
        yield st


# -- the conformance suite -------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1000, BIG], ids=["empty", "one", "small", "resumable"])
def test_put_get_round_trip(store: ObjectStore, size: int) -> None:
    data = blob(size)
    info = store.put(f"pack-{size}", data, {"kind": "pack", "n": str(size)})
    assert (info.size, info.md5, info.sha256) == (
        size, hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())
    assert info.name == f"pack-{size}"
    assert info.properties == {"kind": "pack", "n": str(size)}
    assert store.get(info.id) == data
    assert store.stat(info.id) == info


RANGES = [(0, 10), (0, None), (500, 100), (990, 10), (990, 100), (999, None), (1000, 10),
          (1000, None), (5000, None), (5000, 3), (10, 0), (0, 1000), (0, 5000)]


@pytest.mark.parametrize("offset,length", RANGES, ids=[f"{o}+{n}" for o, n in RANGES])
def test_ranged_get(store: ObjectStore, offset: int, length: int | None) -> None:
    data = blob(1000, 1)
    info = store.put("ranged", data)
    expect = data[offset:] if length is None else data[offset:offset + length]
    assert store.get(info.id, offset, length) == expect


def test_ranged_get_of_empty_object(store: ObjectStore) -> None:
    info = store.put("empty", b"")
    assert store.get(info.id, 0, 10) == b""
    assert store.get(info.id, 5) == b""


def test_stat_fields(store: ObjectStore) -> None:
    data = blob(4321, 2)
    before = now_utc()
    info = store.put("pack 'quoted' \u00fc.bin", data, {"a": "1", "b": "two words"})
    after = now_utc()
    st = store.stat(info.id)
    assert st.id == info.id
    assert st.name == "pack 'quoted' \u00fc.bin"
    assert st.size == 4321
    assert st.md5 == hashlib.md5(data).hexdigest()
    assert st.sha256 == hashlib.sha256(data).hexdigest()
    assert st.properties == {"a": "1", "b": "two words"}
    assert st.created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= st.created <= after + timedelta(seconds=5)


def test_list_sees_exactly_what_was_put_and_not_deleted(store: ObjectStore) -> None:
    assert list(store.list()) == []
    infos = [store.put(f"p{i}", blob(100 + i, 3), {"i": str(i)}) for i in range(6)]
    store.delete(infos[1].id)
    store.delete(infos[4].id)
    listed = {o.id: o for o in store.list()}
    keep = [infos[i] for i in (0, 2, 3, 5)]
    assert set(listed) == {o.id for o in keep}
    for o in keep:
        assert listed[o.id] == o


def test_find_by_name(store: ObjectStore) -> None:
    a = store.put("twin", b"one")
    b = store.put("twin", b"two")
    store.put("other", b"three")
    store.put("it's", b"quoted")
    assert {o.id for o in store.find("twin")} == {a.id, b.id}
    assert [o.name for o in store.find("it's")] == ["it's"]
    assert store.find("none") == []
    store.delete(a.id)
    assert [o.id for o in store.find("twin")] == [b.id]


def test_delete_then_not_found(store: ObjectStore) -> None:
    info = store.put("doomed", b"bytes")
    store.delete(info.id)
    with pytest.raises(ObjectNotFound):
        store.get(info.id)
    with pytest.raises(ObjectNotFound):
        store.get(info.id, 1, 2)
    with pytest.raises(ObjectNotFound):
        store.stat(info.id)
    with pytest.raises(ObjectNotFound):
        store.delete(info.id)


@pytest.mark.parametrize("oid", ["0123456789abcdef0123456789abcdef", "1NoSuchDriveFileId", "",
                                 ".hidden", "../escape", "a/b"])
def test_unknown_ids_are_not_found(store: ObjectStore, oid: str) -> None:
    store.put("bystander", b"x")
    with pytest.raises(ObjectNotFound):
        store.get(oid)
    with pytest.raises(ObjectNotFound):
        store.get(oid, 0, 0)
    with pytest.raises(ObjectNotFound):
        store.stat(oid)
    with pytest.raises(ObjectNotFound):
        store.delete(oid)


def test_side_files_are_not_objects(store: ObjectStore) -> None:
    info = store.put("main", b"content")
    with pytest.raises(ObjectNotFound):
        store.get(info.id + ".name")
    with pytest.raises(ObjectNotFound):
        store.delete(info.id + ".name")
    assert store.stat(info.id) == info


def test_many_threads_put_and_get(store: ObjectStore) -> None:
    def work(t: int) -> list[tuple[ObjectInfo, bytes]]:
        done = []
        for i in range(4):
            data = blob(2000 + 97 * i, 10 * t + i)
            info = store.put(f"t{t}-{i}", data, {"thread": str(t)})
            assert store.get(info.id) == data
            assert store.get(info.id, 100, 50) == data[100:150]
            done.append((info, data))
        return done

    with ThreadPoolExecutor(8) as pool:
        results = [pair for chunk in pool.map(work, range(8)) for pair in chunk]
    assert len({info.id for info, _ in results}) == 32
    listed = {o.id: o for o in store.list()}
    assert set(listed) == {info.id for info, _ in results}
    for info, data in results:
        assert listed[info.id].sha256 == hashlib.sha256(data).hexdigest()
        assert store.get(info.id) == data


# -- the Drive store -------------------------------------------------------------------

@dataclass
class Drive:
    sim: DriveSim
    store: DriveObjectStore


@pytest.fixture
def drive(drive_sim: DriveSim) -> Iterator[Drive]:
    with drive_store(drive_sim) as st:
        yield Drive(drive_sim, st)


def objects_named(sim: DriveSim, name: str) -> list[dict[str, Any]]:
    return [f for f in sim.files() if f["name"] == name and f["mimeType"] != FOLDER_MIME]


def test_small_put_is_one_multipart_request_big_put_is_resumable(drive: Drive) -> None:
    drive.store.put("small", blob(MULTIPART_MAX))
    c = drive.sim.counters
    assert (c.requests.get("upload_multipart"), c.uploads_started) == (1, 0)
    data = blob(MULTIPART_MAX + 1)
    drive.store.put("big", data)
    c = drive.sim.counters
    assert (c.requests.get("upload_multipart"), c.uploads_started) == (1, 1)
    assert c.requests["upload_chunk"] == math.ceil(len(data) / CHUNK)
    assert c.bytes_uploaded == MULTIPART_MAX + len(data)


@pytest.mark.parametrize("fault,status,retry_after", [
    ("too_many", 429, 7.0), ("rate_limit", 403, 3.0), ("rate_limit", 403, None),
    ("server_error", 503, 2.0), ("server_error", 500, None)])
def test_transient_errors_are_try_again(drive: Drive, fault: str, status: int,
                                        retry_after: float | None) -> None:
    info = drive.store.put("x", b"payload")
    drive.sim.inject(fault, match="get", retry_after=retry_after, status=status)
    with pytest.raises(TryAgain) as e:
        drive.store.stat(info.id)
    assert e.value.retry_after == retry_after
    assert f"HTTP {status}" in str(e.value) and "\n" not in str(e.value)
    assert drive.store.stat(info.id) == info            # the fault was spent


@pytest.mark.parametrize("call", ["put", "get", "delete", "list"])
def test_daily_limit_message_is_daily_limit(drive: Drive, call: str) -> None:
    info = drive.store.put("x", b"payload")
    drive.sim.inject("daily_limit")
    with pytest.raises(DailyLimit) as e:
        if call == "put":
            drive.store.put("y", b"more")
        elif call == "get":
            drive.store.get(info.id)
        elif call == "delete":
            drive.store.delete(info.id)
        else:
            list(drive.store.list())
    assert not isinstance(e.value, TryAgain)
    assert "User rate limit exceeded." in str(e.value)


@pytest.mark.parametrize("fault,reason,message,daily", [
    ("daily_limit", "dailyLimitExceeded", "Daily Limit Exceeded", True),          # by reason
    ("daily_limit", "dailyLimitExceeded", "Quota exceeded for quota metric", True),
    ("daily_limit", "userRateLimitExceeded", "User rate limit exceeded.", True),  # the 750 GB/day cap
    ("rate_limit", "userRateLimitExceeded", "User Rate Limit Exceeded", False),   # per minute
    ("rate_limit", "rateLimitExceeded", "User rate limit exceeded.", False),      # reason wins over wording
    ("too_many", "rateLimitExceeded", "User rate limit exceeded.", False),
])
def test_daily_limit_is_told_by_reason(drive: Drive, fault: str, reason: str, message: str,
                                       daily: bool) -> None:
    """docs/cloud.md, "The daily cap, told by reason"."""
    drive.sim.inject(fault, match="upload_multipart", reason=reason, message=message)
    with pytest.raises(DailyLimit if daily else TryAgain) as e:
        drive.store.put("y", b"more")
    assert isinstance(e.value, TryAgain) != daily and reason in str(e.value)


def test_daily_limit_during_resumable_upload_is_not_retried(drive: Drive) -> None:
    fault = drive.sim.inject("daily_limit", match="upload_chunk", skip=2)
    with pytest.raises(DailyLimit):
        drive.store.put("big", blob(BIG))
    assert fault.fired == 1
    assert objects_named(drive.sim, "big") == []


def test_quota_and_bad_requests_are_plain_errors(drive: Drive) -> None:
    drive.sim.inject("quota", match="upload_multipart")
    with pytest.raises(ObjectStoreError) as e:
        drive.store.put("x", b"payload")
    assert type(e.value) is ObjectStoreError
    assert "HTTP 403" in str(e.value) and "storageQuotaExceeded" in str(e.value)
    with pytest.raises(ObjectStoreError) as e:                 # over Drive's 124-byte limit
        drive.store.put("x", b"payload", {"k": "v" * 200})
    assert type(e.value) is ObjectStoreError and "HTTP 400" in str(e.value)


def test_not_found_message(drive: Drive) -> None:
    with pytest.raises(ObjectNotFound) as e:
        drive.store.stat("1NoSuchFile")
    assert str(e.value) == "stat 1NoSuchFile: HTTP 404 File not found: 1NoSuchFile. (notFound)"


def test_put_into_a_missing_folder_is_an_error_not_not_found(drive: Drive) -> None:
    st = DriveObjectStore(lambda: build_service(drive.sim.url, None, timeout=10), "1GoneFolder")
    with st, pytest.raises(ObjectStoreError) as e:
        st.put("x", b"data")
    assert not isinstance(e.value, ObjectNotFound) and "HTTP 404" in str(e.value)


def check_one_file(sim: DriveSim, name: str, data: bytes) -> None:
    (f,) = objects_named(sim, name)
    assert sim.file_bytes(f["id"]) == data
    assert f["sha256Checksum"] == hashlib.sha256(data).hexdigest()
    assert int(f["size"]) == len(data)


def test_resumable_put_resumes_after_a_503(drive: Drive) -> None:
    data = blob(BIG, 5)
    fault = drive.sim.inject("server_error", match="upload_chunk", skip=3)
    info = drive.store.put("big", data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    check_one_file(drive.sim, "big", data)
    c = drive.sim.counters
    assert fault.fired == 1
    assert c.requests["upload_status"] == 1                      # asked where to go on
    assert c.requests["upload_chunk"] == math.ceil(len(data) / CHUNK) + 1
    assert c.bytes_received == len(data) + CHUNK                 # exactly one chunk again
    assert c.uploads_started == 1 and c.files_created == 2      # the folder and the pack


def test_resumable_put_resumes_after_dropped_connections(drive: Drive) -> None:
    # Two drops: httplib2 silently re-sends once, so only the second reaches the store.
    data = blob(BIG, 6)
    fault = drive.sim.inject("drop", match="upload_chunk", skip=2, times=2)
    drive.store.put("big", data)
    check_one_file(drive.sim, "big", data)
    c = drive.sim.counters
    assert fault.fired == 2
    assert c.requests["upload_status"] == 1
    assert c.requests["upload_chunk"] == math.ceil(len(data) / CHUNK) + 2
    assert c.bytes_received == len(data) + 2 * CHUNK


def test_resumable_put_survives_drops_in_the_middle_of_a_chunk(drive_sim: DriveSim) -> None:  # noqa: F811
    # 1 MiB chunks cut after 600 KiB: the server keeps 512 KiB of each cut chunk, so the
    # upload must go on from an offset that is not on the client's chunk grid.
    chunk = 4 * CHUNK
    data = blob(BIG, 7)
    fault = drive_sim.inject("drop", match="upload_chunk", skip=1, times=3, after_bytes=600 * 1024)
    with drive_store(drive_sim, chunk_size=chunk) as st:
        info = st.put("big", data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    check_one_file(drive_sim, "big", data)
    c = drive_sim.counters
    assert fault.fired == 3
    assert c.bytes_received > len(data)                             # re-sent bytes
    assert c.requests["upload_chunk"] + c.requests.get("upload_status", 0) > math.ceil(len(data) / chunk)


def test_resumable_put_gives_up_after_its_attempts(drive_sim: DriveSim) -> None:  # noqa: F811
    fault = drive_sim.inject("server_error", match="upload_chunk", probability=1.0)
    with drive_store(drive_sim, upload_attempts=3) as st, pytest.raises(TryAgain):
        st.put("big", blob(BIG))
    assert fault.fired == 3
    assert objects_named(drive_sim, "big") == []


def test_lost_upload_session_is_try_again(tmp_path: Path) -> None:
    # A server restart forgets upload sessions (like an expired Drive session): the
    # resume gets 404, which must read "put again", not "no such object".
    sim = DriveSim(tmp_path / "drive").start()
    st = drive_store(sim, backoff_s=0.2, backoff_cap_s=0.5)
    data = blob(BIG, 8)
    try:
        sim.inject("slow", match="upload_chunk", skip=2, delay=30)
        with ThreadPoolExecutor(1) as pool:
            put = pool.submit(st.put, "big", data)
            for _ in range(500):                      # until the third chunk hangs
                if sim.counters.faults.get("slow") == 1:
                    break
                time.sleep(0.01)
            sim.stop()
            sim = DriveSim(tmp_path / "drive", port=sim.port).start()
            with pytest.raises(TryAgain) as e:
                put.result(timeout=60)
        assert "HTTP 404" in str(e.value) and "put again" in str(e.value)
        with drive_store(sim) as again:
            info = again.put("big", data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        check_one_file(sim, "big", data)
    finally:
        st.close()
        sim.stop()


def test_slow_reply_beyond_the_timeout_is_try_again(drive: Drive) -> None:
    info = drive.store.put("x", b"payload")
    # the server sleeps 5 s (cut short when it stops); the client gives up after 0.5 s
    drive.sim.inject("slow", match="get", delay=5.0)
    quick = DriveObjectStore(lambda: build_service(drive.sim.url, None, timeout=0.5),
                             drive.store.folder_id)
    with quick:
        with pytest.raises(TryAgain) as e:
            quick.stat(info.id)
        assert "timed out" in str(e.value)
        assert quick.stat(info.id) == info             # the same thread's connection recovers


def test_retrying_recovers_from_two_503s_honouring_retry_after(drive: Drive) -> None:
    info = drive.store.put("x", b"payload")
    fault = drive.sim.inject("server_error", match="get", times=2, retry_after=0.3)
    t0 = time.monotonic()
    got = retrying(lambda: drive.store.stat(info.id), attempts=4, initial_s=0.01, cap_s=5.0)
    waited = time.monotonic() - t0
    assert got == info
    assert fault.fired == 2 and drive.sim.counters.requests["get"] == 3
    assert waited >= 0.6                               # two Retry-After waits of 0.3 s


def test_retrying_gives_up_with_the_last_try_again(drive: Drive) -> None:
    info = drive.store.put("x", b"payload")
    drive.sim.inject("too_many", match="get", times=3, retry_after=0.01)
    with pytest.raises(TryAgain):
        retrying(lambda: drive.store.stat(info.id), attempts=2, initial_s=0.01, cap_s=0.05)
    assert drive.sim.counters.requests["get"] == 2


def test_delete_many_uses_batches_of_at_most_100(drive: Drive) -> None:
    ids = [drive.store.put(f"p{i}", b"%d" % i).id for i in range(103)]
    result = drive.store.delete_many(ids + ["1NoSuchFile", ids[0], "bad/id"])
    assert set(result) == set(ids) | {"1NoSuchFile", "bad/id"}
    assert all(result[i] is None for i in ids)
    assert isinstance(result["1NoSuchFile"], ObjectNotFound)
    assert isinstance(result["bad/id"], ObjectNotFound)
    assert list(drive.store.list()) == []
    c = drive.sim.counters
    assert c.requests["batch"] == 2 and c.requests["delete"] == 104


def test_delete_many_reports_each_call_s_error(drive: Drive) -> None:
    ids = [drive.store.put(f"p{i}", b"x").id for i in range(5)]
    drive.sim.inject("rate_limit", match="delete", skip=2)
    result = drive.store.delete_many(ids)
    assert [type(result[i]) for i in ids] == [type(None)] * 2 + [TryAgain] + [type(None)] * 2
    assert [o.id for o in drive.store.list()] == [ids[2]]


def test_delete_many_when_the_batch_request_fails(drive: Drive) -> None:
    ids = [drive.store.put(f"p{i}", b"x").id for i in range(3)]
    drive.sim.inject("server_error", match="batch")
    result = drive.store.delete_many(ids)
    assert all(isinstance(result[i], TryAgain) for i in ids)
    assert len(list(drive.store.list())) == 3


def test_list_pages(drive_sim: DriveSim) -> None:  # noqa: F811
    with drive_store(drive_sim, page_size=2) as st:
        ids = {st.put(f"p{i}", b"x").id for i in range(5)}
        other = drive_store(drive_sim, folder="elsewhere")
        with other:
            other.put("not mine", b"y")
        assert {o.id for o in st.list()} == ids
    assert drive_sim.counters.requests["list"] == 2 + 3     # 2 ensure_folder + 3 pages


def test_ensure_folder_is_idempotent(drive_sim: DriveSim) -> None:  # noqa: F811
    svc = build_service(drive_sim.url, None, timeout=10)
    try:
        a = ensure_folder(svc, "it's a folder")
        assert ensure_folder(svc, "it's a folder") == a
        sub = ensure_folder(svc, "it's a folder", parent=a)
        assert sub != a and ensure_folder(svc, "it's a folder", parent=a) == sub
        with drive_store(drive_sim, folder="vol") as st:
            inner = ensure_folder(st, "inner", parent=st.folder_id)
            assert ensure_folder(st, "inner", parent=st.folder_id) == inner
    finally:
        svc.close()
    folders = [(f["name"], f["parents"]) for f in drive_sim.files() if f["mimeType"] == FOLDER_MIME]
    assert sorted(n for n, _ in folders) == ["inner", "it's a folder", "it's a folder", "vol"]
    assert drive_sim.counters.created_by_name == {"it's a folder": 2, "vol": 1, "inner": 1}


def test_threads_get_their_own_service(drive: Drive) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def grab() -> None:
        with lock:
            seen.append(id(drive.store.service()))
        assert drive.store.service() is drive.store.service()

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grab()
    assert len(set(seen)) == 5


def test_bad_chunk_size_is_refused() -> None:
    with pytest.raises(ValueError):
        DriveObjectStore(lambda: None, "f", chunk_size=CHUNK + 1)


# -- credentials -----------------------------------------------------------------------

def test_load_credentials_errors(tmp_path: Path) -> None:
    cases: dict[str, Callable[[Path], object]] = {
        "missing": lambda p: None,
        "not JSON": lambda p: p.write_text("{nope"),
        "client-secrets file": lambda p: p.write_text(json.dumps({"installed": {"client_id": "x"}})),
        "neither": lambda p: p.write_text(json.dumps({"type": "other"})),
        "incomplete token": lambda p: p.write_text(json.dumps({"type": "authorized_user"})),
    }
    for what, make in cases.items():
        path = tmp_path / f"{what}.json"
        make(path)
        with pytest.raises(ObjectStoreError) as e:
            load_credentials(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), what


def test_load_credentials_formats(tmp_path: Path) -> None:
    import google.auth.credentials
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    assert isinstance(load_credentials(None), google.auth.credentials.AnonymousCredentials)
    token = tmp_path / "token.json"
    token.write_text(json.dumps({"type": "authorized_user", "client_id": "cid",
                                 "client_secret": "secret", "refresh_token": "rt"}))
    user = load_credentials(token)
    assert isinstance(user, user_credentials.Credentials)
    assert user.refresh_token == "rt" and user.scopes == ["https://www.googleapis.com/auth/drive.file"]
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "project_id": "p", "private_key_id": "k",
                               "private_key": pem, "client_email": "sa@p.iam.gserviceaccount.com",
                               "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}))
    sa = load_credentials(key)
    assert isinstance(sa, service_account.Credentials)
    assert sa.service_account_email == "sa@p.iam.gserviceaccount.com"


def test_google_service_needs_credentials() -> None:
    with pytest.raises(ObjectStoreError):
        build_service(None, None)
