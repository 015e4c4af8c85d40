"""The ``s3_server`` pytest fixture: moto's S3-compatible server, started once per test
session as a subprocess (``python -m moto.server``) on a free port, and ``s3_bucket``:
a fresh, empty bucket on it per test.

The server runs without request authentication (any key is accepted) until a test
turns it on with :meth:`S3Server.enforce_auth` (moto's ``/moto-api/reset-auth``), which
a fixture must turn off again in its finalizer (:meth:`S3Server.relax_auth`). The
process is killed by its pid in the session finalizer, even when tests fail.

Use it by importing the fixtures into a test module
(``from tests.s3_fixture import s3_bucket, s3_server``).
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import pytest

from cas.tier import s3
from tests.waiting import wait_for

ACCESS_KEY = "casfs-test-key"
SECRET_KEY = "casfs-test-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_credentials(path: Path, key: str = ACCESS_KEY, secret: str = SECRET_KEY,
                      profile: str = "default") -> Path:
    """An AWS shared-credentials file at ``path`` (mode 0600) with one profile."""
    path.write_text(f"[{profile}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    path.chmod(0o600)
    return path


@dataclass
class S3Server:
    """A running moto server: ``url`` (``http://127.0.0.1:PORT``), ``pid``, and a
    credentials file ``credentials`` any request is accepted with (while auth is off)."""

    url: str
    pid: int
    credentials: Path
    _client: Any = field(default=None, repr=False)

    def client(self, credentials: Path | None = None) -> Any:
        """A boto3 client on the server (casfs's own :func:`cas.tier.s3.make_client`); the
        one with the default credentials is made once (making one takes ~0.5 s)."""
        if credentials is not None:
            return s3.make_client(self.url, credentials_file=credentials, timeout_s=20.0)
        if self._client is None:
            self._client = s3.make_client(self.url, credentials_file=self.credentials, timeout_s=20.0)
        return self._client

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name; return the name."""
        name = f"casfs-{secrets.token_hex(6)}"
        s3.S3ObjectStore(self.client(), name).ensure_bucket(create=True)
        return name

    def _reset_auth(self, value: str) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=value.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=20) as resp:
            resp.read()

    def enforce_auth(self) -> None:
        """From now on every request must be signed by a key of moto's IAM."""
        self._reset_auth("0")

    def relax_auth(self) -> None:
        """Accept any request again (the session's default)."""
        self._reset_auth("inf")


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's server in a subprocess for the whole session; killed by pid at the end."""
    d = tmp_path_factory.mktemp("moto")
    creds = write_credentials(d / "credentials")
    port = _free_port()
    log = open(d / "moto.log", "wb")
    env = dict(os.environ, MOTO_ALLOW_NONEXISTENT_REGION="true")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _up(url), "moto's server to answer", timeout=60)
        if proc.poll() is not None:
            raise AssertionError(f"moto's server exited: {(d / 'moto.log').read_text()[-2000:]}")
        yield S3Server(url, proc.pid, creds)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the session's moto server."""
    return s3_server.new_bucket()
