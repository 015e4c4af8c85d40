"""Tests of the null pyfuse3 filesystem (tools/bench/nullfs.py) and of tools/bench/__init__.py.

The null fs is mounted for real (needs /dev/fuse and fusermount3); the tests are
marked ``mount`` and skipped where FUSE is unavailable.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import CasEnv
from tools.bench import child_env, is_fuse_mounted, mounted_fstype, wait_mounted

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]


@pytest.fixture
def nullfs(tmp_path: Path) -> Iterator[Path]:
    """A mounted null fs; unmounted with fusermount3 -u, and the process waited for."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    log = open(tmp_path / "nullfs.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tools.bench.nullfs", str(mp)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=child_env(), cwd=REPO_ROOT, start_new_session=True)
    try:
        wait_mounted(mp, proc, timeout=20)
        yield mp
    finally:
        try:
            if is_fuse_mounted(mp):
                subprocess.run(["fusermount3", "-u", str(mp)], check=False, timeout=30)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.terminate()  # our own child, by PID
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if is_fuse_mounted(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False, timeout=30)
        finally:
            log.close()
    assert proc.returncode == 0, (tmp_path / "nullfs.log").read_text(errors="replace")


def test_mount_options(nullfs: Path) -> None:
    assert mounted_fstype(nullfs) == "fuse.nullfs"
    with open("/proc/self/mounts") as f:
        line = next(ln for ln in f if ln.split()[1] == str(nullfs))
    assert line.split()[0] == "nullfs"
    assert "default_permissions" in line.split()[3]
    st = os.statvfs(nullfs)
    assert st.f_namemax == 255 and st.f_blocks > 0


def test_files_sizes_and_zeros(nullfs: Path) -> None:
    f = nullfs / "a"
    f.write_bytes(b"hello world")
    assert f.stat().st_size == 11
    assert stat.S_ISREG(f.stat().st_mode)
    assert f.read_bytes() == bytes(11)  # data is discarded, zeros come back

    # A write far beyond the end extends the size; everything reads as zeros.
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 1000, 3 << 20)
        os.fsync(fd)
    finally:
        os.close(fd)
    size = (3 << 20) + 1000
    assert f.stat().st_size == size
    data = f.read_bytes()
    assert len(data) == size and data.count(0) == size
    with open(f, "rb") as fh:
        fh.seek(size - 10)
        assert fh.read(100) == bytes(10)  # short read at EOF

    # setattr: size, mode, times
    os.truncate(f, 10)
    assert f.stat().st_size == 10
    os.chmod(f, 0o600)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)

    # O_TRUNC on open
    with open(f, "wb") as fh:
        fh.write(b"abc")
    assert f.stat().st_size == 3

    # unlink: gone (ENOENT), but an open descriptor keeps working
    fd = os.open(f, os.O_RDWR)
    try:
        f.unlink()
        with pytest.raises(FileNotFoundError):
            os.stat(f)
        assert os.fstat(fd).st_size == 3
        os.write(fd, b"12345")
        assert os.pread(fd, 100, 0) == bytes(5)
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        f.read_bytes()
    assert os.listdir(nullfs) == []


def test_directories(nullfs: Path) -> None:
    d = nullfs / "d"
    d.mkdir()
    assert stat.S_ISDIR(d.stat().st_mode)
    assert os.stat(nullfs).st_nlink == 3
    names = [f"file{i:04d}" for i in range(300)]
    for n in names:
        (d / n).write_bytes(b"z" * 4096)
    listed = os.listdir(d)
    assert sorted(listed) == names  # every entry exactly once
    assert all(e.stat().st_size == 4096 for e in os.scandir(d))

    # remove entries while listing: nothing is skipped or repeated
    seen = []
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i == 10:
                for n in names[200:]:
                    (d / n).unlink()
    assert len(seen) == len(set(seen))
    assert set(names[:200]) <= set(seen)

    with pytest.raises(OSError) as exc:
        d.rmdir()
    assert exc.value.errno == errno.ENOTEMPTY

    (d / names[0]).rename(nullfs / "moved")
    assert (nullfs / "moved").stat().st_size == 4096
    assert not (d / names[0]).exists()

    sub = d / "sub"
    sub.mkdir()
    (sub / "x").touch()
    with pytest.raises(OSError) as exc:
        os.rename(d, sub / "loop")
    assert exc.value.errno == errno.EINVAL

    shutil.rmtree(d)
    with pytest.raises(FileNotFoundError):
        os.stat(d)
    assert sorted(os.listdir(nullfs)) == ["moved"]
    assert os.stat(nullfs).st_nlink == 2

    os.symlink("moved", nullfs / "link")
    assert os.readlink(nullfs / "link") == "moved"
    assert (nullfs / "link").stat().st_size == 4096  # followed


