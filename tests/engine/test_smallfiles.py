"""Creates held in RAM and written together (docs/smallfiles.md), on a real MariaDB.

Round trips are counted by the server: the session status ``Questions`` of the engine's
own connection (every statement a client sends, COMMIT and SAVEPOINT included).
"""
from __future__ import annotations

import stat as S

import pytest

from cas.errors import Exists, MetaError, NotEmpty, NotFound
from cas.engine.fs import Filesystem
from tests.engine.test_fs import CS, GID, ROOT, UID, Engine, eng, make_file, read_name  # noqa: F401 - eng is the fixture

N = 500   # creates in each of two directories


def questions(fs: Filesystem) -> int:
    """Statements the server received on ``fs``'s connection so far (this one included)."""
    return int(fs.db.query("SHOW SESSION STATUS LIKE 'Questions'")[0][1])


def test_creates_cost_at_most_one_round_trip(eng: Engine) -> None:
    """1,000 creates inside a group, each after the negative lookup the kernel sends
    first, then the group commit: at most one MySQL round trip per create, everything
    lands whole (rows, parent nlink and times), fsck clean."""
    old = eng.fs.mkdir(ROOT, b"old", 0o755, UID, GID).ino
    eng.reopen()   # "old" is a directory this mount did not make
    fs = eng.fs
    new = fs.mkdir(ROOT, b"new", 0o755, UID, GID).ino
    fs.sync()
    before = questions(fs)
    made: dict[tuple[int, bytes], int] = {}
    for parent in (new, old):
        for i in range(N):
            name = f"f{i:04d}".encode()
            with pytest.raises(NotFound):
                fs.lookup(parent, name)
            a = fs.create(parent, name, 0o644, UID, GID)
            fs.release(a.ino)
            made[(parent, name)] = a.ino
        sub = fs.mkdir(parent, b"sub", 0o755, UID, GID)
        made[(parent, b"sub")] = sub.ino
        fs.symlink(sub.ino, b"link", b"../f0000", UID, GID)
    fs.sync()
    trips = questions(fs) - before - 1
    creates = 2 * (N + 2)
    print(f"{trips} round trips for {creates} creates (each after a negative lookup)")
    assert trips <= creates, f"{trips} MySQL round trips for {creates} creates"
    rows = {(int(p), bytes(n)): int(i) for p, n, i in eng.q(
        "SELECT parent, name, inode FROM dentries WHERE parent IN (%s, %s)", (new, old))}
    assert rows == made
    for parent in (new, old):
        nlink, mtime = eng.q("SELECT nlink, mtime_ns FROM inodes WHERE id = %s", (parent,))[0]
        assert int(nlink) == 3
        assert int(mtime) == fs.getattr(parent).mtime_ns
        link = eng.q("SELECT s.target FROM symlinks s JOIN dentries d ON d.inode = s.inode "
                     "WHERE d.parent = %s AND d.name = 'link'", (made[(parent, b"sub")],))
        assert [bytes(r[0]) for r in link] == [b"../f0000"]
    assert len(set(made.values())) == len(made)
    report = eng.fsck()
    assert report.clean, report


