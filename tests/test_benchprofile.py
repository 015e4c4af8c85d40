"""``python -m tools.bench --profile``: py-spy attached to a real casfs mount daemon per
row (tools/bench/profiling.py), and the classification of its stacks (docs/performance.md).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import child_env
from tools.bench.profiling import (CASFS, CHUNK_IO, COMPRESS, FUSE, HASH, IDLE, MYSQL, SYNC, WAIT_GIL,
                                WAIT_LOCK, WAIT_WORKERS, RowProfile, classify, find_py_spy, parse_raw,
                                summarize)

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = ("write_new", "write_dup", "read_cold", "create", "copy", "lsr_cold", "readall_cold")

# the root of every stack of the daemon's main thread, as py-spy --native records it
_LOOP = ("0x7fab91a4524a (libc.so.6);_run_module_as_main (<frozen runpy>:198);mount (tools/cli/mountcmd.py:397);"
         "run_daemon (tools/cli/mountcmd.py:351);serve (fusefront/daemon.py:179);")
_HANDLER = (_LOOP + "run (trio/_core/_run.py:2532);unrolled_run (trio/_core/_run.py:2866);"
            "async_wrapper.<locals>.wrapper (_pyfuse3.py:58);__pyx_gb_7pyfuse3_44generator14 (handlers.pxi:519);"
            "_translate.<locals>.wrapper (fusefront/operations.py:93);CasOperations.write (fusefront/operations.py:313);"
            "_locked.<locals>.wrapper (cas/engine/fs.py:112);Filesystem.write (cas/engine/fs.py:793);"
            "FileData.flush (cas/engine/filedata.py:452);FileData._flush_many (cas/engine/filedata.py:523);")
_WORKER = ("0x7fab91a4524a (libc.so.6);thread_run (libpython3.11.so.1.0);Thread._bootstrap (threading.py:1002);"
           "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83);"
           "_WorkItem.run (concurrent/futures/thread.py:58);")


@pytest.mark.parametrize("frames, loop, want", [
    (_LOOP + "run (trio/_core/_run.py:2535);EpollIOManager.get_events (trio/_core/_io_epoll.py:243);"
     "select_epoll_poll (selectmodule.c.h:841);epoll_wait (libc.so.6)", True, IDLE),
    (_HANDLER + "ChunkManager.store_unknown (cas/chunk/manager.py:295);LocalStore.put_many (cas/chunk/store.py:89);"
     "Future.result (concurrent/futures/_base.py:451);Condition.wait (threading.py:327);"
     "lock_PyThread_acquire_lock (libpython3.11.so.1.0);PyThread_acquire_lock_timed (libpython3.11.so.1.0);"
     "0x7fab91aaed90 (libc.so.6)", True, WAIT_WORKERS),
    (_HANDLER + "ChunkManager.store_unknown (cas/chunk/manager.py:295);LocalStore.put_many (cas/chunk/store.py:94);"
     "LocalStore._sync (cas/chunk/store.py:100);PyCFuncPtr_call (_ctypes.c:4201);ffi_call (libffi.so.8.1.2);"
     "syncfs (libc.so.6)", True, SYNC),
    (_HANDLER + "Database.transaction (cas/db/database.py:361);Cursor.execute (pymysql/cursors.py:170);"
     "Connection._read_packet (pymysql/connections.py:789);sock_recv_into (socketmodule.c:1)", True, MYSQL),
    (_LOOP + "run (trio/_core/_run.py:2532);unrolled_run (trio/_core/_run.py:2866);"
     "__pyx_gb_7pyfuse3_44generator14 (handlers.pxi:523);fuse_reply_write (libfuse3.so.3.14.0);"
     "0x7fab8f7d7166 (libfuse3.so.3.14.0);writev (libc.so.6)", True, FUSE),
    (_LOOP + "run (trio/_core/_run.py:2532);unrolled_run (trio/_core/_run.py:2866);"
     "_translate.<locals>.wrapper (fusefront/operations.py:93);CasOperations.getattr (fusefront/operations.py:171);"
     "_locked.<locals>.wrapper (cas/engine/fs.py:112);rlock_acquire (_threadmodule.c:1);0x7fab91aaed90 (libc.so.6)",
     True, WAIT_LOCK),
    (_HANDLER + "FileData._flush_many (cas/engine/filedata.py:520)", True, CASFS),
    (_WORKER + "ChunkManager.store_unknown.<locals>.<lambda> (cas/chunk/manager.py:294);ChunkCodec.seal (cas/chunk/envelope.py:191);"
     "_compress (cas/chunk/envelope.py:97);ZstdCompressor_compress (compressor.c:554);ZSTD_compressStream2 (zstd.c:29494);"
     "0x7fab8f7d7166 (libzstd.so)", False, COMPRESS),
    (_WORKER + "ChunkCodec.chunk_id (cas/chunk/envelope.py:181);_hashlib_openssl_sha256 (_hashopenssl.c.h:427);"
     "EVP_hash (_hashopenssl.c:442);SHA256_Update (libcrypto.so.3)", False, HASH),
    (_WORKER + "ChunkCodec.chunk_id (cas/chunk/envelope.py:181);_hashlib_openssl_sha256 (_hashopenssl.c.h:427);"
     "py_evp_fromname (_hashopenssl.c:907);pthread_cond_timedwait (libc.so.6);0x7fab91aa3f16 (libc.so.6)",
     False, WAIT_GIL),
    (_WORKER + "LocalStore._put_one (cas/chunk/store.py:116);os_write (libpython3.11.so.1.0);write (libc.so.6)",
     False, CHUNK_IO),
    ("0x7fab91a4524a (libc.so.6);thread_run (libpython3.11.so.1.0);Thread.run (threading.py:982);"
     "_worker (concurrent/futures/thread.py:81);_queue_SimpleQueue_get (_queuemodule.c.h:177);"
     "PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7fab91aaed90 (libc.so.6)", False, IDLE),
])
def test_classify(frames: str, loop: bool, want: str) -> None:
    """Each category from a stack of the shape py-spy records of a casfs daemon: the
    frame nearest the leaf decides; a lock wait under casfs code is the engine lock."""
    assert classify(frames.split(";"), loop) == want


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                    reason="needs /dev/fuse and fusermount3")
def test_bench_profile_rows(tmp_path: Path) -> None:
    """`tools.bench --profile` attaches py-spy to the casfs daemon of each goal row (a new
    daemon after each cold remount) and prints per row the trio loop thread's shares, the
    other threads' busy time and the top functions; the raw stacks it keeps are the daemon's
    own (CasOperations handlers served the row), the new data written was compressed by
    a worker thread, the volume's embedded MariaDB counted the statements of the create
    row, and nothing stays mounted."""
    assert find_py_spy() is not None, "py-spy is a test dependency (pyproject.toml, extra 'test')"
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(20):
        (tree / ("sub" if i % 2 else ".") / f"f{i}").write_bytes(os.urandom(200 * i + 1))
    raw = tmp_path / "raw"
    r = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--size-mib", "32", "--files", "200", "--latency-samples", "0",
         "--only", "native", "--small-files", "--tree", str(tree), "--profile", "--profile-rate", "250",
         "--profile-dir", str(raw), "--workdir", str(tmp_path), "--quiet"],
        cwd=REPO_ROOT, env=child_env(),
        capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    report = r.stdout
    assert "profile of the casfs daemon per row" in report, report
    assert "--profile: error" not in report, report
    for key in ROWS:
        head = re.search(rf"^{key}: .* under the profiler \(([\d.]+) s, .*; (\d+) samples of the trio loop thread$",
                         report, re.MULTILINE)
        assert head is not None, (key, report)
        assert int(head.group(2)) > 0, (key, report)
        stacks = parse_raw((raw / f"{key}.raw").read_text())
        row = summarize(stacks, RowProfile(key, key, 1, "op", float(head.group(1)), 0.0, 0.0))
        assert row.loop_samples == int(head.group(2)), key
        assert sum(row.loop.values()) == row.loop_samples, key   # every sample in one category
    # the daemon's own stacks: its handlers served the rows
    every = "".join((raw / f"{k}.raw").read_text() for k in ROWS)
    assert "CasOperations." in every
    assert len({ln.split(";", 1)[0] for ln in every.splitlines()}) > 2   # several threads sampled
    # 64 MiB of new random data went through zstd in some thread of the write rows
    writes = summarize(parse_raw((raw / "write_new.raw").read_text()), RowProfile("w", "w", 1, "op", 1.0, 0, 0))
    assert writes.loop[COMPRESS] + sum(c[COMPRESS] for c in writes.groups.values()) > 0, report
    assert re.search(r"^  trio loop thread, share of the row's time", report, re.MULTILINE)
    # the volume's own (embedded) MariaDB counted the statements of each row: creating
    # 200 files cannot take none
    creates = re.search(r"^create: .*\n  MySQL: ([\d,]+) statements", report, re.MULTILINE)
    assert creates is not None and int(creates.group(1).replace(",", "")) > 0, report
    assert "top self, all threads" in report
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert not list(tmp_path.glob("casfs-bench-*"))