def _table_rows(text: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| workload"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def make_small_tree(root: Path) -> int:
    """A tiny tree for the small-file rows: files in two levels and a symlink; returns
    the number of files and symlinks."""
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        (root / ("sub" if i % 2 else ".") / f"f{i}").write_bytes(os.urandom(100 * i + 1))
    os.symlink("f0", root / "link")
    return 13


def latency_rows(size_mib: int) -> list[str]:
    return [f"{op}, {phase}, {q} (ms, lower is better)"
            for phase in ("idle", f"during a {size_mib} MiB streaming write")
            for op in ("stat of a cached file", "open + read 4 KiB + close, cached file",
                       "create + close of a new file")
            for q in ("p50", "p99")]


def small_file_rows(n: int) -> list[str]:
    return [f"ls -lR of the --tree tree ({n} files), cold (entries/s)",
            f"read every file of the --tree tree ({n} files), cold (files/s)",
            f"tar -xf of the --tree tree ({n} files) (files/s)",
            "git clone of a local bare repository (files checked out/s)"]


def test_bench_native_and_null(tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    tree_files = make_small_tree(tmp_path / "tree")
    r = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--size-mib", "8", "--files", "200",
         "--latency-samples", "30", "--small-files", "--tree", str(tmp_path / "tree"),
         "--only", "native,null", "--out", str(out), "--workdir", str(tmp_path), "--quiet"],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    report = r.stdout
    assert out.read_text() == report
    assert "nproc=" in report and "memory=" in report and "date:" in report
    assert "casfs: skipped" in report

    header = next(ln for ln in report.splitlines() if ln.startswith("| workload"))
    assert [c.strip() for c in header.strip().strip("|").split("|")] == [
        "workload", "native", "null pyfuse3", "casfs", "casfs/null", "casfs/native"]

    rows = _table_rows(report)
    expected = [
        "seq write 8 MiB, new data (MiB/s)",
        "seq write 8 MiB, same data again (MiB/s)",
        "seq read 8 MiB, cold (MiB/s)",
        "seq read 8 MiB, warm (MiB/s)",
        "create 200 x 4 KiB files + fsync dir (files/s)",
        "scandir + lstat 200 entries, warm (entries/s)",
        "ls -l 200 entries (entries/s)",
        "rename 200 files + fsync dir (files/s)",
        "unlink 200 files + fsync dir (files/s)",
    ]
    # casfs-only rows (its --durability immediate mount) are empty when casfs is skipped
    immediate = [
        "create 200 x 4 KiB files + fsync dir, --durability immediate (files/s)",
        "rename 200 files + fsync dir, --durability immediate (files/s)",
        "unlink 200 files + fsync dir, --durability immediate (files/s)",
    ]
    audit = [  # casfs-only too: creation with its audit log off and on
        "create 200 x 4 KiB files + fsync dir, --audit off (files/s)",
        "create 200 x 4 KiB files + fsync dir, --audit changes (files/s)",
    ]
    small = small_file_rows(tree_files)
    assert list(rows) == expected + immediate + audit + latency_rows(8) + small
    assert "latency: 30 samples per operation" in report
    for label, cells in rows.items():
        native, null, casfs, r_null, r_native = cells
        if label in immediate + audit:
            assert native == null == casfs == r_null == r_native == "-", label
            continue
        if label.startswith("git clone"):   # the null fs reads back zeros: no git there
            assert float(native.replace(",", "")) > 0 and null == casfs == "-", label
            continue
        assert float(native.replace(",", "")) > 0, label
        assert float(null.replace(",", "")) > 0, label
        assert casfs == r_null == r_native == "-", label

    # Everything cleaned up: no mount left, scratch directory removed.
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert not list(tmp_path.glob("casfs-bench-*"))


def test_bench_casfs_latency_and_small_file_rows(tmp_path: Path, casenv: CasEnv) -> None:
    """The casfs column of the latency and small-file rows at a tiny size (its cold
    remounts, the background writer on a mount, git clone into casfs), so they cannot rot."""
    tree_files = make_small_tree(tmp_path / "tree")
    r = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--size-mib", "4", "--files", "50",
         "--latency-samples", "20", "--small-files", "--tree", str(tmp_path / "tree"),
         "--only", "casfs", "--workdir", str(tmp_path), "--quiet",
         "--casfs-init-arg=--meta", f"--casfs-init-arg={casenv.meta_url(f'bench{os.getpid()}')}"],
        cwd=REPO_ROOT, env=casenv.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _table_rows(r.stdout)
    for label in latency_rows(4) + small_file_rows(tree_files):
        native, null, casfs, r_null, r_native = rows[label]
        assert native == null == "-" and float(casfs.replace(",", "")) > 0, label
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert not list(tmp_path.glob("casfs-bench-*"))
