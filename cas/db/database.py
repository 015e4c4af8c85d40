"""The metadata database: connecting, the schema, and transactions with retry.

PyMySQL errors are converted to :class:`~cas.errors.MetaError` here, where they enter the
engine. The session runs in READ COMMITTED with autocommit on; :meth:`Database.transaction` runs
an explicit transaction, retried whole on deadlock (1213), lock wait timeout (1205) and
a failed ``NOWAIT`` lock (MariaDB reports 1205, MySQL 8 reports 3572).
``schema.sql`` (repository root) is the single source of truth of the schema; the
package reads it as ``cas/schema.sql``, a symlink to it in the repository that sdists
and wheels carry as a regular file (docs/install.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import pymysql
import pymysql.cursors

from cas.db import tls as metatls
from cas.counters import MYSQL_COMMIT, MYSQL_RETRIES, MYSQL_TX
from cas.errors import MetaError, SchemaMismatch, VolumeError
from cas.db.server import EmbeddedServer
from cas.config.volume import Volume

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema.sql"   # package data (docs/install.md)
EMBEDDED_DB = "casfs"
ROOT_INODE = 1
_RETRY_CODES = {1213, 1205, 3572}   # 3572: MySQL 8's ER_LOCK_NOWAIT
#: "server gone" client errors (CR_CONNECTION_ERROR 2002, CR_CONN_HOST_ERROR 2003,
#: CR_SERVER_GONE_ERROR 2006, CR_SERVER_LOST 2013): the server died or restarts
SERVER_GONE_CODES = {2002, 2003, 2006, 2013}
_RECONNECT_CODES = SERVER_GONE_CODES
#: how long one operation waits for a server that is gone to answer again (seconds);
#: a mount's embedded server is restarted meanwhile by cas.db.server.ServerSupervisor
RECONNECT_WAIT_S = 10.0
_GROUP_FATAL = {1213} | _RECONNECT_CODES  # errors after which InnoDB kept nothing
GROUP_COMMIT_MAX_OPS = 1000
LONE_DEADLOCK_RETRIES = 20   # runs again of a deadlocked body of a shared mount (Database.lone_bodies)
T = TypeVar("T")


@dataclass(frozen=True)
class MetaTarget:
    """Where a volume's database lives: TCP host/port or a unix socket, and credentials."""

    user: str
    password: str
    database: str
    host: str = "localhost"
    port: int = 3306
    unix_socket: str | None = None
    tls: metatls.TlsSettings | None = None   # volume.toml [meta] (cas/db/tls.py); None: PyMySQL default

    def describe(self) -> str:
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"{self.user}@{where}/{self.database}"


def parse_meta_url(url: str, password: str = "") -> MetaTarget:
    """Parse ``mysql://USER@HOST[:PORT]/DB[?unix_socket=PATH]``.

    The password comes from ``password`` (the volume config) or ``CASFS_MYSQL_PASSWORD``;
    a password inside the URL is refused so that it never sits on a command line.
    Raises MetaError for a malformed URL.
    """
    u = urlparse(url)
    if u.scheme not in ("mysql", "mariadb"):
        raise MetaError(f"meta URL {url!r}: scheme must be mysql://")
    if u.password:
        raise MetaError("meta URL must not carry a password: put it in the volume config "
                        "(meta_password) or CASFS_MYSQL_PASSWORD")
    db = u.path.lstrip("/")
    if not u.username or not u.hostname or not re.fullmatch(r"[A-Za-z0-9_$]{1,64}", db or ""):
        raise MetaError(f"meta URL {url!r}: expected mysql://USER@HOST[:PORT]/DATABASE")
    q = parse_qs(u.query)
    sock = q.get("unix_socket", [None])[0]
    try:
        port = u.port or 3306
    except ValueError as exc:
        raise MetaError(f"meta URL {url!r}: bad port") from exc
    return MetaTarget(user=unquote(u.username), password=password or os.environ.get("CASFS_MYSQL_PASSWORD", ""),
                      database=db, host=u.hostname, port=port, unix_socket=sock)


