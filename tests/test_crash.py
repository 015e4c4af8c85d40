"""kill -9 of the mount daemon in the middle of a copy, then recovery by remounting."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from cas.db.server import pid_running
from tests.conftest import CasEnv
from tests.treeutil import snapshot_stdlib


def test_kill_during_copy(casenv: CasEnv, tmp_path: Path) -> None:
    src = snapshot_stdlib(tmp_path / "src")
    casenv.init("crash", embedded=True)   # the embedded MariaDB default
    mp = casenv.mount("crash")
    rnd = random.Random(11)
    synced = {f"s{i}": rnd.randbytes(rnd.randrange(0, 3 << 20)) for i in range(12)}
    (mp / "synced").mkdir()
    for name, data in synced.items():
        with open(mp / "synced" / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    cp = subprocess.Popen(["cp", "-a", str(src), str(mp / "copy")], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (mp / "copy").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # well into the copy
        assert cp.poll() is None, "copy finished before the kill"
        pid = casenv.daemon_pid(mp)
        os.kill(pid, signal.SIGKILL)
        while pid_running(pid):
            time.sleep(0.05)
    finally:
        cp.wait(timeout=120)
    # the next mount cleans the dead mountpoint and recovers by itself
    casenv.mount("crash", mp)
    r = casenv.run("fsck", "crash", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for name, data in synced.items():
        assert (mp / "synced" / name).read_bytes() == data
    # whatever part of the copy committed reads back equal to its source
    checked = 0
    for dirpath, _dirs, files in os.walk(mp / "copy"):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(mp / "copy")
            if not p.is_symlink() and p.stat().st_size == (src / rel).stat().st_size:
                assert p.read_bytes() == (src / rel).read_bytes(), rel
                checked += 1
    assert checked > 0
    casenv.run("gc", "--grace", "0", "crash")   # sweeps chunk files the crash orphaned
    r = casenv.run("fsck", "crash", check=False)
    assert r.returncode == 0 and " 0 orphan files" in r.stdout, r.stdout
