"""Progress of long commands (tools/cli/progress.py, docs/status.md "Progress"), on a real
mount and the real CLI: a tqdm bar with a rate on a terminal (a pseudo-terminal here),
plain periodic lines when stderr is a pipe, nothing extra with --json."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from tests.conftest import CasEnv
from tests.ptyrun import run_pty

CHUNK = 64 * 1024


def write_fsynced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_progress_bar_on_a_terminal_plain_lines_when_piped_nothing_with_json(
        casenv: CasEnv, mounted: Callable[..., Path]) -> None:
    mp = mounted(chunk_size="64KiB")
    for i in range(16):                                     # 16 files of 4 random chunks
        write_fsynced(mp / f"f{i}", os.urandom(4 * CHUNK))
    for i in range(4):
        (mp / f"f{i}").unlink()
    fsync_dir(mp)                                           # the unlinks are committed: 16 dead chunks

    # A terminal: gc draws a tqdm bar (carriage returns, 100%, a rate per second).
    rc, out = run_pty(casenv, "gc", "--grace", "0", "vol")
    assert rc == 0, out
    assert "freed 16 chunks" in out
    bar = [seg for seg in re.split(r"[\r\n]", out) if seg.startswith("gc:")]
    assert bar and "\r" in out, out
    assert "100%" in bar[-1] and re.search(r"\d+/\d+ \[[^\]]*, *[\d.]+ chunks/s\]", bar[-1]), out

    # --json: stdout is one JSON document, stderr has nothing.
    r = casenv.run("gc", "--json", "--grace", "0", "vol")
    assert json.loads(r.stdout)["local"]["chunks_deleted"] == 0 and r.stderr == ""
    r = casenv.run("fsck", "--json", "vol")
    assert json.loads(r.stdout)["clean"] and r.stderr == ""
    r = casenv.run("scrub", "--json", "--rate", "0", "vol")
    assert json.loads(r.stdout)["local"]["checked"] == 48 and r.stderr == ""

    # A pipe: a scrub paced to 1 MiB/s over 3 MiB runs 3 s or more, so it prints plain
    # lines (no carriage return, no escape sequence) with rate and ETA, then a last one.
    r = casenv.run("scrub", "--restart", "--rate", "1", "vol")
    assert "verified 48 chunks" in r.stdout
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr and "\x1b" not in r.stderr, r.stderr
    periodic = [ln for ln in lines if re.fullmatch(
        r"scrub: [\d.]+ (B|KiB|MiB)/3\.0 MiB \(\d+%\), [\d.]+ (B|KiB|MiB)/s, ETA \d:\d\d:\d\d", ln)]
    assert periodic, r.stderr
    assert re.fullmatch(r"scrub: 3\.0 MiB/3\.0 MiB \(100%\), done in \d:\d\d:\d\d", lines[-1]), r.stderr
