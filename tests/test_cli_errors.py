"""Bad input through the real `casfs` CLI: a one-line message and a non-zero exit.

Also the errno a program sees inside a real mount for the classic namespace errors,
and what a full chunk store (ENOSPC) leaves behind. Every mount, tmpfs, MySQL user and
immutable flag a test creates is removed in a finally block or by the ``casenv`` fixture.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from cas.db.database import SCHEMA_VERSION, parse_meta_url
from cas.db.server import EmbeddedServer, pid_running
from fusefront.mountpoint import find_mount, is_dead_mount

from .conftest import CasEnv
from .treeutil import tmpfs

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

MiB = 1 << 20


# -- helpers ---------------------------------------------------------------------------

def assert_error(r: subprocess.CompletedProcess[str], *needles: str, usage: bool = False) -> str:
    """``r`` failed with exactly one error line on stderr containing every needle.

    Returns that line. A click usage error (``usage=True``, exit 2) may be preceded by
    the usage and hint lines, but still carries exactly one ``Error:`` line.
    """
    out = f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    assert r.returncode != 0, out
    assert "Traceback" not in r.stderr, out
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if usage:
        assert r.returncode == 2, out
        errs = [ln for ln in lines if ln.startswith("Error:")]
        assert len(errs) == 1, out
        line = errs[0]
    else:
        assert r.returncode == 1, out
        assert len(lines) == 1, "expected a one-line message: " + out
        line = lines[0]
        assert line.startswith("Error: "), out
    for n in needles:
        assert n.lower() in line.lower(), f"{n!r} not in the message: " + out
    return line


def volume_config(casenv: CasEnv, name: str) -> dict[str, Any]:
    return tomllib.loads((casenv.data_home / name / "volume.toml").read_text())


def set_meta_url(casenv: CasEnv, name: str, url: str) -> None:
    """Point volume ``name`` at another metadata URL by editing its config."""
    cfg_file = casenv.data_home / name / "volume.toml"
    text = cfg_file.read_text()
    old = volume_config(casenv, name)["meta_url"]
    cfg_file.write_text(text.replace(f'"{old}"', f'"{url}"'))
    assert volume_config(casenv, name)["meta_url"] == url


def admin(server: EmbeddedServer, database: str | None = None) -> pymysql.connections.Connection:
    return pymysql.connect(unix_socket=str(server.socket), user="root", password="",
                           database=database, autocommit=True)


def volume_db(casenv: CasEnv, name: str) -> str:
    return parse_meta_url(volume_config(casenv, name)["meta_url"]).database


def new_mountpoint(casenv: CasEnv, tag: str) -> Path:
    """An empty directory registered for cleanup by the casenv fixture."""
    mp = casenv.tmp / f"mp_{tag}"
    mp.mkdir()
    casenv.mounts.append(mp)
    return mp


def expect_errno(err: int, fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(OSError) as ei:
        fn(*args)
    assert ei.value.errno == err, (f"{getattr(fn, '__name__', fn)}{args}: expected "
                                   f"{errno.errorcode[err]}, got {ei.value!r}")


def wait_dead(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        assert time.monotonic() < deadline, f"process {pid} still running"
        time.sleep(0.05)


# -- mountpoints -----------------------------------------------------------------------

def test_mountpoint_missing(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.tmp / "nosuch"
    assert_error(casenv.run("mount", str(mp), "vol", check=False), str(mp), "does not exist")
    assert not mp.exists()


def test_mountpoint_is_a_file(casenv: CasEnv) -> None:
    casenv.init("vol")
    f = casenv.tmp / "afile"
    f.write_text("x")
    assert_error(casenv.run("mount", str(f), "vol", check=False), str(f), "is not a directory")
    assert f.read_text() == "x"


def test_mountpoint_not_empty(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.tmp / "full"
    mp.mkdir()
    (mp / "keep").write_text("x")
    casenv.mounts.append(mp)
    assert_error(casenv.run("mount", str(mp), "vol", check=False), str(mp), "is not empty")
    assert find_mount(mp) is None


def test_mountpoint_already_mounted(casenv: CasEnv) -> None:
    casenv.init("vol")
    casenv.init("vol2")
    mp = casenv.mount("vol")
    (mp / "f").write_bytes(b"first volume")
    assert_error(casenv.run("mount", str(mp), "vol2", check=False), str(mp), "already a mountpoint")
    # the first mount is untouched
    assert (mp / "f").read_bytes() == b"first volume"
    assert sum(1 for m in open("/proc/self/mounts") if f" {mp} " in m) == 1


def test_same_volume_mounted_twice(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp1 = casenv.mount("vol")
    mp2 = new_mountpoint(casenv, "second")
    assert_error(casenv.run("mount", str(mp2), "vol", check=False), "vol", "already mounted")
    assert find_mount(mp2) is None
    assert find_mount(mp1) is not None
    (mp1 / "still").write_bytes(b"ok")
    assert (mp1 / "still").read_bytes() == b"ok"


def test_umount_not_mounted(casenv: CasEnv) -> None:
    d = casenv.tmp / "plain"
    d.mkdir()
    assert_error(casenv.run("umount", str(d), check=False), str(d), "is not mounted")
    missing = casenv.tmp / "nosuch"
    assert_error(casenv.run("umount", str(missing), check=False), "is not mounted")


def _kill_daemon(casenv: CasEnv, mp: Path) -> None:
    pid = casenv.daemon_pid(mp)
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)
    deadline = time.monotonic() + 10
    while not is_dead_mount(mp):
        assert time.monotonic() < deadline, "mount did not turn dead after SIGKILL"
        time.sleep(0.05)


def test_umount_dead_daemon(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.mount("vol")
    _kill_daemon(casenv, mp)
    r = casenv.run("umount", str(mp), check=False)
    assert r.returncode == 0, r.stderr
    assert "daemon had died" in r.stderr
    assert find_mount(mp) is None
    assert f" {mp} " not in Path("/proc/self/mounts").read_text()
    assert not is_dead_mount(mp)


def test_mount_over_dead_mount(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.mount("vol")
    with open(mp / "kept", "wb") as f:
        f.write(b"durable" * 1000)
        f.flush()
        os.fsync(f.fileno())
    _kill_daemon(casenv, mp)
    r = casenv.run("mount", str(mp), "vol", check=False)
    assert r.returncode == 0, r.stderr
    assert find_mount(mp) is not None and not is_dead_mount(mp)
    assert sum(1 for m in open("/proc/self/mounts") if f" {mp} " in m) == 1
    assert (mp / "kept").read_bytes() == b"durable" * 1000
    (mp / "new").write_bytes(b"after restart")
    casenv.umount(mp)
    assert find_mount(mp) is None


# -- volumes and init arguments --------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ("mount", "{mp}", "nosuch"),
    ("stats", "nosuch"),
    ("gc", "nosuch"),
    ("fsck", "nosuch"),
])
def test_volume_missing(casenv: CasEnv, argv: tuple[str, ...]) -> None:
    mp = casenv.tmp / "mp"
    mp.mkdir()
    casenv.mounts.append(mp)
    args = [a.format(mp=mp) for a in argv]
    assert_error(casenv.run(*args, check=False), "'nosuch'", "does not exist", "casfs init nosuch")
    assert find_mount(mp) is None
    assert not (casenv.data_home / "nosuch").exists()


def test_init_existing_volume(casenv: CasEnv) -> None:
    casenv.init("vol")
    before = (casenv.data_home / "vol" / "volume.toml").read_text()
    r = casenv.run("init", "--meta", casenv.meta_url(f"other{uuid.uuid4().hex[:8]}"), "vol", check=False)
    assert_error(r, "'vol'", "already exists")
    # the existing volume is untouched and still works
    assert (casenv.data_home / "vol" / "volume.toml").read_text() == before
    casenv.run("stats", "vol")


@pytest.mark.parametrize("size, needle", [
    ("3MiB", "power of two"),
    ("100000", "power of two"),
    ("32KiB", "between 64 KiB and 16 MiB"),
    ("32MiB", "between 64 KiB and 16 MiB"),
    ("0", "power of two"),
])
def test_init_bad_chunk_size(casenv: CasEnv, size: str, needle: str) -> None:
    r = casenv.run("init", "--chunk-size", size, "--meta", casenv.meta_url("never_created"), "vol",
                   check=False)
    assert_error(r, "chunk size", needle)
    assert not (casenv.data_home / "vol").exists()


def test_init_chunk_size_not_a_size(casenv: CasEnv) -> None:
    r = casenv.run("init", "--chunk-size", "lots", "vol", check=False)
    assert_error(r, "'lots' is not a size", usage=True)
    assert not (casenv.data_home / "vol").exists()


@pytest.mark.parametrize("spec", ["lz4", "zstd:0", "zstd:23", "zstd:abc", "gzip:3", ""])
def test_init_bad_compression(casenv: CasEnv, spec: str) -> None:
    r = casenv.run("init", "--compression", spec, "--meta", casenv.meta_url("never_created"), "vol",
                   check=False)
    line = assert_error(r, "zstd:LEVEL")
    assert "invalid literal" not in line  # a message for people, not Python's
    assert not (casenv.data_home / "vol").exists()


# -- the metadata server ---------------------------------------------------------------

@pytest.mark.parametrize("url, needles", [
    ("mysql://root@127.0.0.1:1/casfs_x", ("cannot reach MySQL", "127.0.0.1:1", "refused")),
    ("mysql://root@localhost/casfs_x?unix_socket=/nonexistent/dir/mysqld.sock",
     ("cannot reach MySQL", "/nonexistent/dir/mysqld.sock")),
])
def test_init_mysql_unreachable(casenv: CasEnv, url: str, needles: tuple[str, ...]) -> None:
    r = casenv.run("init", "--meta", url, "vol", check=False, timeout=60)
    assert_error(r, *needles)
    assert not (casenv.data_home / "vol").exists(), "a failed init must not leave a volume behind"


def test_existing_volume_mysql_unreachable(casenv: CasEnv) -> None:
    casenv.init("vol")
    set_meta_url(casenv, "vol", "mysql://root@127.0.0.1:1/casfs_x")
    for cmd in ("stats", "gc", "fsck"):
        assert_error(casenv.run(cmd, "vol", check=False, timeout=60), "cannot reach MySQL", "127.0.0.1:1")
    mp = new_mountpoint(casenv, "unreach")
    assert_error(casenv.run("mount", str(mp), "vol", check=False, timeout=60), "cannot reach MySQL")
    assert find_mount(mp) is None


def test_password_in_url_refused(casenv: CasEnv) -> None:
    url = f"mysql://root:secret@localhost/casfs_x?unix_socket={casenv.server.socket}"
    line = assert_error(casenv.run("init", "--meta", url, "vol", check=False),
                        "must not carry a password", "CASFS_MYSQL_PASSWORD")
    assert "secret" not in line
    assert not (casenv.data_home / "vol").exists()


@pytest.fixture
def mysql_user(casenv: CasEnv) -> Iterator[tuple[str, str, str]]:
    """A MySQL user with a password, allowed on one database: (user, password, db)."""
    tag = uuid.uuid4().hex[:10]
    user, password, db = f"cu_{tag}", f"pw-{tag}", f"cdb_{tag}"
    conn = admin(casenv.server)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE USER '{user}'@'localhost' IDENTIFIED BY %s", (password,))
            cur.execute(f"GRANT ALL PRIVILEGES ON `{db}`.* TO '{user}'@'localhost'")
        yield user, password, db
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{user}'@'localhost'")
            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
        conn.close()


def test_wrong_credentials(casenv: CasEnv, mysql_user: tuple[str, str, str]) -> None:
    user, password, db = mysql_user
    url = f"mysql://{user}@localhost/{db}?unix_socket={casenv.server.socket}"
    for bad in ("wrong", ""):
        casenv.env["CASFS_MYSQL_PASSWORD"] = bad
        r = casenv.run("init", "--meta", url, "vol", check=False)
        assert_error(r, "refused the credentials", user)
        assert bad == "" or bad not in r.stderr.replace(user, "")
        assert not (casenv.data_home / "vol").exists()
    casenv.env["CASFS_MYSQL_PASSWORD"] = password
    casenv.run("init", "--meta", url, "vol")
    assert password not in (casenv.data_home / "vol" / "volume.toml").read_text()
    casenv.run("stats", "vol")
    casenv.env["CASFS_MYSQL_PASSWORD"] = "wrong"
    assert_error(casenv.run("stats", "vol", check=False), "refused the credentials")
    mp = new_mountpoint(casenv, "creds")
    assert_error(casenv.run("mount", str(mp), "vol", check=False), "refused the credentials")
    assert find_mount(mp) is None
    casenv.env["CASFS_MYSQL_PASSWORD"] = password
    casenv.mount("vol", mp)
    (mp / "f").write_bytes(b"with a password")
    casenv.umount(mp)


def test_schema_1_volume_is_upgraded_and_keeps_its_files(casenv: CasEnv) -> None:
    """A volume made by the first release (schema 1: no cloud tables, no is_local, no
    bad or data_bytes) is upgraded on first use (data_bytes filled in from the
    manifests) and its files read back."""
    casenv.init("vol", chunk_size="64KiB")
    mp = casenv.mount("vol")
    data = os.urandom(200_000)
    (mp / "f").write_bytes(data)
    casenv.umount(mp)
    conn = admin(casenv.server, volume_db(casenv, "vol"))
    try:
        with conn.cursor() as cur:
            for t in ("packs", "pack_entries", "upload_queue"):
                cur.execute(f"DROP TABLE {t}")
            cur.execute("ALTER TABLE chunks DROP COLUMN is_local, DROP KEY bad_idx, DROP COLUMN bad")
            cur.execute("ALTER TABLE inodes DROP COLUMN data_bytes")
            cur.execute("UPDATE meta SET v = '1' WHERE k = 'schema_version'")
    finally:
        conn.close()
    st = json.loads(casenv.run("stats", "--json", "vol").stdout)
    assert st["files"] == 1 and st["local_bytes"] > 0
    conn = admin(casenv.server, volume_db(casenv, "vol"))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT v FROM meta WHERE k = 'schema_version'")
            assert cur.fetchone()[0] == str(SCHEMA_VERSION)
            cur.execute("SHOW TABLES")
            assert {"packs", "pack_entries", "upload_queue"} <= {r[0] for r in cur.fetchall()}
            cur.execute("SELECT data_bytes FROM inodes WHERE size = 200000")
            assert [r[0] for r in cur.fetchall()] == [200_000]
            cur.execute("SELECT COUNT(*) FROM chunks WHERE bad = 0")
            assert cur.fetchone()[0] == 4  # 200,000 bytes in 64 KiB slots
    finally:
        conn.close()
    casenv.mount("vol", mp)
    assert (mp / "f").read_bytes() == data
    assert json.loads(casenv.run("fsck", "--json", "vol").stdout)["clean"]


def test_wrong_schema_version(casenv: CasEnv) -> None:
    casenv.init("vol")
    conn = admin(casenv.server, volume_db(casenv, "vol"))
    try:
        with conn.cursor() as cur:
            assert cur.execute("UPDATE meta SET v = '999' WHERE k = 'schema_version'") == 1
    finally:
        conn.close()
    for cmd in ("stats", "gc", "fsck"):
        assert_error(casenv.run(cmd, "vol", check=False), "schema version 999", f"version {SCHEMA_VERSION}")
    mp = new_mountpoint(casenv, "schema")
    assert_error(casenv.run("mount", str(mp), "vol", check=False), "schema version 999")
    assert find_mount(mp) is None


# -- the chunk store -------------------------------------------------------------------

@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """``immutable(dir)`` sets chattr +i (root ignores mode bits); undone at teardown."""
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (e2fsprogs)")
    done: list[Path] = []

    def make(d: Path) -> None:
        r = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"chattr +i not possible here: {r.stderr.strip()}")
        done.append(d)
        try:  # make sure it really stops writes, even for root
            (d / "probe").write_bytes(b"")
        except PermissionError:
            return
        (d / "probe").unlink()
        pytest.skip("chattr +i does not stop writes here")

    try:
        yield make
    finally:
        for d in done:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)


def test_chunk_store_not_writable(casenv: CasEnv, immutable: Callable[[Path], None]) -> None:
    casenv.init("vol")
    chunks = casenv.data_home / "vol" / "chunks"
    immutable(chunks)
    mp = new_mountpoint(casenv, "ro")
    assert_error(casenv.run("mount", str(mp), "vol", check=False), "chunk store", str(chunks),
                 "not writable")
    assert find_mount(mp) is None


def test_chunk_store_is_a_file(casenv: CasEnv) -> None:
    casenv.init("vol")
    chunks = casenv.data_home / "vol" / "chunks"
    chunks.rmdir()
    chunks.write_bytes(b"not a directory")
    mp = new_mountpoint(casenv, "file")
    assert_error(casenv.run("mount", str(mp), "vol", check=False), "chunk store", "not writable")
    assert find_mount(mp) is None


def test_chunk_store_turns_unwritable_while_mounted(casenv: CasEnv,
                                                     immutable: Callable[[Path], None]) -> None:
    """fsync reports EIO while the store refuses writes; the data stays buffered and is
    committed once the store is writable again."""
    casenv.init("vol")
    mp = casenv.mount("vol")
    chunks = casenv.data_home / "vol" / "chunks"
    immutable(chunks)
    data = os.urandom(300_000)
    fd = os.open(mp / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        expect_errno(errno.EIO, os.fsync, fd)
        subprocess.run(["chattr", "-i", str(chunks)], check=True)
        os.fsync(fd)
    finally:
        os.close(fd)
    casenv.umount(mp)
    r = casenv.run("fsck", "vol", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    casenv.mount("vol", mp)
    assert (mp / "f").read_bytes() == data


# -- the embedded server ---------------------------------------------------------------

@pytest.mark.parametrize("override", ["", "/nonexistent/mariadbd"])
def test_mariadbd_not_installed(casenv: CasEnv, tmp_path: Path, override: str) -> None:
    empty = tmp_path / "emptybin"
    empty.mkdir()
    casenv.env["PATH"] = str(empty)
    casenv.env["CASFS_MARIADBD"] = override
    r = casenv.run("init", "vol", check=False)
    assert_error(r, "mariadbd is not installed", "apt-get install mariadb-server", "--meta")
    assert not (casenv.data_home / "vol").exists()
    # `casfs mount` creates the default volume on first use: same message, nothing left
    mp = new_mountpoint(casenv, "nodb")
    assert_error(casenv.run("mount", str(mp), check=False), "mariadbd is not installed")
    assert not (casenv.data_home / "default").exists()
    assert find_mount(mp) is None


# -- errno inside a mount --------------------------------------------------------------

def test_errnos_inside_mount(casenv: CasEnv, mounted: Callable[..., Path], tmp_path: Path) -> None:
    mp = mounted()
    (mp / "file").write_bytes(b"data")
    (mp / "dir").mkdir()
    (mp / "full").mkdir()
    (mp / "full" / "x").write_bytes(b"")

    expect_errno(errno.ENOENT, open, mp / "missing", "rb")
    expect_errno(errno.ENOENT, os.stat, mp / "missing" / "deeper")
    expect_errno(errno.ENOENT, os.unlink, mp / "missing")
    expect_errno(errno.ENOENT, os.rename, mp / "missing", mp / "other")

    expect_errno(errno.EEXIST, os.mkdir, mp / "dir")
    expect_errno(errno.EEXIST, os.mkdir, mp / "file")
    expect_errno(errno.EEXIST, os.open, mp / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    expect_errno(errno.EEXIST, os.link, mp / "file", mp / "dir" / ".." / "file")

    expect_errno(errno.ENOTEMPTY, os.rmdir, mp / "full")
    expect_errno(errno.ENOTEMPTY, os.rename, mp / "dir", mp / "full")

    expect_errno(errno.ENOTDIR, open, mp / "file" / "x", "rb")
    expect_errno(errno.ENOTDIR, os.open, mp / "file" / "x", os.O_WRONLY | os.O_CREAT)
    expect_errno(errno.ENOTDIR, os.rmdir, mp / "file")
    expect_errno(errno.ENOTDIR, os.listdir, mp / "file")

    expect_errno(errno.EISDIR, open, mp / "dir", "wb")
    expect_errno(errno.EISDIR, os.open, mp / "dir", os.O_RDWR)
    expect_errno(errno.EISDIR, os.unlink, mp / "dir")
    expect_errno(errno.EISDIR, os.rename, mp / "file", mp / "dir")

    long = "n" * 256
    expect_errno(errno.ENAMETOOLONG, open, mp / long, "wb")
    expect_errno(errno.ENAMETOOLONG, os.mkdir, mp / long)
    expect_errno(errno.ENAMETOOLONG, os.stat, mp / long)
    expect_errno(errno.ENAMETOOLONG, os.rename, mp / "file", mp / long)
    ok = "n" * 255
    (mp / ok).write_bytes(b"max")
    assert (mp / ok).read_bytes() == b"max"

    outside = tmp_path / "outside"
    outside.mkdir()
    expect_errno(errno.EXDEV, os.rename, mp / "file", outside / "file")
    expect_errno(errno.EXDEV, os.link, mp / "file", outside / "file")
    assert (mp / "file").read_bytes() == b"data"
    assert not (outside / "file").exists()

    # nothing above changed the tree
    assert sorted(os.listdir(mp)) == sorted(["file", "dir", "full", ok])
    assert os.listdir(mp / "full") == ["x"]
    assert os.listdir(mp / "dir") == []


# -- a full chunk store ----------------------------------------------------------------

@pytest.fixture
def small_tmpfs(casenv: CasEnv, tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted at teardown (after casenv's mounts are gone)."""
    with tmpfs(tmp_path / "tmpfs", "8m") as d:
        yield d