def _code(exc: BaseException | None) -> int:
    """The MySQL error number of a PyMySQL error (0 for anything else)."""
    if isinstance(exc, pymysql.err.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return 0


def _convert(exc: pymysql.err.MySQLError, target: MetaTarget) -> MetaError:
    code = exc.args[0] if exc.args else 0
    msg = exc.args[1] if len(exc.args) > 1 else str(exc)
    if code == 1045:
        return MetaError(f"MySQL refused the credentials for {target.describe()}: {msg}")
    if metatls.tls_error(code, str(msg)):
        return MetaError(f"TLS to MySQL at {target.describe()} failed, no credentials were sent: {msg}")
    if code in (2002, 2003, 2005, 2006, 2013):
        return MetaError(f"cannot reach MySQL at {target.describe()}: {msg}")
    if code == 1049:
        return MetaError(f"database {target.database!r} does not exist on {target.describe()}")
    return MetaError(f"MySQL error {code} on {target.describe()}: {msg}")


class Database:
    """One PyMySQL connection; not thread-safe (callers serialize access)."""

    def __init__(self, target: MetaTarget, database: str | None = None) -> None:
        self.target = target
        self._database = target.database if database is None else database
        self.lock_wait_s = 0      # 0: the server's innodb_lock_wait_timeout (see set_lock_wait)
        self.conn = self._connect()
        self._group_max = 0       # 0: every transaction commits at once
        self._group_open = False
        self._group_ops = 0
        self.on_group_lost: Callable[[], None] | None = None  # RAM state must be reloaded
        self.on_group_commit: Callable[[], None] | None = None  # after each group COMMIT
        self.last_commit_ns = 0   # time.time_ns() after the last COMMIT that succeeded here (cas.tier.snapshot)
        self.reconnect_wait_s = RECONNECT_WAIT_S
        self._resync_due = False  # a group was lost while the server was down: reload first
        # Operations the owner holds in RAM (cas.engine.fs creates), written by the owner's
        # ``before_statement`` before any statement runs here and before every commit
        # (:meth:`write_held`, docs/smallfiles.md); counted as uncommitted operations.
        self.held_ops = 0
        self.before_statement: Callable[[], None] | None = None
        self._writing_held = False
        # The mount session this connection works for (cas.db.sessions; 0: none, e.g. a
        # CLI tool or an engine test): change-log rows and sustained inodes name it.
        self.session_id = 0
        # Shared volumes (docs/sharing.md): each body runs alone in its group (max_ops 1).
        # A body that fails ends the transaction (ROLLBACK TO SAVEPOINT keeps the row
        # locks InnoDB took after the savepoint: another machine must not wait for them
        # until the next commit), and a body InnoDB picked as a deadlock victim (1213) is
        # run again, up to LONE_DEADLOCK_RETRIES times, instead of being reported as a
        # lost group: nothing else was lost with it. False keeps the single-writer rules.
        self.lone_bodies = False

    def _connect(self) -> pymysql.connections.Connection:
        t = self.target
        try:
            conn = pymysql.connect(
                host=t.host, port=t.port, unix_socket=t.unix_socket, user=t.user,
                password=t.password, database=self._database or None, autocommit=True,
                charset="utf8mb4", connect_timeout=10, binary_prefix=True,
                init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                **metatls.connect_args(t.tls))
        except pymysql.err.MySQLError as exc:
            raise _convert(exc, t) from exc
        if t.tls is not None and t.tls.mode == metatls.REQUIRED and not metatls.is_encrypted(conn):
            conn.close()  # PyMySQL refuses this itself (>= 1.2); never run on plaintext anyway
            raise MetaError(f"MySQL at {t.describe()} did not negotiate TLS; refusing a plaintext "
                            "connection (volume.toml [meta] tls = \"required\")")
        if self.lock_wait_s:
            self._apply_lock_wait(conn)
        return conn

    def set_lock_wait(self, seconds: int) -> None:
        """Wait at most ``seconds`` (whole, >= 1) for a row lock on this connection and
        every reconnection (session ``innodb_lock_wait_timeout``; the server default is
        50 s). A statement that waits longer fails with MySQL error 1205: its body is
        rolled back to its savepoint and raises MetaError. A shared mount sets it
        (cas.engine.fs, docs/sharing.md): another machine's body holds a row lock for
        one body only, so a longer wait means that machine is stuck."""
        self.lock_wait_s = seconds
        self._apply_lock_wait(self.conn)

    def _apply_lock_wait(self, conn: pymysql.connections.Connection) -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("SET SESSION innodb_lock_wait_timeout = %s", (int(self.lock_wait_s),))
        except pymysql.err.MySQLError as exc:
            raise _convert(exc, self.target) from exc

    def _connect_wait(self) -> pymysql.connections.Connection:
        """Connect, waiting up to ``reconnect_wait_s`` seconds (RECONNECT_WAIT_S) for a
        server that is gone (SERVER_GONE_CODES) to answer again; retries back off from
        50 ms to 0.5 s. Raises MetaError when the wait runs out or for any other error."""
        deadline = time.monotonic() + self.reconnect_wait_s
        delay = 0.05
        while True:
            try:
                conn = self._connect()
            except MetaError as exc:
                code = _code(exc.__cause__)
                if code not in SERVER_GONE_CODES or time.monotonic() + delay > deadline:
                    raise MetaError(f"{exc} (waited {self.reconnect_wait_s:.0f} s for the server)"
                                    if code in SERVER_GONE_CODES else str(exc)) from exc.__cause__
                time.sleep(delay)
                delay = min(0.5, delay * 2)
                continue
            log.info("reconnected to %s", self.target.describe())
            return conn

    def close(self) -> None:
        """Commit any open group transaction and close the connection."""
        try:
            self.commit()
        finally:
            self._close_conn()

    def _close_conn(self) -> None:
        try:
            self.conn.close()
        except pymysql.err.Error:
            pass

    def query(self, sql: str, args: Sequence[Any] | dict[str, Any] | None = None, *,
              see_held: bool = True) -> list[tuple[Any, ...]]:
        """Run one statement outside a transaction; return its rows. Raises MetaError.

        Operations the owner holds in RAM are written first (:meth:`write_held`), unless
        ``see_held`` is False: a read the owner knows no held row can change.

        When the server is gone (SERVER_GONE_CODES) the statement runs once more on a
        new session, after waiting up to RECONNECT_WAIT_S for the server; an open group
        transaction is lost first (:meth:`_lose_group`: the owner reloads its RAM state
        before the statement runs again, so a read sees the database as it is).
        """
        try:
            if see_held:
                self.write_held()
        except MetaError:
            if self.held_ops:
                raise
            # writing them lost the group (logged): a read goes on, on the new session
        for attempt in (0, 1):
            try:
                if not self._group_open:
                    self._ensure_conn()
                with self.conn.cursor() as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall())
            except pymysql.err.OperationalError as exc:
                gone = _code(exc) in _RECONNECT_CODES
                if self._group_open:
                    if not gone or attempt:
                        self._group_lost(exc)
                    self._lose_group(exc)
                    continue
                if attempt == 0 and gone:
                    self._close_conn()  # _ensure_conn waits for the server
                    continue
                raise _convert(exc, self.target) from exc
            except pymysql.err.MySQLError as exc:
                raise _convert(exc, self.target) from exc
        raise AssertionError("unreachable")

    def execute(self, sql: str, args: Sequence[Any] | None = None) -> int:
        """Run one statement outside a transaction; return the affected row count.

        A closed session is reopened first (waiting up to RECONNECT_WAIT_S for the
        server); a statement the server may have run before it went away is not sent
        again. Raises MetaError."""
        self.write_held()
        try:
            if not self._group_open:
                self._ensure_conn()
            with self.conn.cursor() as cur:
                return int(cur.execute(sql, args))
        except pymysql.err.MySQLError as exc:
            raise _convert(exc, self.target) from exc

    # -- group commit -------------------------------------------------------------------
    def start_group_commit(self, max_ops: int = GROUP_COMMIT_MAX_OPS) -> None:
        """From now on, :meth:`transaction` bodies join one open transaction (each in its
        own savepoint) that commits at :meth:`commit`, or after ``max_ops`` bodies.

        For a connection that is the only writer of the rows it changes in bulk (a
        mount's namespace): no deadlock can then roll the open transaction back.
        """
        self._group_max = max_ops

    @property
    def group_open(self) -> bool:
        """Whether a group transaction is open (what joined it is not durable yet)."""
        return self._group_open

    @property
    def uncommitted(self) -> int:
        """Operations since the last group commit: transaction bodies run (a batch of held
        operations counts as its size) and operations held in RAM."""
        return self._group_ops + self.held_ops

    def hold_op(self) -> None:
        """Count one operation the owner holds in RAM instead of running it now (its rows
        are written by ``before_statement``, :meth:`write_held`). Once the group's
        operations reach its ``max_ops`` (at once without group commit) the held rows are
        written and the group commits. Raises MetaError (the group was lost)."""
        self.held_ops += 1
        if self._group_ops + self.held_ops >= self._group_max:
            self.commit()

    def write_held(self) -> None:
        """Let the owner write the operations it holds in RAM (``before_statement``),
        so that no statement on this connection, and no commit, runs without them:
        the owner's held rows are visible to every read and commit whole with the
        group. Not re-entered from the owner's own statements. Raises MetaError."""
        if not self.held_ops or self.before_statement is None or self._writing_held:
            return
        self._writing_held = True
        try:
            self.before_statement()
        finally:
            self._writing_held = False

    def lose_group(self, why: str) -> NoReturn:
        """The owner could not write the operations it held into the open group (a
        statement failed): roll the whole group back as a lost one, so that the database
        and the owner's RAM state (``on_group_lost``) agree again, and raise MetaError."""
        n = self._group_ops + self.held_ops
        self._rollback()
        self._group_open = False
        self._group_ops = 0
        self.held_ops = 0
        self._resync_due = self._resync_due or n > 0
        log.error("metadata group transaction rolled back (%d operations): %s", n, why)
        self._resync()
        raise MetaError(f"{why}: the last {n} uncommitted operations were lost")

    def commit(self) -> None:
        """Commit the open group transaction, if any (durable when this returns); held
        operations are written first (:meth:`write_held`)."""
        self.write_held()
        if not self._group_open:
            return
        t0 = time.perf_counter_ns()
        try:
            self.conn.commit()
        except pymysql.err.MySQLError as exc:
            self._group_lost(exc)
        self.last_commit_ns = time.time_ns()
        MYSQL_COMMIT.observe_ns(time.perf_counter_ns() - t0)
        self._group_open = False
        self._group_ops = 0
        if self.on_group_commit is not None:
            self.on_group_commit()

    def _group_lost(self, exc: pymysql.err.MySQLError) -> NoReturn:
        """The open group transaction is gone (deadlock victim, connection lost):
        recover (:meth:`_lose_group`) and raise MetaError (EIO) for the operation that
        found out."""
        n = self._lose_group(exc)
        raise MetaError(f"{_convert(exc, self.target)}: the last {n} uncommitted operations were lost") from exc

    def _lose_group(self, exc: pymysql.err.MySQLError) -> int:
        """Forget the lost group transaction, start a fresh session (waiting up to
        RECONNECT_WAIT_S for a server that is gone) and, if the group held operations,
        let the owner resynchronize its RAM state (``on_group_lost``). Returns how many
        operations were lost. Raises
        MetaError if the server does not come back in time; the resync then runs
        before the next statement (:meth:`_ensure_conn`)."""
        self._rollback()
        self._group_open = False
        n, self._group_ops = self._group_ops + self.held_ops, 0
        self.held_ops = 0
        self._close_conn()
        self._resync_due = self._resync_due or n > 0  # nothing to reload if it held nothing
        log.error("metadata group transaction lost (%d operations): %s", n, _convert(exc, self.target))
        try:
            self.conn = self._connect_wait()
        except MetaError as err:
            raise MetaError(f"{err}: the last {n} uncommitted operations were lost") from exc
        self._resync()
        return n

    def _resync(self) -> None:
        """Run ``on_group_lost`` if a lost group still awaits it (once; again if it fails)."""
        if not self._resync_due:
            return
        self._resync_due = False
        if self.on_group_lost is None:
            return
        try:
            self.on_group_lost()
        except BaseException:
            self._resync_due = True
            raise

    def _ensure_conn(self) -> None:
        """Reconnect if the session is closed (waiting up to RECONNECT_WAIT_S for a
        server that is gone), then run a resync still due from a lost group; a group
        transaction cannot be open then."""
        if not self.conn.open:
            self.conn = self._connect_wait()
        self._resync()

    def _begin_group(self) -> None:
        """Open the group transaction; a server found gone at BEGIN is waited for (no
        operation is lost then: the previous group committed)."""
        for attempt in (0, 1):
            self._ensure_conn()
            try:
                self.conn.begin()
            except pymysql.err.MySQLError as exc:
                if attempt == 0 and _code(exc) in _RECONNECT_CODES:
                    self._close_conn()
                    continue
                raise _convert(exc, self.target) from exc
            self._group_open = True
            return

    def _in_group(self, body: Callable[[pymysql.cursors.Cursor], T], again: bool = True, ops: int = 1,
                  deadlocks: int = 0) -> T:
        if not self._group_open:
            self._begin_group()
        try:
            with self.conn.cursor() as cur:
                cur.execute("SAVEPOINT op")
                try:
                    result = body(cur)
                except pymysql.err.MySQLError as exc:
                    if exc.args and exc.args[0] in _GROUP_FATAL:
                        raise  # the server rolled back the whole transaction
                    cur.execute("ROLLBACK TO SAVEPOINT op")
                    self._end_lone()
                    raise _convert(exc, self.target) from exc
                except BaseException:
                    cur.execute("ROLLBACK TO SAVEPOINT op")
                    self._end_lone()
                    raise
        except pymysql.err.MySQLError as exc:  # the server rolled the whole group back
            if again and self._group_ops == 0 and self.held_ops == 0 and _code(exc) in _RECONNECT_CODES:
                self._lose_group(exc)  # it held nothing: reconnect and run the body again
                return self._in_group(body, again=False, ops=ops)
            if (self.lone_bodies and deadlocks < LONE_DEADLOCK_RETRIES and self._group_ops == 0
                    and self.held_ops == 0 and _code(exc) == 1213):
                self._rollback()   # InnoDB rolled the body back: it held nothing else, run it again
                self._group_open = False
                MYSQL_RETRIES.add()
                time.sleep(min(0.2, 0.005 * 2 ** deadlocks))
                return self._in_group(body, again=again, ops=ops, deadlocks=deadlocks + 1)
            self._group_lost(exc)
        self._group_ops += ops
        if self._group_ops + self.held_ops >= self._group_max:
            self.commit()
        return result

    def _end_lone(self) -> None:
        """After a failed body rolled back to its savepoint: with ``lone_bodies`` and
        nothing else in the group, roll the transaction back whole, which releases the
        row locks the body took (docs/sharing.md)."""
        if self.lone_bodies and self._group_ops == 0 and self.held_ops == 0:
            self.conn.rollback()
            self._group_open = False

    def transaction(self, body: Callable[[pymysql.cursors.Cursor], T], retries: int = 20, ops: int = 1) -> T:
        """Run ``body(cursor)`` in one transaction and commit; retry on deadlock, lock
        wait timeout and a failed NOWAIT (``_RETRY_CODES``).

        ``body`` may run more than once, so it must not have effects outside the
        database that a retry would repeat wrongly. Raises MetaError; on any exception
        the transaction is rolled back. Under group commit (:meth:`start_group_commit`)
        the body runs in a savepoint of the open group transaction instead: an exception
        undoes the body alone, and the commit happens later; ``ops`` is how many
        operations the body carries (a batch of held creates), counted toward
        ``max_ops``. Operations held in RAM are written first (:meth:`write_held`).
        """
        self.write_held()
        if self._group_max:
            t0 = time.perf_counter_ns()
            result = self._in_group(body, ops=ops)
            MYSQL_TX.observe_ns(time.perf_counter_ns() - t0)
            return result
        for attempt in range(retries):
            try:
                self._ensure_conn()
                t0 = time.perf_counter_ns()
                self.conn.begin()
                with self.conn.cursor() as cur:
                    result = body(cur)
                self.conn.commit()
                self.last_commit_ns = time.time_ns()
                MYSQL_TX.observe_ns(time.perf_counter_ns() - t0)
                return result
            except pymysql.err.MySQLError as exc:
                self._rollback()
                if exc.args and exc.args[0] in _RETRY_CODES and attempt + 1 < retries:
                    MYSQL_RETRIES.add()
                    time.sleep(min(0.5, 0.01 * 2 ** attempt))
                    continue
                if exc.args and exc.args[0] in _RECONNECT_CODES and attempt == 0:
                    self._close_conn()  # _ensure_conn waits for the server
                    continue
                raise _convert(exc, self.target) from exc
            except BaseException:
                self._rollback()
                raise
        raise AssertionError("unreachable")

    def _rollback(self) -> None:
        try:
            self.conn.rollback()
        except pymysql.err.Error:
            pass


