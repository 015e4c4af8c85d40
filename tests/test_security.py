"""No way in for other local users (docs/security.md), on real embedded volumes and mounts.

* the embedded server's socket never lives in a directory another user can create or
  write: a hostile directory at the old predictable ``/tmp/casfs-UID-HASH`` path is not
  used, and a long volume path still mounts;
* the embedded server refuses every file statement (``secure_file_priv``);
* a pid in ``run/mysqld.pid`` that is not this datadir's mariadbd is never signalled;
* ``casfs init`` refuses a directory that is not empty or that other users can write;
* POSIX ACLs are enforced as on ext4 (a deny entry denies; default ACLs are inherited);
* a path component the OS refuses (ENAMETOOLONG) is a one-line error for every command.

Every process, mount and directory a test makes is removed by the fixtures or a finally
block; processes are stopped by pid.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from cas.db.server import EmbeddedServer, find_server, is_server_of, pid_running, private_dir_problem
from fusefront.mountpoint import find_mount

from .conftest import CasEnv
from .test_cli_errors import assert_error
from .waiting import wait_for

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

FOREIGN_UID = 54321   # a uid no account uses: "another local user"


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process (sleep) whose pid a stale pid file may name; killed by pid."""
    p = subprocess.Popen(["sleep", "3600"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def long_home(casenv: CasEnv, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """XDG_DATA_HOME long enough that no volume's run/mysqld.sock fits in sun_path
    (108 bytes, unix(7)). Private socket directories recorded by its volumes are
    removed at teardown."""
    xdg = tmp_path / ("x" * 90)
    xdg.mkdir()
    casenv.env["XDG_DATA_HOME"] = str(xdg)
    monkeypatch.setenv("XDG_DATA_HOME", str(xdg))
    made: set[Path] = set()
    casenv_data = casenv.data_home

    def note() -> None:
        for rec in casenv_data.glob("*/run/sockdir"):
            made.add(Path(rec.read_text().strip()))
    try:
        yield xdg
    finally:
        note()
        for d in made:
            if d.parent == Path(tempfile.gettempdir()) and d.name.startswith("casfs-"):
                shutil.rmtree(d, ignore_errors=True)


def sockdir_of(casenv: CasEnv, name: str) -> Path:
    """The private socket directory recorded in volume ``name``'s run/sockdir."""
    return Path((casenv.data_home / name / "run" / "sockdir").read_text().strip())


def server_of(casenv: CasEnv, name: str) -> EmbeddedServer:
    vol = casenv.data_home / name
    return EmbeddedServer(vol / "mysql", vol / "run", vol / "log")


# -- 1. the socket's directory and secure_file_priv -------------------------------------

@pytest.mark.parametrize("hostile", ["foreign-owner", "world-writable"])
def test_long_volume_path_never_uses_a_predictable_socket_dir(
        casenv: CasEnv, long_home: Path, tmp_path: Path, hostile: str) -> None:
    xdg = long_home
    run_dir = casenv.data_home / "vol" / "run"
    assert len(str(run_dir / "mysqld.sock")) > 108
    # another user creates the directory the old code would have used, first
    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    trap = Path(tempfile.gettempdir()) / f"casfs-{os.getuid()}-{digest}"
    trap.mkdir()
    try:
        if hostile == "foreign-owner":
            os.chown(trap, FOREIGN_UID, FOREIGN_UID)
            os.chmod(trap, 0o755)
        else:
            os.chmod(trap, 0o777)
        casenv.init("vol", embedded=True)
        mp = casenv.mount("vol")
        (mp / "f").write_bytes(b"hello" * 1000)
        os.sync()
        assert (mp / "f").read_bytes() == b"hello" * 1000
        assert list(trap.iterdir()) == [], "the server used a directory another user made"
        # the socket is in a private directory recorded in run/sockdir
        sockdir = sockdir_of(casenv, "vol")
        assert private_dir_problem(sockdir) is None
        sock = sockdir / "mysqld.sock"
        assert sock.is_socket()
        assert server_of(casenv, "vol").socket == sock
        # the server reads and writes no files for anyone who reaches it
        conn = pymysql.connect(unix_socket=str(sock), user="root", password="", autocommit=True)
        try:
            with conn.cursor() as cur:
                for sql in (f"SELECT 'x' INTO OUTFILE '{tmp_path / 'out'}'",
                            f"LOAD DATA INFILE '{xdg}/casfs/vol/volume.toml' INTO TABLE casfs.meta"):
                    with pytest.raises(pymysql.err.MySQLError) as ei:
                        cur.execute(sql)
                    assert ei.value.args[0] == 1290, ei.value   # ER_OPTION_PREVENTS_STATEMENT
                cur.execute("SELECT LOAD_FILE(%s)", (f"{xdg}/casfs/vol/volume.toml",))
                assert cur.fetchall() == ((None,),)
                # temporary files stay in the private run/tmp, not in the shared /tmp
                cur.execute("SELECT @@tmpdir")
                assert cur.fetchall() == ((str(run_dir / "tmp"),),)
                assert private_dir_problem(run_dir / "tmp") is None
        finally:
            conn.close()
        assert not (tmp_path / "out").exists()
        casenv.umount(mp)
        assert find_mount(mp) is None
        # a removed socket directory is replaced, never re-created at a known name
        shutil.rmtree(sockdir)
        casenv.run("stats", "vol")
        new = sockdir_of(casenv, "vol")
        assert new != sockdir and private_dir_problem(new) is None
    finally:
        shutil.rmtree(trap, ignore_errors=True)


def test_recorded_socket_dir_taken_over_is_not_used(casenv: CasEnv, long_home: Path) -> None:
    casenv.init("vol", embedded=True)
    sockdir = sockdir_of(casenv, "vol")
    # the directory disappears (a temp cleaner) and another user re-creates it
    shutil.rmtree(sockdir)
    sockdir.mkdir(mode=0o777)
    os.chmod(sockdir, 0o777)
    try:
        os.chown(sockdir, FOREIGN_UID, FOREIGN_UID)
        casenv.run("stats", "vol")
        assert list(sockdir.iterdir()) == []
        new = sockdir_of(casenv, "vol")
        assert new != sockdir and private_dir_problem(new) is None
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_run_directory_others_can_write_is_refused(casenv: CasEnv) -> None:
    casenv.init("vol", embedded=True)
    run_dir = casenv.data_home / "vol" / "run"
    os.chmod(run_dir, 0o777)
    try:
        r = casenv.run("stats", "vol", check=False)
        assert_error(r, "refusing run directory", str(run_dir))
        assert not (run_dir / "mysqld.sock").exists()
    finally:
        os.chmod(run_dir, 0o700)
    casenv.run("stats", "vol")


# -- 2. pids from the pid file are checked before any signal ------------------------------

def test_stale_pid_file_never_signals_another_process(
        casenv: CasEnv, bystander: subprocess.Popen[bytes]) -> None:
    casenv.init("vol", embedded=True)
    srv = server_of(casenv, "vol")
    assert srv.pid() is None                       # init stopped its server
    srv.pid_file.write_text(f"{bystander.pid}\n")  # a dead server's pid, reused by `sleep`
    # starting the server (mount) must not take `sleep` for a hung server and kill it
    mp = casenv.mount("vol")
    (mp / "f").write_bytes(b"data")
    assert bystander.poll() is None, "casfs signalled an unrelated process"
    real = srv.pid()
    assert real is not None and real != bystander.pid and is_server_of(real, srv.datadir)
    casenv.umount(mp)
    wait_for(lambda: not pid_running(real), "the embedded server to stop")
    # stopping a server this process did not start goes through the pid file: it names
    # `sleep` again; the server is found by its datadir and stopped, `sleep` lives on
    starter = server_of(casenv, "vol")
    starter.acquire()
    try:
        real = srv.pid()
        assert real is not None and is_server_of(real, srv.datadir)
        srv.pid_file.write_text(f"{bystander.pid}\n")
        server_of(casenv, "vol").stop()
        wait_for(lambda: not pid_running(real), "the embedded server to stop")
        assert bystander.poll() is None, "casfs signalled an unrelated process"
        assert find_server(srv.datadir) is None
    finally:
        starter.release()
    assert bystander.poll() is None


# -- 3. init refuses a directory that is not empty or that others can write ---------------

def test_init_refuses_unsafe_volume_directories(casenv: CasEnv, tmp_path: Path) -> None:
    def refused(d: Path, *needles: str) -> None:
        before = sorted(p.name for p in d.iterdir())
        r = casenv.run("init", "--meta", casenv.meta_url("never_created"), str(d), check=False)
        assert_error(r, str(d), *needles)
        assert sorted(p.name for p in d.iterdir()) == before, "a refused init created files"

    full = tmp_path / "full"
    full.mkdir(mode=0o700)
    (full / "photo.jpg").write_bytes(b"precious")
    refused(full, "not empty")
    assert (full / "photo.jpg").read_bytes() == b"precious"

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    refused(shared, "other users can write")
    os.chmod(shared, 0o770)
    refused(shared, "other users can write")

    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, FOREIGN_UID, FOREIGN_UID)
    refused(foreign, f"owned by uid {FOREIGN_UID}")

    # a world-writable parent without the sticky bit: the volume could be renamed away
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)
    r = casenv.run("init", "--meta", casenv.meta_url("never_created"), str(open_parent / "vol"), check=False)
    assert_error(r, "every user can rename")
    assert list(open_parent.iterdir()) == []

    # an empty private directory, and a new one, are fine
    ok = tmp_path / "ok"
    ok.mkdir(mode=0o700)
    casenv.run("init", "--meta", casenv.meta_url(f"sec{os.getpid()}a"), str(ok))
    assert (ok / "volume.toml").is_file()
    casenv.run("init", "--meta", casenv.meta_url(f"sec{os.getpid()}b"), str(tmp_path / "new"))
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700


# -- 6. a path the OS refuses is one line, not a traceback --------------------------------

def test_overlong_path_component_is_one_line_for_every_command(casenv: CasEnv, tmp_path: Path) -> None:
    long = str(tmp_path / ("a" * 300))
    mp = tmp_path / "mp"
    mp.mkdir()
    for args in (["init", long], ["init", "--meta", casenv.meta_url("never_created"), long],
                 ["stats", long], ["mount", long], ["mount", str(mp), long], ["mount", long, "vol"],
                 ["fsck", long], ["gc", long], ["umount", long]):
        r = casenv.run(*args, check=False)
        line = assert_error(r)
        if args[0] != "umount":  # umount only looks the path up in /proc/self/mountinfo
            assert "too long" in line and len(line) < 300, line
    assert find_mount(mp) is None
    assert not os.path.exists(long)


# -- 4. POSIX ACLs are enforced, as on ext4 -----------------------------------------------

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
A_USER_OBJ, A_USER, A_GROUP_OBJ, A_GROUP, A_MASK, A_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID = 0xFFFFFFFF
NOBODY = 65534

_PROBE = r"""
import errno, json, os, sys
fd = int(sys.argv[1])
os.umask(0)  # pyfuse3 cannot ask for FUSE_DONT_MASK: the kernel applies the umask before casfs
out = {}
for name, how in json.loads(sys.argv[2]):
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "c": os.O_WRONLY | os.O_CREAT | os.O_EXCL}[how]
    try:
        os.close(os.open(name, flags, 0o666, dir_fd=fd))
        out[name + ":" + how] = "ok"
    except OSError as exc:
        out[name + ":" + how] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in the kernel's xattr form: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def as_nobody(root: Path, probes: list[tuple[str, str]]) -> dict[str, str]:
    """Open each (name, "r"|"w"|"c") below ``root`` as uid/gid 65534 (setpriv(1)); the
    directory is passed as an open fd, so its ancestors need not be searchable."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", _PROBE, str(fd), json.dumps(probes)],
                           pass_fds=(fd,), capture_output=True, text=True, timeout=60, check=True)
    finally:
        os.close(fd)
    return dict(json.loads(r.stdout))