def _fsck_clean(casenv: CasEnv, vol: str) -> str:
    r = casenv.run("fsck", "--json", vol, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_enospc_leaves_no_half_committed_manifest(casenv: CasEnv, small_tmpfs: Path) -> None:
    casenv.init("vol", chunk_size="256KiB")
    chunks = casenv.data_home / "vol" / "chunks"
    chunks.rmdir()
    (small_tmpfs / "chunks").mkdir()
    chunks.symlink_to(small_tmpfs / "chunks")
    mp = casenv.mount("vol")

    durable: dict[str, bytes] = {}
    failed: list[str] = []
    for i in range(40):  # 40 x 512 KiB = 20 MiB, far more than fits in 8 MiB
        name = f"f{i:02d}"
        data = os.urandom(512 * 1024)
        fd = os.open(mp / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            failed.append(name)
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                if name not in failed:
                    failed.append(name)
        if failed:
            pending = data
            break
        durable[name] = data
    assert failed, "the 8 MiB store never filled up"
    assert len(durable) >= 4, f"ENOSPC after only {len(durable)} files"

    # nothing half-committed: every referenced chunk exists and verifies
    _fsck_clean(casenv, "vol")
    for name, data in durable.items():
        assert (mp / name).read_bytes() == data, name
    # the failed file's bytes stay buffered in the daemon (retried by the writeback
    # timer), so it still reads back whole; its close reports the pending ENOSPC
    assert os.stat(mp / failed[0]).st_size == len(pending)
    fd = os.open(mp / failed[0], os.O_RDONLY)
    try:
        assert os.read(fd, 2 * len(pending)) == pending
    finally:
        try:
            os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc

    # free space: delete the failed file and a few durable ones, then gc the chunks
    os.unlink(mp / failed[0])
    for name in list(durable)[:4]:
        os.unlink(mp / name)
        del durable[name]
    casenv.run("gc", "--grace", "0", "vol")
    deadline = time.monotonic() + 15
    fresh = os.urandom(512 * 1024)
    while True:  # the writeback of the failed file's buffers may need a tick to settle
        try:
            with open(mp / "fresh", "wb") as f:
                f.write(fresh)
                f.flush()
                os.fsync(f.fileno())
            break
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and time.monotonic() < deadline, exc
            casenv.run("gc", "--grace", "0", "vol")
            time.sleep(0.5)
    assert (mp / "fresh").read_bytes() == fresh
    casenv.umount(mp)
    _fsck_clean(casenv, "vol")

    # after a remount (no page cache), everything reads back from the store
    casenv.mount("vol", mp)
    assert (mp / "fresh").read_bytes() == fresh
    for name, data in durable.items():
        assert (mp / name).read_bytes() == data, name
    assert not (mp / failed[0]).exists()