def schema_statements() -> Iterator[str]:
    """The statements of schema.sql, comments removed."""
    text = "\n".join(line for line in SCHEMA_FILE.read_text().splitlines()
                     if not line.lstrip().startswith("--"))
    for stmt in re.split(r";\s*$", text, flags=re.M):
        if stmt.strip():
            yield stmt.strip()


def _v1_to_v2(db: Database) -> None:
    """Schema 1 -> 2: chunks.is_local, and the cloud tier's tables (from schema.sql)."""
    if "is_local" not in _columns(db, "chunks"):
        db.execute("ALTER TABLE chunks ADD COLUMN is_local TINYINT NOT NULL DEFAULT 1")
    for stmt in schema_statements():
        for table in ("packs", "pack_entries", "upload_queue"):
            if stmt.startswith(f"CREATE TABLE {table} "):
                db.execute(stmt.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))


def _columns(db: Database, table: str) -> set[str]:
    """Column names of ``table`` in the current database."""
    return {str(r[0]) for r in db.query("SELECT column_name FROM information_schema.columns "
                                        "WHERE table_schema = DATABASE() AND table_name = %s", (table,))}


def _v2_to_v3(db: Database) -> None:
    """Schema 2 -> 3: chunks.bad (chunks that failed verification) and inodes.data_bytes
    (bytes in stored slots, for st_blocks), filled in from the manifests."""
    if "bad" not in _columns(db, "chunks"):
        db.execute("ALTER TABLE chunks ADD COLUMN bad TINYINT NOT NULL DEFAULT 0, ADD KEY bad_idx (bad)")
    if "data_bytes" not in _columns(db, "inodes"):
        db.execute("ALTER TABLE inodes ADD COLUMN data_bytes BIGINT UNSIGNED NOT NULL DEFAULT 0")
        cs = int(db.query("SELECT v FROM meta WHERE k = 'chunk_size'")[0][0])
        db.execute("UPDATE inodes i JOIN (SELECT m.inode, SUM(LEAST(%s, CAST(j.size AS SIGNED) - "
                   "CAST(m.slot AS SIGNED) * %s)) AS b FROM manifests m JOIN inodes j ON j.id = m.inode "
                   "GROUP BY m.inode) t ON t.inode = i.id SET i.data_bytes = GREATEST(t.b, 0)", (cs, cs))


