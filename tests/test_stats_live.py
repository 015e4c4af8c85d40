"""`casfs stats` on a mounted volume: the mount's live RAM-cache hit ratio, live and
garbage figures apart, and `casfs stats --watch` rates."""
from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT, CasEnv
from tests.waiting import wait_for
from tools.cli.mountcmd import commit_before_unmount

CHUNK = 64 * 1024


def _read_direct(path: Path) -> bytes:
    """Read ``path`` with O_DIRECT, so the kernel page cache cannot answer for casfs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = bytearray()
        while True:
            piece = os.read(fd, 1 << 20)
            if not piece:
                return bytes(out)
            out += piece
    finally:
        os.close(fd)


def _live(casenv: CasEnv, want: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """Poll `casfs stats --json` until its live counters satisfy ``want`` (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        mount = json.loads(casenv.run("stats", "--json", "vol").stdout)["mount"]
        if mount is not None and want(mount):
            return dict(mount)
        assert time.monotonic() < deadline, f"live stats never reached the expected state: {mount}"
        time.sleep(0.5)


def test_stats_shows_live_cache_hit_ratio(casenv: CasEnv, mounted: Callable[..., Path]) -> None:
    mp = mounted(chunk_size="64KiB")
    data = os.urandom(8 * CHUNK)
    (mp / "f").write_bytes(data)
    casenv.umount(mp)
    assert json.loads(casenv.run("stats", "--json", "vol").stdout)["mount"] is None
    assert "RAM cache          not mounted" in casenv.run("stats", "vol").stdout
    casenv.mount("vol", mp)
    assert _read_direct(mp / "f") == data      # cold: every chunk a miss
    first = _live(casenv, lambda m: m["cache_misses"] >= 8)
    assert first["cache_hits"] + first["cache_misses"] >= 8
    for _ in range(3):
        assert _read_direct(mp / "f") == data  # warm: served by the RAM cache
    m = _live(casenv, lambda m: m["cache_hits"] >= first["cache_hits"] + 24)
    assert m["cache_misses"] == first["cache_misses"]      # nothing new came from disk
    assert abs(m["cache_hit_ratio"] - m["cache_hits"] / (m["cache_hits"] + m["cache_misses"])) < 1e-5
    assert m["cache_bytes"] >= len(data)
    text = casenv.run("stats", "vol").stdout
    assert re.search(r"RAM cache +hit ratio \d+\.\d% of \d+ chunk reads since mount", text), text


def _figure(text: str, label: str) -> int:
    """The exact byte count in parentheses on the line of ``label`` in `casfs stats`."""
    line = next(ln for ln in text.splitlines() if ln.startswith(label + " "))
    m = re.search(r"\((\d+)\)", line)
    assert m, line
    return int(m.group(1))


def test_stats_separates_live_and_garbage(casenv: CasEnv, mounted: Callable[..., Path]) -> None:
    """Item 7 of issue 11: compressible data kept, incompressible data deleted (its
    chunks at refcount 0 await gc). Stored bytes are the live chunks' only, so they stay
    below unique bytes next to a compression ratio above 1; the garbage has its own line
    until gc frees it; holes are counted apart from dedup."""
    mp = mounted(chunk_size="64KiB")
    # 8 chunks, each a different line of 32 bytes repeated: compressible, not deduplicated
    text_data = b"".join((b"chunk %05d of casfs stats test\n" % k) * (CHUNK // 32) for k in range(8))
    assert len(text_data) == 8 * CHUNK
    (mp / "text").write_bytes(text_data)
    (mp / "copy").write_bytes(text_data)                 # dedup saves one copy
    with open(mp / "sparse", "wb") as f:                 # 3 chunks of hole, then 1 of data
        f.seek(3 * CHUNK)
        f.write(text_data[:CHUNK])
    (mp / "noise").write_bytes(os.urandom(16 * CHUNK))
    (mp / "noise").unlink()
    _commit(casenv, mp)
    s = json.loads(casenv.run("stats", "--json", "vol").stdout)
    assert s["garbage_chunks"] == 16 and s["garbage_bytes"] >= 16 * CHUNK
    assert s["live_stored_bytes"] < s["unique_bytes"] < s["stored_bytes"]   # the old text's trap
    text = casenv.run("stats", "vol").stdout
    assert _figure(text, "stored bytes") == s["live_stored_bytes"] < _figure(text, "unique bytes") == 8 * CHUNK
    assert float(re.search(r"compression ratio +([\d.]+)", text).group(1)) > 1   # type: ignore[union-attr]
    assert _figure(text, "garbage") == s["garbage_bytes"]
    assert re.search(r"^garbage +16 chunks", text, re.M), text
    assert re.search(r"^live chunks +8 ", text, re.M), text
    assert _figure(text, "sparse bytes") == 3 * CHUNK
    assert _figure(text, "dedup saved") == 8 * CHUNK + CHUNK    # the copy, and sparse's data chunk
    casenv.run("gc", "--grace", "0", "vol")
    after = json.loads(casenv.run("stats", "--json", "vol").stdout)
    assert after["garbage_chunks"] == 0 and after["garbage_bytes"] == 0
    assert after["stored_bytes"] == after["live_stored_bytes"] == s["live_stored_bytes"]
    assert re.search(r"^garbage +0 chunks, 0 B \(0\)", casenv.run("stats", "vol").stdout, re.M)


def _commit(casenv: CasEnv, mp: Path) -> None:
    commit_before_unmount(str(mp), casenv.daemon_pid(mp), casenv.data_home / "vol" / "run",
                          time.monotonic() + 120)


def test_stats_watch_shows_the_write_rate(casenv: CasEnv, mounted: Callable[..., Path]) -> None:
    """`casfs stats --watch --count 3` while a writer runs: a header and three lines, the
    written MiB/s and ops/s above 0; with --json the same as objects; Ctrl-C exits 0."""
    mp = mounted(chunk_size="64KiB")
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        block = os.urandom(CHUNK)
        k = 0
        while not stop.is_set():
            with open(mp / f"w{k % 8}", "wb") as f:
                for _ in range(16):
                    f.write(block)
                    written[0] += len(block)
            k += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for(lambda: written[0] > 0, "the writer to start")
        out = casenv.run("stats", "vol", "--watch", "--count", "3", "--interval", "1").stdout.splitlines()
        js = [json.loads(x) for x in casenv.run("stats", "vol", "--watch", "--json", "--count", "2",
                                                "--interval", "1").stdout.splitlines()]
    finally:
        stop.set()
        t.join()
    assert out[0].split()[:3] == ["time", "ops/s", "in"] and len(out) == 4, out
    rows = [ln.split() for ln in out[1:]]
    assert any(float(r[2]) > 0 and float(r[1]) > 0 for r in rows), out   # in MiB/s, ops/s
    assert len(js) == 2 and any(j["in_mib_per_s"] > 0 for j in js), js
    # idle, then Ctrl-C: rates 0, exit status 0
    p = subprocess.Popen([sys.executable, "-m", "tools.cli", "stats", "vol", "--watch", "--interval", "0.2"],
                         cwd=ROOT, env=casenv.env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().startswith("time")
        p.stdout.readline()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # on a terminal: redrawn in place by rich (a table, cursor movements between reports)
    text = _on_pty(casenv, "stats", "vol", "--watch", "--count", "2", "--interval", "0.3")
    assert text.count("written (in)") >= 2 and "queue ETA" in text and "\x1b[" in text, text
    casenv.umount(mp)
    r = casenv.run("stats", "vol", "--watch", "--count", "1", check=False)
    assert r.returncode == 1 and "not mounted" in r.stderr


def _on_pty(casenv: CasEnv, *args: str) -> str:
    """Run `casfs ARGS` with a pseudo-terminal as stdin/stdout; its output, once it exited 0."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "tools.cli", *args], cwd=ROOT, env=dict(casenv.env, TERM="xterm"),
                         stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = bytearray()
    try:
        while True:
            try:
                piece = os.read(master, 65536)
            except OSError:          # EIO: the child closed the terminal
                break
            if not piece:
                break
            out += piece
        assert p.wait(timeout=60) == 0, p.stderr.read() if p.stderr else ""
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stderr:
            p.stderr.close()
    return out.decode(errors="replace")
