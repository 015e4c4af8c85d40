"""The ``sessions`` and ``sustained`` tables: the mounts of a volume, on any machine
(schema 5; docs/sharing.md, "Sessions" and "Reaping").

A session is one row per running mount: id, host, pid, the mount's local chunk store
(cas.config.volume.Volume.store), its mode ('exclusive' on a volume that is not shared,
'shared' on one that is), its consistency level, and a heartbeat in server time
(UTC, ``UTC_TIMESTAMP(6)``: a DST change of the server's or the connection's time
zone moves no heartbeat), renewed every :func:`heartbeat_interval_s` seconds on a connection of its
own. A session is *live* while its heartbeat is younger than the timeout
(:func:`timeout_s`: 60 s, or env ``CASFS_SESSION_TIMEOUT_S``), *dead* after; every
liveness test here is computed by the server (``heartbeat >= UTC_TIMESTAMP(6) - INTERVAL``) so
that clocks of the machines do not matter. A session of this host whose process is gone
is dead at once (:func:`is_stale_here`): a mount killed with -9 does not block the next
mount of the same machine for a timeout.

``sustained`` rows (session, inode): an inode that reached nlink 0 while that session
had it open. It is freed at that session's last release, when the session is reaped,
and never by another mount's start-up recovery while the session is live.

Locks (READ COMMITTED, docs/metadata.md): plain SELECTs take none. Registration and
``casfs join`` serialize on the ``meta`` row ``sessions_lock`` (:data:`LOCK_KEY`,
cas.db.volume.lock_value) around their check-and-insert, so two mounts that start at once
never both pass the check. Reaping a dead session locks that session's row first
(``FOR UPDATE SKIP LOCKED``: a second reaper of the same session skips it, a session
whose heartbeat came back is not reaped), then the inode row, its manifest rows and its
chunks' rows (the free-inode order of docs/metadata.md), then the sustained rows.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any, NamedTuple

from pymysql.cursors import Cursor

from cas.db import chunks as dbchunks
from cas.db import manifests as dbmanifests
from cas.db import namespace as ns
from cas.db import volume
from cas.db.batch import batches
from cas.db.server import pid_running
from cas.db.source import Source, execute, rows

log = logging.getLogger(__name__)

#: the default session timeout (seconds): a heartbeat older than this is a dead session
DEFAULT_TIMEOUT_S = 60.0
#: env var overriding :data:`DEFAULT_TIMEOUT_S` (tests use a few seconds)
TIMEOUT_ENV = "CASFS_SESSION_TIMEOUT_S"
#: the heartbeat period (seconds), unless timeout / 4 is shorter
HEARTBEAT_S = 5.0
#: the meta row registrations and `casfs join` lock around their check-and-insert
LOCK_KEY = "sessions_lock"
EXCLUSIVE = "exclusive"
SHARED = "shared"


def timeout_s() -> float:
    """The session timeout in seconds: env ``CASFS_SESSION_TIMEOUT_S`` (a positive
    number), else :data:`DEFAULT_TIMEOUT_S`. No lock (no statement)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        v = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        v = DEFAULT_TIMEOUT_S
    return v if v > 0 else DEFAULT_TIMEOUT_S


def heartbeat_interval_s(timeout: float | None = None) -> float:
    """Seconds between heartbeats: :data:`HEARTBEAT_S`, or ``timeout / 4`` when that is
    shorter (so that three heartbeats may be late before a session looks dead). No lock."""
    t = timeout_s() if timeout is None else timeout
    return min(HEARTBEAT_S, t / 4)


def _us(timeout: float) -> int:
    return max(1, int(timeout * 1_000_000))


class SessionRow(NamedTuple):
    """One session, as :func:`list_sessions` reads it: ``age_s`` is seconds since its last
    heartbeat (server clock), ``live`` whether that is under the timeout (and, for a
    session of this host, whether its process still runs), ``sustained`` its sustained
    inodes, ``queued`` the upload-queue rows of its store not yet in a pack."""

    id: int
    host: str
    pid: int
    store: str
    mode: str
    consistency: str
    started: str
    age_s: float
    live: bool
    sustained: int
    queued: int


#: env var naming this machine in session rows instead of its hostname: tests that
#: simulate several machines on one box give each its own (tests/machines.py)
HOST_ENV = "CASFS_SESSION_HOST"