def _v3_to_v4(db: Database) -> None:
    """Schema 3 -> 4: snapshot_packs (the packs each kept metadata snapshot names, which gc
    keeps; docs/backup.md) and xattrs.name_idx (casfs find --xattr; docs/find.md)."""
    for stmt in schema_statements():
        if stmt.startswith("CREATE TABLE snapshot_packs "):
            db.execute(stmt.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
    if not db.query("SELECT 1 FROM information_schema.statistics WHERE table_schema = DATABASE() "
                    "AND table_name = 'xattrs' AND index_name = 'name_idx'"):
        db.execute("ALTER TABLE xattrs ADD KEY name_idx (name, value(64))")


def _v4_to_v5(db: Database) -> None:
    """Schema 4 -> 5 (several mounts of one volume, docs/sharing.md): upload_queue.store,
    and every table of schema.sql the database lacks (sessions, sustained, changes)."""
    if "store" not in _columns(db, "upload_queue"):
        db.execute("ALTER TABLE upload_queue ADD COLUMN store CHAR(32) NULL, "
                   "ADD KEY store_idx (store, pack)")
    for stmt in schema_statements():
        if stmt.startswith("CREATE TABLE "):
            db.execute(stmt.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))


#: from_version -> the step to the next version; each step is idempotent (DDL commits
#: on its own in MySQL, so a step cut short by a crash is simply run again).
_MIGRATIONS: dict[str, Callable[[Database], None]] = {"1": _v1_to_v2, "2": _v2_to_v3, "3": _v3_to_v4,
                                                     "4": _v4_to_v5}


