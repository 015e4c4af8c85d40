"""fsck's view of the volume's sessions (docs/sharing.md, "Sessions", "Reaping").

Lists every session (live or dead, host, pid, store, mode, sustained inodes, queued
chunks of its store), the dead ones no live mount has reaped yet (not an error: the next
heartbeat of any live mount reaps them, or the next mount of their own machine), and
the sustained rows whose session no longer exists (an error: the inodes they name have
nlink 0 and nobody will free them while the row stays). ``repair`` frees those inodes
(cas.db.sessions.free_unlinked: exact refcount decrements, one transaction per inode)
and deletes the rows.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from pymysql.cursors import Cursor

from cas.db import sessions as dbsessions
from cas.db.database import Metadata


@dataclass
class SessionReport:
    """Sessions of the volume; ``orphan_sustained`` as (session, inode) pairs;
    ``freed``: inodes freed by the repair."""

    sessions: list[dbsessions.SessionRow] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    orphan_sustained: list[tuple[int, int]] = field(default_factory=list)
    freed: int = 0
    repaired: bool = False

    @property
    def clean(self) -> bool:
        """True unless sustained rows of vanished sessions are left (dead sessions are
        not an error: a live mount reaps them)."""
        return not self.orphan_sustained or self.repaired

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: sessions as objects, the rest as lists."""
        return {"sessions": [s._asdict() for s in self.sessions], "dead": self.dead,
                "orphan_sustained": [list(p) for p in self.orphan_sustained], "freed": self.freed,
                "repaired": self.repaired, "clean": self.clean}


def check(meta: Metadata, repair: bool = False) -> SessionReport:
    """The report of the module docstring; with ``repair`` free the inodes of orphan
    sustained rows. The caller's own session (``meta.db.session_id``: `fsck --repair`'s
    exclusive session) is not listed. Raises MetaError."""
    db = meta.db
    r = SessionReport(sessions=[s for s in dbsessions.list_sessions(db, store_of_first=uuid.UUID(meta.volume.uuid).hex)
                                if s.id != db.session_id])
    r.dead = [s.id for s in r.sessions if not s.live]
    r.orphan_sustained = dbsessions.orphan_sustained(db)
    if repair and r.orphan_sustained:
        for session, ino in r.orphan_sustained:
            def free(cur: Cursor, s: int = session, i: int = ino) -> bool:
                return dbsessions.free_unlinked(cur, i, s)
            if db.transaction(free):
                r.freed += 1
        r.repaired = True
    return r
