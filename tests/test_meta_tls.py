"""TLS to an external metadata server (cas/db/tls.py, docs/database.md).

A real MariaDB with a certificate from a CA the test makes (cryptography), on a TCP port
of 127.0.0.1, and an account that REQUIRE SSL; a volume made with `casfs init --meta URL
--tls-ca CA` mounts and works; a wrong CA fails init and mount with one line and
changes nothing; and a man in the middle that strips TLS from the server's handshake
gets no login packet: the volume refuses to fall back to plaintext.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymysql
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cas.db.server import EmbeddedServer, _find
from tests.conftest import CasEnv
from tests.waiting import wait_for

pytestmark = pytest.mark.mount
USER, PASSWORD = "casfs_tls", "tls-test-pw"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_pem(path: Path, obj: x509.Certificate | rsa.RSAPrivateKey) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


def make_ca(d: Path, name: str) -> tuple[Path, x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed CA certificate (PEM at d/NAME.pem), its certificate and key."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _write_pem(d / f"{name}.pem", cert), cert, key


def make_server_cert(d: Path, ca: x509.Certificate, ca_key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost signed by ``ca``: (cert, key) PEM."""
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "casfs test db")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _write_pem(d / "server.pem", cert), _write_pem(d / "server-key.pem", key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TlsServer:
    port: int
    ca: Path          # the CA that signed the server's certificate
    wrong_ca: Path    # another CA
    socket: Path      # root's way in (unix socket)

    def root(self) -> pymysql.connections.Connection:
        return pymysql.connect(unix_socket=str(self.socket), user="root", autocommit=True)

    def databases(self) -> set[str]:
        with self.root() as c, c.cursor() as cur:
            cur.execute("SHOW DATABASES")
            return {r[0] for r in cur.fetchall()}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """A real MariaDB on 127.0.0.1:PORT with TLS (ssl_cert/ssl_key/ssl_ca) and a unix
    socket for root; the account USER must use TLS (REQUIRE SSL). Killed by pid at exit."""
    d = tmp_path_factory.mktemp("tlsdb")
    ca, ca_cert, ca_key = make_ca(d, "test-ca")
    wrong_ca, _, _ = make_ca(d, "other-ca")
    cert, key = make_server_cert(d, ca_cert, ca_key)
    srv = EmbeddedServer(d / "data", d / "run", d / "log")  # its datadir set-up and socket check
    srv.run_dir.mkdir(mode=0o700)
    srv.install()
    port = free_port()
    binary = _find("mariadbd")
    assert binary is not None
    cmd = [binary, "--no-defaults", f"--datadir={srv.datadir}", f"--socket={srv.socket}",
           f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={srv.pid_file}",
           f"--log-error={srv.log_dir / 'mariadb.err'}", "--skip-name-resolve",
           "--innodb-buffer-pool-size=64M", f"--tmpdir={srv.run_dir}",
           f"--ssl-ca={ca}", f"--ssl-cert={cert}", f"--ssl-key={key}"]
    if os.geteuid() == 0:
        cmd.append("--user=root")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or srv.alive(), "the TLS MariaDB server to answer")
        assert proc.poll() is None, (srv.log_dir / "mariadb.err").read_text()
        ts = TlsServer(port=port, ca=ca, wrong_ca=wrong_ca, socket=srv.socket)
        with ts.root() as c, c.cursor() as cur:
            cur.execute(f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}' REQUIRE SSL")
            cur.execute(f"GRANT ALL ON *.* TO '{USER}'@'127.0.0.1'")
            cur.execute("SHOW VARIABLES LIKE 'have_ssl'")
            assert cur.fetchone()[1] == "YES"
        yield ts
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StripTlsProxy:
    """A man in the middle on 127.0.0.1: relays to the server but clears CLIENT_SSL
    (0x0800) in the server's initial handshake packet, and records what the client sends
    after it (a client that falls back sends its login packet, with the user name)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.from_client = bytearray()
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._stop = False
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, server]
            hello = self._packet(server)
            # protocol 10: version byte, server version NUL-terminated, thread id (4),
            # scramble (8), filler (1), then the low two bytes of the capability flags
            pos = hello.index(b"\0", 5) + 1 + 4 + 8 + 1
            flags = int.from_bytes(hello[pos:pos + 2], "little") & ~0x0800
            client.sendall(hello[:pos] + flags.to_bytes(2, "little") + hello[pos + 2:])
            for a, b, record in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pipe, args=(a, b, record), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _packet(s: socket.socket) -> bytes:
        head = b""
        while len(head) < 4:
            head += s.recv(4 - len(head))
        n = int.from_bytes(head[:3], "little")
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
        return head + body

    def _pipe(self, a: socket.socket, b: socket.socket, record: bool) -> None:
        try:
            while data := a.recv(65536):
                if record:
                    self.from_client += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(10)


def _set_meta(vol: Path, **changes: object) -> None:
    cfg = tomllib.loads((vol / "volume.toml").read_text())
    for k, v in changes.items():
        if k == "meta_url":
            cfg["meta_url"] = v
        else:
            cfg.setdefault("meta", {})[k] = v
    (vol / "volume.toml").write_bytes(tomli_w.dumps(cfg).encode())


def test_tls_required_volume(casenv: CasEnv, tls_server: TlsServer) -> None:
    """init --tls-ca: the volume mounts and works over verified TLS only; a wrong CA
    fails init (nothing created) and mount with one line; no plaintext fallback."""
    casenv.env["CASFS_MYSQL_PASSWORD"] = PASSWORD
    url = f"mysql://{USER}@127.0.0.1:{tls_server.port}/casfs_tls_vol"

    # a CA that did not sign the server's certificate: one line, exit 1, nothing made
    r = casenv.run("init", "--meta", url, "--tls-ca", str(tls_server.wrong_ca), "tv", check=False)
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "certificate verify failed" in r.stderr, r.stderr
    assert not (casenv.data_home / "tv").exists()
    assert "casfs_tls_vol" not in tls_server.databases()
    # TLS options with the embedded server: refused
    r = casenv.run("init", "--tls-ca", str(tls_server.ca), "tv", check=False)
    assert r.returncode == 2 and "need --meta" in r.stderr, r.stderr

    casenv.run("init", "--meta", url, "--tls-ca", str(tls_server.ca), "tv")
    vol = casenv.data_home / "tv"
    cfg = tomllib.loads((vol / "volume.toml").read_text())
    assert cfg["meta"] == {"tls": "required", "ca_file": str(tls_server.ca)}
    mp = casenv.mount("tv")
    data = os.urandom(3 << 20)
    (mp / "f").write_bytes(data)
    casenv.umount(mp)
    mp = casenv.mount("tv", mp)
    assert (mp / "f").read_bytes() == data
    casenv.umount(mp)

    # the CA changed under the volume: mount and stats refuse with one line
    shutil.copy(tls_server.wrong_ca, casenv.tmp / "ca-now.pem")
    _set_meta(vol, ca_file=str(casenv.tmp / "ca-now.pem"))
    for args in (("mount", str(mp), "tv"), ("stats", "tv")):
        r = casenv.run(*args, check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "TLS to MySQL" in r.stderr and "certificate verify failed" in r.stderr, r.stderr
    _set_meta(vol, ca_file=str(tls_server.ca))

    # a man in the middle strips TLS from the handshake: no fallback, no login sent
    proxy = StripTlsProxy(tls_server.port)
    try:
        _set_meta(vol, meta_url=f"mysql://{USER}@127.0.0.1:{proxy.port}/casfs_tls_vol")
        r = casenv.run("stats", "tv", check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "TLS" in r.stderr, r.stderr
        assert proxy.connections >= 1
        assert USER.encode() not in bytes(proxy.from_client)  # the login packet never left
        # the same volume with tls = "preferred" does fall back through this proxy (so the
        # proxy works, and it is the setting that refuses); the server then refuses the
        # account, which requires TLS
        _set_meta(vol, tls="preferred")
        r = casenv.run("stats", "tv", check=False)
        assert r.returncode == 1 and "refused the credentials" in r.stderr, r.stderr
        assert USER.encode() in bytes(proxy.from_client)
    finally:
        proxy.close()
    _set_meta(vol, tls="required", meta_url=url)
    assert casenv.run("stats", "tv").returncode == 0