def _upgrade(db: Database, version: int) -> None:
    """Bring a database of schema ``version`` up to SCHEMA_VERSION, step by step."""
    while version < SCHEMA_VERSION:
        log.warning("upgrading the volume's database from schema %d to %d", version, version + 1)
        _MIGRATIONS[str(version)](db)
        db.execute("UPDATE meta SET v = %s WHERE k = 'schema_version' AND v = %s",
                   (str(version + 1), str(version)))
        version += 1


class Metadata:
    """A volume's database connection and, for embedded volumes, its server."""

    def __init__(self, volume: Volume, db: Database, server: EmbeddedServer | None) -> None:
        self.volume = volume
        self.db = db
        self.server = server

    def close(self) -> None:
        """Commit and close the connection; release the embedded server."""
        try:
            self.db.close()
        finally:
            if self.server is not None:
                self.server.release()
                self.server = None

    def __enter__(self) -> "Metadata":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _target_for(volume: Volume, server: EmbeddedServer | None) -> MetaTarget:
    if server is not None:
        return MetaTarget(user="root", password="", database=EMBEDDED_DB, unix_socket=str(server.socket))
    target = parse_meta_url(volume.meta_url, volume.meta_password)
    tls = metatls.from_config(volume.meta_tls)
    return target if tls is None else dataclasses.replace(target, tls=tls)


