"""Keys of an encrypted volume: the master key, how it is wrapped, and the subkeys.

An encrypted volume has one **master key**: 32 random bytes made at ``casfs init
--encrypt``. It is never stored in the clear. volume.toml's ``[encryption]`` table
(:func:`new_encryption_table`, byte format in docs/format.md) holds it *wrapped*
(AES-256-GCM, NIST SP 800-38D) under one or more wrapping keys, any one of which
unlocks the volume:

- ``passphrase``: a key derived from the passphrase by scrypt (RFC 7914; ``n``, ``r``,
  ``p`` and a 16-byte random salt stored with the wrap);
- ``keyfile``: a key derived by HKDF-SHA-256 (RFC 5869) from the 32 bytes of a key file.

Each wrap's associated data is ``b"casfs-master-key/1/" + volume uuid + b"/" + kind``,
so a wrap cannot be moved to another volume's table or to another kind without the
unwrap failing. :func:`unwrap` turns a table and a passphrase or key file into
:class:`VolumeKeys`, whose subkeys are HKDF-SHA-256 expansions of the master key with
distinct ``info`` labels (one key per purpose; none is the master key itself):

- ``chunk_id``: keyed BLAKE3 of a chunk's plaintext (32 bytes), the chunk id of an
  encrypted volume (dedup key, file name in the store, pack entry);
- ``chunk_aead``: AES-256-GCM of chunk envelopes (cas.chunk.envelope.ChunkCodec);
- ``blob_aead``: AES-256-GCM of metadata blobs (:meth:`VolumeKeys.seal_blob`).

A passphrase comes from a prompt, the environment variable ``CASFS_PASSPHRASE`` or a
file (:func:`passphrase_from_env_or_file`), never from the command line (a command line
is visible to every local user in /proc/PID/cmdline). A failed unlock is an audit event
on the ``casfs.audit`` logger and a line in the volume's log/mount.log.
"""
from __future__ import annotations

import base64
import getpass
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cas.errors import CasError, IntegrityError, VolumeError

if TYPE_CHECKING:
    from cas.config.volume import Volume

audit_log = logging.getLogger("casfs.audit")

KEY_SIZE = 32            # bytes: master key, subkeys, key files
NONCE_SIZE = 12          # bytes: AES-GCM nonce (96 bits, random per message)
TAG_SIZE = 16            # bytes: AES-GCM tag
TABLE_VERSION = 1
SCRYPT_N = 2 ** 15       # scrypt cost: ~32 MiB of RAM and ~0.1 s here per unlock
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16
BLOB_MAGIC = b"CASB\x01"  # sealed metadata blob: magic+version, nonce, ciphertext+tag
PASSPHRASE_ENV = "CASFS_PASSPHRASE"
#: bounds on the scrypt parameters a wrap may ask for (RFC 7914 section 2 defines them;
#: casfs writes n = 2**15, r = 8, p = 1): beyond them the table is refused, not run
SCRYPT_N_MIN, SCRYPT_N_MAX, SCRYPT_R_MAX, SCRYPT_P_MAX = 2 ** 14, 2 ** 20, 16, 4
NEW_PASSPHRASE_ENV = "CASFS_NEW_PASSPHRASE"


class WrongPassphrase(CasError):
    """The passphrase or key file does not unlock the volume's master key (or none was
    given for an encrypted volume). Nothing was changed."""


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: object, what: str) -> bytes:
    try:
        return base64.b64decode(str(s), validate=True)
    except (ValueError, TypeError) as exc:
        raise VolumeError(f"[encryption] table: {what} is not base64") from exc


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(key)


