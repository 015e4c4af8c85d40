"""`casfs status PATH...` and `casfs drive wait PATH...`: the Drive sync status of files
inside a mounted volume (docs/status.md).

Both read the virtual xattr ``user.casfs.status`` that the mount answers for every
regular file (cas/engine/syncstatus.py): the path names the file *and* the volume (the mount
that serves it), so neither command takes a volume argument, and both work for any user
who may read the file. A path outside a casfs mount (no such xattr) is an error.
"""
from __future__ import annotations

import errno
import json
import os
import stat as S
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import click

from cas.engine.syncstatus import STATUS_XATTR, FileSync
from fusefront.mountpoint import FSTYPE, mount_table

from tools.cli.common import human, os_error_line
from tools.cli.progress import progress

XATTR = STATUS_XATTR.decode()
WAIT_POLL_S = 0.5       # seconds between the first looks at the pending files in `drive wait`
WAIT_POLL_MAX_S = 5.0   # ... doubling while nothing moves, up to this; back to WAIT_POLL_S on progress


class StatusError(click.ClickException):
    """A path whose status cannot be read (one line, exit 1)."""


def read_status(path: str) -> FileSync:
    """The status of regular file ``path`` (symlinks followed) from its xattr.

    Raises StatusError when the file is not inside a casfs mount (the xattr is missing
    or xattrs are not supported there), OSError for a path the OS refuses."""
    try:
        value = os.getxattr(path, XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise StatusError(f"{path}: not inside a casfs mount (no {XATTR} attribute)") from None
        raise
    try:
        return FileSync.decode(value)
    except ValueError as exc:
        raise StatusError(f"{path}: {exc}") from None


def on_casfs(st: os.stat_result) -> bool:
    """Whether the file of ``st`` is inside a casfs mount: its device is that of a
    ``fuse.casfs`` mount of the mount table."""
    for m in mount_table():
        if m.fstype != FSTYPE:
            continue
        try:
            if os.stat(m.target).st_dev == st.st_dev:
                return True
        except OSError:   # a dead mount, or one this user may not see into
            continue
    return False


def files_under(path: str, recursive: bool) -> Iterator[str]:
    """The regular files ``path`` names: itself, or (a directory inside a casfs mount)
    the regular files in it, in its subdirectories too with ``recursive``. Symbolic
    links met inside a directory are not followed. Raises StatusError for another file
    type or a directory outside casfs, OSError."""
    st = os.stat(path)
    if S.S_ISREG(st.st_mode):
        yield path
        return
    if not S.S_ISDIR(st.st_mode):
        raise StatusError(f"{path}: not a regular file or a directory")
    if not on_casfs(st):
        raise StatusError(f"{path}: not inside a casfs mount")
    if not recursive:
        with os.scandir(path) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_file(follow_symlinks=False):
                    yield e.path
        return

    def fail(exc: OSError) -> None:
        raise exc
    for top, dirs, names in os.walk(path, onerror=fail):
        dirs.sort()
        for name in sorted(names):
            p = os.path.join(top, name)
            if S.S_ISREG(os.lstat(p).st_mode):
                yield p


def summarize(path: str, statuses: list[FileSync]) -> dict[str, Any]:
    """A directory's summary: files, how many per state and per place, bytes left."""
    states = Counter(s.state for s in statuses)
    if not statuses or states["synced"] == len(statuses):
        overall = "synced"
    elif states["no-cloud"]:
        overall = "no-cloud"
    else:
        overall = "pending"
    return {"path": path, "type": "directory", "files": len(statuses), "state": overall,
            "states": dict(sorted(states.items())), "where": dict(sorted(Counter(s.where for s in statuses).items())),
            "queued_bytes": sum(s.queued_bytes for s in statuses),
            "dirty_bytes": sum(s.dirty_bytes for s in statuses)}


def _line(d: dict[str, Any]) -> str:
    left = human(d["queued_bytes"] + d["dirty_bytes"])
    if d["type"] == "file":
        return f"{d['state']:8} {d['where']:10} {left:>11} queued  {d['path']}"
    where = ", ".join(f"{n} {w}" for w, n in d["where"].items())
    states = ", ".join(f"{n} {s}" for s, n in d["states"].items())
    return (f"{d['state']:8} {'':10} {left:>11} queued  {d['path']}/: {d['files']} files ({states}"
            + (f"; {where}" if where else "") + ")")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-r", "--recursive", is_flag=True, help="Summarise a directory's whole subtree, "
              "not only the files directly in it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list, an object per PATH.")