def _server_for(volume: Volume) -> EmbeddedServer | None:
    if not volume.embedded:
        return None
    return EmbeddedServer(volume.mysql_dir, volume.run_dir, volume.log_dir)


def connect(volume: Volume) -> Metadata:
    """Connect to an initialized volume's database and check its schema and identity.

    Raises MetaError (unreachable, refused), SchemaMismatch, ServerError (embedded
    server cannot start).
    """
    server = _server_for(volume)
    if server is not None:
        server.acquire()
    try:
        db = Database(_target_for(volume, server))
        try:
            rows = dict(db.query("SELECT k, v FROM meta"))
        except MetaError as exc:
            db.close()
            raise MetaError(f"database {db.target.describe()} holds no casfs volume ({exc})") from exc
        version = rows.get("schema_version")
        if version in _MIGRATIONS:
            _upgrade(db, int(version))
            version = str(SCHEMA_VERSION)
        if version != str(SCHEMA_VERSION):
            db.close()
            raise SchemaMismatch(f"database schema version {version}, this casfs speaks version "
                                 f"{SCHEMA_VERSION}: use a matching casfs release")
        if rows.get("volume_uuid") != volume.uuid:
            db.close()
            raise MetaError(f"database {db.target.describe()} belongs to another volume "
                            f"({rows.get('volume_uuid')}, expected {volume.uuid})")
        _check_encryption(volume, db, rows.get(ENCRYPTION_META))
    except BaseException:
        if server is not None:
            server.release()
        raise
    return Metadata(volume, db, server)


