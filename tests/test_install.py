"""casfs installed from a wheel, and mounted the way Linux mounts things (docs/install.md,
docs/mounting.md).

The wheel is built from a copy of the repository with pip (PEP 517, build isolation),
installed into a fresh venv that holds nothing but the wheel; the venv sees the
dependencies through a directory of links to this environment's installed packages
(casfs itself left out), so the test runs offline and quickly while every casfs file it
uses comes from the wheel. All commands then run the venv's console scripts, from a
directory outside the repository and without PYTHONPATH.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cas.db.server import pid_running
from fusefront.mountpoint import find_mount
from tests.conftest import ROOT, CasEnv
from tests.waiting import wait_exit, wait_for

pytestmark = pytest.mark.mount
CASFS_PARTS = {"cas", "fusefront", "tools", "tests"}


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with casfs installed from a wheel built from this repository; returns
    its bin directory."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache",
        ".hypothesis"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), str(src)], cwd=base)
    wheel = next((base / "dist").glob("casfs-*.whl"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    # the dependencies: links to this environment's packages, casfs's own files left out
    deps = base / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name
        if name in CASFS_PARTS or name.startswith(("__editable__", "casfs-", "_casfs")) or name.endswith(".pth"):
            continue
        (deps / name).symlink_to(entry)
    venv_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=base).stdout.strip())
    (venv_site / "casfs-deps.pth").write_text(str(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--no-deps", str(wheel)],
         cwd=base)
    _run([sys.executable, "-m", "pip", "--python", str(py), "check"], cwd=base)  # dependencies all there
    return venv / "bin"


def _env(casenv: CasEnv, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in casenv.env.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_wheel_installs_inits_and_mounts(casenv: CasEnv, wheel_venv: Path) -> None:
    """`pip install` of the wheel (not editable) gives a casfs that inits, mounts, writes,
    reads back and unmounts: the schema and every other file it reads ship inside the
    package (FileNotFoundError for site-packages/schema.sql before)."""
    env = _env(casenv)
    cwd = wheel_venv.parent  # not the repository
    r = _run([str(wheel_venv / "python"), "-c",
              "import importlib.util as u, cas.db.database, tools.cli; "
              "print(cas.db.database.__file__); print(cas.db.database.SCHEMA_FILE.read_text()[:2]); "
              "print([m for m in ('tools.bench', 'tools.drivesim') if u.find_spec(m)])"], cwd=cwd, env=env)
    where, head, left_out = r.stdout.split("\n")[:3]
    assert where.startswith(str(wheel_venv.parent)), where  # the wheel's code, not the repository's
    assert head == "--" and left_out == "[]"  # benchmarks and drivesim stay out of the wheel
    casfs = str(wheel_venv / "casfs")
    _run([casfs, "init", "--meta", casenv.meta_url(f"whl{os.getpid()}"), "wv"], cwd=cwd, env=env)
    mp = casenv.tmp / "mnt-wheel"
    mp.mkdir()
    casenv.mounts.append(mp)
    _run([casfs, "mount", str(mp), "wv"], cwd=cwd, env=env)
    data = os.urandom(3 << 20) + bytes(1 << 20)
    (mp / "f").write_bytes(data)
    (mp / "d").mkdir()
    os.symlink("../f", mp / "d" / "link")
    _run([casfs, "umount", str(mp)], cwd=cwd, env=env)
    assert find_mount(mp) is None
    _run([casfs, "mount", str(mp), "wv"], cwd=cwd, env=env)
    assert (mp / "f").read_bytes() == data
    assert (mp / "d" / "link").read_bytes() == data
    out = _run([casfs, "stats", "--json", "wv"], cwd=cwd, env=env).stdout
    assert json.loads(out)
    _run([casfs, "umount", str(mp)], cwd=cwd, env=env)


def test_mount8_fstab_style_and_plain_umount(casenv: CasEnv, wheel_venv: Path) -> None:
    """mount(8) mounts a volume through fuse3's mount.fuse3 (``casfs VOLUME MOUNTPOINT -o
    OPTS``), with mount options translated (kernel flags to the mount, fstab-only ones
    ignored, casfs ones to `casfs mount`) and returns once mounted; a plain umount(8),
    followed at once by SIGTERM to the daemon (what a service manager may do), commits
    everything before the daemon exits 0, and an immediate remount waits for it; the
    umount.fuse.casfs and mount.fuse.casfs helpers work as umount(8)/mount(8) call them.

    mount(8) clears PATH before running helpers, so `-t fuse.casfs` needs casfs in
    /usr/local/bin (docs/mounting.md); the test names the program in the source
    (`-t fuse 'PATH/casfs#VOLUME'`), which mount.fuse3 runs with the same arguments.
    """
    casenv.init("fv")
    vol = casenv.data_home / "fv"
    # nothing is committed until exit: the unmount has all of it to commit
    env = _env(casenv, CASFS_WRITEBACK_INTERVAL_S="3600")
    mp = casenv.tmp / "mnt-fstab"
    mp.mkdir()
    casenv.mounts.append(mp)
    source = f"{wheel_venv / 'casfs'}#{vol}"

    def mount8(*opts: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["mount", "-t", "fuse", "-o", ",".join(opts), source, str(mp)],
                              capture_output=True, text=True, env=env, cwd=casenv.tmp, timeout=600)

    bad = mount8("rw", "bogus_option=1")
    assert bad.returncode != 0 and "unknown mount option 'bogus_option=1'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 2, bad.stderr  # usage line + one-line error
    assert find_mount(mp) is None

    r = mount8("rw", "nosuid", "nodev", "noatime", "relatime", "_netdev", "nofail", "x-systemd.automount",
               "durability=group", "cache_size=64MiB")
    assert r.returncode == 0, r.stderr
    m = find_mount(mp)
    assert m is not None and m.fstype == "fuse.casfs"
    flags = next(line.split()[3] for line in open("/proc/self/mounts") if line.split()[1] == str(mp))
    assert {"nosuid", "nodev", "noatime"} <= set(flags.split(",")), flags
    pid = casenv.daemon_pid(mp)
    files = {f"f{i}": os.urandom(4 << 20) for i in range(6)}
    for name, data in files.items():
        (mp / name).write_bytes(data)
    u = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=600)
    assert u.returncode == 0, u.stderr
    os.kill(pid, signal.SIGTERM)  # while it commits what it holds
    r = mount8("rw")  # at once: waits for the old daemon to finish
    assert r.returncode == 0, r.stderr
    wait_exit(pid)
    ended = json.loads((vol / "run" / "exit.json").read_text())
    assert ended == {"pid": pid, "rescued": 0, "error": ""}, ended
    for name, data in files.items():
        assert _sha(mp / name) == hashlib.sha256(data).hexdigest(), name

    # umount(8)'s and mount(8)'s helpers, called as they call them
    pid = casenv.daemon_pid(mp)
    more = os.urandom(2 << 20)
    (mp / "g").write_bytes(more)
    _run([str(wheel_venv / "umount.fuse.casfs"), str(mp), "-t", "fuse.casfs"], env=env, cwd=casenv.tmp)
    assert find_mount(mp) is None and not pid_running(pid)  # casfs umount: returns after the exit
    _run([str(wheel_venv / "mount.fuse.casfs"), str(vol), str(mp), "-o", "rw,noexec,ro"], env=env, cwd=casenv.tmp)
    assert (mp / "g").read_bytes() == more
    assert _sha(mp / "f0") == hashlib.sha256(files["f0"]).hexdigest()
    with pytest.raises(OSError) as exc:
        (mp / "h").write_bytes(b"x")  # -o ro reached the kernel mount
    assert exc.value.errno == 30  # EROFS
    _run([str(wheel_venv / "umount.fuse.casfs"), str(mp)], env=env, cwd=casenv.tmp)
    wait_for(lambda: find_mount(mp) is None, "the unmount")


def test_mount_waits_for_the_volume_s_exiting_daemon(casenv: CasEnv) -> None:
    """A mount of a volume whose previous daemon still holds the mount lock but serves no
    mount any more (umount(8) returned while it commits before exiting) waits for it
    instead of failing with "already mounted"; held by a daemon that is still mounted,
    the mount fails at once (exit 1, one line)."""
    casenv.init("wv2")
    vol = casenv.data_home / "wv2"
    (vol / "run").mkdir(exist_ok=True)
    fd = os.open(vol / "run" / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    mp = casenv.tmp / "mnt-wait"
    mp.mkdir()
    casenv.mounts.append(mp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # an exiting daemon, as far as the mount can tell
        p = subprocess.Popen([sys.executable, "-m", "tools.cli", "mount", str(mp), "wv2"], cwd=ROOT,
                             env=casenv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = vol / "log" / "mount.log"
        wait_for(lambda: log.exists() and "waiting for its previous mount daemon" in log.read_text(),
                 "the mount to wait for the lock")
        assert p.poll() is None
    finally:
        os.close(fd)  # the old daemon exits
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert find_mount(mp) is not None
    other = casenv.tmp / "mnt-other"
    other.mkdir()
    r = casenv.run("mount", str(other), "wv2", check=False)
    assert r.returncode == 1 and r.stderr.strip() == "Error: volume wv2 is already mounted", r.stderr
