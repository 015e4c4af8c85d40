"""A mount's session: registration, the heartbeat thread, reaping dead sessions, the end.

:func:`start` registers the mount in the ``sessions`` table (cas.db.sessions) on a
connection of its own, refusing what invariant 25 forbids (docs/sharing.md,
"Sessions"): a mount of a volume that is not shared is 'exclusive' and refuses to start
beside any other live session, on any machine; a mount of a shared volume refuses to
start beside a live exclusive one. The check and the insert run under the ``meta`` row
lock ``sessions_lock``, so two mounts starting at once cannot both pass.

:class:`SessionKeeper` then runs one thread (``casfs-session``) with that connection
(never the engine's connection, never the trio thread): every
:func:`cas.db.sessions.heartbeat_interval_s` seconds it renews the heartbeat and reaps
dead sessions of other mounts (docs/sharing.md, "Reaping"): their sustained inodes that
no live session sustains are freed with exact refcount decrements, one transaction per
inode; the leases of their 'uploading' packs expire; their row goes. :meth:`SessionKeeper.stop`
ends the session at a clean unmount (after the engine freed its unlinked-while-open
inodes). A mount whose heartbeats stopped for longer than the timeout (a machine that
slept) finds its row reaped; it registers again under the same id when that is allowed,
and logs an error either way: the inodes it sustained may have been freed.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from pymysql.cursors import Cursor

from cas.db import sessions as dbsessions
from cas.db import volume as dbvolume
from cas.db.database import Database, Metadata
from cas.db.server import EmbeddedServer
from cas.errors import CasError, VolumeError

log = logging.getLogger(__name__)


def _boottime() -> float:
    """Seconds of CLOCK_BOOTTIME (Linux): like monotonic time, but it runs on while the
    machine is suspended."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _conflict(vol_name: str, shared: bool, others: list[dbsessions.SessionRow]) -> str | None:
    """The one-line refusal for a mount (``shared``: of a shared volume) beside the live
    sessions ``others``, or None when it may start."""
    if not shared and others:
        o = others[0]
        return (f"volume {vol_name} is already mounted by {o.host}:{o.pid} (session {o.id}, "
                f"{o.mode}); unmount it there first")
    for o in others:
        if o.mode == dbsessions.EXCLUSIVE:
            return (f"volume {vol_name} is mounted exclusively by {o.host}:{o.pid}; unmount it "
                    "or remount it after `casfs join`")
    return None