def acl_scenario(root: Path) -> tuple[dict[str, str], dict[str, object]]:
    """The same ACL changes on ``root``: what uid 65534 may open, and the modes and ACLs."""
    deny = root / "deny"
    deny.write_bytes(b"secret")
    os.chmod(deny, 0o644)
    # a deny entry for one user: everyone else may read, that user may not
    os.setxattr(deny, ACL_ACCESS, acl((A_USER_OBJ, 6, NO_ID), (A_USER, 0, NOBODY), (A_GROUP_OBJ, 4, NO_ID),
                                      (A_MASK, 4, NO_ID), (A_OTHER, 4, NO_ID)))
    grant = root / "grant"
    grant.write_bytes(b"shared")
    os.chmod(grant, 0o600)
    os.setxattr(grant, ACL_ACCESS, acl((A_USER_OBJ, 6, NO_ID), (A_USER, 6, NOBODY), (A_GROUP_OBJ, 0, NO_ID),
                                       (A_MASK, 6, NO_ID), (A_OTHER, 0, NO_ID)))
    masked = root / "masked"
    masked.write_bytes(b"x")
    os.setxattr(masked, ACL_ACCESS, acl((A_USER_OBJ, 6, NO_ID), (A_USER, 6, NOBODY), (A_GROUP_OBJ, 0, NO_ID),
                                        (A_MASK, 6, NO_ID), (A_OTHER, 0, NO_ID)))
    os.chmod(masked, 0o600)   # chmod sets the mask to the group bits: the grant is masked out
    shared = root / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    os.setxattr(shared, ACL_DEFAULT, acl((A_USER_OBJ, 7, NO_ID), (A_USER, 7, NOBODY), (A_GROUP_OBJ, 5, NO_ID),
                                         (A_MASK, 7, NO_ID), (A_OTHER, 0, NO_ID)))
    os.setxattr(shared, ACL_ACCESS, acl((A_USER_OBJ, 7, NO_ID), (A_USER, 7, NOBODY), (A_GROUP_OBJ, 5, NO_ID),
                                        (A_MASK, 7, NO_ID), (A_OTHER, 0, NO_ID)))
    inherited = shared / "inherited"
    fd = os.open(inherited, os.O_WRONLY | os.O_CREAT, 0o640)
    os.close(fd)
    sub = shared / "sub"
    sub.mkdir(0o750)
    access = as_nobody(root, [("deny", "r"), ("deny", "w"), ("grant", "r"), ("grant", "w"),
                              ("masked", "r"), ("shared/inherited", "w"), ("shared/new", "c"),
                              ("shared/sub/new", "c")])
    facts: dict[str, object] = {}
    for p in (deny, grant, masked, shared, inherited, sub, shared / "new"):
        try:
            facts[p.name + ":mode"] = oct(stat.S_IMODE(os.stat(p).st_mode))
        except FileNotFoundError:
            facts[p.name + ":mode"] = "ENOENT"
            continue
        for name in (ACL_ACCESS, ACL_DEFAULT):
            try:
                facts[f"{p.name}:{name}"] = os.getxattr(p, name).hex()
            except OSError as exc:
                facts[f"{p.name}:{name}"] = errno.errorcode[exc.errno or 0]
    return access, facts


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_posix_acls_are_enforced_like_ext4(casenv: CasEnv, tmp_path: Path) -> None:
    casenv.init("vol")
    mp = casenv.mount("vol", None, "--allow-other")   # other users may use the mount at all
    os.chmod(mp, 0o755)
    got, got_facts = acl_scenario(mp)
    assert got == {"deny:r": "EACCES", "deny:w": "EACCES", "grant:r": "ok", "grant:w": "ok",
                   "masked:r": "EACCES", "shared/inherited:w": "EACCES", "shared/new:c": "ok",
                   "shared/sub/new:c": "EACCES"}, got   # sub's mask is its mode's r-x
    # side by side with the local filesystem (ext4/tmpfs with ACLs): same access, modes, ACLs
    ref = tmp_path / "ref"
    ref.mkdir()
    os.chmod(ref, 0o755)
    want, want_facts = acl_scenario(ref)
    assert got == want
    assert got_facts == want_facts


