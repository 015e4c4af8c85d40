"""`casfs mount` and `casfs umount`: starting the mount daemon and stopping it.

The daemon is a forked child in its own session. It reports over a pipe either
"OK" (the kernel mount exists) or "ERR <message>"; `casfs mount` prints the message and
exits 1, so every start-up failure reaches the user. A registry file
``$XDG_DATA_HOME/casfs/mounts/<hash>.json`` maps a mountpoint to its daemon's pid, which
`casfs umount` waits for after ``fusermount3 -u``.

`casfs umount` first asks the daemon to commit everything (SIGUSR1 and
``run/sync.json``, fusefront/daemon.py) and unmounts only when nothing is left
uncommitted; a daemon that exits with buffers it cannot commit keeps them in the
volume's rescue area (cas/engine/rescue.py), which the next mount replays. docs/writeback.md.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from cas.config import audit
from cas.tier import cloud, snapshot
from cas.engine import rescue
from cas.engine import sessions
from cas.errors import CasError, VolumeError
from cas.engine.fs import DURABILITY_MODES, GROUP, Filesystem
from cas.engine.coherence import CONSISTENCY_LEVELS, SESSION
from cas.db.volume import is_shared
from cas.db.database import Metadata, connect
from cas.tier.objstore import CredentialsRefused, ObjectStoreError
from cas.db.server import ServerSupervisor, pid_running
from cas.chunk.store import LocalStore
from cas.config.volume import Volume, data_home
from fusefront.daemon import SYNC_REQUEST, SYNC_SIGNAL, SYNC_STATUS, serve
from fusefront.metrics import MetricsServer
from fusefront.observe import Observer
from fusefront.mountpoint import (MountpointError, check_mountpoint, find_mount, is_dead_mount,
                                  unmount)

log = logging.getLogger("casfs.mount")


def registry_file(mountpoint: str | Path) -> Path:
    """Registry file of the mount at ``mountpoint`` (absolute path)."""
    h = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:24]
    return data_home() / "mounts" / f"{h}.json"


def is_mounted(vol: Volume) -> bool:
    """Whether a mount daemon holds ``vol`` (its run/mount.lock flock is taken)."""
    try:
        fd = os.open(vol.run_dir / "mount.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _check_store(vol: Volume) -> None:
    try:
        vol.chunk_dir.mkdir(parents=True, exist_ok=True)
        LocalStore(vol.chunk_dir).check_writable()
    except OSError as exc:
        raise VolumeError(f"chunk store {vol.chunk_dir} is not writable: {exc.strerror}") from exc


@dataclass(frozen=True)
class MountOptions:
    """What `casfs mount` was asked for. Sizes in bytes; ``local_limit`` None = no limit;
    ``drive_endpoint`` overrides the volume's [drive] endpoint for this mount."""

    allow_other: bool = False
    cache_bytes: int = 256 << 20
    local_limit: int | None = None
    drive_endpoint: str | None = None
    durability: str | None = None   # None: the volume's [mount] durability, else "group"
    fuse_options: tuple[str, ...] = ()  # kernel mount flags from -o (tools/cli/fstab.py KERNEL_FLAGS)
    metrics: str | None = None      # [HOST:]PORT of the Prometheus endpoint; None: off
    audit: str | None = None        # audit level; None: the volume's [audit] level, else "changes"
    snapshot_interval_s: float | None = None   # None: the volume's [drive] snapshot_interval_s
    consistency: str | None = None  # None: the volume's [mount] consistency, else "session"


def durability_of(vol: Volume, opts: MountOptions) -> str:
    """The namespace durability of a mount (docs/durability.md): ``opts.durability``,
    else ``durability`` of the volume's ``[mount]`` table, else "group". Raises
    VolumeError for anything but "group" or "immediate"."""
    mode = opts.durability if opts.durability is not None else vol.mount.get("durability", GROUP)
    if mode not in DURABILITY_MODES:
        raise VolumeError(f"volume {vol.name}: durability {mode!r} (volume.toml [mount]) is not one of "
                          f"{', '.join(DURABILITY_MODES)}")
    return str(mode)


