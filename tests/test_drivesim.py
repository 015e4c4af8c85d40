"""Tests of tools.drivesim, the Drive v3 test server: the wire protocol as raw HTTP and as
the real google-api-python-client sees it, fault injection, persistence, and the CLI."""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from googleapiclient.errors import HttpError
from googleapiclient.http import MediaIoBaseUpload

from cas.tier.drive import DriveObjectStore, build_service, ensure_folder
from tests.drivesim_fixture import drive_sim  # noqa: F401  (fixture)
from tools.drivesim import CHUNK_ALIGN, FOLDER_MIME, DriveSim

ROOT = Path(__file__).resolve().parent.parent
Reply = tuple[int, dict[str, str], bytes]


def call(sim: DriveSim, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> Reply:
    """One raw HTTP request to ``sim``: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def error_of(reply: Reply) -> dict[str, Any]:
    err: dict[str, Any] = json.loads(reply[2])["error"]
    return err


def multipart_create(sim: DriveSim, meta: dict[str, Any], data: bytes, nl: bytes = b"\r\n") -> Reply:
    b = b"b0und4ry"
    body = nl.join([b"--" + b, b"Content-Type: application/json", b"", json.dumps(meta).encode(),
                    b"--" + b, b"Content-Type: application/octet-stream", b"", data,
                    b"--" + b + b"--", b""])
    return call(sim, "POST", "/upload/drive/v3/files?uploadType=multipart&fields=*", body,
                {"Content-Type": f'multipart/related; boundary="{b.decode()}"'})


def start_session(sim: DriveSim, total: int, name: str = "up") -> str:
    status, headers, _ = call(sim, "POST", "/upload/drive/v3/files?uploadType=resumable&fields=id,size",
                              json.dumps({"name": name}).encode(),
                              {"Content-Type": "application/json",
                               "X-Upload-Content-Length": str(total)})
    assert status == 200
    loc = headers["location"]
    assert loc.startswith(sim.url)
    return "/" + loc[len(sim.url):]


def put_chunk(sim: DriveSim, session: str, data: bytes, first: int, total: int | str) -> Reply:
    rng = f"bytes {first}-{first + len(data) - 1}/{total}" if data else f"bytes */{total}"
    return call(sim, "PUT", session, data, {"Content-Range": rng})


@pytest.fixture
def service(drive_sim: DriveSim) -> Iterator[Any]:  # noqa: F811
    svc = build_service(drive_sim.url, None, timeout=10)
    yield svc
    svc.close()


# -- uploads ---------------------------------------------------------------------------

@pytest.mark.parametrize("nl", [b"\r\n", b"\n"], ids=["crlf", "lf"])
@pytest.mark.parametrize("data", [b"", b"x", b"ends in CR\r", b"\r\n--b0und4r\n", bytes(range(256)) * 40])
def test_multipart_keeps_binary_content_exactly(drive_sim: DriveSim, nl: bytes, data: bytes) -> None:  # noqa: F811
    status, _, body = multipart_create(drive_sim, {"name": "m", "appProperties": {"k": "v"}}, data, nl)
    assert status == 200
    f = json.loads(body)
    assert drive_sim.file_bytes(f["id"]) == data
    assert (f["size"], f["md5Checksum"], f["sha256Checksum"]) == (
        str(len(data)), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())
    assert f["kind"] == "drive#file" and f["trashed"] is False and f["appProperties"] == {"k": "v"}
    assert f["createdTime"].endswith("Z")


@pytest.mark.parametrize("data", [b"ends in CR\r", b"\r\n--===============\n", b"\n" * 3])
def test_client_multipart_round_trip(drive_sim: DriveSim, service: Any, data: bytes) -> None:  # noqa: F811
    media = MediaIoBaseUpload(io.BytesIO(data), "application/octet-stream")
    f = service.files().create(body={"name": "c"}, media_body=media, fields="id,size").execute()
    assert f["size"] == str(len(data)) and drive_sim.file_bytes(f["id"]) == data


def test_resumable_protocol(drive_sim: DriveSim) -> None:  # noqa: F811
    data = os.urandom(2 * CHUNK_ALIGN + 1000)
    total = len(data)
    session = start_session(drive_sim, total)
    status, headers, _ = put_chunk(drive_sim, session, b"", 0, total)
    assert status == 308 and "range" not in headers                      # nothing yet
    # a non-final chunk is kept only up to a multiple of 256 KiB
    status, headers, _ = put_chunk(drive_sim, session, data[:CHUNK_ALIGN + 5000], 0, total)
    assert (status, headers["range"]) == (308, f"bytes=0-{CHUNK_ALIGN - 1}")
    # a chunk starting beyond what the server holds is refused
    status, _, _ = put_chunk(drive_sim, session, data[2 * CHUNK_ALIGN:], 2 * CHUNK_ALIGN, total)
    assert status == 400
    # an overlapping chunk is fine: the overlap is skipped
    status, headers, _ = put_chunk(drive_sim, session, data[1000:2 * CHUNK_ALIGN], 1000, total)
    assert (status, headers["range"]) == (308, f"bytes=0-{2 * CHUNK_ALIGN - 1}")
    status, _, body = put_chunk(drive_sim, session, data[2 * CHUNK_ALIGN:], 2 * CHUNK_ALIGN, total)
    assert status == 200
    f = json.loads(body)
    assert set(f) == {"id", "size"} and f["size"] == str(total)        # the session's fields
    assert drive_sim.file_bytes(f["id"]) == data
    # asking again after completion gives the file again, not a second one
    assert json.loads(put_chunk(drive_sim, session, b"", 0, total)[2]) == f
    c = drive_sim.counters
    assert (c.uploads_started, c.files_created, c.bytes_uploaded) == (1, 1, total)
    assert c.requests["upload_status"] == 2 and c.requests["upload_chunk"] == 4


def test_unknown_session_is_404(drive_sim: DriveSim) -> None:  # noqa: F811
    reply = put_chunk(drive_sim, "/upload/drive/v3/files?uploadType=resumable&upload_id=nope", b"x", 0, 1)
    assert reply[0] == 404 and error_of(reply)["errors"][0]["reason"] == "notFound"


def test_short_body_gets_408_instead_of_hanging(drive_sim: DriveSim) -> None:  # noqa: F811
    drive_sim.body_timeout = 0.2
    total = 2 * CHUNK_ALIGN
    session = start_session(drive_sim, total)
    with socket.create_connection((drive_sim.host, drive_sim.port), timeout=5) as s:
        s.sendall(f"PUT {session} HTTP/1.1\r\nHost: {drive_sim.host}\r\n"
                  f"Content-Range: bytes 0-{CHUNK_ALIGN - 1}/{total}\r\n"
                  f"Content-Length: {CHUNK_ALIGN}\r\n\r\n".encode() + b"z" * 10)
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert put_chunk(drive_sim, session, b"", 0, total)[0] == 308


def test_drop_in_the_middle_of_a_chunk_keeps_the_aligned_part(drive_sim: DriveSim) -> None:  # noqa: F811
    data = os.urandom(4 * CHUNK_ALIGN)
    total = len(data)
    session = start_session(drive_sim, total)
    drive_sim.inject("drop", match="upload_chunk", after_bytes=CHUNK_ALIGN + 1000)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        put_chunk(drive_sim, session, data[:3 * CHUNK_ALIGN], 0, total)
    status, headers, _ = put_chunk(drive_sim, session, b"", 0, total)
    assert (status, headers["range"]) == (308, f"bytes=0-{CHUNK_ALIGN - 1}")
    status, _, body = put_chunk(drive_sim, session, data[CHUNK_ALIGN:], CHUNK_ALIGN, total)
    assert status == 200 and drive_sim.file_bytes(json.loads(body)["id"]) == data
    assert drive_sim.counters.bytes_received == total + 1000


# -- reading ---------------------------------------------------------------------------

def test_download_ranges(drive_sim: DriveSim) -> None:  # noqa: F811
    data = bytes(range(100))
    fid = json.loads(multipart_create(drive_sim, {"name": "r"}, data)[2])["id"]
    empty = json.loads(multipart_create(drive_sim, {"name": "e"}, b"")[2])["id"]
    path = f"/drive/v3/files/{fid}?alt=media"
    assert call(drive_sim, "GET", path)[::2] == (200, data)
    status, headers, body = call(drive_sim, "GET", path, headers={"Range": "bytes=10-19"})
    assert (status, headers["content-range"], body) == (206, "bytes 10-19/100", data[10:20])
    status, headers, body = call(drive_sim, "GET", path, headers={"Range": "bytes=95-200"})
    assert (status, headers["content-range"], body) == (206, "bytes 95-99/100", data[95:])
    assert call(drive_sim, "GET", path, headers={"Range": "bytes=90-"})[::2] == (206, data[90:])
    assert call(drive_sim, "GET", path, headers={"Range": "bytes=-3"})[::2] == (206, data[-3:])
    status, headers, _ = call(drive_sim, "GET", path, headers={"Range": "bytes=100-"})
    assert (status, headers["content-range"]) == (416, "bytes */100")
    empty_path = f"/drive/v3/files/{empty}?alt=media"
    assert call(drive_sim, "GET", empty_path)[::2] == (200, b"")
    assert call(drive_sim, "GET", empty_path, headers={"Range": "bytes=0-"})[0] == 416


def test_not_found_envelope(drive_sim: DriveSim) -> None:  # noqa: F811
    for method, path in [("GET", "/drive/v3/files/nope"), ("GET", "/drive/v3/files/nope?alt=media"),
                         ("DELETE", "/drive/v3/files/nope")]:
        reply = call(drive_sim, method, path)
        assert reply[0] == 404
        assert error_of(reply) == {"code": 404, "message": "File not found: nope.", "errors": [
            {"domain": "global", "reason": "notFound", "message": "File not found: nope."}]}


def test_fields(drive_sim: DriveSim, service: Any) -> None:  # noqa: F811
    fid = json.loads(multipart_create(drive_sim, {"name": "f", "appProperties": {"a": "b"}}, b"abc")[2])["id"]
    files = service.files()
    assert files.get(fileId=fid).execute() == {"kind": "drive#file", "id": fid, "name": "f",
                                               "mimeType": "application/octet-stream"}
    assert files.get(fileId=fid, fields="id").execute() == {"id": fid}
    assert files.get(fileId=fid, fields="size,appProperties").execute() == {"size": "3", "appProperties": {"a": "b"}}
    full = files.get(fileId=fid, fields="*").execute()
    assert full["md5Checksum"] == hashlib.md5(b"abc").hexdigest() and full["parents"] == [drive_sim.root_id]
    assert files.list(fields="files(id,name)").execute() == {"files": [{"id": fid, "name": "f"}]}
    assert files.list(fields="files/id").execute() == {"files": [{"id": fid}]}
    assert set(files.list().execute()) == {"kind", "incompleteSearch", "files"}
    with pytest.raises(HttpError) as e:
        files.get(fileId=fid, fields="id,(").execute()
    assert e.value.resp.status == 400


def test_query_language(drive_sim: DriveSim, service: Any) -> None:  # noqa: F811
    folder = ensure_folder(service, "dir")
    made = {}
    for name, parent, props in [("a", folder, {"k": "v1"}), ("b", folder, {"k": "v2"}),
                                ("it's", folder, {}), ("a", "root", {"k": "v1", "j": "x"})]:
        made[name, parent] = service.files().create(
            body={"name": name, "parents": [parent], "appProperties": props},
            fields="id").execute()["id"]

    def names(q: str) -> list[str]:
        return sorted(f["name"] for f in service.files().list(q=q, fields="files(name)").execute()["files"])

    assert names("name = 'a'") == ["a", "a"]
    assert names(f"name = 'a' and '{folder}' in parents") == ["a"]
    assert names("name = 'it\\'s'") == ["it's"]
    assert names("appProperties has { key='k' and value='v1' }") == ["a", "a"]
    assert names(f"'{folder}' in parents and appProperties has {{ key='k' and value='v2' }}") == ["b"]
    assert names(f"mimeType = '{FOLDER_MIME}'") == ["dir"]
    assert names(f"mimeType != '{FOLDER_MIME}' and trashed = false") == ["a", "a", "b", "it's"]
    assert names("'root' in parents") == ["a", "dir"]
    assert names("name = 'b' or (name = 'a' and not 'root' in parents)") == ["a", "b"]
    assert names("trashed = true") == []
    service.files().update(fileId=made["b", folder], body={"trashed": True}).execute()
    assert names("trashed = true") == ["b"]
    for bad in ["name == 'a'", "size = '3'", "name = 'open", "name = 'a' and", "'x' in owners"]:
        with pytest.raises(HttpError) as e:
            names(bad)
        assert e.value.resp.status == 400, bad


def test_paging(drive_sim: DriveSim, service: Any) -> None:  # noqa: F811
    ids = [service.files().create(body={"name": f"n{i}"}, fields="id").execute()["id"] for i in range(5)]
    seen, token, pages = [], None, 0
    while True:
        page = service.files().list(pageSize=2, pageToken=token, fields="nextPageToken, files(id)").execute()
        seen += [f["id"] for f in page["files"]]
        pages += 1
        token = page.get("nextPageToken")
        if not token:
            break
    assert (seen, pages) == (ids, 3)
    bads: list[dict[str, Any]] = [{"pageSize": 0}, {"pageSize": 1001}, {"pageToken": "!!"}]
    for bad in bads:
        with pytest.raises(HttpError) as e:
            service.files().list(**bad).execute()
        assert e.value.resp.status == 400


def test_create_checks_parents_and_properties(drive_sim: DriveSim, service: Any) -> None:  # noqa: F811
    with pytest.raises(HttpError) as e:
        service.files().create(body={"name": "x", "parents": ["1Missing"]}).execute()
    assert e.value.resp.status == 404 and "File not found: 1Missing." in str(e.value)
    with pytest.raises(HttpError) as e:
        service.files().create(body={"name": "x", "appProperties": {"k": "v" * 124}}).execute()
    assert e.value.resp.status == 400
    service.files().create(body={"name": "x", "appProperties": {"k": "v" * 123}}).execute()


def test_deleting_a_folder_deletes_its_contents(drive_sim: DriveSim, service: Any) -> None:  # noqa: F811
    top = ensure_folder(service, "top")
    sub = ensure_folder(service, "sub", parent=top)
    service.files().create(body={"name": "leaf", "parents": [sub]}).execute()
    keep = service.files().create(body={"name": "keep"}, fields="id").execute()["id"]
    service.files().delete(fileId=top).execute()
    assert [f["id"] for f in drive_sim.files()] == [keep]


def test_batch(drive_sim: DriveSim, service: Any) -> None:  # noqa: F811
    fid = service.files().create(body={"name": "x"}, fields="id").execute()["id"]
    got: dict[str, Any] = {}
    batch = service.new_batch_http_request(callback=lambda rid, resp, exc: got.update({rid: (resp, exc)}))
    batch.add(service.files().get(fileId=fid, fields="id,name"), request_id="get")
    batch.add(service.files().delete(fileId=fid), request_id="del")
    batch.add(service.files().delete(fileId="1Nope"), request_id="missing")
    batch.execute()
    assert got["get"] == ({"id": fid, "name": "x"}, None)
    assert got["del"][1] is None
    assert got["missing"][0] is None and got["missing"][1].resp.status == 404
    big = service.new_batch_http_request()
    for i in range(101):
        big.add(service.files().delete(fileId=f"1F{i}"))
    with pytest.raises(HttpError) as e:
        big.execute()
    assert e.value.resp.status == 400
    assert drive_sim.counters.requests["batch"] == 2


# -- faults ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw,status,reason,message,retry_after", [
    ("rate_limit", {}, 403, "userRateLimitExceeded", "User Rate Limit Exceeded", None),
    ("rate_limit", {"retry_after": 2}, 403, "userRateLimitExceeded", "User Rate Limit Exceeded", "2"),
    ("too_many", {}, 429, "rateLimitExceeded", "Rate Limit Exceeded", "1"),
    ("server_error", {"retry_after": 0.5}, 503, "backendError", "Service Unavailable", "0.5"),
    ("server_error", {"status": 500}, 500, "internalError", "Internal Error", None),
    ("daily_limit", {}, 403, "userRateLimitExceeded", "User rate limit exceeded.", None),
    ("quota", {}, 403, "storageQuotaExceeded", "The user's Drive storage quota has been exceeded.", None),
])
def test_error_faults(drive_sim: DriveSim, kind: str, kw: dict[str, Any], status: int,  # noqa: F811
                      reason: str, message: str, retry_after: str | None) -> None:
    drive_sim.inject(kind, **kw)
    reply = call(drive_sim, "GET", "/drive/v3/files")
    assert reply[0] == status and reply[1].get("retry-after") == retry_after
    err = error_of(reply)
    assert (err["code"], err["message"], err["errors"][0]["reason"]) == (status, message, reason)
    assert call(drive_sim, "GET", "/drive/v3/files")[0] == 200
    assert drive_sim.counters.faults == {kind: 1}


def test_fault_selection(drive_sim: DriveSim) -> None:  # noqa: F811
    f = drive_sim.inject("server_error", match=r"^DELETE ", times=2, skip=1)
    statuses = [call(drive_sim, "DELETE", "/drive/v3/files/x")[0] for _ in range(4)]
    assert statuses == [404, 503, 503, 404] and f.fired == 2
    assert call(drive_sim, "GET", "/drive/v3/files")[0] == 200              # not matched
    drive_sim.inject("server_error", match="list", probability=0.5)
    statuses = [call(drive_sim, "GET", "/drive/v3/files")[0] for _ in range(40)]
    assert 0 < statuses.count(503) < 40 and set(statuses) == {200, 503}
    drive_sim.clear_faults()
    assert call(drive_sim, "GET", "/drive/v3/files")[0] == 200
    with pytest.raises(ValueError):
        drive_sim.inject("gremlins")


def test_drop_and_slow(drive_sim: DriveSim) -> None:  # noqa: F811
    drive_sim.inject("drop", match="list")
    with pytest.raises(http.client.RemoteDisconnected):
        call(drive_sim, "GET", "/drive/v3/files")
    drive_sim.inject("slow", match="list", delay=0.3)
    t0 = time.monotonic()
    assert call(drive_sim, "GET", "/drive/v3/files")[0] == 200
    assert time.monotonic() - t0 >= 0.3
    assert drive_sim.counters.faults == {"drop": 1, "slow": 1}


def test_stop_closes_open_and_busy_connections() -> None:
    sim = DriveSim().start()
    idle = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    idle.request("GET", "/drive/v3/files")
    assert idle.getresponse().read()                     # kept alive, left open
    sim.inject("slow", delay=30)
    busy = socket.create_connection((sim.host, sim.port), timeout=5)
    busy.sendall(b"GET /drive/v3/files HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(500):                                 # until the handler sleeps
        if sim.counters.faults.get("slow") == 1:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the slow fault never fired")
    sim.stop()
    idle.close()
    busy.close()
    assert not [t for t in threading.enumerate() if "process_request" in t.name]
    with pytest.raises(OSError):
        socket.create_connection((sim.host, sim.port), timeout=1).close()


# -- persistence and the command line ---------------------------------------------------

def test_data_dir_survives_a_restart(tmp_path: Path) -> None:
    data = os.urandom(6 * 1024 * 1024)
    with DriveSim(tmp_path / "drive") as sim:
        svc = build_service(sim.url, None, timeout=10)
        folder = ensure_folder(svc, "vol")
        svc.close()
        with DriveObjectStore(lambda: build_service(sim.url, None, timeout=10), folder,
                              chunk_size=1024 * 1024) as st:
            big = st.put("big", data, {"p": "1"})
            small = st.put("small", b"tiny")
        before = sim.files()
    with DriveSim(tmp_path / "drive") as sim:
        assert sim.files() == before
        svc = build_service(sim.url, None, timeout=10)
        assert ensure_folder(svc, "vol") == folder
        svc.close()
        with DriveObjectStore(lambda: build_service(sim.url, None, timeout=10), folder) as st:
            assert st.get(big.id) == data and st.stat(big.id) == big
            st.delete(small.id)
            assert {o.id for o in st.list()} == {big.id}
    assert not (tmp_path / "drive" / "blobs" / small.id).exists()
    assert (tmp_path / "drive" / "blobs" / big.id).read_bytes() == data


def test_cli_serves_until_terminated(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tools.drivesim", "--port", "0", "--data-dir",
                             str(tmp_path / "d"), "--fault", "rate_limit:0.0", "--fault", "slow:0:delete"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        with urllib.request.urlopen(url + "drive/v3/files?fields=files(id)", timeout=5) as resp:
            assert json.loads(resp.read()) == {"files": []}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "d" / "blobs").is_dir()


def test_cli_refuses_a_bad_fault() -> None:
    r = subprocess.run([sys.executable, "-m", "tools.drivesim", "--fault", "gremlins:0.5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "bad fault" in r.stderr
