"""Kernel cache invalidation for a shared volume (docs/sharing.md, "Consistency").

The engine reads the change rows other machines committed
(:meth:`cas.engine.fs.Filesystem.poll_changes`: every ``poll_s`` seconds from
:func:`poll_loop`, and at open, lookup or getattr as the consistency level says) and
hands them to :meth:`Invalidator.seen`, with the engine lock held, from whatever thread
polled. The kernel must then forget what it caches of those inodes and entries:

* this layer's own tables (``PageCacheGuard``, ``Listings``) belong to the loop thread:
  they are updated by :meth:`Invalidator.drain`, on the loop, right after the engine
  call of a handler that polled, or by the :meth:`Invalidator.run` task;
* attribute invalidations (``pyfuse3.invalidate_inode(ino, attr_only=True)``) only
  mark the kernel's cached attributes stale, take no lock a FUSE request holds, and run
  in :meth:`Invalidator.drain` (the FUSE layer already does this in setxattr);
* entry and page cache invalidations (``pyfuse3.invalidate_entry``,
  ``pyfuse3.invalidate_inode``) may wait for kernel locks that a request in progress
  holds (a lookup holds its directory's lock until we answer it), so libfuse says never
  to send them from a request handler nor with a lock a request may need. They run in a
  thread of their own (``trio.to_thread``) started by the :meth:`Invalidator.run` task,
  without the engine lock, while the loop keeps answering requests.

An inode or entry the kernel does not know (forgotten, never looked up) makes these
calls fail with ENOENT: nothing to drop, ignored.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import pyfuse3
import trio

from cas.db.changes import Change

if TYPE_CHECKING:
    from .operations import CasOperations

log = logging.getLogger(__name__)


class Invalidator:
    """Turns the change rows the engine applied into kernel invalidations (see the
    module docstring). ``seen`` may be called from any thread; ``drain`` and ``run``
    on the trio loop only."""

    def __init__(self, ops: CasOperations) -> None:
        self.ops = ops
        self.pending: deque[Change] = deque()   # appended by any thread, taken on the loop
        self.token: trio.lowlevel.TrioToken | None = None
        self.wake: trio.Event | None = None
        # (parent, name) entries and inodes whose pages to drop, for the thread
        self.entries: list[tuple[int, bytes]] = []
        self.inodes: list[int] = []

    def seen(self, rows: list[Change]) -> None:
        """The engine's hook (``Filesystem.on_changes``): queue ``rows`` and wake the
        :meth:`run` task. Never blocks (the engine lock is held)."""
        self.pending.extend(rows)
        token = self.token
        if token is None:
            return   # the task drains what is pending when it starts
        try:
            on_loop = trio.lowlevel.current_trio_token() is token
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._set()
            return
        try:
            token.run_sync_soon(self._set)
        except trio.RunFinishedError:
            pass   # unmounting: nothing to invalidate any more

    def _set(self) -> None:
        if self.wake is not None:
            self.wake.set()

    def drain(self) -> None:
        """On the loop: apply the pending rows to this layer's tables and the kernel's
        cached attributes, and queue their entries and pages for the thread."""
        ops = self.ops
        inos: set[int] = set()
        while self.pending:
            c = self.pending.popleft()
            ops.pages.changed(c.inode)
            ops.listings.drop(c.inode)
            inos.add(c.inode)
            if c.parent is not None:
                ops.listings.drop(c.parent)
                inos.add(c.parent)
                if c.name is not None:
                    self.entries.append((c.parent, c.name))
        for ino in inos:
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError:   # ENOENT: the kernel does not hold it
                pass
        self.inodes.extend(inos)

    async def run(self) -> None:
        """The task: wait for rows, drain them, and send the entry and page cache
        invalidations from a thread of their own."""
        self.token = trio.lowlevel.current_trio_token()
        while True:
            self.wake = trio.Event()
            self.drain()
            if self.entries or self.inodes:
                entries, inodes = self.entries, self.inodes
                self.entries, self.inodes = [], []
                await trio.to_thread.run_sync(_invalidate, entries, inodes)
                continue
            await self.wake.wait()


def _invalidate(entries: list[tuple[int, bytes]], inodes: list[int]) -> None:
    """Send the kernel entry and page cache invalidations (a worker thread, no engine
    lock held); an inode or entry the kernel does not know (ENOENT) is skipped."""
    for parent, name in dict.fromkeys(entries):
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError:
            pass
    for ino in dict.fromkeys(inodes):
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError:
            pass

