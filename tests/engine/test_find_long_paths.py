"""casfs find (cas/maint/find.py) builds paths in a recursive CTE whose column type comes
from its anchor row: a path longer than Linux's PATH_MAX (4096 bytes; reachable
through relative paths) comes back whole, not cut at the column's length."""
from __future__ import annotations

import os

from cas.maint.find import Query, search
from tests.engine.test_fs import ROOT, Engine, eng, make_file  # noqa: F401 - the fixture


def test_paths_longer_than_path_max_are_whole(eng: Engine) -> None:
    parent, names = ROOT, []
    for i in range(24):                      # 24 x 251 bytes: a path of about 6 KiB
        name = b"%03d" % i + b"x" * 247
        parent = eng.fs.mkdir(parent, name, 0o40755, os.getuid(), os.getgid()).ino
        names.append(name)
    make_file(eng.fs, b"target", b"t", parent=parent)
    eng.fs.sync()
    want = b"/".join(names) + b"/target"
    assert len(want) > 4096
    for q in (Query(name="target"), Query(ftype="f")):
        hits = list(search(eng.fs.db, q))
        assert [h.path for h in hits] == [want]
    start = eng.fs.lookup(ROOT, names[0]).ino     # the other statement: below a directory
    hits = list(search(eng.fs.db, Query(start=start, name="target")))
    assert [h.path for h in hits] == [want[len(names[0]) + 1:]]
