"""The embedded metadata server: a private MariaDB for one volume.

With no ``meta_url`` a volume keeps its database in ``VOLUME/mysql`` and talks to a
mariadbd that listens on a unix socket only (``--skip-networking``). Every process that
needs the database (a mount, ``casfs gc``, ``casfs stats`` ...) calls :meth:`acquire`,
which starts the server if it is not running, and :meth:`release` when done; the last
user to leave stops it. Users are counted with flock(2): each holds a shared lock on
``run/mysql.users`` for its lifetime, so a user killed by SIGKILL is uncounted by the
kernel. Starting and stopping happen under an exclusive lock on ``run/mysql.control``.
A server left running by a killed mount is found through its socket and reused.

Other local users get no way in (docs/security.md): the socket lives only in a directory
that this user owns and nobody else can write (the volume's ``run/``, or for a long
volume path a private directory made with mkdtemp(3) whose path is recorded in
``run/sockdir`` and checked with lstat(2) on every use); the server runs with
``--secure-file-priv=/dev/null`` so no statement reads or writes files, and with its
temporary files in the private ``run/tmp``; and a pid from
``run/mysqld.pid`` is signalled only after ``/proc/PID/cmdline`` shows this datadir's
mariadbd, through a pidfd so a reused pid is never hit.
"""
from __future__ import annotations

import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import stat as S
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cas.errors import ServerError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `apt-get install mariadb-server` (Debian/Ubuntu), "
    "or use an existing server with `casfs init --meta mysql://USER@HOST:PORT/DB`"
)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def _find(binary: str) -> str | None:
    if binary == "mariadbd" and "CASFS_MARIADBD" in os.environ:  # override; empty = none
        p = os.environ["CASFS_MARIADBD"]
        return p if p and os.access(p, os.X_OK) else None
    return shutil.which(binary) or next(
        (p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.access(p, os.X_OK)), None)


SOCKET_NAME = "mysqld.sock"
SOCKDIR_RECORD = "sockdir"   # in run/: the private directory holding the socket of a long run path
SUN_PATH_MAX = 100           # bytes of a socket path we use; sun_path holds 108 with the NUL (unix(7))
# secure_file_priv: MariaDB has no NULL setting (MySQL does); no file can lie below a
# character device, so every LOAD DATA INFILE / SELECT ... INTO OUTFILE / LOAD_FILE() is refused
SECURE_FILE_PRIV = "/dev/null"


def private_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a directory private to this user, or None if it is.

    Private: lstat(2) shows a real directory (not a symlink) owned by this effective uid
    with no permission bits for group or other (mode 0700 or stricter).
    """
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not S.S_ISDIR(st.st_mode):
        return f"{path} is not a directory" + (" (a symlink)" if S.S_ISLNK(st.st_mode) else "")
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    if st.st_mode & 0o077:
        return f"{path} has mode {S.S_IMODE(st.st_mode):04o}: other users can use it"
    return None


def _check_run_dir(run_dir: Path) -> None:
    """Raise ServerError unless ``run_dir`` is a real directory of this user that no
    other user can write (the socket and pid file live there)."""
    try:
        st = os.lstat(run_dir)
    except OSError as exc:
        raise ServerError(f"run directory {run_dir}: {exc.strerror}") from exc
    if not S.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ServerError(f"refusing run directory {run_dir}: it must be a directory owned by uid "
                          f"{os.geteuid()} that no other user can write (mode 0700)")


def _socket_base() -> str:
    """A short directory to make the private socket directory in: $XDG_RUNTIME_DIR when it
    is private to this user (XDG Base Directory spec: owned by the user, mode 0700), else
    the system temp dir (or /tmp when that path is long)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg) and len(xdg) < 60 and private_dir_problem(Path(xdg)) is None:
        return xdg
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) < 60 else "/tmp"


