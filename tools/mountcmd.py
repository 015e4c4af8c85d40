"""`casfs mount` and `casfs umount`: starting the mount daemon and stopping it.

The daemon is a forked child in its own session. It reports over a pipe either
"OK" (the kernel mount exists) or "ERR <message>"; `casfs mount` prints the message and
exits 1, so every start-up failure reaches the user. A registry file
``$XDG_DATA_HOME/casfs/mounts/<hash>.json`` maps a mountpoint to its daemon's pid, which
`casfs umount` waits for after ``fusermount3 -u``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from cas import cloud
from cas.errors import CasError, VolumeError
from cas.fs import DURABILITY_MODES, GROUP, Filesystem
from cas.meta import Metadata, connect
from cas.objstore import ObjectStoreError
from cas.server import ServerSupervisor, pid_running
from cas.store import LocalStore
from cas.volume import Volume, data_home
from fusefront.daemon import serve
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


def durability_of(vol: Volume, opts: MountOptions) -> str:
    """The namespace durability of a mount (docs/durability.md): ``opts.durability``,
    else ``durability`` of the volume's ``[mount]`` table, else "group". Raises
    VolumeError for anything but "group" or "immediate"."""
    mode = opts.durability if opts.durability is not None else vol.mount.get("durability", GROUP)
    if mode not in DURABILITY_MODES:
        raise VolumeError(f"volume {vol.name}: durability {mode!r} (volume.toml [mount]) is not one of "
                          f"{', '.join(DURABILITY_MODES)}")
    return str(mode)


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
    cfg = cloud.CloudConfig.from_volume(vol)
    if opts.drive_endpoint is not None:
        cfg.endpoint = opts.drive_endpoint
    try:
        objects = cloud.open_objects(vol, cfg, meta.db)
    except ObjectStoreError as exc:
        log.error("cloud tier unavailable, uploads stay queued: %s", exc)
        return None
    tier = cloud.CloudTier(meta, objects, cfg, local_limit=opts.local_limit)
    fs.attach_cloud(tier)
    tier.start()
    return tier


def run_daemon(vol: Volume, mp: Path, opts: MountOptions, on_ready: Callable[[], None]) -> None:
    """Mount ``vol`` at ``mp`` in this process until unmounted; flush and close after."""
    vol.run_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(vol.run_dir / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise VolumeError(f"volume {vol.name} is already mounted") from None
    reg = registry_file(mp)
    try:
        durability = durability_of(vol, opts)
        meta = connect(vol)
        # an embedded server that dies is restarted (docs/database.md)
        supervisor = ServerSupervisor(meta.server) if meta.server is not None else None
        if supervisor is not None:
            supervisor.start()
        fs = Filesystem(meta, cache_bytes=opts.cache_bytes, durability=durability)
        log.info("namespace durability: %s", durability)
        try:
            start_cloud(meta, fs, opts)
            freed = fs.recover()
            if freed:
                log.warning("freed %d inodes unlinked while open before a crash", freed)
            reg.parent.mkdir(parents=True, exist_ok=True)
            reg.write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(mp), "volume": str(vol.path)}))
            serve(fs, mp, fsname=f"casfs:{vol.name}", allow_other=opts.allow_other, on_ready=on_ready)
        finally:
            try:
                fs.close()
            finally:
                if supervisor is not None:
                    supervisor.stop()
    finally:
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
        run_daemon(vol, mp, opts, on_ready=lambda: click.echo(f"mounted {vol.name} at {mp}", err=True))
        return
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        _become_daemon(vol, level)
        code = 0
        try:
            run_daemon(vol, mp, opts, on_ready=lambda: _report(wfd, "OK"))
        except BaseException as exc:  # report start-up failures to the parent
            code = 1
            log.error("mount failed: %s", "".join(traceback.format_exception(exc)))
            msg = str(exc) if isinstance(exc, (CasError, MountpointError)) else f"{type(exc).__name__}: {exc}"
            _report(wfd, "ERR " + (msg.splitlines()[0] if msg else type(exc).__name__))
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        line = f.readline().decode(errors="replace").strip()
    if line == "OK":
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
    """Unmount ``mountpoint`` and wait until its daemon has exited (all data flushed).

    A mount whose daemon died is cleaned up. Raises MountpointError: not mounted,
    busy, or the daemon did not exit within ``timeout`` seconds.
    """
    mp = os.path.abspath(mountpoint)
    reg = registry_file(mp)
    pid = None
    try:
        pid = int(json.loads(reg.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        pass
    if is_dead_mount(mp):
        unmount(mp, lazy=True)
        if pid is not None and not pid_running(pid):
            reg.unlink(missing_ok=True)
        click.echo(f"cleaned up {mp}: its daemon had died", err=True)
        return
    if find_mount(mp) is None:
        raise MountpointError(f"{mp} is not mounted")
    unmount(mp)
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() > deadline:
            raise MountpointError(f"unmounted {mp}, but daemon {pid} did not exit within {timeout:.0f} s")
        time.sleep(0.05)
