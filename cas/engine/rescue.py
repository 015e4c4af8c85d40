"""The rescue area: uncommitted file buffers kept across the exit of a mount daemon.

A daemon that must exit while some files' buffers cannot be committed (full chunk
store, dead database; it was unmounted with ``fusermount3 -u`` or got SIGTERM) spills
each such file's RAM state (:class:`cas.engine.filedata.InodeData`) to ``VOLUME/rescue/`` (mode
0700) with :func:`spill`; the next mount replays the records with :func:`replay` before
it serves, and deletes each record only after its data committed. docs/writeback.md
describes the design; the byte format of one record (``<inode>.<time_ns>.rec``) is::

    magic      b"CASRESCUE1\\n"                    11 bytes
    hlen       header length, unsigned big-endian  4 bytes
    header     JSON (UTF-8): ino, path (or null), size (bytes), chunk_size,
               truncate_from (slot or null), attrs ({column: int}), mode, uid, gid
               (null when unknown), error, time_ns, slots ([[slot, length], ...])
    data       the canonical bytes of each slot, in header order (exactly ``length``
               bytes each: the slot's part of the file, as a flush would store it)
    digest     SHA-256 of everything above         32 bytes

A record is written to ``NAME.tmp``, fsynced, renamed, and the directory fsynced: it is
either absent or complete; a record whose digest does not match is renamed to
``NAME.bad`` and reported, never replayed. In an encrypted volume the whole record is
sealed (:meth:`cas.config.keys.VolumeKeys.seal_blob`, associated data RESCUE_AAD + volume uuid
+ "/" + the record's file name: a renamed or moved record does not open): the rescue
area never holds file data in the clear (docs/encryption.md).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat as S
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cas.errors import CasError, Exists, FsError, IntegrityError
from cas.chunk.store import fsync_dir
import cas.db.namespace as ns

if TYPE_CHECKING:
    from cas.engine.fs import Filesystem

log = logging.getLogger(__name__)

MAGIC = b"CASRESCUE1\n"
RESCUE_AAD = b"casfs-rescue/1"
SUFFIX = ".rec"
LOST_FOUND = b"lost+found"   # directory at the root of the volume for orphaned records


class RescueError(CasError):
    """A rescue record cannot be written, read or replayed."""


@dataclass(frozen=True)
class Record:
    """One spilled file: its header fields and slot -> canonical bytes."""

    header: dict[str, Any]
    slots: dict[int, bytes]


def rescue_dir(volume_path: Path) -> Path:
    """The rescue area of the volume at ``volume_path``."""
    return volume_path / "rescue"


def area_bytes(directory: Path) -> tuple[int, int]:
    """(records, bytes) in the rescue area ``directory``; (0, 0) when it does not exist."""
    n = size = 0
    try:
        for e in os.scandir(directory):
            if e.name.endswith(SUFFIX):
                n += 1
                size += e.stat().st_size
    except FileNotFoundError:
        pass
    return n, size


def encode(header: dict[str, Any], slots: dict[int, bytes | bytearray]) -> bytes:
    """The bytes of one record (see the module docstring)."""
    order = sorted(slots)
    header = dict(header, slots=[[s, len(slots[s])] for s in order])
    h = json.dumps(header, sort_keys=True).encode()
    body = b"".join([MAGIC, struct.pack(">I", len(h)), h, *(bytes(slots[s]) for s in order)])
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes) -> Record:
    """Parse and verify one record. Raises RescueError when it is malformed or damaged."""
    if len(blob) < len(MAGIC) + 4 + 32 or not blob.startswith(MAGIC):
        raise RescueError("not a rescue record")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise RescueError("digest mismatch")
    (hlen,) = struct.unpack_from(">I", body, len(MAGIC))
    pos = len(MAGIC) + 4
    try:
        header = json.loads(body[pos:pos + hlen])
    except ValueError as exc:
        raise RescueError(f"bad header: {exc}") from exc
    pos += hlen
    slots: dict[int, bytes] = {}
    for slot, length in header["slots"]:
        slots[int(slot)] = body[pos:pos + int(length)]
        pos += int(length)
    if pos != len(body):
        raise RescueError("slot lengths do not match the record's size")
    return Record(header, slots)


def _aad(fs: Filesystem, name: str) -> bytes:
    """A record's associated data: RESCUE_AAD, the volume uuid and the record's file
    name, so a sealed record renamed, or moved to another volume, does not open."""
    return RESCUE_AAD + fs.meta.volume.uuid.encode() + b"/" + name.encode()


def _keys(fs: Filesystem) -> Any:
    """The volume's keys; None for a plain volume. RescueError for an encrypted volume
    that is not unlocked (never plaintext records of an encrypted volume)."""
    vol = fs.meta.volume
    if vol.encryption and vol.keys is None:
        raise RescueError(f"volume {vol.name} is encrypted and not unlocked: no rescue record")
    return vol.keys if vol.encryption else None


def _seal(fs: Filesystem, blob: bytes, name: str) -> bytes:
    """``blob`` sealed under the volume's keys in an encrypted volume, else as it is."""
    keys = _keys(fs)
    return keys.seal_blob(blob, _aad(fs, name)) if keys is not None else blob


