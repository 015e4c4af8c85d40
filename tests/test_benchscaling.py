"""``python -m tools.bench.scaling`` (docs/scaling.md): statements per operation counted at
the server through a real mount, the load generator's typed-layer transactions against a
real MariaDB server, and the computed tables built from them."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import child_env

REPO_ROOT = Path(__file__).resolve().parent.parent


def _row(report: str, label: str) -> list[str]:
    """The cells of the table row whose first cell starts with ``label``."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(label):
            return cells
    raise AssertionError(f"no row {label!r} in:\n{report}")


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="needs /dev/fuse and fusermount3")
def test_scaling_counts_statements_at_the_server(tmp_path: Path) -> None:
    """A small run of every part: the create row counts at most one statement per file
    (held creates, docs/smallfiles.md) and a COMMIT for the fsync of the directory; a
    read of chunks in the RAM cache writes nothing; the shared-mode columns add to what
    was measured (strong >= session >= measured for an open); each load transaction
    ran at each worker count; the computed tables follow; nothing stays mounted and the
    scratch directory is gone."""
    r = subprocess.run(
        [sys.executable, "-m", "tools.bench.scaling", "--files", "20", "--mib", "2", "--workers", "1,2",
         "--seconds", "0.5", "--machines", "1,4", "--no-audit-off", "--workdir", str(tmp_path), "--quiet"],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = r.stdout
    head = _row(report, "operation")
    col = {name: i for i, name in enumerate(head)}
    create = _row(report, "create (empty)")
    assert 0 < float(create[col["stmts"]]) <= 1, report
    assert float(create[col["COMMIT"]]) > 0, report
    cached = _row(report, "read 2 MiB, chunks in the RAM cache")
    for c in ("INSERT", "UPDATE", "DELETE", "COMMIT"):
        assert float(cached[col[c]]) == 0, (c, report)
    opened = _row(report, "open + close, cold")
    measured = float(opened[col["stmts"]])
    assert measured > 0, report   # a cold open reads its name from MySQL
    assert float(opened[col["shared strong*"]]) > float(opened[col["shared session*"]]) > measured, report
    for label in ("create, own directory", "create, all in one directory", "lookup (one SELECT",
                  "change-log poll + lookup", "change-log poll alone"):
        cells = _row(report, label)
        assert all(float(c.replace(",", "")) > 0 for c in cells[1:3]), (label, report)
    assert "error" not in report, report
    assert re.search(r"^3\. what one server carries for M machines", report, re.MULTILINE), report
    assert re.search(r"^4\. Drive limits for M machines", report, re.MULTILINE), report
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert not list(tmp_path.glob("casfs-scaling-*"))