#: meta key recording that a volume is encrypted (written at init, or at the first
#: unlocked open of an encrypted volume made before the key existed); its value names
#: the scheme (docs/encryption.md)
ENCRYPTION_META = "encryption"
ENCRYPTION_SCHEME = "aes-256-gcm/blake3-keyed"


def _check_encryption(volume: Volume, db: Database, recorded: str | None) -> None:
    """Refuse a volume whose database says it is encrypted while its volume.toml has no
    [encryption] table (new chunks would be written in plaintext under SHA-256 names,
    snapshots unsealed); record the scheme for an encrypted volume that has no row yet
    once it is unlocked (``volume.keys`` set). Closes ``db`` and raises VolumeError."""
    if recorded is not None and recorded != "none" and not volume.encryption:
        db.close()
        raise VolumeError(f"volume {volume.name} is encrypted ({recorded}, says its database) but "
                          f"{volume.path}/volume.toml has no [encryption] table: put it back from "
                          "`casfs key export` text or the volume object on Drive; refusing to go on as plain")
    if recorded is None and volume.encryption and getattr(volume, "keys", None) is not None:
        try:
            db.execute("INSERT IGNORE INTO meta (k, v) VALUES (%s, %s)", (ENCRYPTION_META, ENCRYPTION_SCHEME))
        except MetaError as exc:   # the next unlocked open tries again
            log.warning("cannot record that volume %s is encrypted: %s", volume.name, exc)