def test_held_creates_keep_posix_answers(eng: Engine) -> None:
    """EEXIST and ENOENT while creates are held (in a directory of this mount and in one
    it did not make), lookups and listings of held names, renames and unlinks of held
    files, and a failing operation undone alone amid held creates."""
    fs = eng.fs
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    a = fs.create(d, b"a", 0o644, UID, GID)
    assert fs.creates, "the create is held in RAM"
    with pytest.raises(Exists):
        fs.create(d, b"a", 0o644, UID, GID)
    with pytest.raises(Exists):
        fs.mkdir(d, b"a", 0o755, UID, GID)
    assert fs.lookup(d, b"a").ino == a.ino
    with pytest.raises(NotFound):
        fs.lookup(d, b"b")
    # the root was not made by this mount: a negative lookup, then a held create
    with pytest.raises(NotFound):
        fs.lookup(ROOT, b"r")
    r = fs.mknod(ROOT, b"r", S.S_IFREG | 0o600, 0, UID, GID)
    assert fs.lookup(ROOT, b"r").ino == r.ino
    with pytest.raises(Exists):
        fs.mknod(ROOT, b"r", S.S_IFREG | 0o600, 0, UID, GID)
    # a listing sees held names (they are written before its query)
    fs.create(d, b"c", 0o644, UID, GID)
    assert [n for n, _, _ in fs.readdir(d, 0)] == [b"a", b"c"]
    # rename and unlink of held names
    fs.create(d, b"e", 0o644, UID, GID)
    fs.rename(d, b"e", d, b"e2")
    with pytest.raises(NotFound):
        fs.lookup(d, b"e")
    assert fs.lookup(d, b"e2")
    fs.create(d, b"g", 0o644, UID, GID)
    fs.unlink(d, b"g")
    with pytest.raises(NotFound):
        fs.lookup(d, b"g")
    g2 = fs.create(d, b"g", 0o644, UID, GID)
    # a rename onto a non-empty held directory fails alone
    s1 = fs.mkdir(d, b"s1", 0o755, UID, GID).ino
    s2 = fs.mkdir(d, b"s2", 0o755, UID, GID).ino
    fs.create(s2, b"x", 0o644, UID, GID)
    with pytest.raises(NotEmpty):
        fs.rename(d, b"s1", d, b"s2")
    fs.create(s1, b"y", 0o644, UID, GID)
    # a hard link and a rename of one name onto another of the same inode (POSIX: nothing)
    fs.link(a.ino, ROOT, b"ha")
    fs.rename(ROOT, b"ha", d, b"a")
    assert fs.lookup(ROOT, b"ha").ino == a.ino and fs.lookup(d, b"a").ino == a.ino
    for ino in list(fs.data.states):
        while fs.data.states.get(ino) is not None and fs.data.states[ino].opens:
            fs.release(ino)
    got = {bytes(n): int(i) for n, i in eng.q("SELECT name, inode FROM dentries WHERE parent = %s", (d,))}
    assert got == {b"a": a.ino, b"c": got[b"c"], b"e2": got[b"e2"], b"g": g2.ino, b"s1": s1, b"s2": s2}
    assert {bytes(r[0]) for r in eng.q("SELECT name FROM dentries WHERE parent = %s", (s1,))} == {b"y"}
    assert {bytes(r[0]) for r in eng.q("SELECT name FROM dentries WHERE parent = %s", (s2,))} == {b"x"}
    assert int(eng.q("SELECT nlink FROM inodes WHERE id = %s", (d,))[0][0]) == 4
    report = eng.fsck()
    assert report.clean, report


def test_lost_group_loses_held_creates_whole(eng: Engine) -> None:
    """The session dies with creates held: they are lost whole with their group (no
    dentry without its inode or the reverse), committed ones stay, RAM answers agree
    with the database, and their inode numbers are not handed out again."""
    fs = eng.fs
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    kept = fs.mknod(d, b"kept", S.S_IFREG | 0o644, 0, UID, GID).ino
    fs.sync()
    lost = [fs.mknod(d, f"l{i}".encode(), S.S_IFREG | 0o644, 0, UID, GID).ino for i in range(3)]
    assert len(fs.readdir(d, 0)) == 4   # written into the open group (not committed)
    lost += [fs.mknod(d, f"l{i}".encode(), S.S_IFREG | 0o644, 0, UID, GID).ino for i in range(3, 5)]
    ldir = fs.mkdir(d, b"ldir", 0o755, UID, GID).ino
    assert fs.creates and fs.db.uncommitted == 6
    conn_id = int(fs.db.conn.thread_id())
    with eng.admin.cursor() as cur:
        cur.execute(f"KILL {conn_id}")
    # a read writes the held creates first: that finds the session gone, loses the
    # group, and the read runs on a new session
    assert [n for n, _, _ in fs.readdir(d, 0)] == [b"kept"]
    assert not fs.creates and fs.db.uncommitted == 0
    with pytest.raises(NotFound):
        fs.lookup(d, b"l0")
    with pytest.raises(NotFound):
        fs.getattr(ldir)
    again = fs.mknod(d, b"l0", S.S_IFREG | 0o644, 0, UID, GID).ino
    assert again > max(lost + [ldir, kept])
    rows = {bytes(n): int(i) for n, i in eng.q("SELECT name, inode FROM dentries WHERE parent = %s", (d,))}
    assert rows == {b"kept": kept, b"l0": again}
    assert int(eng.q("SELECT nlink FROM inodes WHERE id = %s", (d,))[0][0]) == 2
    assert not eng.q("SELECT id FROM inodes WHERE id IN %s", (lost + [ldir],))
    report = eng.fsck()
    assert report.clean, report
    # nor by the next mount (the rescue area names files by inode number)
    fs = eng.reopen()
    assert fs.mknod(d, b"next", S.S_IFREG | 0o644, 0, UID, GID).ino > max(lost + [ldir, again])