class VolumeKeys:
    """The keys of one encrypted volume, derived from its 32-byte master key by
    HKDF-SHA-256. Thread-safe (the AEAD objects and BLAKE3 keep no per-call state)."""

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_SIZE:
            raise ValueError(f"master key must be {KEY_SIZE} bytes, not {len(master)}")
        self._master = bytes(master)
        self.id_key = _hkdf(master, b"casfs/1/chunk-id")
        self.chunk_aead = AESGCM(_hkdf(master, b"casfs/1/chunk-aead"))
        self.blob_aead = AESGCM(_hkdf(master, b"casfs/1/blob-aead"))

    @property
    def master(self) -> bytes:
        """The 32-byte master key (for re-wrapping it: `casfs key passwd`)."""
        return self._master

    def chunk_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """The chunk id of plaintext ``data`` in this volume: keyed BLAKE3, 32 bytes.
        Without the key nobody can compute it, so a stored name cannot confirm a known
        file (docs/format.md). The blake3 binding releases the GIL on large inputs."""
        return blake3.blake3(data, key=self.id_key).digest()

    def seal_blob(self, data: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``data`` (a metadata blob, e.g. a snapshot) with
        AES-256-GCM under the blob key; ``aad`` is authenticated, not stored.
        Returns ``BLOB_MAGIC + nonce(12) + ciphertext + tag(16)``: len(data) + 33 bytes."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        return BLOB_MAGIC + nonce + self.blob_aead.encrypt(nonce, data, aad)

    def open_blob(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of a blob made by :meth:`seal_blob` with the same ``aad``.
        Raises IntegrityError (EIO) on a malformed blob or a bad tag (wrong key, wrong
        aad, or any changed byte)."""
        head = len(BLOB_MAGIC) + NONCE_SIZE
        if len(blob) < head + TAG_SIZE or blob[:len(BLOB_MAGIC)] != BLOB_MAGIC:
            raise IntegrityError("sealed blob: malformed header")
        try:
            return self.blob_aead.decrypt(blob[len(BLOB_MAGIC):head], blob[head:], aad)
        except InvalidTag as exc:
            raise IntegrityError("sealed blob: authentication failed (wrong key or changed bytes)") from exc


def new_master_key() -> bytes:
    """32 random bytes from the OS CSPRNG (secrets.token_bytes)."""
    return secrets.token_bytes(KEY_SIZE)


def read_key_file(path: Path) -> bytes:
    """The 32-byte key in ``path``: 32 raw bytes, or 64 hex digits (whitespace around
    them ignored). Raises WrongPassphrase when the file cannot be read or holds
    anything else."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise WrongPassphrase(f"cannot read key file {path}: {exc.strerror}") from exc
    if len(raw) == KEY_SIZE:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise WrongPassphrase(f"key file {path} does not hold a key (32 bytes, or 64 hex digits)")


def create_key_file(path: Path) -> None:
    """Create ``path`` (mode 0600, must not exist) holding a new random key as 64 hex
    digits and a newline. Raises FileExistsError / OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_bytes(KEY_SIZE).hex() + "\n")


def _wrap_aad(volume_uuid: str, kind: str) -> bytes:
    return b"casfs-master-key/1/" + volume_uuid.encode() + b"/" + kind.encode()


def _scrypt_key(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _keyfile_key(key: bytes) -> bytes:
    return _hkdf(key, b"casfs/1/keyfile-wrap")


def _wrap(master: bytes, kek: bytes, volume_uuid: str, kind: str) -> dict[str, Any]:
    nonce = secrets.token_bytes(NONCE_SIZE)
    return {"kind": kind, "nonce": _b64(nonce),
            "wrapped": _b64(AESGCM(kek).encrypt(nonce, master, _wrap_aad(volume_uuid, kind)))}


def passphrase_wrap(master: bytes, passphrase: str, volume_uuid: str) -> dict[str, Any]:
    """One ``passphrase`` wrap entry of the table: scrypt parameters, salt, nonce and the
    wrapped key (strings base64)."""
    if not passphrase:
        raise WrongPassphrase("the passphrase must not be empty")
    salt = secrets.token_bytes(SALT_SIZE)
    w = _wrap(master, _scrypt_key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P), volume_uuid, "passphrase")
    w.update({"kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)})
    return w


def keyfile_wrap(master: bytes, key_file: Path, volume_uuid: str) -> dict[str, Any]:
    """One ``keyfile`` wrap entry of the table (the key file's key through HKDF)."""
    w = _wrap(master, _keyfile_key(read_key_file(key_file)), volume_uuid, "keyfile")
    w["kdf"] = "hkdf-sha256"
    return w


def new_encryption_table(master: bytes, passphrase: str | None, key_file: Path | None,
                         *, volume_uuid: str = "") -> dict[str, Any]:
    """The ``[encryption]`` table of volume.toml for ``master`` (32 bytes)::

        {"version": 1, "cipher": "aes-256-gcm", "chunk_id": "blake3-keyed",
         "volume_uuid": UUID, "wraps": [{"kind": "passphrase", "kdf": "scrypt",
         "n": .., "r": .., "p": .., "salt": B64, "nonce": B64, "wrapped": B64},
         {"kind": "keyfile", "kdf": "hkdf-sha256", "nonce": B64, "wrapped": B64}]}

    One wrap per secret given; at least one is required. ``volume_uuid`` goes into each
    wrap's associated data. Raises WrongPassphrase for an empty passphrase, an unreadable
    key file, or neither.
    """
    if not passphrase and key_file is None:
        raise WrongPassphrase("an encrypted volume needs a passphrase or a key file")
    wraps: list[dict[str, Any]] = []
    if passphrase:
        wraps.append(passphrase_wrap(master, passphrase, volume_uuid))
    if key_file is not None:
        wraps.append(keyfile_wrap(master, key_file, volume_uuid))
    return {"version": TABLE_VERSION, "cipher": "aes-256-gcm", "chunk_id": "blake3-keyed",
            "volume_uuid": volume_uuid, "wraps": wraps}


def _check_table(table: dict[str, Any]) -> list[dict[str, Any]]:
    if table.get("version") != TABLE_VERSION or table.get("cipher") != "aes-256-gcm" \
            or table.get("chunk_id") != "blake3-keyed":
        raise VolumeError(f"[encryption] table version {table.get('version')!r} / cipher "
                          f"{table.get('cipher')!r} not supported by this casfs")
    wraps = table.get("wraps")
    if not isinstance(wraps, list) or not wraps:
        raise VolumeError("[encryption] table has no wrapped key")
    return wraps


def unwrap_master(table: dict[str, Any], passphrase: str | None, key_file: Path | None) -> bytes:
    """The 32-byte master key of ``table``, unwrapped with ``key_file`` (tried first) or
    ``passphrase``. Raises WrongPassphrase when neither unlocks it (or neither is given,
    or the table has no wrap of that kind), VolumeError for a malformed table."""
    wraps = _check_table(table)
    vuuid = str(table.get("volume_uuid", ""))
    if not passphrase and key_file is None:
        raise WrongPassphrase("the volume is encrypted: give its passphrase (prompt, CASFS_PASSPHRASE "
                              "or --passphrase-file) or --key-file")
    tried = []
    for kind, secret in (("keyfile", key_file), ("passphrase", passphrase)):
        if not secret:
            continue
        tried.append(kind)
        kek_cache: dict[tuple[Any, ...], bytes] = {}
        for w in wraps:
            if w.get("kind") != kind:
                continue
            if kind == "keyfile":
                assert isinstance(secret, Path)
                kek = _keyfile_key(read_key_file(secret))
            else:
                assert isinstance(secret, str)
                if w.get("kdf") != "scrypt":
                    raise VolumeError(f"[encryption] table: unknown kdf {w.get('kdf')!r}")
                salt = _unb64(w.get("salt"), "salt")
                try:
                    params = (int(w["n"]), int(w["r"]), int(w["p"]))
                except (KeyError, TypeError, ValueError) as exc:
                    raise VolumeError(f"[encryption] table: bad scrypt parameters: {exc}") from exc
                n, r, p = params
                # the table may come from the unauthenticated volume object on Drive: bound
                # the work (128 * n * r bytes of RAM: at most 2 GiB) before running it
                if not (SCRYPT_N_MIN <= n <= SCRYPT_N_MAX and 1 <= r <= SCRYPT_R_MAX and 1 <= p <= SCRYPT_P_MAX):
                    raise VolumeError(f"[encryption] table: scrypt parameters n={n} r={r} p={p} are outside "
                                      f"the accepted bounds (n {SCRYPT_N_MIN}..{SCRYPT_N_MAX}, r <= "
                                      f"{SCRYPT_R_MAX}, p <= {SCRYPT_P_MAX})")
                key = (salt, *params)
                if key not in kek_cache:
                    try:
                        kek_cache[key] = _scrypt_key(secret, salt, *params)
                    except ValueError as exc:
                        raise VolumeError(f"[encryption] table: bad scrypt parameters: {exc}") from exc
                kek = kek_cache[key]
            try:
                master = AESGCM(kek).decrypt(_unb64(w.get("nonce"), "nonce"),
                                             _unb64(w.get("wrapped"), "wrapped"), _wrap_aad(vuuid, kind))
            except InvalidTag:
                continue
            if len(master) == KEY_SIZE:
                return master
    what = " or ".join("key file" if k == "keyfile" else "passphrase" for k in tried)
    raise WrongPassphrase(f"wrong {what}: it does not unlock this volume's key")


def unwrap(table: dict[str, Any], passphrase: str | None, key_file: Path | None) -> VolumeKeys:
    """:class:`VolumeKeys` of the volume whose ``[encryption]`` table is ``table``.
    Raises WrongPassphrase / VolumeError as :func:`unwrap_master`."""
    return VolumeKeys(unwrap_master(table, passphrase, key_file))


def passphrase_from_env_or_file(passphrase_file: Path | None) -> str | None:
    """The passphrase from ``passphrase_file`` (its first line, without the line end)
    if given, else from $CASFS_PASSPHRASE, else None. Raises WrongPassphrase when the
    file cannot be read."""
    return _secret_from(passphrase_file, PASSPHRASE_ENV)


def new_passphrase_from_env_or_file(passphrase_file: Path | None) -> str | None:
    """As :func:`passphrase_from_env_or_file` for a new passphrase ($CASFS_NEW_PASSPHRASE)."""
    return _secret_from(passphrase_file, NEW_PASSPHRASE_ENV)


def _secret_from(path: Path | None, env: str) -> str | None:
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise WrongPassphrase(f"cannot read passphrase file {path}: {exc}") from exc
        return text.splitlines()[0] if text else ""
    return os.environ.get(env) or None


def audit_unlock_failure(volume: Volume, message: str) -> None:
    """Emit the audit event of a failed unlock on the ``casfs.audit`` logger and append
    the same line to the volume's log/mount.log (created mode 0600 if missing; a log
    that cannot be written is skipped: the error itself still reaches the user)."""
    audit = {"op": "unlock", "result": "EACCES", "volume": volume.name,
             "uid": os.getuid(), "pid": os.getpid()}
    audit_log.warning("authentication failed", extra={"audit": audit})
    line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING casfs.audit: authentication failed "
            f"op=unlock result=EACCES volume={volume.name} uid={audit['uid']} pid={audit['pid']}: {message}\n")
    try:
        volume.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(volume.log_dir / "mount.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def unlock(volume: Volume, passphrase: str | None = None, key_file: Path | None = None,
           interactive: bool = False) -> VolumeKeys | None:
    """The keys of ``volume``, or None for an unencrypted volume; also stored in
    ``volume.keys``, where the engine's chunk codec finds them (cas.chunk.envelope.codec_for).

    Secrets in order: ``key_file``; ``passphrase``; $CASFS_PASSPHRASE; a prompt on the
    terminal when ``interactive`` and stdin is a TTY. Raises WrongPassphrase when none is
    given, or (after the audit event, :func:`audit_unlock_failure`) when the one given
    does not unlock it; VolumeError
    when the table is malformed or belongs to another volume (its uuid differs).
    """
    table = volume.encryption
    if not table:
        return None
    if str(table.get("volume_uuid", "")) != volume.uuid:
        raise VolumeError(f"volume {volume.name}: the [encryption] table belongs to volume "
                          f"{table.get('volume_uuid')!r}, not {volume.uuid!r}")
    if passphrase is None and key_file is None:
        passphrase = passphrase_from_env_or_file(None)
        if passphrase is None and interactive and sys.stdin.isatty():
            passphrase = getpass.getpass(f"Passphrase of volume {volume.name}: ")
    if not passphrase and key_file is None:   # nothing was tried: not an authentication failure
        raise WrongPassphrase(f"volume {volume.name} is encrypted: give its passphrase (CASFS_PASSPHRASE, "
                              "--passphrase-file, or a terminal to ask on) or --key-file")
    try:
        keys = unwrap(table, passphrase, key_file)
    except WrongPassphrase as exc:
        audit_unlock_failure(volume, str(exc))
        raise
    volume.keys = keys
    return keys