def this_host() -> str:
    """The host name session rows give this machine: env ``CASFS_SESSION_HOST``, else
    ``socket.gethostname()``. No lock (no statement)."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def is_stale_here(host: str, pid: int) -> bool:
    """True when a session names a process of this host (:func:`this_host`) that no
    longer runs: it died without ending its session (kill -9, a crash). No lock (no
    statement). A session of another host is never stale here: only its heartbeat tells."""
    return host == this_host() and not pid_running(pid)


def list_sessions(src: Source, timeout: float | None = None, store_of_first: str = "",
                  counts: bool = True) -> list[SessionRow]:
    """Every session, oldest first, with liveness from the server's clock (and
    :func:`is_stale_here`); with ``counts`` also its sustained inode count and the
    queued chunks of its store (queue rows with a NULL store count for
    ``store_of_first``, the volume's first store; both reads are O(rows counted), so
    the heartbeat's checks go without them: zeros). No lock: plain SELECTs."""
    t = timeout_s() if timeout is None else timeout
    found = rows(src, "SELECT id, host, pid, store, mode, consistency, "
                      "DATE_FORMAT(started, '%%Y-%%m-%%d %%H:%%i:%%s'), "
                      "TIMESTAMPDIFF(MICROSECOND, heartbeat, UTC_TIMESTAMP(6)), "
                      "heartbeat >= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND FROM sessions ORDER BY id", (_us(t),))
    held: dict[Any, Any] = {}
    queued: dict[str, int] = {}
    if counts and found:
        held = dict(rows(src, "SELECT session, COUNT(*) FROM sustained GROUP BY session"))
        queued = {("" if s is None else str(s)): int(n) for s, n in
                  rows(src, "SELECT store, COUNT(*) FROM upload_queue WHERE pack IS NULL GROUP BY store")}
        if store_of_first:
            queued[store_of_first] = queued.get(store_of_first, 0) + queued.pop("", 0)
    out = []
    for i, host, pid, store, mode, cons, started, age_us, fresh in found:
        live = bool(fresh) and not is_stale_here(str(host), int(pid))
        out.append(SessionRow(int(i), str(host), int(pid), str(store), str(mode), str(cons), str(started),
                              max(0, int(age_us)) / 1e6, live, int(held.get(i, 0)),
                              queued.get(str(store), 0)))
    return out


def live_others(cur: Cursor, own: int, timeout: float | None = None) -> list[SessionRow]:
    """The live sessions other than ``own`` (0: none is ours), read in the caller's
    transaction. No lock of its own: callers hold :data:`LOCK_KEY` (registration, join)."""
    return [s for s in list_sessions(cur, timeout, counts=False) if s.live and s.id != own]


def register(cur: Cursor, *, host: str, pid: int, store: str, mode: str, consistency: str,
             session_id: int = 0) -> int:
    """Insert this mount's session row (heartbeat now, server time); returns its id.
    ``session_id`` > 0 re-inserts a session that was reaped under the same id (a mount
    whose heartbeats stopped longer than the timeout, then came back). Locks: the new row
    (exclusive) to the caller's COMMIT; the caller holds :data:`LOCK_KEY` and has checked
    :func:`live_others`."""
    if session_id:
        cur.execute("INSERT INTO sessions (id, host, pid, store, mode, consistency, started, heartbeat) "
                    "VALUES (%s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                    (session_id, host, pid, store, mode, consistency))
        return session_id
    cur.execute("INSERT INTO sessions (host, pid, store, mode, consistency, started, heartbeat) "
                "VALUES (%s, %s, %s, %s, %s, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                (host, pid, store, mode, consistency))
    return int(cur.lastrowid)


def lock_registrations(cur: Cursor) -> None:
    """Serialize with every other registration and `casfs join`: the exclusive lock of
    the meta row :data:`LOCK_KEY` (created if absent), held to the caller's COMMIT."""
    volume.lock_value(cur, LOCK_KEY, "0")


def heartbeat(src: Source, session: int, timeout: float | None = None) -> bool:
    """Renew ``session``'s heartbeat (server time, UTC). False when its row is gone:
    another mount reaped it. The time written is the time the row is written, not the
    statement's start (``UTC_TIMESTAMP(6)``, like ``NOW(6)``, is the start): an UPDATE
    that waited for the row's lock adds the wait, measured by ``SYSDATE(6)`` (execution
    time) minus ``NOW(6)`` and bounded to [0, timeout] so that a shift of the session's
    time zone during the wait (DST) cannot push the heartbeat far into the future.
    Locks the session's row for this statement (autocommitted on the Database)."""
    t = timeout_s() if timeout is None else timeout
    return execute(src, "UPDATE sessions SET heartbeat = UTC_TIMESTAMP(6) + INTERVAL "
                        "LEAST(GREATEST(TIMESTAMPDIFF(MICROSECOND, NOW(6), SYSDATE(6)), 0), %s) MICROSECOND "
                        "WHERE id = %s", (_us(t), session)) > 0


def end(cur: Cursor, session: int) -> int:
    """Clean end of ``session``: delete its sustained rows (the inodes they kept are
    freed by the engine before; any left stay with nlink 0 and the next start-up recovery
    frees them) and its row. Returns the sustained rows deleted. Locks those rows
    (exclusive) to the caller's COMMIT."""
    n = int(cur.execute("DELETE FROM sustained WHERE session = %s", (session,)))
    cur.execute("DELETE FROM sessions WHERE id = %s", (session,))
    return n


# -- sustained inodes ------------------------------------------------------------------------

def sustain(cur: Cursor, session: int, ino: int) -> None:
    """Record that ``session`` keeps inode ``ino`` (nlink 0, still open there), in the
    transaction that unlinked it. Locks the new row (exclusive) to the COMMIT; the caller
    holds the inode's row."""
    cur.execute("INSERT IGNORE INTO sustained (session, inode) VALUES (%s, %s)", (session, ino))


def release_sustained(cur: Cursor, session: int, ino: int, timeout: float | None = None) -> bool:
    """``session`` no longer keeps ``ino`` (its last release): delete its row; True when
    another *live* session still sustains ``ino`` (then the caller must not free it).
    Locks: ``session``'s row of ``ino`` (deleted), to the caller's COMMIT; the other
    sessions' rows are read without a lock: the caller holds the inode row
    (cas.db.namespace.nlink_for_update) of an inode with nlink 0, which no transaction
    can make sustained again (it has no name left to unlink), so those rows can only go."""
    t = timeout_s() if timeout is None else timeout
    if session:
        cur.execute("DELETE FROM sustained WHERE session = %s AND inode = %s", (session, ino))
    cur.execute("SELECT x.id, x.host, x.pid FROM sustained s JOIN sessions x ON x.id = s.session "
                "WHERE s.inode = %s AND s.session <> %s AND x.heartbeat >= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND",
                (ino, session, _us(t)))
    return any(not is_stale_here(str(h), int(p)) for _, h, p in cur.fetchall())


def forget_inode(cur: Cursor, ino: int) -> None:
    """The inode ``ino`` is freed (or gone): delete every sustained row naming it (those
    of dead sessions included). Locks those rows (exclusive) to the COMMIT."""
    cur.execute("DELETE FROM sustained WHERE inode = %s", (ino,))


def sustained_by(src: Source, session: int) -> list[int]:
    """The inodes ``session`` sustains. No lock."""
    return [int(r[0]) for r in rows(src, "SELECT inode FROM sustained WHERE session = %s ORDER BY inode",
                                    (session,))]


def orphan_sustained(src: Source) -> list[tuple[int, int]]:
    """Sustained rows (session, inode) whose session has no row: left by a session ended
    or reaped half-way (fsck reports them; ``fsck --repair`` frees their inodes). No lock."""
    return [(int(s), int(i)) for s, i in rows(
        src, "SELECT s.session, s.inode FROM sustained s LEFT JOIN sessions x ON x.id = s.session "
             "WHERE x.id IS NULL ORDER BY s.session, s.inode")]


def free_unlinked(cur: Cursor, ino: int, session: int = 0, timeout: float | None = None) -> bool:
    """Free inode ``ino`` if it has nlink 0 and no live session but ``session`` (the
    reaped one, or 0) sustains it: its manifest's chunk references are dropped exactly
    (one -1 per slot naming a chunk: invariant 2), its manifest, symlink, xattr, inode and
    sustained rows deleted. The same statements as the engine's free of an inode
    (cas.engine.fs ``_free_inode``), for a reaper that has no engine. Returns True when
    freed. A gone inode only loses its sustained rows; an inode with links only loses
    ``session``'s row. Locks, in order: the inode row (``nlink_for_update``), ``session``'s
    sustained row of it, its manifest rows, its chunks' rows in id order, its
    symlink/xattr/inode rows, its sustained rows; to the caller's COMMIT. The chunk rows
    are taken with ``NOWAIT`` (:func:`_lock_chunks_nowait`): MetaError / a retry of the
    caller's transaction when a mount's group holds one."""
    nlink = ns.nlink_for_update(cur, ino)
    if nlink is None:
        forget_inode(cur, ino)
        return False
    if release_sustained(cur, session, ino, timeout) or nlink != 0:
        return False
    lost = dbmanifests.chunks_for_update(cur, ino)
    _lock_chunks_nowait(cur, sorted(set(lost)))
    counts: dict[bytes, int] = {}
    for cid in lost:
        counts[cid] = counts.get(cid, 0) + 1
    by_delta: dict[int, list[bytes]] = {}
    for cid, n in counts.items():
        by_delta.setdefault(-n, []).append(cid)
    for delta, ids in by_delta.items():
        dbchunks.drop_refs(cur, delta, ids)
    if lost:
        dbmanifests.delete_all(cur, ino)
    ns.delete_inode(cur, ino)
    forget_inode(cur, ino)
    return True


def _lock_chunks_nowait(cur: Cursor, ids: Sequence[bytes]) -> None:
    """X-lock the chunk rows ``ids`` (sorted) in id order, failing at once (``NOWAIT``:
    MariaDB error 1205, MySQL 8 error 3572, both of which Database.transaction retries
    whole after a back-off) instead of waiting for a row another transaction holds. A reaper holds several chunk rows;
    waiting for one while a mount's group waits for another it holds would close a
    cycle (docs/metadata.md, "Lock order"), so it never waits for a chunk row: a
    mount's group may wait for it, never the other way round."""
    for batch in batches(list(ids)):
        cur.execute("SELECT id FROM chunks WHERE id IN %s ORDER BY id FOR UPDATE NOWAIT", (batch,))
        cur.fetchall()


# -- reaping ---------------------------------------------------------------------------------

def dead_sessions(src: Source, own: int, timeout: float | None = None) -> list[SessionRow]:
    """Sessions other than ``own`` that are dead (heartbeat older than the timeout, or a
    process of this host that is gone). No lock."""
    return [s for s in list_sessions(src, timeout, counts=False) if not s.live and s.id != own]


def lock_dead(cur: Cursor, session: int, timeout: float | None = None) -> SessionRow | None:
    """Lock ``session``'s row for reaping (``FOR UPDATE SKIP LOCKED``) if it is still
    dead; None when it is gone, alive again (fresh heartbeat, a running process of this
    host), or another reaper holds it. Locks that row (exclusive) to the caller's COMMIT."""
    t = timeout_s() if timeout is None else timeout
    cur.execute("SELECT id, host, pid, store, mode, consistency, heartbeat >= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND "
                "FROM sessions WHERE id = %s FOR UPDATE SKIP LOCKED", (_us(t), session))
    r = cur.fetchone()
    if r is None:
        return None
    host, pid = str(r[1]), int(r[2])
    if r[6] and not is_stale_here(host, pid):
        return None
    return SessionRow(int(r[0]), host, pid, str(r[3]), str(r[4]), str(r[5]), "", 0.0, False, 0, 0)


def expire_leases(cur: Cursor, dead: SessionRow, timeout: float | None = None) -> int:
    """Expire the leases of the 'uploading' packs the dead session's uploader owned
    (``packs.owner`` = host:pid:token, cas.tier.cloud.owner_id) so that the uploaders'
    recovery settles them at once instead of at lease end; skipped when a live session
    runs with the same host and pid (a reused pid). Returns the packs expired. Locks
    those pack rows (exclusive) to the caller's COMMIT."""
    t = timeout_s() if timeout is None else timeout
    cur.execute("SELECT COUNT(*) FROM sessions WHERE host = %s AND pid = %s AND id <> %s "
                "AND heartbeat >= UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND", (dead.host, dead.pid, dead.id, _us(t)))
    if int(cur.fetchone()[0]):
        return 0
    prefix = f"{dead.host}:{dead.pid}:".replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return int(cur.execute("UPDATE packs SET lease_until = NOW(6) WHERE state = 'uploading' "
                           "AND owner LIKE %s AND (lease_until IS NULL OR lease_until > NOW(6))",
                           (prefix + "%",)))


def delete_session(cur: Cursor, session: int) -> None:
    """Delete a reaped session's remaining sustained rows and its row. Locks them
    (exclusive) to the caller's COMMIT; the caller holds the row (:func:`lock_dead`)."""
    cur.execute("DELETE FROM sustained WHERE session = %s", (session,))
    cur.execute("DELETE FROM sessions WHERE id = %s", (session,))


def sessions_exist(src: Source, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` have a session row. No lock."""
    if not ids:
        return set()
    return {int(r[0]) for r in rows(src, "SELECT id FROM sessions WHERE id IN %s", (list(ids),))}


def any_live(src: Source, timeout: float | None = None) -> list[SessionRow]:
    """The live sessions (fsck --repair refuses while one runs, anywhere). No lock."""
    return [s for s in list_sessions(src, timeout, counts=False) if s.live]