def _open(fs: Filesystem, blob: bytes, name: str) -> bytes:
    """The record inside ``blob`` (:func:`_seal`); RescueError when it does not open."""
    keys = _keys(fs)
    if keys is None:
        return blob
    try:
        return bytes(keys.open_blob(blob, _aad(fs, name)))
    except IntegrityError as exc:
        raise RescueError(f"sealed record does not open: {exc}") from exc


def spill(fs: Filesystem, directory: Path) -> list[Path]:
    """Write every file of ``fs`` holding uncommitted changes to the rescue area.

    Paths are looked up while the database answers (else null). Returns the record
    files written, each durable (fsynced, directory fsynced). Raises RescueError when a
    record cannot be written (the records already written stay).
    """
    directory.mkdir(mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    written: list[Path] = []
    with fs.lock:
        data = fs.data
        data.wait_idle(list(data.states.values()))   # a flight gives back or commits first
        for st in [s for s in list(data.states.values()) if s.needs_flush]:
            a = fs.attrs.get(st.ino)
            header = {"ino": st.ino, "path": fs.path_of(st.ino), "size": st.size,
                      "chunk_size": fs.chunk_size, "truncate_from": st.truncate_from,
                      "attrs": dict(st.attrs), "mode": a.mode if a else None,
                      "uid": a.uid if a else None, "gid": a.gid if a else None,
                      "error": st.wb_message, "time_ns": time.time_ns()}
            slots = {s: data._slot_bytes(st, s) for s in st.dirty}
            name = f"{st.ino}.{header['time_ns']}{SUFFIX}"
            tmp = directory / (name + ".tmp")
            sealed = _seal(fs, encode(header, slots), name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    view = memoryview(sealed)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, directory / name)
                fsync_dir(directory)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise RescueError(f"cannot write rescue record {directory / name}: {exc}") from exc
            written.append(directory / name)
            log.warning("kept the uncommitted data of inode %d (%s, %d bytes) in %s",
                        st.ino, header["path"] or "path unknown", st.dirty_bytes, directory / name)
    return written


def pending(directory: Path) -> list[Path]:
    """The records of the rescue area, oldest first."""
    try:
        names = [e.name for e in os.scandir(directory) if e.name.endswith(SUFFIX)]
    except FileNotFoundError:
        return []

    def key(n: str) -> tuple[int, str]:
        parts = n.split(".")
        return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0, n)
    return [directory / n for n in sorted(names, key=key)]


@dataclass
class ReplayResult:
    """What :func:`replay` did: records committed into their inode, into lost+found
    (paths), and records found damaged (renamed to .bad)."""

    replayed: int = 0
    lost_found: list[str] | None = None
    damaged: list[str] | None = None


