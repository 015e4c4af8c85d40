"""`casfs find` and `casfs du`: metadata search and subtree space, from the database.

Both open the volume's database directly (starting its embedded server if no mount
runs), like `casfs stats`, so they work mounted or not; they see what is committed
(cas/maint/find.py). Where to look is ``[VOLUME] [PATH]``: a volume name (default
"default") and a path inside it ("/" or nothing: the root); or one argument that is a
path inside a mounted casfs volume (``casfs find /mnt/vol/photos``). docs/find.md.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from cas.tier import cloud
from cas.maint import du as du_mod
from cas.maint import find as find_mod
from cas.errors import FsError, VolumeError
from cas.db.database import Database, connect
from cas.config.volume import DEFAULT_NAME, Volume, open_volume
from fusefront.mountpoint import find_mount

from tools.cli.common import human, user_errors
from tools.cli.mountcmd import registry_file


@dataclass(frozen=True)
class Where:
    """A place in a volume: the volume, the path inside it ('' = root) and the prefix
    printed before each path found ('' or what the user typed)."""

    volume: Volume
    inner: str
    shown: str


def in_mount(arg: str) -> tuple[Path, str] | None:
    """(volume directory, path inside the volume) when ``arg`` is an existing path on a
    running casfs mount (found through the mount registry), else None."""
    if not os.path.lexists(arg):
        return None
    p = Path(os.path.realpath(os.path.dirname(os.path.abspath(arg)))) / os.path.basename(os.path.abspath(arg))
    for cand in [p, *p.parents]:
        reg = registry_file(cand)
        if reg.is_file() and find_mount(cand) is not None:
            try:
                vol = Path(json.loads(reg.read_text())["volume"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
            return vol, str(p.relative_to(cand))
    return None


def locate(args: tuple[str, ...]) -> Where:
    """Parse ``[VOLUME] [PATH]`` (see the module docstring). Raises click.UsageError,
    VolumeError."""
    if len(args) > 2:
        raise click.UsageError("expected at most VOLUME and PATH")
    if len(args) == 1:
        hit = in_mount(args[0])
        if hit is not None:
            return Where(open_volume(str(hit[0])), hit[1] if hit[1] != "." else "", args[0])
        return Where(open_volume(args[0]), "", "")
    if len(args) == 2:
        return Where(open_volume(args[0]), args[1], args[1])
    return Where(open_volume(DEFAULT_NAME), "", "")


def _inner_file(vol: Volume, arg: str) -> str:
    """FILE of --duplicates-of as a path inside ``vol``: a path on a mount of ``vol`` if
    it is one, else taken as relative to the volume root."""
    hit = in_mount(arg)
    if hit is not None:
        if hit[0].resolve() != vol.path.resolve():
            raise VolumeError(f"{arg} is on another volume's mount ({hit[0]})")
        return hit[1]
    return arg


def _joined(prefix: bytes, rel: bytes) -> bytes:
    if not prefix:
        return rel
    return prefix + rel if prefix.endswith(b"/") else prefix + b"/" + rel


@click.command()
@click.argument("where", nargs=-1, metavar="[VOLUME] [PATH]")
@click.option("--name", "glob", metavar="GLOB", help="Last path component matches GLOB (*, ?, [...]; "
              "case-sensitive, as find -name).")
@click.option("--size", metavar="[+-]N[kMGT]", help="Size above (+), below (-) or exactly N bytes.")
@click.option("--mtime", metavar="[+-]N[smhdw]", help="Modified less (-) or more (+) than N ago (default unit: days).")
@click.option("--type", "ftype", type=click.Choice(sorted(find_mod.TYPES)), help="f file, d directory, l symlink.")
@click.option("--xattr", "xattrs", multiple=True, metavar="KEY[=VALUE]",
              help="Has extended attribute KEY (with value VALUE); repeatable (all must hold).")
@click.option("--duplicates-of", "dup", metavar="FILE",
              help="Files with exactly FILE's content (same chunks in the same slots, same size), FILE excluded.")
@click.option("--status", type=click.Choice(find_mod.STATUSES),
              help="synced: every chunk confirmed on Drive; pending: some not yet; cloud-only: some not local.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: path, inode, type, size, mtime_ns.")
@click.option("--print0", is_flag=True, help="End each path with NUL instead of a newline (for xargs -0).")
@user_errors
def find(where: tuple[str, ...], glob: str | None, size: str | None, mtime: str | None, ftype: str | None,
         xattrs: tuple[str, ...], dup: str | None, status: str | None, as_json: bool, print0: bool) -> None:
    """Print the paths below PATH (default: the whole volume) that pass every test.

    One SQL query on the volume's database, mounted or not; the start directory itself
    is not printed. Paths are relative to the volume root, or start with PATH as given.
    """
    loc = locate(where)
    try:
        size_t = find_mod.parse_size_test(size) if size is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--size") from None
    try:
        mtime_t = find_mod.parse_age_test(mtime) if mtime is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--mtime") from None
    xs = []
    for x in xattrs:
        k, eq, v = x.partition("=")
        if not k:
            raise click.BadParameter(f"{x!r}: KEY[=VALUE]", param_hint="--xattr")
        xs.append((os.fsencode(k), os.fsencode(v) if eq else None))
    with connect(loc.volume) as meta:
        start, mode = find_mod.resolve(meta.db, loc.inner)
        if mode & 0o170000 != 0o040000:
            raise FsError(f"{loc.shown or loc.inner}: not a directory", errno.ENOTDIR)
        dup_ino = None
        if dup is not None:
            dup_ino, dup_mode = find_mod.resolve(meta.db, _inner_file(loc.volume, dup))
            if dup_mode & 0o170000 != 0o100000:
                raise FsError(f"--duplicates-of {dup}: not a regular file", errno.EINVAL)
        if status is not None and not cloud.enabled(meta.db):
            raise VolumeError(f"volume {loc.volume.name} has no cloud tier: --status needs one "
                              "(set it up with `casfs drive auth`)")
        q = find_mod.Query(start=start, name=glob, size=size_t, mtime=mtime_t, ftype=ftype, xattrs=tuple(xs),
                           duplicates_of=dup_ino, status=status)
        _print_hits(meta.db, q, os.fsencode(loc.shown), as_json, print0)


def _print_hits(db: Database, q: find_mod.Query, prefix: bytes, as_json: bool, print0: bool) -> None:
    out = sys.stdout.buffer
    end = b"\0" if print0 else b"\n"
    for h in find_mod.search(db, q):
        path = _joined(prefix, h.path)
        if as_json:
            out.write(json.dumps({"path": os.fsdecode(path), "inode": h.inode, "type": h.kind,
                                  "size": h.size, "mtime_ns": h.mtime_ns}).encode() + end)
        else:
            out.write(path + end)
    out.flush()


@click.command()
@click.argument("where", nargs=-1, metavar="[VOLUME] [PATH]")
@click.option("-d", "--max-depth", "depth", type=click.IntRange(0, 1), default=0,
              help="1: one line per subdirectory of PATH, then PATH's total.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects with -d 1).")
@user_errors
def du(where: tuple[str, ...], depth: int, as_json: bool) -> None:
    """Logical, unique (only referenced from inside), shared (also referenced from
    outside) bytes and holes of PATH's subtree (default: the whole volume)."""
    loc = locate(where)
    rows: list[tuple[str, du_mod.Usage]] = []
    with connect(loc.volume) as meta:
        start, _ = find_mod.resolve(meta.db, loc.inner)
        if depth:
            for name, ino in du_mod.children(meta.db, start):
                rows.append((os.fsdecode(_joined(os.fsencode(loc.shown), name)), du_mod.usage(meta.db, ino)))
        rows.append((loc.shown or ".", du_mod.usage(meta.db, start)))
    if as_json:
        objs = [{"path": p, **u.as_dict()} for p, u in rows]
        click.echo(json.dumps(objs if depth else objs[0], sort_keys=True))
        return
    click.echo(f"{'logical':>11} {'unique':>11} {'unique st.':>11} {'shared':>11} {'holes':>11}  path")
    for p, u in rows:
        click.echo(f"{human(u.logical):>11} {human(u.unique):>11} {human(u.unique_stored):>11} "
                   f"{human(u.shared):>11} {human(u.holes):>11}  {p}")


def register(group: click.Group) -> None:
    """Add `find` and `du` to the casfs command group."""
    group.add_command(find)
    group.add_command(du)