def create_schema(volume: Volume, fill: Callable[[Database], None] | None = None) -> bool:
    """Create the volume's database from schema.sql, then run ``fill`` on it (the rows a
    new volume needs beyond the schema's). Starts and releases the embedded server of an
    embedded volume. Returns True when it created the database (False: it existed,
    empty). Raises MetaError when the database already holds tables, or on any server
    error."""
    server = _server_for(volume)
    if server is not None:
        server.acquire()
    try:
        target = _target_for(volume, server)
        admin = Database(target, database="")
        try:
            existed = bool(admin.query("SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = %s",
                                       (target.database,))[0][0])
            admin.execute(f"CREATE DATABASE IF NOT EXISTS `{target.database}` CHARACTER SET utf8mb4")
            n = admin.query("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s",
                            (target.database,))[0][0]
            if n:
                raise MetaError(f"database {target.describe()} is not empty: it may hold another volume")
        finally:
            admin.close()
        db = Database(target)
        try:
            for stmt in schema_statements():
                db.execute(stmt)
            if fill is not None:
                fill(db)
        finally:
            db.close()
    finally:
        if server is not None:
            server.release()
    return not existed


def initialize(volume: Volume, uid: int, gid: int) -> None:
    """Create the volume's database from schema.sql with its root directory inode.

    Raises MetaError if the database already holds tables, or on any server error.
    """
    def fill(db: Database) -> None:
        now = time.time_ns()
        db.execute("INSERT INTO meta (k, v) VALUES ('volume_uuid', %s), ('chunk_size', %s)",
                   (volume.uuid, str(volume.chunk_size)))
        if volume.encryption:
            db.execute("INSERT INTO meta (k, v) VALUES (%s, %s)", (ENCRYPTION_META, ENCRYPTION_SCHEME))
        db.execute("INSERT INTO inodes (id, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
                   "VALUES (%s, %s, %s, %s, 2, %s, %s, %s)",
                   (ROOT_INODE, 0o40755, uid, gid, now, now, now))
    create_schema(volume, fill)
