"""What casfs lets the kernel cache never shows stale data, and is actually kept.

casfs opens unchanged files with ``keep_cache`` (their pages survive a reopen), gives
entries, attributes and negative entries (names looked up and not found) long timeouts,
and keeps recently listed directories in the FUSE layer (fusefront/kernelcache.py). These tests change files and directories through
every path a mount offers (write through another handle, close and reopen, truncate
down and up, O_TRUNC, mmap, O_DIRECT) and check that cached reads, O_DIRECT reads
(straight from the daemon), sizes and listings all show the new state. Two tests look
into the page cache itself with mincore(2): an unchanged file keeps its pages across a
reopen; a file changed since its last open is opened without them. The last two check
that a POSIX access ACL written as an xattr (which is how cp -a, tar and rsync set modes)
sets the mode the kernel reports at once.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                       reason="needs /dev/fuse and fusermount3"),
]

CS = 64 * 1024          # chunk size of the volumes under test
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def pattern(tag: bytes, n: int) -> bytes:
    """``n`` bytes that differ from any other tag's at every 8-byte word."""
    word = (tag * 8)[:6]
    return b"".join(word + i.to_bytes(2, "big") for i in range(n // 8 + 1))[:n]


def write_file(path: Path, data: bytes, offset: int = 0, flags: int = os.O_WRONLY | os.O_CREAT) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def read_cached(path: Path) -> bytes:
    """The whole file through an ordinary open (served from the page cache if kept)."""
    with open(path, "rb", buffering=0) as f:
        return f.read()


def read_direct(path: Path) -> bytes:
    """The whole file with O_DIRECT: the daemon's bytes, bypassing the page cache."""
    size = os.stat(path).st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = max(PAGE, -(-(size + 1) // PAGE) * PAGE)
        buf = mmap.mmap(-1, n)
        try:
            got = 0
            while got < n:
                r = os.preadv(fd, [memoryview(buf)[got:]], got)
                if r <= 0:
                    break
                got += r
            return bytes(buf[:got])
        finally:
            buf.close()
    finally:
        os.close(fd)


def assert_content(path: Path, want: bytes) -> None:
    assert os.stat(path).st_size == len(want)
    got = read_cached(path)
    assert got == want, f"cached read differs at {first_difference(got, want)}"
    got = read_direct(path)
    assert got == want, f"O_DIRECT read differs at {first_difference(got, want)}"


def first_difference(a: bytes, b: bytes) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"offset {i} (lengths {len(a)} and {len(b)})"


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages of the file). Opens ``path``: that
    open is the one whose keep_cache decision this observes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            n = -(-size // PAGE)
            vec = ctypes.create_string_buffer(n)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec.raw[:n]), n
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.fixture
def mp(mounted: Callable[..., Path]) -> Path:
    return mounted(chunk_size="64KiB")


# -- contents ---------------------------------------------------------------------------

def test_reopen_after_write_sees_new_content(mp: Path) -> None:
    f = mp / "f"
    want = pattern(b"old", 3 * CS + 100)
    write_file(f, want)
    assert_content(f, want)                      # now in the page cache
    new = pattern(b"NEW", len(want))             # same size: only the bytes tell
    write_file(f, new, flags=os.O_WRONLY)
    assert_content(f, new)
    patch = pattern(b"patch", 5000)              # unaligned, across a chunk boundary
    write_file(f, patch, CS - 1234, os.O_WRONLY)
    want = new[:CS - 1234] + patch + new[CS - 1234 + len(patch):]
    assert_content(f, want)
    tail = pattern(b"tail", 777)                 # past the end: grows the file
    write_file(f, tail, len(want) + 10, os.O_WRONLY)
    want = want + bytes(10) + tail
    assert_content(f, want)


def test_reader_handle_sees_writes_through_another_handle(mp: Path) -> None:
    f = mp / "f"
    old = pattern(b"old", 2 * CS + 5)
    write_file(f, old)
    r = os.open(f, os.O_RDONLY)
    w = os.open(f, os.O_WRONLY)
    try:
        assert os.pread(r, len(old) + 1, 0) == old   # the reader's pages are cached
        os.pwrite(w, b"X" * 3000, 100)
        os.pwrite(w, b"Y" * 10, len(old) + 100)      # grows the file
        want = old[:100] + b"X" * 3000 + old[3100:] + bytes(100) + b"Y" * 10
        assert os.fstat(r).st_size == len(want)
        assert os.pread(r, len(want) + 1, 0) == want
        assert_content(f, want)                      # and a third open, while w is open
    finally:
        os.close(w)
        os.close(r)
    assert_content(f, want)


def test_truncate_down_and_up_reads_zeros(mp: Path) -> None:
    f = mp / "f"
    old = pattern(b"T", 3 * CS + 1234)
    write_file(f, old)
    assert_content(f, old)
    os.truncate(f, CS + 500)
    assert_content(f, old[:CS + 500])
    os.truncate(f, len(old))                     # the cut bytes must not come back
    assert_content(f, old[:CS + 500] + bytes(len(old) - CS - 500))
    # the same through handles, with a reader holding the file open throughout
    write_file(f, old)
    r = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(r, len(old), 0) == old
        w = os.open(f, os.O_WRONLY)
        try:
            os.ftruncate(w, 100)
            assert os.pread(r, len(old), 0) == old[:100]
            os.ftruncate(w, 2 * CS)
        finally:
            os.close(w)
        assert os.pread(r, len(old), 0) == old[:100] + bytes(2 * CS - 100)
    finally:
        os.close(r)
    assert_content(f, old[:100] + bytes(2 * CS - 100))


def test_open_with_o_trunc_drops_the_old_content(mp: Path) -> None:
    f = mp / "f"
    old = pattern(b"long", 2 * CS + 99)
    write_file(f, old)
    assert_content(f, old)
    r = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(r, len(old), 0) == old
        short = pattern(b"short", 1000)
        write_file(f, short, flags=os.O_WRONLY | os.O_TRUNC)
        assert os.fstat(r).st_size == len(short)
        assert os.pread(r, len(old), 0) == short
    finally:
        os.close(r)
    assert_content(f, short)
    os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
    assert_content(f, b"")


def test_mmap_and_o_direct_writers(mp: Path) -> None:
    f = mp / "f"
    old = pattern(b"base", 4 * PAGE * 16)
    write_file(f, old)
    assert_content(f, old)
    fd = os.open(f, os.O_RDWR)
    try:
        with mmap.mmap(fd, len(old)) as m:
            m[PAGE - 3:PAGE + 3] = b"mmap!!"
            m.flush()
    finally:
        os.close(fd)
    want = old[:PAGE - 3] + b"mmap!!" + old[PAGE + 3:]
    assert_content(f, want)
    r = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(r, len(want), 0) == want         # cached again
        fd = os.open(f, os.O_WRONLY | os.O_DIRECT)
        try:
            block = mmap.mmap(-1, PAGE)
            block.write(pattern(b"direct", PAGE))
            assert os.pwritev(fd, [block], 2 * PAGE) == PAGE
            block.close()
        finally:
            os.close(fd)
        want = want[:2 * PAGE] + pattern(b"direct", PAGE) + want[3 * PAGE:]
        assert os.pread(r, len(want), 0) == want
    finally:
        os.close(r)
    assert_content(f, want)


# -- the page cache itself ----------------------------------------------------------------

def test_unchanged_file_keeps_its_pages_across_opens(mp: Path) -> None:
    f = mp / "f"
    data = pattern(b"keep", 2 * CS + 3 * PAGE)
    write_file(f, data)
    assert read_cached(f) == data
    assert read_cached(f) == data                # an open of an unchanged file
    cached, pages = resident_pages(f)
    assert cached == pages, f"only {cached} of {pages} pages kept across an open"


def test_file_changed_since_its_last_open_is_opened_without_its_pages(mp: Path) -> None:
    f = mp / "f"
    data = pattern(b"drop", 2 * CS + 3 * PAGE)
    write_file(f, data)
    assert read_cached(f) == data
    # a truncation to the same size changes nothing the kernel would notice by itself
    os.truncate(f, len(data))
    cached, pages = resident_pages(f)
    assert cached == 0, f"{cached} of {pages} pages kept after a truncate"
    assert_content(f, data)
    # written through one handle while another was open: the next open starts afresh
    assert read_cached(f) == data
    keep_open = os.open(f, os.O_RDONLY)
    try:
        write_file(f, b"w", 5, os.O_WRONLY)
        w = os.open(f, os.O_WRONLY)
        try:
            os.pwrite(w, b"v", 6)
            cached, pages = resident_pages(f)
        finally:
            os.close(w)
    finally:
        os.close(keep_open)
    assert cached == 0, f"{cached} of {pages} pages kept after a write during an open"
    assert_content(f, data[:5] + b"wv" + data[7:])


# -- directories --------------------------------------------------------------------------

def listing(d: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (inode, file type, size) as readdir(plus) and lstat report them."""
    out = {}
    with os.scandir(d) as it:
        for e in it:
            s = e.stat(follow_symlinks=False)
            assert e.inode() == s.st_ino == os.lstat(d / e.name).st_ino, e.name
            out[e.name] = (s.st_ino, stat.S_IFMT(s.st_mode), s.st_size)
    return out


def test_listings_and_entries_follow_every_change(mp: Path) -> None:
    d = mp / "d"
    d.mkdir()
    other = mp / "other"
    other.mkdir()
    names = [f"file{i:04d}" for i in range(1000)]   # several READDIRPLUS replies
    for n in names:
        (d / n).write_bytes(n.encode())
    expected = set(names)

    def check() -> dict[str, tuple[int, int, int]]:
        first = listing(d)
        assert set(first) == expected
        assert listing(d) == first                   # again, from what was kept
        return first

    check()
    assert not (d / "new").exists()                  # the kernel may keep this negative entry
    (d / "new").write_bytes(b"x")
    expected.add("new")
    assert (d / "new").read_bytes() == b"x"
    check()
    os.unlink(d / "file0500")
    expected.discard("file0500")
    check()
    assert not (d / "renamed").exists()
    os.rename(d / "file0001", d / "renamed")
    expected.discard("file0001")
    expected.add("renamed")
    check()
    (other / "moved-in").write_bytes(b"in")
    os.rename(other / "moved-in", d / "moved-in")
    expected.add("moved-in")
    check()
    os.rename(d / "file0002", other / "moved-out")
    expected.discard("file0002")
    check()
    assert os.listdir(other) == ["moved-out"]
    before = check()["file0003"]
    (other / "replacement").write_bytes(b"replacement!")
    os.rename(other / "replacement", d / "file0003")    # replaces: another inode
    after = check()["file0003"]
    assert after[0] != before[0] and after[2] == len(b"replacement!")
    for name in ("hardlink", "symlink", "subdir", "fifo"):
        assert not (d / name).exists()
    os.link(d / "file0004", d / "hardlink")
    os.symlink("file0005", d / "symlink")
    os.mkdir(d / "subdir")
    os.mkfifo(d / "fifo")
    expected |= {"hardlink", "symlink", "subdir", "fifo"}
    got = check()
    assert got["hardlink"][0] == got["file0004"][0]
    assert got["symlink"][1] == stat.S_IFLNK and got["subdir"][1] == stat.S_IFDIR
    assert got["fifo"][1] == stat.S_IFIFO
    os.rmdir(d / "subdir")
    os.unlink(d / "fifo")
    expected -= {"subdir", "fifo"}
    check()
    # sizes in a listing are current even while the file is open and being written
    fd = os.open(d / "file0006", os.O_WRONLY)
    try:
        os.pwrite(fd, b"z" * 5000, 0)
        assert check()["file0006"][2] == 5000
    finally:
        os.close(fd)
    assert check()["file0006"][2] == 5000


# -- access ACLs set the mode ------------------------------------------------------------

ACL_ACCESS = "system.posix_acl_access"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in the kernel's xattr form: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_access_acl_sets_the_mode(mp: Path) -> None:
    f = mp / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    os.stat(f)                                   # the kernel holds mode 0600 now
    # an ACL that says no more than a mode: the mode changes, nothing is stored (ext4 does so)
    os.setxattr(f, ACL_ACCESS, acl((USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
    with pytest.raises(OSError) as exc:
        os.getxattr(f, ACL_ACCESS)
    assert exc.value.errno == errno.ENODATA
    # an extended ACL is kept; the group bits show its mask
    extended = acl((USER_OBJ, 7, NO_ID), (USER, 4, 1234), (GROUP_OBJ, 4, NO_ID), (MASK, 6, NO_ID),
                   (OTHER, 0, NO_ID))
    os.setxattr(f, ACL_ACCESS, extended)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o760
    assert os.getxattr(f, ACL_ACCESS) == extended
    os.setxattr(f, ACL_ACCESS, acl((USER_OBJ, 5, NO_ID), (GROUP_OBJ, 0, NO_ID), (OTHER, 1, NO_ID)))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o501
    with pytest.raises(OSError) as exc:
        os.getxattr(f, ACL_ACCESS)
    assert exc.value.errno == errno.ENODATA
    # permission checks use the new mode at once, not the kernel's cached one (which it
    # re-reads by itself only when a check fails)
    os.chmod(f, 0o755)
    assert os.access(f, os.X_OK)
    os.setxattr(f, ACL_ACCESS, acl((USER_OBJ, 6, NO_ID), (GROUP_OBJ, 4, NO_ID), (OTHER, 4, NO_ID)))
    assert not os.access(f, os.X_OK)


@pytest.mark.skipif(shutil.which("cp") is None, reason="needs cp")
def test_cp_a_keeps_modes(mp: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for mode in (0o644, 0o755, 0o600, 0o777, 0o751, 0o4755):
        p = src / f"m{mode:o}"
        p.write_bytes(b"data")
        os.chmod(p, mode)
    subprocess.run(["cp", "-a", str(src), str(mp / "dst")], check=True, capture_output=True)
    for p in src.iterdir():
        assert stat.S_IMODE(os.stat(mp / "dst" / p.name).st_mode) == stat.S_IMODE(os.stat(p).st_mode), p.name