# -- 5. xattrs and file sizes cannot grow the daemon without bound --------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_xattr_space_per_inode_is_bounded(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.mount("vol")
    f = mp / "f"
    f.write_bytes(b"x")
    os.setxattr(f, "user.a", b"a" * 60000)
    os.setxattr(f, "user.b", b"b" * 60000)
    with pytest.raises(OSError) as ei:          # 120,000 + 12,000 bytes > 128 KiB
        os.setxattr(f, "user.c", b"c" * 12000)
    assert ei.value.errno == errno.ENOSPC
    assert sorted(os.listxattr(f)) == ["user.a", "user.b"]
    os.setxattr(f, "user.a", b"a" * 48000)      # replacing a value counts the new one only
    os.setxattr(f, "user.c", b"c" * 12000)
    assert os.getxattr(f, "user.c") == b"c" * 12000
    # a bare namespace prefix names nothing (ext4: EINVAL)
    for name in ("user.", "trusted.", "security."):
        with pytest.raises(OSError) as ei:
            os.setxattr(f, name, b"v")
        assert ei.value.errno == errno.EINVAL, name
    with pytest.raises(OSError) as ei:
        os.getxattr(f, "user.")
    assert ei.value.errno == errno.EINVAL
    casenv.umount(mp)
    mp = casenv.mount("vol")
    assert os.getxattr(mp / "f", "user.a") == b"a" * 48000
    assert "user." not in os.listxattr(mp / "f")