def status(paths: tuple[str, ...], recursive: bool, as_json: bool) -> None:
    """Drive sync status of files inside a mounted casfs volume.

    Per file: synced (every chunk in a confirmed pack on Drive) or pending, where its
    chunks are (local, both, cloud-only, partial, none) and the bytes still queued. A
    directory gets one summary line of the regular files in it (-r: in its subtree).
    Exits 1 when a PATH could not be read (each named on stderr); the others are shown.
    """
    out: list[dict[str, Any]] = []
    failed = 0
    for path in paths:
        try:
            if S.S_ISDIR(os.stat(path).st_mode):
                out.append(summarize(path.rstrip("/") or "/",
                                     [read_status(f) for f in files_under(path, recursive)]))
            else:
                out.append({"path": path, "type": "file", **asdict(read_status(path))})
        except (StatusError, OSError) as exc:
            failed += 1
            msg = exc.format_message() if isinstance(exc, StatusError) else os_error_line(exc)
            click.echo(f"Error: {msg}", err=True)
            continue
        if not as_json:
            click.echo(_line(out[-1]))
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
    if failed:
        raise SystemExit(1)


@click.command("wait")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--timeout", default=None, type=click.FloatRange(min=0),
              help="Give up after this many seconds (exit 1). Default: wait as long as it takes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end; no progress.")
def wait(paths: tuple[str, ...], timeout: float | None, as_json: bool) -> None:
    """Wait until every chunk of the files PATHS name (directories: their whole subtree)
    is in a confirmed pack on Drive, then exit 0.

    Reads each file's status once, then only the files still pending, after 0.5 s,
    doubling the pause while nothing moves up to 5 s (0.5 s again after progress; a
    file once synced is not looked at again); shows the bytes still to upload on
    stderr. Exits 1 with one line
    at --timeout, or when a file is not on a casfs mount or its volume has no cloud
    tier. It only waits: the mount uploads (a partly filled pack after the volume's
    pack age, 60 s by default); `casfs drive push` uploads now.
    """
    files = [f for p in paths for f in files_under(p, recursive=True)]
    end = None if timeout is None else time.monotonic() + timeout
    left = 0
    todo = files
    pause = WAIT_POLL_S
    with progress("drive wait", unit="B", json_mode=as_json) as bar:
        first = True
        while True:
            statuses = [(f, read_status(f)) for f in todo]
            no_cloud = [f for f, s in statuses if s.state == "no-cloud"]
            if no_cloud:
                raise StatusError(f"{no_cloud[0]}: its volume has no cloud tier (set one up with "
                                  "`casfs drive auth` or `casfs s3 enable`): nothing will reach the cloud")
            pending = [(f, s) for f, s in statuses if s.state != "synced"]
            before = left
            left = sum(s.bytes_left for _, s in pending)
            if not first:   # nothing moved: look less often; progress: look soon again
                pause = WAIT_POLL_S if (left < before or len(pending) < len(todo)) else min(2 * pause, WAIT_POLL_MAX_S)
            todo = [f for f, _ in pending]
            if first:
                bar.set_total(left)
                first = False
            elif bar.done + left > bar.total:
                bar.set_total(bar.done + left)     # more to upload than at the start
            bar.update(bar.total - left - bar.done)
            if not pending:
                break
            now = time.monotonic()
            if end is not None and now >= end:
                raise StatusError(
                    f"timed out after {timeout:g} s: {len(pending)} of {len(files)} files not on Drive yet "
                    f"({human(left)} to upload; first: {pending[0][0]}); see `casfs drive status`")
            time.sleep(pause if end is None else max(0.0, min(pause, end - now)))
    if as_json:
        click.echo(json.dumps({"files": len(files), "synced": True}))
    else:
        click.echo(f"{len(files)} files synced to Drive")


def register(group: click.Group, drive: click.Group) -> None:
    """Add `status` to the casfs command group and `wait` to its `drive` group."""
    group.add_command(status)
    drive.add_command(wait)