def consistency_of(vol: Volume, opts: MountOptions) -> str:
    """The consistency level of a mount of a shared volume (docs/sharing.md):
    ``opts.consistency``, else ``consistency`` of the volume's ``[mount]`` table, else
    "session". Raises VolumeError for anything but "eventual", "session" or "strong"."""
    level = opts.consistency if opts.consistency is not None else vol.mount.get("consistency", SESSION)
    if level not in CONSISTENCY_LEVELS:
        raise VolumeError(f"volume {vol.name}: consistency {level!r} (volume.toml [mount]) is not one of "
                          f"{', '.join(CONSISTENCY_LEVELS)}")
    return str(level)


def _record_join_settings(meta: Metadata) -> None:
    """Refresh what `casfs join` copies to a further machine (tools/cli/joincmd.py);
    a failure is logged, the mount goes on."""
    from tools.cli import joincmd
    try:
        if joincmd.record_join_settings(meta):
            log.info("recorded the join settings of volume %s", meta.volume.name)
    except CasError as exc:
        log.warning("cannot record the join settings of volume %s: %s", meta.volume.name, exc)


def start_cloud(meta: Metadata, fs: Filesystem, opts: MountOptions) -> cloud.CloudTier | None:
    """Attach and start the volume's cloud tier, if it has one. A store that cannot be
    opened (no network, bad credentials) is logged and the mount goes on: uploads stay
    queued in the database for the next mount."""
    vol = meta.volume
    if not cloud.enabled(meta.db):
        if opts.local_limit is not None or opts.drive_endpoint is not None:
            raise VolumeError(f"volume {vol.name} has no cloud tier: --local-limit and "
                              "--drive-endpoint need one (casfs drive auth)")
        return None
    if is_shared(meta.db):   # this store's files no queue row names (docs/sharing.md, "Data")
        try:
            queued = cloud.queue_held(meta.db, LocalStore(vol.chunk_dir), vol.store, vol.uuid)
        except CasError as exc:   # the next mount tries again
            log.warning("cannot queue this store's unqueued chunks for upload: %s", exc)
        else:
            if queued:
                log.info("queued or adopted %d chunks of this store for upload", queued)
    cfg = cloud.CloudConfig.from_volume(vol)
    if opts.drive_endpoint is not None:
        cfg.endpoint = opts.drive_endpoint
    try:
        objects = cloud.open_objects(vol, cfg, meta.db)
    except ObjectStoreError as exc:
        log.error("cloud tier unavailable, uploads stay queued: %s", exc)
        if isinstance(exc, CredentialsRefused):
            audit.event("drive credentials refused", op="drive_credentials", result="EACCES",
                        detail=str(exc).splitlines()[0] if str(exc) else "")
        return None
    tier = cloud.CloudTier(meta, objects, cfg, local_limit=opts.local_limit, shared=fs.shared)
    interval = cfg.snapshot_interval_s if opts.snapshot_interval_s is None else opts.snapshot_interval_s
    tier.snapshots = snapper = snapshot.Snapshotter(tier, interval, cfg.keep_generations,
                                                    last_commit_ns=lambda: fs.db.last_commit_ns)
    tier.on_idle = snapper.tick
    fs.attach_cloud(tier)
    tier.start()
    return tier