class SessionKeeper:
    """One mount's session row and its heartbeat thread (see the module docstring).

    ``db`` is a connection of the keeper's own; ``session_id`` the registered id;
    ``shared`` whether the volume is shared (the mode is 'shared', the engine sustains
    inodes unlinked while open). Thread-safe: the connection is used by the thread only,
    between :meth:`start_thread` and :meth:`stop`."""

    def __init__(self, db: Database, vol_name: str, store: str, consistency: str,
                 expect_shared: bool | None = None, exclusive: bool = False) -> None:
        self.db = db
        # an exclusive session even on a shared volume (`fsck --repair`: no mount may run)
        self.exclusive = exclusive
        # the mode the mount's engine runs in (None: whatever the volume says): registering
        # in the other mode is refused, the engine and the session must agree
        self.expect_shared = expect_shared
        self.vol_name = vol_name
        self.store = store
        self.consistency = consistency
        self.session_id = 0
        self.shared = False
        self.timeout = dbsessions.timeout_s()
        self.interval = dbsessions.heartbeat_interval_s(self.timeout)
        self.join_timeout_s = max(30.0, 2 * self.interval)   # stop() waits this long for the thread
        self.reaped = 0            # dead sessions this keeper reaped
        self.freed = 0             # inodes freed while reaping
        self._stop = threading.Event()
        self._ending = threading.Event()   # stop() ends the session: never register or reap again
        self._healthy_since: float | None = _boottime()   # since when heartbeats run without a gap
        self._last_ok = _boottime()
        self._thread: threading.Thread | None = None
        # a thread stop() stopped waiting for closes its connection itself when it ends
        self._handover = threading.Lock()
        self._thread_done = False
        self._orphaned = False
        # an embedded volume's server, held as one more user so that it outlives the
        # engine's close until the session has ended (cas.db.server.EmbeddedServer)
        self.server: EmbeddedServer | None = None

    # -- registration ----------------------------------------------------------------------
    def register(self, session_id: int = 0) -> None:
        """Insert the session row under the registration lock. Raises VolumeError (one
        line) when the volume may not be mounted now, MetaError on a database error."""
        host, pid = dbsessions.this_host(), os.getpid()

        def body(cur: Cursor) -> tuple[int, bool]:
            dbsessions.lock_registrations(cur)
            shared = dbvolume.is_shared(cur)
            if self.expect_shared is not None and shared != self.expect_shared:
                raise VolumeError(f"volume {self.vol_name} became {'shared' if shared else 'not shared'} "
                                  "while mounting; mount again")
            why = _conflict(self.vol_name, shared and not self.exclusive,
                            dbsessions.live_others(cur, session_id, self.timeout))
            if why is not None:
                raise VolumeError(why)
            mode = dbsessions.SHARED if shared and not self.exclusive else dbsessions.EXCLUSIVE
            sid = dbsessions.register(cur, host=host, pid=pid, store=self.store, mode=mode,
                                      consistency=self.consistency, session_id=session_id)
            return sid, shared

        self.session_id, self.shared = self.db.transaction(body)
        self.expect_shared = self.shared   # a registration again (after a reaping) keeps the mode

    # -- the thread ------------------------------------------------------------------------
    def start_thread(self) -> None:
        """Start the heartbeat thread (daemon thread ``casfs-session``)."""
        self._thread = threading.Thread(target=self._run, name="casfs-session", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                try:
                    self.beat()
                except CasError as exc:   # the database is away: the next beat tries again
                    log.warning("session %d: heartbeat failed: %s", self.session_id, str(exc).splitlines()[0])
                except Exception:  # noqa: BLE001 - the next beat tries again; the mount goes on
                    log.exception("session %d: heartbeat or reaping failed", self.session_id)
        finally:
            with self._handover:
                self._thread_done = True
                if self._orphaned:
                    self.db.close()

    def beat(self) -> None:
        """One heartbeat, then reap dead sessions. Raises MetaError (the thread logs it).

        Sessions found dead by their heartbeat's age are reaped only once this keeper
        has itself beaten without a gap for a whole timeout (:meth:`may_reap_by_age`):
        after an outage of the database, or a sleep of this machine, every live mount's
        heartbeat is old too, and the first keeper back must not reap the others. A
        session of this host whose process is gone is reaped at once.

        The time of this beat is taken after the heartbeat statement returned: a
        statement that blocked (a row lock, a slow server) for over timeout / 2 counts
        as a gap, like a stall between beats."""
        if self._renew():
            self.reap(by_age=self.may_reap_by_age())

    def _renew(self) -> bool:
        """Renew the heartbeat (see :meth:`beat`); register again under the same id when
        another mount reaped this session. False when it could not register again (or the
        keeper is stopping). Raises MetaError."""
        before = _boottime()
        try:
            ok = dbsessions.heartbeat(self.db, self.session_id, self.timeout)
        except CasError:
            self._healthy_since = None
            raise
        now = _boottime()
        if (self._healthy_since is None or now - self._last_ok > self.timeout / 2
                or now - before > self.timeout / 2):
            self._healthy_since = now     # first beat after a failure, a stall or a slow beat
        self._last_ok = now
        if ok:
            return True
        if self._ending.is_set():         # ended by stop() meanwhile: stay out
            return False
        log.error("session %d was reaped by another mount (no heartbeat for over %.0f s): inodes "
                  "this mount kept open after their unlink may have been freed; registering again",
                  self.session_id, self.timeout)
        try:
            self.register(self.session_id)
        except VolumeError as exc:
            log.critical("session %d cannot register again: %s", self.session_id, exc)
            return False
        return True

    def _keep_beating(self, by_age: bool) -> bool:
        """Called between the steps of a reap: renew the heartbeat when an interval has
        passed since the last one, so that a long reap (many sustained inodes, NOWAIT
        retries) never lets this session's own heartbeat age past the timeout. False when
        the reap must stop: the keeper is stopping, the session is gone, or (``by_age``)
        this beat found a gap, so reaping by age is no longer allowed."""
        if self._ending.is_set():
            return False
        if _boottime() - self._last_ok < self.interval:
            return True
        since = self._healthy_since
        if not self._renew():
            return False
        return not by_age or self._healthy_since == since

    def may_reap_by_age(self) -> bool:
        """Whether this keeper's heartbeats have run without a gap for a whole timeout
        (CLOCK_BOOTTIME: a suspend counts as a gap)."""
        return self._healthy_since is not None and _boottime() - self._healthy_since >= self.timeout

    def reap(self, by_age: bool = True) -> int:
        """Reap every dead session of another mount (with ``by_age`` False only those of
        this host whose process is gone); returns how many were reaped here. Raises
        MetaError."""
        n = 0
        for dead in dbsessions.dead_sessions(self.db, self.session_id, self.timeout):
            if not by_age and not dbsessions.is_stale_here(dead.host, dead.pid):
                continue
            if not self._keep_beating(by_age):
                break
            if self._reap_one(dead, by_age):
                n += 1
        return n

    def _reap_one(self, dead: dbsessions.SessionRow, by_age: bool = True) -> bool:
        """Free ``dead``'s sustained inodes (one transaction each), expire its pack
        leases and delete its row; False when another reaper holds it, it came back, or
        the reap stopped half-way (:meth:`_keep_beating`; the next beat goes on). The
        heartbeat is renewed between the inodes when an interval has passed."""
        freed = 0
        for ino in dbsessions.sustained_by(self.db, dead.id):
            if not self._keep_beating(by_age):
                self.freed += freed
                return False
            def free(cur: Cursor, ino: int = ino) -> bool | None:
                if dbsessions.lock_dead(cur, dead.id, self.timeout) is None:
                    return None
                return dbsessions.free_unlinked(cur, ino, dead.id, self.timeout)
            got = self.db.transaction(free)
            if got is None:
                return False
            freed += int(got)

        def finish(cur: Cursor) -> int | None:
            row = dbsessions.lock_dead(cur, dead.id, self.timeout)
            if row is None:
                return None
            packs = dbsessions.expire_leases(cur, row, self.timeout)
            dbsessions.delete_session(cur, dead.id)
            return packs

        packs = self.db.transaction(finish)
        if packs is None:
            return False
        self.reaped += 1
        self.freed += freed
        log.warning("reaped dead session %d (%s:%d, store %s, heartbeat %.1f s old): freed %d inodes it "
                    "kept open after unlink, expired %d pack leases", dead.id, dead.host, dead.pid,
                    dead.store, dead.age_s, freed, packs)
        return True

    # -- the end ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the thread and end the session (its sustained rows and its row go), then
        close the keeper's connection. Never raises: a session that cannot be ended is
        reaped by another mount after the timeout (or at this machine's next mount)."""
        self._ending.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)
        # a thread still in a statement keeps its connection (a connection is never used
        # by two threads): the session ends on a fresh one, the thread's goes with it
        with self._handover:
            busy = self._thread is not None and not self._thread_done
            self._orphaned = busy
        db = self.db
        try:
            if busy:
                log.warning("session %d: the heartbeat thread is still busy; ending the session on "
                            "a new connection", self.session_id)
                db = Database(self.db.target)
            if self.session_id:
                left = db.transaction(lambda cur: dbsessions.end(cur, self.session_id))
                if left:
                    log.warning("session %d ended with %d sustained inodes not freed: the next "
                                "start-up recovery frees them", self.session_id, left)
        except CasError as exc:
            log.error("cannot end session %d (%s): another mount reaps it after %.0f s", self.session_id,
                      exc, self.timeout)
        finally:
            if db is not self.db:
                db.close()
            if not busy:
                self.db.close()
            if self.server is not None:
                self.server.release()
                self.server = None


def start(meta: Metadata, consistency: str = "session", shared: bool | None = None,
          exclusive: bool = False) -> SessionKeeper:
    """Register a session for the mount of ``meta`` (a connection of its own), set
    ``meta.db.session_id`` and start the heartbeat thread. ``shared``: the mode the
    mount's engine was built in (``is_shared`` read before); the registration, which reads
    it again under the registration lock, is refused when the volume changed meanwhile (a
    `casfs join` elsewhere), so that the session and the engine never disagree. Returns
    the keeper (stop it at unmount). Raises VolumeError (refused: another session's mode
    forbids this mount, or the volume became shared while mounting; one line), MetaError.
    ``exclusive``: register an exclusive session whatever the volume's mode (`casfs fsck
    --repair` holds one for its length: no mount starts meanwhile, on any machine)."""
    server = None
    if meta.server is not None:
        server = EmbeddedServer(meta.server.datadir, meta.server.run_dir, meta.server.log_dir)
        server.acquire()
    try:
        db = Database(meta.db.target)
    except BaseException:
        if server is not None:
            server.release()
        raise
    keeper = SessionKeeper(db, meta.volume.name, meta.volume.store, consistency, expect_shared=shared,
                           exclusive=exclusive)
    keeper.server = server
    try:
        keeper.register()
    except BaseException:
        keeper.stop()
        raise
    meta.db.session_id = keeper.session_id
    keeper.start_thread()
    log.info("session %d registered (%s, timeout %.0f s, heartbeat every %.1f s)", keeper.session_id,
             "shared" if keeper.shared else "exclusive", keeper.timeout, keeper.interval)
    return keeper