def socket_path_for(run_dir: Path) -> Path:
    """Unix socket path for a server whose run directory is ``run_dir``.

    ``run_dir/mysqld.sock`` when that fits in sun_path (unix(7)). A longer path uses a
    private directory made with mkdtemp(3) (mode 0700, unpredictable name, created
    exclusively) under $XDG_RUNTIME_DIR or the temp dir; its path is recorded in
    ``run_dir/sockdir`` and used again only while lstat(2) shows it private to this user
    (:func:`private_dir_problem`); otherwise a new one is made. A predictable shared
    path is never used: another user could create it first and reach the server.
    Raises ServerError when ``run_dir`` itself is not private to this user.
    """
    p = run_dir / SOCKET_NAME
    if not run_dir.exists():
        if len(str(p)) < SUN_PATH_MAX:
            return p
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_run_dir(run_dir)
    if len(str(p)) < SUN_PATH_MAX:
        return p
    record = run_dir / SOCKDIR_RECORD
    with _flock(run_dir / (SOCKDIR_RECORD + ".lock")):
        try:
            d = Path(record.read_text().strip())
        except (OSError, ValueError):
            d = Path()
        if d.is_absolute() and len(str(d / SOCKET_NAME)) < SUN_PATH_MAX and private_dir_problem(d) is None:
            return d / SOCKET_NAME
        d = Path(tempfile.mkdtemp(prefix="casfs-", dir=_socket_base()))
        tmp = run_dir / (SOCKDIR_RECORD + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(str(d) + "\n")
        os.replace(tmp, record)
        return d / SOCKET_NAME


class EmbeddedServer:
    """The private mariadbd of a volume; see the module docstring for the protocol."""

    def __init__(self, datadir: Path, run_dir: Path, log_dir: Path) -> None:
        self.datadir = datadir
        self.run_dir = run_dir
        self.log_dir = log_dir
        self._socket: Path | None = None
        self.pid_file = run_dir / "mysqld.pid"
        self._users_fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        """The server's unix socket (:func:`socket_path_for`; checked again at every
        :meth:`acquire`). Raises ServerError for a run directory other users can write."""
        if self._socket is None:
            self._socket = socket_path_for(self.run_dir)
        return self._socket

    # -- state -------------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether a server answers on the socket."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def pid(self) -> int | None:
        """Process id of this datadir's running mariadbd, or None.

        The pid file is believed only if ``/proc/PID/cmdline`` shows a mariadbd started
        with this ``--datadir`` (:func:`is_server_of`): a pid file left by a dead server
        may name an unrelated process that reused the pid. When it does not, running
        processes are searched for this datadir's server.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid > 0 and is_server_of(pid, self.datadir):
            return pid
        return find_server(self.datadir)

    # -- lifecycle ---------------------------------------------------------------------
    def install(self) -> None:
        """Create the datadir with mariadb-install-db (root@localhost, no password)."""
        tool = _find("mariadb-install-db") or _find("mysql_install_db")
        if not _find("mariadbd") or not tool:
            raise ServerError(f"mariadbd is not installed: {INSTALL_HINT}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [tool, "--no-defaults", f"--datadir={self.datadir}",
               "--auth-root-authentication-method=normal", "--skip-test-db",
               f"--tmpdir={self._private_tmp()}"]
        cmd += _user_args()
        with open(self.log_dir / "mariadb-install.log", "wb") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise ServerError(f"mariadb-install-db failed (exit {rc}); see {self.log_dir / 'mariadb-install.log'}")

    def _private_tmp(self) -> Path:
        """``run/tmp``, the server's temporary directory (mode 0700): its temporary tables
        and files never go to a directory other users share (/tmp). Raises ServerError."""
        d = self.run_dir / "tmp"
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ServerError(f"cannot create {d}: {exc.strerror}") from exc
        problem = private_dir_problem(d)
        if problem is not None:
            raise ServerError(f"refusing the server's temporary directory: {problem}")
        return d

    def acquire(self) -> None:
        """Register as a user of the server, starting it if needed. Raises ServerError."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._socket = socket_path_for(self.run_dir)  # re-checked: the socket dir may be gone
        with _flock(self.run_dir / "mysql.control"):
            fd = os.open(self.run_dir / "mysql.users", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._users_fd = fd
            try:
                if not self.alive():
                    self._start()
            except BaseException:
                self._drop_users_lock()
                raise

    def release(self) -> None:
        """Unregister; the last user stops the server."""
        if self._users_fd is None:
            return
        with _flock(self.run_dir / "mysql.control"):
            fd = self._users_fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._drop_users_lock()
                return
            try:
                self.stop()
            finally:
                self._drop_users_lock()

    def _drop_users_lock(self) -> None:
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None

    def _start(self) -> None:
        binary = _find("mariadbd")
        if not binary:
            raise ServerError(f"mariadbd is not installed: {INSTALL_HINT}")
        if not (self.datadir / "mysql").is_dir():
            self.install()
        self._socket = socket_path_for(self.run_dir)
        stale = self.pid()
        if stale is not None:  # running but not answering: stop it before starting anew
            _terminate(stale, STOP_TIMEOUT_S, datadir=self.datadir)
        try:
            self.socket.unlink()
        except FileNotFoundError:
            pass
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
               "--skip-networking", f"--pid-file={self.pid_file}",
               f"--log-error={self.log_dir / 'mariadb.err'}",
               "--innodb-buffer-pool-size=128M", "--innodb-log-file-size=64M",
               "--max-connections=200", "--character-set-server=utf8mb4",
               "--skip-name-resolve", "--transaction-isolation=READ-COMMITTED",
               f"--secure-file-priv={SECURE_FILE_PRIV}", f"--tmpdir={self._private_tmp()}"]
        cmd += _user_args()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"mariadbd exited at start (code {self._proc.returncode}); "
                                  f"see {self.log_dir / 'mariadb.err'}")
            if self.alive():
                return
            time.sleep(0.05)
        raise ServerError(f"mariadbd did not answer within {START_TIMEOUT_S:.0f} s; see {self.log_dir / 'mariadb.err'}")

    def restart_if_dead(self) -> bool:
        """Start the server again if it does not answer (it died under its users).

        Runs under the control lock, like :meth:`acquire`, so a casfs command starting
        the server at the same moment is not raced. Returns whether this call started
        it; never starts a server this object has released. Raises ServerError when it
        cannot start.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _flock(self.run_dir / "mysql.control"):
            if self._users_fd is None or self.alive():
                return False  # released (the last user stops it on purpose), or it runs
            if self._proc is not None:
                self._proc.poll()  # reap our dead child (no zombie left behind)
            self._start()
            return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, wait for exit). No-op if it is not running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
            return
        pid = self.pid()
        if pid is not None:
            _terminate(pid, STOP_TIMEOUT_S, datadir=self.datadir)


RESTART_BACKOFF_MIN_S = 0.5    # first wait after a failed restart
RESTART_BACKOFF_MAX_S = 30.0   # the backoff doubles up to this bound
WATCH_INTERVAL_S = 0.25        # how often the supervisor checks the server


class ServerSupervisor:
    """Keeps a mount's embedded server running: a daemon thread that checks every
    WATCH_INTERVAL_S seconds whether the server's process (pid file) still runs and,
    when it is gone (killed, crashed, OOM-killed) and nothing answers on the socket,
    starts it again with :meth:`EmbeddedServer.restart_if_dead`, under the control
    lock (so it never races another casfs command starting or stopping the server).

    A failed start is retried after a bounded exponential backoff: RESTART_BACKOFF_MIN_S,
    doubling up to RESTART_BACKOFF_MAX_S, reset by a success. Each restart is logged
    (WARNING), each failed start too (ERROR). The server must have been acquired
    (:meth:`EmbeddedServer.acquire`) before :meth:`start`; a released server is never
    restarted, so :meth:`stop` may come before or after the release. Clients wait and
    reconnect by themselves (``cas.db.database.Database``; docs/database.md).
    """

    def __init__(self, server: EmbeddedServer, interval_s: float = WATCH_INTERVAL_S) -> None:
        self.server = server
        self.interval_s = interval_s
        self.restarts = 0                 # successful restarts so far
        self.last_error = ""              # the last failed start's message, "" if none
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching (a daemon thread named ``casfs-dbsup``)."""
        self._thread = threading.Thread(target=self._run, name="casfs-dbsup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and wait for the thread (a restart in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        backoff = RESTART_BACKOFF_MIN_S
        while not self._stop.wait(self.interval_s):
            # the pid check reads two small files; the socket is tried only when the
            # process is gone (a connection every check would load the server)
            if self.server.pid() is not None or self.server.alive():
                continue
            try:
                restarted = self.server.restart_if_dead()
            except Exception as exc:  # ServerError, OSError: try again after the backoff
                self.last_error = str(exc)
                log.error("embedded MariaDB server is down and did not restart (next try in %.1f s): %s",
                          backoff, exc)
                if self._stop.wait(backoff):
                    return
                backoff = min(RESTART_BACKOFF_MAX_S, backoff * 2)
                continue
            backoff = RESTART_BACKOFF_MIN_S
            self.last_error = ""
            if restarted:
                self.restarts += 1
                log.warning("embedded MariaDB server was down: restarted it (restart %d, pid %s)",
                            self.restarts, self.server.pid())


def _user_args() -> list[str]:
    return ["--user=root"] if os.geteuid() == 0 else []


def pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (/proc/PID/stat state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _same_path(a: str, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def is_server_of(pid: int, datadir: Path) -> bool:
    """Whether process ``pid`` is a mariadbd (or mysqld) serving ``datadir``: its
    ``/proc/PID/cmdline`` (proc(5)) names such a binary and ``--datadir=`` that directory."""
    args = _cmdline(pid)
    if not args or not pid_running(pid):
        return False
    names = {"mariadbd", "mysqld"}
    override = _find("mariadbd")
    if override:
        names.add(os.path.basename(override))
    if os.path.basename(args[0]) not in names:
        return False
    return any(a.startswith("--datadir=") and _same_path(a[len("--datadir="):], datadir) for a in args[1:])


def find_server(datadir: Path) -> int | None:
    """Pid of a running mariadbd serving ``datadir`` (searched in /proc), or None."""
    for name in os.listdir("/proc"):
        if name.isdigit() and is_server_of(int(name), datadir):
            return int(name)
    return None


def _terminate(pid: int, timeout: float, datadir: Path | None = None) -> None:
    """SIGTERM ``pid``, SIGKILL it after ``timeout`` s, and wait until it is gone.

    With ``datadir``, the process is first pinned with a pidfd (pidfd_open(2)) and then
    checked to be that datadir's server (:func:`is_server_of`); signals go through the
    pidfd, so a pid reused by an unrelated process is never signalled.
    """
    if datadir is None:
        _terminate_pid(pid, timeout)
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already
        return
    try:
        if not is_server_of(pid, datadir):
            return
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while True:
            readable, _, _ = select.select([fd], [], [], 0.05)  # a pidfd is readable once the process exited
            if readable or not pid_running(pid):
                return
            if time.monotonic() > deadline:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except ProcessLookupError:
                    return
    finally:
        os.close(fd)


def _terminate_pid(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


class _flock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> "_flock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