def open_audit(vol: Volume, opts: MountOptions) -> tuple[str, audit.PrivateRotatingHandler | None]:
    """The mount's audit level and, unless it is off, the buffered handler of the
    volume's audit log, attached to the "casfs.audit" logger (cas/config/audit.py). Raises
    VolumeError for a bad level or a log that cannot be opened."""
    cfg = audit.AuditConfig.from_volume(vol, opts.audit)
    if cfg.level == audit.OFF:
        return cfg.level, None
    try:
        handler = audit.open_handler(vol, cfg, buffered=True)
    except OSError as exc:
        raise VolumeError(f"cannot open the audit log in {vol.log_dir}: {exc.strerror or exc}") from exc
    logger = logging.getLogger(audit.LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False   # thousands of records: not for mount.log
    return cfg.level, handler


def close_audit(handler: logging.Handler | None) -> None:
    """Write what the audit handler holds and detach it (at the daemon's exit)."""
    if handler is not None:
        logging.getLogger(audit.LOGGER).removeHandler(handler)
        handler.close()


def final_snapshot(fs: Filesystem) -> None:
    """The unmount's metadata snapshot (docs/backup.md): stop the tier's thread, then
    drain the queue (for at most the volume's [drive] unmount_snapshot_s) and upload a
    snapshot when something changed since the last one. Never raises: a failure is logged
    and the recovery point stays the previous snapshot."""
    tier = fs.cloud
    snapper = tier.snapshots if tier is not None else None
    if tier is None or snapper is None:
        return
    try:
        snapper.final(tier.cfg.unmount_snapshot_s)
    except Exception:  # noqa: BLE001 - the unmount goes on whatever happens here
        log.exception("unmount snapshot failed")


EXIT_FILE = "exit.json"   # run/exit.json: how the last daemon ended {"pid", "rescued", "error"}
ANSWER_GRACE_S = 120.0    # a commit attempt under way when --timeout passes is awaited this long


class DataRescued(CasError):
    """The daemon exited with uncommitted data, kept in the volume's rescue area."""


def replay_rescue(fs: Filesystem, vol: Volume) -> str:
    """Replay the rescue area into ``fs`` before it serves; returns a notice for the
    user ("" when there was nothing). Raises VolumeError (one line) when a record
    cannot be committed: the records stay and the mount is refused."""
    directory = rescue.rescue_dir(vol.path)
    todo = len(rescue.pending(directory))
    if not todo:
        return ""
    try:
        r = rescue.replay(fs, directory)
    except CasError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VolumeError(f"cannot replay the rescue area {directory} ({todo} files of uncommitted "
                          f"data kept by an earlier mount): {msg}; free space or restore the "
                          "database, then mount again") from exc
    lost = r.lost_found or []
    parts = [f"replayed {r.replayed + len(lost)} files of uncommitted data from the rescue area"]
    if lost:
        parts.append(f"{len(lost)} into {', '.join(lost)} (their inode was gone)")
    if r.damaged:
        parts.append(f"{len(r.damaged)} damaged records left as .bad in {directory}")
    return "; ".join(parts)


def _close_or_rescue(fs: Filesystem, vol: Volume) -> None:
    """Commit everything and close ``fs``; what cannot be committed is spilled to the
    rescue area first. Raises DataRescued when data was kept there (the daemon then
    exits non-zero), RescueError when even that failed, or the close's error."""
    left: list[tuple[int, str | None, int, str]] = []
    err = ""
    try:
        left, err = fs.commit_all()
    except Exception as exc:  # noqa: BLE001 - whatever it is, the buffers must be kept
        err = str(exc)
        left = [(st.ino, None, st.dirty_bytes, "") for st in fs.data.states.values() if st.needs_flush]
    if not left:
        final_snapshot(fs)
    spilled: list[Path] = []
    spill_error: rescue.RescueError | None = None
    if left:
        try:
            spilled = rescue.spill(fs, rescue.rescue_dir(vol.path))
        except rescue.RescueError as exc:
            log.critical("%s: uncommitted data of %d files is LOST", exc, len(left))
            spill_error = exc
    close_error: BaseException | None = None
    try:
        fs.close()
    except Exception as exc:  # noqa: BLE001
        close_error = exc
    else:
        for p in spilled:  # committed at close after all: the records are stale copies
            p.unlink(missing_ok=True)
        spilled = []
    result: dict[str, object] = {"pid": os.getpid(), "rescued": len(spilled),
                                 "error": str(spill_error or close_error or "")}
    try:
        (vol.run_dir / EXIT_FILE).write_text(json.dumps(result))
    except OSError:
        pass
    if spill_error is not None:
        raise spill_error
    if spilled:
        names = ", ".join(p for _, p, _, _ in left if p) or "paths unknown"
        raise DataRescued(f"{len(spilled)} files with uncommitted data ({names}) kept in "
                          f"{rescue.rescue_dir(vol.path)} ({err}); the next mount replays them")
    if close_error is not None:
        raise close_error


EXITING_WAIT_S = 600.0   # how long a new mount waits for the volume's previous daemon to exit


def _volume_mounted(vol: Volume) -> bool:
    """Whether a mount registry entry (:func:`registry_file`) of ``vol`` names a
    mountpoint that is still a casfs mount."""
    for reg in (data_home() / "mounts").glob("*.json"):
        try:
            info = json.loads(reg.read_text())
            same = Path(info["volume"]) == vol.path
            mp = str(info["mountpoint"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if same:
            m = find_mount(mp)
            if m is not None and m.fstype == "fuse.casfs":
                return True
    return False


def _lock_after_exiting_daemon(vol: Volume, lock_fd: int, timeout: float = EXITING_WAIT_S) -> bool:
    """Take the volume's mount lock (flock on ``lock_fd``); True once held.

    While another daemon holds it but serves no mount of this volume any more (it was
    unmounted with umount(8) and is committing before it exits, or it is still starting
    up), wait for it, up to ``timeout`` seconds: `umount MOUNTPOINT && mount
    MOUNTPOINT` then works. False when the volume is mounted (or the wait ran out)."""
    deadline = time.monotonic() + timeout
    logged = False
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        if _volume_mounted(vol) or time.monotonic() > deadline:
            return False
        if not logged:
            log.warning("volume %s: waiting for its previous mount daemon to finish and exit", vol.name)
            logged = True
        time.sleep(0.1)


def _defer_exit_signals() -> None:
    """From now on SIGTERM and SIGINT are logged and ignored: the daemon is committing
    what it holds before it exits (after umount(8), systemd stopping a .mount unit
    may signal the processes left in its cgroup; dying then would lose the buffers).
    SIGKILL still kills it; the rescue area covers what cannot be committed."""
    def note(signum: int, frame: object) -> None:
        log.warning("signal %d while committing before exit: finishing the commit first", signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, note)
        except ValueError:  # not the main thread (engine tests): nothing to defer
            pass


def run_daemon(vol: Volume, mp: Path, opts: MountOptions, on_ready: Callable[[str], None]) -> None:
    """Mount ``vol`` at ``mp`` in this process until unmounted; flush and close after.

    Replays the rescue area before serving; ``on_ready`` gets a notice about it ("" if
    none). At exit, data that cannot be committed goes to the rescue area and
    DataRescued is raised (see :func:`_close_or_rescue`)."""
    vol.run_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(vol.run_dir / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    if not _lock_after_exiting_daemon(vol, lock_fd):
        os.close(lock_fd)
        raise VolumeError(f"volume {vol.name} is already mounted") from None
    reg = registry_file(mp)
    audit_handler: logging.Handler | None = None
    metrics: MetricsServer | None = None
    try:
        durability = durability_of(vol, opts)
        consistency = consistency_of(vol, opts)
        audit_level, audit_handler = open_audit(vol, opts)
        meta = connect(vol)
        # an embedded server that dies is restarted (docs/database.md)
        supervisor = ServerSupervisor(meta.server) if meta.server is not None else None
        if supervisor is not None:
            supervisor.start()
        shared = is_shared(meta.db)
        fs = Filesystem(meta, cache_bytes=opts.cache_bytes, durability=durability, shared=shared,
                        consistency=consistency)
        log.info("namespace durability: %s", durability)
        if shared:
            log.info("shared volume: consistency %s", consistency)
        keeper: sessions.SessionKeeper | None = None
        try:
            # the cross-machine mount lock and the heartbeat (docs/sharing.md, "Sessions")
            # (refused when a `casfs join` made the volume shared since is_shared was read:
            # the engine, the session and the cloud tier run in one mode)
            keeper = sessions.start(meta, consistency, shared=shared)
            fs.sustain_open = keeper.shared
            _record_join_settings(meta)
            start_cloud(meta, fs, opts)
            freed = fs.recover()
            if freed:
                log.warning("freed %d inodes unlinked while open before a crash", freed)
            notice = replay_rescue(fs, vol)
            if notice:
                log.warning("%s", notice)
            observer = Observer(fs, metrics=opts.metrics is not None, audit_level=audit_level)
            if opts.metrics is not None:
                metrics = MetricsServer(fs, observer, opts.metrics)
            reg.parent.mkdir(parents=True, exist_ok=True)
            # "commit_request": this daemon answers `casfs umount`'s SIGUSR1 (an older one
            # would die of it)
            reg.write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(mp), "volume": str(vol.path),
                                       "commit_request": True}))
            serve(fs, mp, fsname=f"casfs:{vol.name}", allow_other=opts.allow_other,
                  on_ready=lambda: on_ready(notice), extra_options=opts.fuse_options,
                  observer=observer if observer.enabled else None)
        finally:
            _defer_exit_signals()
            try:
                if metrics is not None:
                    metrics.stop()
                _close_or_rescue(fs, vol)
            finally:
                if keeper is not None:
                    keeper.stop()   # after the engine freed what the session sustained
                if supervisor is not None:
                    supervisor.stop()
    finally:
        close_audit(audit_handler)
        try:
            reg.unlink()
        except FileNotFoundError:
            pass
        os.close(lock_fd)


def mount(vol: Volume, mountpoint: str, opts: MountOptions, *, foreground: bool, debug: bool) -> None:
    """Validate, then mount in the foreground or in a daemon; return when ready."""
    mp = check_mountpoint(mountpoint)
    _check_store(vol)
    level = logging.DEBUG if debug else logging.INFO
    if foreground:
        logging.getLogger().setLevel(level)
        def ready(notice: str) -> None:
            if notice:
                click.echo(notice, err=True)
            click.echo(f"mounted {vol.name} at {mp}", err=True)
        run_daemon(vol, mp, opts, on_ready=ready)
        return
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        _become_daemon(vol, level)
        code = 0
        reported = []

        def ready(notice: str) -> None:
            reported.append(True)
            _report(wfd, "OK " + notice)
        try:
            run_daemon(vol, mp, opts, on_ready=ready)
        except BaseException as exc:  # report start-up failures to the parent
            code = 1
            if isinstance(exc, DataRescued):
                log.error("exiting with uncommitted data: %s", exc)
            else:
                log.error("mount failed: %s", "".join(traceback.format_exception(exc)))
            msg = str(exc) if isinstance(exc, (CasError, MountpointError)) else f"{type(exc).__name__}: {exc}"
            if not reported:  # after OK the pipe is closed and its fd may be reused
                _report(wfd, "ERR " + (msg.splitlines()[0] if msg else type(exc).__name__))
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        line = f.readline().decode(errors="replace").strip()
    if line == "OK" or line.startswith("OK "):
        if line[3:]:
            click.echo(line[3:], err=True)
        click.echo(f"mounted {vol.name} at {mp} (daemon pid {pid})", err=True)
        return
    if line.startswith("ERR "):
        raise click.ClickException(line[4:])
    raise click.ClickException(f"mount daemon exited during start-up; see {vol.log_dir / 'mount.log'}")


def _report(fd: int, line: str) -> None:
    try:
        os.write(fd, (line + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _become_daemon(vol: Volume, level: int) -> None:
    os.setsid()
    vol.log_dir.mkdir(parents=True, exist_ok=True)
    logf = os.open(vol.log_dir / "mount.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    os.close(null)
    os.close(logf)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def umount(mountpoint: str, timeout: float) -> None:
    """Unmount ``mountpoint`` and wait until its daemon has exited (all data committed).

    First asks the daemon to commit everything (:func:`commit_before_unmount`), retrying
    until ``timeout`` seconds; with data still uncommitted the mount stays and
    MountpointError names the files. A mount whose daemon died is cleaned up. Raises
    MountpointError: not mounted, busy, data uncommitted, the daemon did not exit within
    ``timeout`` seconds, or it exited keeping data in the rescue area.
    """
    mp = os.path.abspath(mountpoint)
    reg = registry_file(mp)
    pid = None
    run_dir: Path | None = None
    try:
        info = json.loads(reg.read_text())
        pid = int(info["pid"])
        if info.get("commit_request"):
            run_dir = Path(info["volume"]) / "run"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if is_dead_mount(mp):
        unmount(mp, lazy=True)
        if pid is not None and not pid_running(pid):
            reg.unlink(missing_ok=True)
        click.echo(f"cleaned up {mp}: its daemon had died", err=True)
        return
    if find_mount(mp) is None:
        raise MountpointError(f"{mp} is not mounted")
    deadline = time.monotonic() + timeout
    if pid is not None and run_dir is not None and pid_running(pid):
        commit_before_unmount(mp, pid, run_dir, deadline)
        deadline = max(deadline, time.monotonic() + 60)  # all committed: the exit is quick
    unmount(mp)
    if pid is None:
        return
    while pid_running(pid):
        if time.monotonic() > deadline:
            raise MountpointError(f"unmounted {mp}, but daemon {pid} did not exit within {timeout:.0f} s")
        time.sleep(0.05)
    if run_dir is not None:
        try:
            ended = json.loads((run_dir / EXIT_FILE).read_text())
        except (OSError, ValueError):
            return
        if ended.get("pid") == pid and ended.get("rescued"):
            raise MountpointError(f"unmounted {mp}, but {ended['rescued']} files could not be committed and "
                                  f"were kept in {run_dir.parent / 'rescue'} ({ended.get('error', '')}); "
                                  "the next mount replays them")


def _ask_commit(pid: int, run_dir: Path, deadline: float) -> dict[str, object] | None:
    """One commit request to daemon ``pid``; its answer, or None (the daemon is gone, or
    gave no answer by ``deadline``). A commit attempt takes as long as its writeback:
    the caller's deadline should leave it time (ANSWER_GRACE_S)."""
    token = secrets.token_hex(8)
    tmp = run_dir / (SYNC_REQUEST + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, run_dir / SYNC_REQUEST)
    try:
        os.kill(pid, SYNC_SIGNAL)
    except ProcessLookupError:
        return None
    resend = time.monotonic() + 1.0
    while pid_running(pid):
        try:
            answer = json.loads((run_dir / SYNC_STATUS).read_text())
            if isinstance(answer, dict) and answer.get("token") == token:
                return answer
        except (OSError, ValueError):
            pass
        now = time.monotonic()
        if now > deadline:
            return None
        if now > resend:  # signals that arrive while one is handled coalesce: ask again
            try:
                os.kill(pid, SYNC_SIGNAL)
            except ProcessLookupError:
                return None
            resend = now + 1.0
        time.sleep(0.05)
    return None


def commit_before_unmount(mp: str, pid: int, run_dir: Path, deadline: float) -> None:
    """Ask the daemon of ``mp`` to commit every buffer and namespace change, retrying
    (about once a second) until ``deadline`` (time.monotonic()). Returns when nothing is
    left uncommitted, or only files whose creation a lost transaction took (the daemon
    spills those to the rescue area at exit); raises MountpointError naming the uncommitted files otherwise (the
    mount stays: nothing is lost, the user can free space and retry)."""
    answer: dict[str, object] | None = None
    while True:
        # the attempt that starts before the deadline is awaited (it names the files)
        answer = _ask_commit(pid, run_dir, max(deadline, time.monotonic() + ANSWER_GRACE_S))
        if answer is not None and not answer.get("files") and not answer.get("error"):
            return
        files = answer.get("files") if answer is not None else None
        if isinstance(files, list) and files and all(f.get("lost") for f in files):
            # only files whose creation a lost transaction took: no retry can commit them;
            # the daemon keeps them in the rescue area at exit (reported below), and the
            # next mount puts them in /lost+found
            return
        if not pid_running(pid) or time.monotonic() + 1.0 > deadline:
            break
        time.sleep(1.0)
    if answer is None:
        if not pid_running(pid):
            return  # the daemon is gone: the unmount below cleans up (its data is in rescue/)
        raise MountpointError(f"{mp} is still mounted: its daemon did not confirm a commit in time; "
                              "retry with a longer --timeout")
    files = answer.get("files") or []
    assert isinstance(files, list)
    names = [str(f.get("path") or f"inode {f.get('ino')} (path unknown)") for f in files]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    reason = answer.get("error") or next((f.get("error") for f in files if f.get("error")), "") or "unknown error"
    what = f"{len(names)} files not committed: {shown}" if names else "namespace changes not committed"
    raise MountpointError(f"{mp} is still mounted: {what} ({reason}); nothing was lost: free space "
                          "(or restore the database) and run `casfs umount` again")