def replay(fs: Filesystem, directory: Path) -> ReplayResult:
    """Commit every record of the rescue area into ``fs`` (before it serves).

    A record goes into its inode when that inode is still a linked regular file (the
    record's buffers are installed as the file's dirty state and flushed, as the daemon
    would have); otherwise into a new file ``/lost+found/<inode>-<name>`` holding the
    record's slots (the rest of the old file, never committed, is not known). Each
    record is deleted after the group COMMIT that holds it. Raises CasError (NoSpace,
    MetaError ...) when a record cannot be committed: it stays for the next mount.
    """
    out = ReplayResult(lost_found=[], damaged=[])
    for path in pending(directory):
        try:
            rec = decode(_open(fs, path.read_bytes(), path.name))
            if int(rec.header["chunk_size"]) != fs.chunk_size:
                raise RescueError("chunk size differs from the volume's")
        except (RescueError, OSError, KeyError, ValueError, TypeError) as exc:
            log.error("rescue record %s is damaged (%s): renamed to .bad, not replayed", path, exc)
            os.replace(path, path.with_suffix(".bad"))
            assert out.damaged is not None
            out.damaged.append(path.name)
            continue
        target = _replay_one(fs, rec)
        path.unlink()
        fsync_dir(directory)
        if target is None:
            out.replayed += 1
        else:
            assert out.lost_found is not None
            out.lost_found.append(target)
    return out


def _live_file(fs: Filesystem, ino: int) -> bool:
    row = ns.inode(fs.db, ino)
    return row is not None and S.S_ISREG(row.mode) and row.nlink > 0


def _replay_one(fs: Filesystem, rec: Record) -> str | None:
    """Commit one record; returns None (into its inode) or the lost+found path."""
    h = rec.header
    ino = int(h["ino"])
    where: str | None = None
    with fs.lock:
        if _live_file(fs, ino):
            fs.open(ino)
            truncate_from = h["truncate_from"]
        else:
            where, ino = _lost_found_file(fs, h)
            truncate_from = None  # a new file: no manifest to cut
        st = fs.data.adopt(ino, int(h["size"]), rec.slots, truncate_from,
                           {str(k): int(v) for k, v in h["attrs"].items()})
        try:
            fs.data.flush(st)
            fs.db.commit()
        except BaseException:
            fs.data.discard(st)  # the record stays on disk for the next mount
            raise
        finally:
            fs.release(ino)
    log.warning("replayed rescued data of inode %d (%s, %d bytes) into %s", int(h["ino"]),
                h["path"] or "path unknown", sum(len(b) for b in rec.slots.values()), where or "its inode")
    return where


def _lost_found_file(fs: Filesystem, h: dict[str, Any]) -> tuple[str, int]:
    """Create (open) ``/lost+found/<ino>-<name>`` for a record whose inode is gone."""
    root = fs.getattr(1)
    found = ns.entry(fs.db, 1, LOST_FOUND)
    if found is not None:
        lf = found
    else:
        lf = fs.mkdir(1, LOST_FOUND, 0o700, root.uid, root.gid).ino
    base = os.path.basename(h["path"] or "") or "unnamed"
    mode = int(h["mode"]) if h.get("mode") is not None else 0o100600
    uid = int(h["uid"]) if h.get("uid") is not None else root.uid
    gid = int(h["gid"]) if h.get("gid") is not None else root.gid
    for n in range(1000):
        name = f"{h['ino']}-{base}" + (f".{n}" if n else "")
        raw = name.encode()[:255]
        try:
            a = fs.create(lf, raw, mode & 0o7777, uid, gid)
        except Exists:
            continue
        return "/" + LOST_FOUND.decode() + "/" + raw.decode(errors="replace"), a.ino
    raise FsError("no free name in lost+found", errno.EEXIST)
