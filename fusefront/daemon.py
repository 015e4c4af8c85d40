"""Running a mount: pyfuse3 init, the trio main loop, the writeback timer, teardown.

:func:`serve` blocks until the filesystem is unmounted (``fusermount3 -u``) or the
process gets SIGTERM/SIGINT, in which case it unmounts itself. It never closes the
engine: the caller flushes and closes it afterwards.

Control channel of `casfs umount` (docs/writeback.md): the caller writes a token to
``run/sync.request`` and sends SIGUSR1; the daemon writes back every buffer, commits,
and answers in ``run/sync.json`` (mode 0600, in the volume's private run/ directory):
``{"token", "pid", "error", "files": [{"ino", "path", "bytes", "error"}]}``, where
``files`` lists the files still uncommitted.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from cas.errors import CasError
from cas.engine.fs import Filesystem
from cas.config.volume import write_private

from .observe import Observer
from .operations import CasOperations, offload

log = logging.getLogger(__name__)
WRITEBACK_INTERVAL_S = 0.5   # how often released files are committed (in one transaction)
if "CASFS_WRITEBACK_INTERVAL_S" in os.environ:  # tests: hold a group open (tests/test_dbsup.py)
    WRITEBACK_INTERVAL_S = float(os.environ["CASFS_WRITEBACK_INTERVAL_S"])
WRITEBACK_AGE_S = 5.0        # an open file's dirty buffer older than this is committed too
if "CASFS_WRITEBACK_AGE_S" in os.environ:  # tests: write back open files while they are written (tests/test_stress.py)
    WRITEBACK_AGE_S = float(os.environ["CASFS_WRITEBACK_AGE_S"])
# run/stats.json (the live counters of `casfs stats` and `casfs stats --watch`) is rewritten
# when a counter changed, at most every STATS_INTERVAL_S; the counters are looked at every
# STATS_POLL_S, so the file is never older than the mount's state by more than
# STATS_INTERVAL_S + STATS_POLL_S (0.75 s), busy or idle (docs/find.md, "Live figures")
STATS_INTERVAL_S = 0.5
STATS_POLL_S = 0.25
STATS_FILE = "stats.json"
SYNC_REQUEST = "sync.request"   # token of the last commit request of `casfs umount`
SYNC_STATUS = "sync.json"       # the daemon's answer to it
SYNC_SIGNAL = signal.SIGUSR1
AUDIT_FLUSH_S = 1.0          # how often buffered audit log lines are written (cas/config/audit.py)


def answer_sync(fs: Filesystem) -> dict[str, object]:
    """Commit everything (:meth:`Filesystem.commit_all`) and write the answer for the
    token in ``run/sync.request`` to ``run/sync.json``. Returns the answer."""
    run = fs.meta.volume.run_dir
    try:
        token = (run / SYNC_REQUEST).read_text().strip()
    except OSError:
        token = ""
    left, err = fs.commit_all()
    # a file whose creation went with a lost group transaction can never be committed
    # where it was: retrying cannot help, it goes to the rescue area at exit
    lost = {st.ino for st in list(fs.data.states.values()) if st.lost}
    answer: dict[str, object] = {
        "token": token, "pid": os.getpid(), "error": err,
        "files": [{"ino": ino, "path": path, "bytes": n, "error": e, "lost": ino in lost}
                  for ino, path, n, e in left]}
    write_private(run / SYNC_STATUS, json.dumps(answer).encode())
    if left or err:
        log.error("commit request: %d files still uncommitted (%s)", len(left), err or "see their errors")
    return answer


async def _sync_requests(fs: Filesystem) -> None:
    with trio.open_signal_receiver(SYNC_SIGNAL) as signals:
        async for _ in signals:
            try:
                await offload(answer_sync, fs)
            except Exception:
                log.exception("cannot answer a commit request")


def publish_stats(fs: Filesystem, counters: dict[str, object] | None = None) -> None:
    """Write the mount's live counters (``counters``, else :meth:`Filesystem.runtime_stats`)
    to ``run/stats.json`` (atomically), with ``pid`` and ``time`` (s since the epoch)."""
    run = fs.meta.volume.run_dir
    tmp = run / (STATS_FILE + ".tmp")
    data = fs.runtime_stats() if counters is None else counters
    tmp.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), **data}))
    os.replace(tmp, run / STATS_FILE)


async def _publish(fs: Filesystem) -> None:
    """Keep run/stats.json current: rewritten when the counters changed and the last
    write is STATS_INTERVAL_S old, so at most twice a second while busy, and once more
    when a workload ends (its final counters differ from the last written)."""
    last: dict[str, object] | None = None
    written = -STATS_INTERVAL_S
    while True:
        now = time.monotonic()
        if now - written >= STATS_INTERVAL_S:
            counters: dict[str, object] = dict(fs.runtime_stats())
            if counters != last:
                try:
                    publish_stats(fs, counters)
                    last, written = counters, now
                except OSError as exc:
                    log.warning("cannot write live stats: %s", exc)
                    written = now
        await trio.sleep(STATS_POLL_S)


async def _writeback(fs: Filesystem) -> None:
    last_error = ""
    while True:
        await trio.sleep(WRITEBACK_INTERVAL_S)
        try:
            await offload(fs.writeback, WRITEBACK_AGE_S)
        except CasError as exc:  # retried next tick; the data stays buffered
            if str(exc) != last_error:
                log.error("writeback failed (will retry): %s", exc)
            last_error = str(exc)
        except Exception:
            log.exception("writeback failed (will retry)")
        else:
            last_error = ""


async def _poll_changes(fs: Filesystem) -> None:
    """Shared volume: read the change log every ``fs.level.poll_s`` seconds in a worker
    thread (the engine takes its lock for one query and the RAM drops), deleting old
    change rows now and then (docs/sharing.md, "Consistency")."""
    last_error = ""
    while True:
        await trio.sleep(fs.level.poll_s)
        try:
            await offload(fs.poll_changes, True)
        except CasError as exc:  # retried next poll
            if str(exc) != last_error:
                log.error("cannot read the change log (will retry): %s", exc)
            last_error = str(exc)
        except Exception:
            log.exception("reading the change log failed (will retry)")
        else:
            last_error = ""


async def _flush_audit() -> None:
    while True:
        await trio.sleep(AUDIT_FLUSH_S)
        for h in list(logging.getLogger("casfs.audit").handlers):
            h.flush()


async def _main(fs: Filesystem, state: dict[str, bool], audit: bool = False,
                ops: CasOperations | None = None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_writeback, fs)
        if ops is not None and ops.invalidator is not None:   # a shared volume
            nursery.start_soon(ops.invalidator.run)
            nursery.start_soon(_poll_changes, fs)
        nursery.start_soon(_publish, fs)
        nursery.start_soon(_sync_requests, fs)
        if audit:
            nursery.start_soon(_flush_audit)

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)
        await pyfuse3.main()
        state["unmounted"] = True
        nursery.cancel_scope.cancel()


def serve(fs: Filesystem, mountpoint: Path, *, fsname: str, allow_other: bool = False,
          on_ready: Callable[[], None] = lambda: None, extra_options: tuple[str, ...] = (),
          observer: Observer | None = None) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve requests until unmounted.

    ``on_ready`` is called once the kernel mount exists; ``extra_options`` are more
    libfuse mount options (kernel flags such as ``ro``, ``noatime``, ``nosuid``);
    ``observer`` (metrics, audit log; fusefront/observe.py) is installed on the handlers
    when given. Raises RuntimeError from pyfuse3.init when the kernel refuses the mount.
    """
    ops = CasOperations(fs)
    if observer is not None:
        observer.install(ops)
    options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=casfs"} | set(extra_options)
    if allow_other:
        options.add("allow_other")
    # a commit request that arrives before the trio loop listens must not kill us
    # (SIGUSR1's default action): ignored until then; `casfs umount` asks again
    signal.signal(SYNC_SIGNAL, signal.SIG_IGN)
    pyfuse3.init(ops, str(mountpoint), options)
    state = {"unmounted": False}
    try:
        on_ready()
        trio.run(_main, fs, state, observer is not None and observer.audit_level != "off", ops)
    finally:
        pyfuse3.close(unmount=not state["unmounted"])