def test_xattrs_do_not_grow_the_daemon(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.mount("vol")
    pid = casenv.daemon_pid(mp)
    d = mp / "d"
    d.mkdir()
    value = os.urandom(60000)
    for i in range(8):              # warm up: code paths, database connection buffers
        (d / f"w{i}").write_bytes(b"")
        os.setxattr(d / f"w{i}", "user.v", value)
        os.getxattr(d / f"w{i}", "user.v")
    before = rss_kib(pid)
    n = 1200                        # 1200 files x 120,000 bytes of values = 137 MiB
    for i in range(n):
        p = d / f"f{i}"
        p.write_bytes(b"")
        os.setxattr(p, "user.a", value)
        os.setxattr(p, "user.b", value)
    for i in range(n):              # read back: every inode's xattrs pass through the cache
        assert os.getxattr(d / f"f{i}", "user.b") == value
    grown_mib = (rss_kib(pid) - before) / 1024
    # the cache holds at most 16 MiB; without a bound it would hold all 137 MiB
    assert grown_mib < 64, f"daemon RSS grew by {grown_mib:.0f} MiB"


def test_trusted_xattrs_hidden_from_other_users(casenv: CasEnv) -> None:
    casenv.init("vol")
    mp = casenv.mount("vol", None, "--allow-other")
    f = mp / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o644)
    os.setxattr(f, "user.visible", b"1")
    os.setxattr(f, "trusted.hidden", b"2")
    assert sorted(os.listxattr(f)) == ["trusted.hidden", "user.visible"]   # root sees both
    fd = os.open(f, os.O_RDONLY)
    try:
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", "import os, sys; print(sorted(os.listxattr(int(sys.argv[1]))))",
                            str(fd)], pass_fds=(fd,), capture_output=True, text=True, timeout=60, check=True)
    finally:
        os.close(fd)
    assert r.stdout.strip() == "['user.visible']"


def test_maximum_file_size(casenv: CasEnv) -> None:
    from cas.engine.fs import MAX_FILE_SIZE
    casenv.init("vol")
    mp = casenv.mount("vol")
    f = mp / "big"
    f.write_bytes(b"head")
    with pytest.raises(OSError) as ei:
        os.truncate(f, MAX_FILE_SIZE + 1)
    assert ei.value.errno == errno.EFBIG
    assert os.stat(f).st_size == 4
    os.truncate(f, MAX_FILE_SIZE)
    assert os.stat(f).st_size == MAX_FILE_SIZE
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"tail", MAX_FILE_SIZE)
        assert ei.value.errno == errno.EFBIG
        assert os.pwrite(fd, b"tail", MAX_FILE_SIZE - 2) == 2   # a write stops at the maximum
        assert os.pread(fd, 8, MAX_FILE_SIZE - 4) == b"\0\0ta"
        assert os.pread(fd, 4, 0) == b"head"
    finally:
        os.close(fd)
    casenv.umount(mp)
    mp = casenv.mount("vol")
    assert os.stat(mp / "big").st_size == MAX_FILE_SIZE
