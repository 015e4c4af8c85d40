"""Mountpoints: validating one, reading the mount table, and unmounting.

Unmounting goes through ``fusermount3 -u`` (works for a non-root user, and on a mount
whose daemon died: "Transport endpoint is not connected").
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.casfs"


class MountpointError(Exception):
    """A mountpoint cannot be used or unmounted; the message is for the user."""


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    """Entries of /proc/self/mounts (source, target, fstype), octal escapes decoded."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append(MountEntry(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out


def find_mount(path: str | Path) -> MountEntry | None:
    """The mount whose target is exactly ``path`` (absolute, not resolved), if any."""
    target = os.path.abspath(path)
    found = None
    for m in mount_table():
        if m.target == target:
            found = m
    return found


def fusermount() -> str:
    binary = shutil.which("fusermount3") or shutil.which("fusermount")
    if not binary:
        raise MountpointError("fusermount3 is not installed: apt-get install fuse3")
    return binary


def unmount(path: str | Path, lazy: bool = False) -> None:
    """Unmount FUSE mount ``path``. Raises MountpointError with fusermount's message."""
    args = [fusermount(), "-u"] + (["-z"] if lazy else []) + [os.path.abspath(path)]
    r = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise MountpointError(msg[-1] if msg else f"fusermount3 failed (exit {r.returncode})")


def is_dead_mount(path: str | Path) -> bool:
    """Whether ``path`` is a FUSE mount whose daemon is gone (ENOTCONN).

    statvfs always reaches the daemon (stat may be answered from the attribute cache).
    """
    try:
        os.statvfs(path)
        return False
    except OSError as exc:
        return exc.errno == errno.ENOTCONN


def check_mountpoint(path: str | Path) -> Path:
    """Validate ``path`` as a mountpoint and return it absolute.

    A dead casfs mount left there by a killed daemon is cleaned up first. Raises
    MountpointError: missing, not a directory, not empty, already mounted.
    """
    p = Path(os.path.abspath(path))
    if is_dead_mount(p):
        m = find_mount(p)
        if m is not None and m.fstype == FSTYPE:
            unmount(p, lazy=True)
        else:
            raise MountpointError(f"{p}: transport endpoint is not connected (a dead FUSE mount); "
                                  f"run `fusermount3 -u {p}`")
    if not p.exists():
        raise MountpointError(f"mountpoint {p} does not exist")
    if not p.is_dir():
        raise MountpointError(f"mountpoint {p} is not a directory")
    m = find_mount(p)
    if m is not None:
        raise MountpointError(f"{p} is already a mountpoint ({m.source}, {m.fstype})")
    try:
        if any(os.scandir(p)):
            raise MountpointError(f"mountpoint {p} is not empty")
    except PermissionError as exc:
        raise MountpointError(f"mountpoint {p}: {exc.strerror}") from exc
    return p
