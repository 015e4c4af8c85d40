"""A real tree round trip through a real mount, across unmount and remount."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.conftest import CasEnv
from tests.treeutil import IGNORED, compare_trees, snapshot_stdlib


def test_stdlib_round_trip(casenv: CasEnv, tmp_path: Path) -> None:
    src = snapshot_stdlib(tmp_path / "src")
    os.symlink("os.py", src / "casfs-test-link")          # a relative symlink
    os.symlink("/nonexistent/target", src / "dangling")  # a dangling one
    casenv.init("vol")
    mp = casenv.mount("vol")
    shutil.copytree(src, mp / "tree", symlinks=True, ignore=IGNORED)
    shutil.copystat(src, mp / "tree")
    assert compare_trees(src, mp / "tree") == []
    casenv.umount(mp)
    assert not any(mp.iterdir())
    casenv.mount("vol", mp)
    diffs = compare_trees(src, mp / "tree")
    assert diffs == [], diffs[:20]
    r = casenv.run("fsck", "vol")
    assert "0 refcount mismatches" in r.stdout
