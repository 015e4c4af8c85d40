"""cas.maint.find.glob_to_sql: the LIKE (and REGEXP) it makes match on the real MariaDB server
exactly the names Python's fnmatch.fnmatchcase matches (fnmatch(3) without flags,
find(1)'s -name), for globs and names drawn from the characters special to either."""
from __future__ import annotations

import fnmatch
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.maint.find import glob_to_sql
from cas.db.database import Database, MetaTarget
from cas.db.server import EmbeddedServer

# no backslash: fnmatchcase has no escape character, fnmatch(3) and casfs do; no '^':
# glibc's fnmatch (find -name) reads "[^" as "[!", fnmatchcase as a literal '^'
ALPHABET = "ab.:=%_[]!*?-"


@pytest.fixture(scope="module")
def db(mysql_server: EmbeddedServer) -> Iterator[Database]:
    d = Database(MetaTarget(user="root", password="", database="", unix_socket=str(mysql_server.socket)))
    try:
        yield d
    finally:
        d.close()


def sql_match(db: Database, name: str, glob: str) -> bool:
    like, rx = glob_to_sql(glob)
    n = name.encode()
    if rx is None:
        return bool(db.query("SELECT %s LIKE %s", (n, like))[0][0])
    return bool(db.query("SELECT %s LIKE %s AND %s REGEXP %s", (n, like, n, rx))[0][0])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(glob=st.text(ALPHABET, max_size=7), name=st.text(ALPHABET, min_size=1, max_size=7))
def test_glob_matches_like_fnmatch(db: Database, glob: str, name: str) -> None:
    assert sql_match(db, name, glob) == fnmatch.fnmatchcase(name, glob), (glob, name, glob_to_sql(glob))


@pytest.mark.parametrize("glob, name, want", [
    ("\\*", "*", True), ("\\*", "a", False), ("a\\?", "a?", True), ("\\[a]", "[a]", True),
    ("[a-c]x", "bx", True), ("[!a-c]x", "bx", False), ("%", "%", True), ("%", "a", False),
    ("_", "a", False), ("a\\\\b", "a\\b", True), ("[^a]", "b", True), ("[^a]", "a", False),
    ("[b-a]", "a", False), ("x[b-a]*", "xa", False), ("[..]", ".", True), ("[:=]", "=", True),
])
def test_escapes(db: Database, glob: str, name: str, want: bool) -> None:
    assert sql_match(db, name, glob) is want