def test_failed_write_of_held_creates_loses_the_group(eng: Engine) -> None:
    """When writing held creates fails with the session alive (here: a name taken behind
    the mount's back, which breaks the single-writer rule), the group is rolled back as
    a lost one: the database never keeps a group without the creates it answered."""
    fs = eng.fs
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    fs.sync()
    fs.mknod(d, b"x", S.S_IFREG | 0o644, 0, UID, GID)
    with eng.admin.cursor() as cur:   # another writer takes the name meanwhile
        cur.execute("INSERT INTO dentries (parent, name, inode) VALUES (%s, 'x', 1)", (d,))
    with pytest.raises(MetaError, match="uncommitted operations were lost"):
        fs.sync()
    assert not fs.creates and fs.db.uncommitted == 0
    assert fs.lookup(d, b"x").ino == 1   # RAM was dropped: the database answers
    with eng.admin.cursor() as cur:
        cur.execute("DELETE FROM dentries WHERE parent = %s AND name = 'x'", (d,))


def test_cold_open_of_small_files(eng: Engine) -> None:
    """After a remount: lookup + open + read + release of an unchanged small file costs
    one round trip (the lookup brings the manifest with the inode row), and none after
    a listing (one query a batch brings the manifests); the manifests kept are never
    stale (a write, a truncate, an unlink after the lookup)."""
    fs = eng.fs
    d = fs.mkdir(ROOT, b"d", 0o755, UID, GID).ino
    content = {f"f{i}".encode(): f"small file {i}\n".encode() * (i + 1) for i in range(40)}
    content[b"empty"] = b""
    content[b"two"] = b"y" * (CS + 5)          # two slots
    content[b"big"] = bytes(range(256)) * (5 * CS // 256)   # above SMALL_SLOTS: read on open
    for name, data in content.items():
        make_file(fs, name, data, parent=d)
    fs = eng.reopen()
    before = questions(fs)
    for name, data in content.items():
        ino = fs.lookup(d, name).ino
        fs.open(ino)
        assert fs.read(ino, 0, len(data) + 10) == data
        fs.release(ino)
    trips = questions(fs) - before - 1
    print(f"cold lookup+open+read+release: {trips} round trips for {len(content)} files")
    assert trips <= len(content) + 2      # the big file's open reads its manifest
    fs = eng.reopen()
    before = questions(fs)
    listed = {n: a.ino for n, a, _ in fs.readdir(d, 0)}
    for name, data in content.items():
        fs.open(listed[name])
        assert fs.read(listed[name], 0, len(data) + 10) == data
        fs.release(listed[name])
    trips = questions(fs) - before - 1
    print(f"cold readdir + open+read+release: {trips} round trips for {len(content)} files")
    assert trips <= 6
    # kept manifests do not outlive a change: write, truncate, unlink + create
    ino = fs.lookup(d, b"f1").ino
    fs.open(ino)
    fs.write(ino, 0, b"NEW")
    fs.release(ino)
    fs.flush_all()
    fs.lookup(d, b"f1")
    fs.setattr(ino, size=2)
    fs.open(ino)
    assert fs.read(ino, 0, 100) == b"NE"
    fs.release(ino)
    fs.lookup(d, b"f2")
    fs.unlink(d, b"f2")
    n = make_file(fs, b"f2", b"other", parent=d)
    assert fs.lookup(d, b"f2").ino == n
    fs.open(n)
    assert fs.read(n, 0, 100) == b"other"
    fs.release(n)
    fs = eng.reopen()
    assert read_name(fs, b"f1", parent=d) == b"NE"
    report = eng.fsck()
    assert report.clean, report


def test_reopen_of_a_closed_small_file_runs_no_query(eng: Engine) -> None:
    """A small file closed clean keeps its committed manifest in RAM: opening, reading
    and closing it again costs no round trip; after a write, the next open reads the new
    bytes (the kept manifest is the committed one, never stale), also after a remount."""
    fs = eng.fs
    ino = make_file(fs, b"f", b"first version\n" * 100)
    fs.flush_all()
    fs.open(ino)
    assert fs.read(ino, 0, 4096).startswith(b"first version")
    fs.release(ino)
    before = questions(fs)
    for _ in range(50):
        fs.open(ino)
        assert fs.read(ino, 0, 14) == b"first version\n"
        fs.release(ino)
    trips = questions(fs) - before - 1
    assert trips == 0, f"{trips} round trips for 50 re-opens of a cached small file"
    fs.open(ino)
    fs.write(ino, 0, b"SECOND")
    fs.release(ino)
    fs.flush_all()
    fs.open(ino)
    assert fs.read(ino, 0, 14) == b"SECONDversion\n"
    fs.release(ino)
    fs.setattr(ino, size=3)
    fs.open(ino)
    assert fs.read(ino, 0, 100) == b"SEC"
    fs.release(ino)
    fs = eng.reopen()
    assert read_name(fs, b"f") == b"SEC"
    assert eng.fsck().clean
