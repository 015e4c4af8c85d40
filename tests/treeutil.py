"""Helpers for tests that copy and compare real directory trees."""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import shutil
import stat as S
import sysconfig
from collections.abc import Iterator
from pathlib import Path

IGNORED = shutil.ignore_patterns("site-packages", "dist-packages")


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def snapshot_stdlib(dest: Path) -> Path:
    """A frozen copy of the standard library (site-packages excluded) at ``dest``."""
    shutil.copytree(stdlib_dir(), dest, symlinks=True, ignore=IGNORED)
    return dest


def walk(root: Path) -> dict[str, os.stat_result]:
    """lstat of every path below ``root``, keyed by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = os.lstat(p)
    return out


def compare_trees(a: Path, b: Path, mtimes: bool = True) -> list[str]:
    """Differences between trees ``a`` and ``b``: paths, types, modes, mtimes, bytes, links."""
    wa, wb = walk(a), walk(b)
    diffs = [f"only in {a}: {p}" for p in sorted(set(wa) - set(wb))]
    diffs += [f"only in {b}: {p}" for p in sorted(set(wb) - set(wa))]
    for rel in sorted(set(wa) & set(wb)):
        sa, sb = wa[rel], wb[rel]
        if sa.st_mode != sb.st_mode:
            diffs.append(f"{rel}: mode {sa.st_mode:o} != {sb.st_mode:o}")
            continue
        if S.S_ISLNK(sa.st_mode):
            if os.readlink(a / rel) != os.readlink(b / rel):
                diffs.append(f"{rel}: symlink target differs")
        elif S.S_ISREG(sa.st_mode):
            if sa.st_size != sb.st_size:
                diffs.append(f"{rel}: size {sa.st_size} != {sb.st_size}")
            elif file_digest(a / rel) != file_digest(b / rel):
                diffs.append(f"{rel}: contents differ")
            if mtimes and sa.st_mtime_ns != sb.st_mtime_ns:
                diffs.append(f"{rel}: mtime {sa.st_mtime_ns} != {sb.st_mtime_ns}")
    return diffs


def file_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def unique_chunk_bytes(roots: list[Path], chunk_size: int) -> tuple[int, int]:
    """(logical bytes, unique non-zero chunk bytes) of the regular files below ``roots``.

    Computed independently of casfs: files cut into fixed slots, all-zero slots are holes.
    """
    seen: set[bytes] = set()
    logical = unique = 0
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                if not S.S_ISREG(os.lstat(p).st_mode):
                    continue
                with open(p, "rb") as f:
                    while block := f.read(chunk_size):
                        logical += len(block)
                        if block.count(0) == len(block):
                            continue
                        d = hashlib.sha256(block).digest()
                        if d not in seen:
                            seen.add(d)
                            unique += len(block)
    return logical, unique


@contextlib.contextmanager
def tmpfs(path: Path, size: str, mode: str = "0700") -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "8m") mounted at ``path`` (needs root), unmounted after.

    A tmpfs that cannot be mounted fails the test: the full-disk tests must run.
    """
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}"
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
