"""Consistency levels and the change feed of a shared volume (docs/sharing.md, "Consistency").

A shared volume (meta ``shared`` = '1') may be mounted by several machines at once. No
answer from RAM is then authoritative: every transaction that changes an inode or a
dentry also writes change rows (cas/db/changes.py), and each mount reads the rows of
the other sessions (:class:`ChangeFeed`) and drops what they name from its RAM caches
(cas.engine.fs.Filesystem.poll_changes) and, through the FUSE layer, from the kernel's.

The consistency level (:data:`LEVELS`, ``casfs mount --consistency``) says how often a
mount polls, how long the kernel may cache entries and attributes, and what an open,
a lookup, a getattr and a close do:

* ``strong``: kernel timeouts 0, no ``keep_cache``; every lookup, getattr and open polls
  first (one query), so it sees every commit that finished before it started; a close
  of a file written here commits before it returns.
* ``session`` (the default; close-to-open): poll every 1 s, kernel timeouts 1 s; an open
  polls first; a close of a file written here commits before it returns. Namespace
  changes of another machine are seen within :data:`SESSION_BOUND_S`.
* ``eventual``: poll every 10 s, kernel timeouts 10 s, no poll at open; bound
  :data:`EVENTUAL_BOUND_S`.

On a volume that is not shared the level changes nothing.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cas.db import changes as dbchanges
from cas.db.changes import Change
from cas.db.source import Source
from cas.errors import InvalidArgument

EVENTUAL = "eventual"
SESSION = "session"
STRONG = "strong"
CONSISTENCY_LEVELS = (EVENTUAL, SESSION, STRONG)
#: how far back (seconds, this machine's monotonic clock) every poll reads change ids
#: again: a row whose id was handed out before a poll but whose transaction committed
#: after it is still seen, as long as it commits within this window of the poll. Change
#: rows are the last statement of their transaction, which commits right after
#: (a shared mount commits every body at once), so the gap is one round trip.
POLL_WINDOW_S = 5.0
#: change rows older than this (server time) are deleted by any mount, every PRUNE_EVERY_S
CHANGES_KEEP_S = 300.0
PRUNE_EVERY_S = 60.0


@dataclass(frozen=True)
class Level:
    """One consistency level: ``poll_s`` (seconds between background polls),
    ``kernel_timeout_s`` (FUSE entry and attribute timeouts, seconds), whether an open,
    and a lookup or getattr, poll first, whether the kernel may keep a file's pages
    across opens, and whether a close of a file written here commits before returning."""

    name: str
    poll_s: float
    kernel_timeout_s: float
    poll_at_open: bool
    poll_at_lookup: bool
    keep_cache: bool
    commit_at_close: bool

    @property
    def bound_s(self) -> float:
        """The stated bound (seconds) after another machine's commit within which this
        mount sees a namespace change: one poll interval plus the kernel's timeout."""
        return self.poll_s + self.kernel_timeout_s


LEVELS = {
    STRONG: Level(STRONG, 1.0, 0.0, True, True, False, True),
    SESSION: Level(SESSION, 1.0, 1.0, True, False, True, True),
    EVENTUAL: Level(EVENTUAL, 10.0, 10.0, False, False, True, False),
}
SESSION_BOUND_S = LEVELS[SESSION].bound_s     # 2 s
EVENTUAL_BOUND_S = LEVELS[EVENTUAL].bound_s   # 20 s


def level(name: str) -> Level:
    """The :class:`Level` called ``name``. Raises InvalidArgument for an unknown one."""
    try:
        return LEVELS[name]
    except KeyError:
        raise InvalidArgument(f"consistency {name!r}: choose one of {', '.join(CONSISTENCY_LEVELS)}") from None


class ChangeFeed:
    """Which change rows of other sessions this mount has not applied yet.

    AUTO_INCREMENT ids are not commit order: an id handed out before a poll may commit
    after it (within :data:`POLL_WINDOW_S` of its INSERT, see below). So each poll first
    reads every id above ``low`` (skipping the ids it returned before), and only then
    raises ``low`` to the ``MAX(id)`` read (in the same statement) by a poll that ended
    at least :data:`POLL_WINDOW_S` before this one began (a *mark*): every id up to that
    maximum was handed out before that mark, so its row had committed before this
    poll's read began, and this read saw it. ``MAX(id)`` counts every session's rows
    (a primary-key read), so ``low`` also moves past this mount's own rows while the
    other mounts are idle.
    :meth:`start` begins with a mark and a ``low`` that every row still uncommitted may
    lie above (:func:`cas.db.changes.settled_id`), never at the latest id, which rows
    committing after the mount started may lie below. ``clock`` (seconds, monotonic) is
    there for tests. Not thread-safe: the engine calls it under its lock.
    """

    def __init__(self, start_id: int = 0, window_s: float = POLL_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.low = start_id
        self.marks: deque[tuple[float, int]] = deque()   # (clock at a poll's end, MAX(id) it read)
        self.seen: set[int] = set()
        self.pruned_at = clock()

    def start(self, src: Source, session: int) -> None:
        """Begin at a mount's start, before it loads anything: ``low`` = the highest id
        of the rows older than twice the window (server time), and the rows above it
        that are committed now count as seen (what they changed is what this mount will
        load); the rows above it that commit later are returned by later polls.
        Raises MetaError."""
        self.low = dbchanges.settled_id(src, 2 * self.window_s)
        self.poll(src, session)

    def poll(self, src: Source, session: int) -> list[Change]:
        """The committed change rows of sessions other than ``session`` not returned
        before, in id order. Raises MetaError."""
        begun = self.clock()
        top, got = dbchanges.since(src, self.low, session)
        fresh = [c for c in got if c.id not in self.seen]
        self.seen.update(c.id for c in fresh)
        while self.marks and self.marks[0][0] <= begun - self.window_s:
            self.low = max(self.low, self.marks.popleft()[1])
        self.seen = {i for i in self.seen if i > self.low}
        self.marks.append((self.clock(), top))
        return fresh

    def prune_due(self) -> bool:
        """Whether it is time to delete old change rows (every PRUNE_EVERY_S)."""
        now = self.clock()
        if now - self.pruned_at < PRUNE_EVERY_S:
            return False
        self.pruned_at = now
        return True
