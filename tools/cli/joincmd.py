"""`casfs join` and `casfs sessions`: a further machine on a shared volume, and the list of
the volume's mounts (docs/sharing.md, "Joining a machine" and "Sessions").

`casfs join NAME --meta URL` makes the local side of a volume that already lives in that
MySQL database: volume.toml (the volume's uuid and chunk size from the ``meta`` table;
compression, the ``[drive]`` table minus credentials and the ``[encryption]`` table from
the *join settings* the first machine recorded, :func:`record_join_settings`), a fresh
random ``store_id`` (this machine's local chunk store), ``chunks/ run/ log/``; and marks
the volume shared (meta ``shared`` = '1'), refusing while a live exclusive session runs.

The join settings are written by `casfs init --meta` and refreshed by every mount of the
volume's first side (the side `casfs init` made: no ``store_id``), so a volume made
before this version gets them at its next mount there. They are JSON cut into meta rows
``join_config_0``, ``join_config_1`` ... (a meta value holds at most 255 characters), with
``join_config_parts`` giving the count; all written in one transaction. The wrapped
master key of an encrypted volume is in them, as in the volume object on Drive
(docs/encryption.md): it opens only with the passphrase or key file of one of its wraps.
Credentials of the cloud store are per machine and never stored there.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import uuid
from pathlib import Path
from typing import Any

import click
from pymysql.cursors import Cursor

from cas.config.volume import DEFAULT_NAME, Volume, create_volume_dir, open_volume, volume_path, write_private
from cas.db import sessions as dbsessions
from cas.db import tls as metatls
from cas.db import volume as dbvolume
from cas.db.database import SCHEMA_VERSION, Database, Metadata, connect, parse_meta_url
from cas.errors import MetaError, VolumeError
from tools.cli.common import user_errors

JOIN_PREFIX = "join_config_"
JOIN_PARTS = "join_config_parts"
_PART = dbvolume.VALUE_MAX


def join_settings(vol: Volume) -> dict[str, Any]:
    """What a joining machine copies from ``vol``'s volume.toml: compression, the
    ``[drive]`` table without ``credentials``, the ``[s3]`` table without its
    machine-local ``credentials_file`` and ``profile`` (each machine finds its S3
    credentials in its own AWS chain), the ``[encryption]`` table."""
    drive = {k: v for k, v in vol.drive.items() if k != "credentials"}
    s3 = {k: v for k, v in vol.s3.items() if k not in ("credentials_file", "profile")}
    return {"compression": vol.compression, "drive": drive, "s3": s3, "encryption": dict(vol.encryption),
            "credentials": str(vol.drive.get("credentials", ""))}


def record_join_settings(meta: Metadata) -> bool:
    """Record :func:`join_settings` of ``meta.volume`` in the ``meta`` table when they
    differ from what is there (one transaction); True when written. Only the volume's
    first side (no ``store_id``) records them. Raises MetaError."""
    vol = meta.volume
    if vol.store_id or vol.embedded:
        return False
    text = json.dumps(join_settings(vol), sort_keys=True, separators=(",", ":"))
    parts = [text[i:i + _PART] for i in range(0, len(text), _PART)] or [""]
    if read_join_text(meta.db) == text:
        return False

    def body(cur: Cursor) -> None:
        for i, p in enumerate(parts):
            dbvolume.set_value(cur, f"{JOIN_PREFIX}{i}", p)
        dbvolume.set_value(cur, JOIN_PARTS, str(len(parts)))
    meta.db.transaction(body)
    return True


def read_join_text(db: Database) -> str | None:
    """The recorded join settings' JSON text, or None when the volume has none."""
    got = dbvolume.values_with_prefix(db, JOIN_PREFIX)
    try:
        n = int(got.get(JOIN_PARTS, ""))
    except ValueError:
        return None
    parts = [got.get(f"{JOIN_PREFIX}{i}") for i in range(n)]
    if any(p is None for p in parts):
        return None
    return "".join(str(p) for p in parts)


def _target(meta_url: str, tls: dict[str, object] | None) -> Any:
    target = parse_meta_url(meta_url)
    t = metatls.from_config(tls or {})
    return target if t is None else dataclasses.replace(target, tls=t)


def join_volume(name: str, meta_url: str, tls: dict[str, object] | None,
                drive_credentials: Path | None) -> Volume:
    """Create the local side of the volume in ``meta_url``'s database as volume ``name``
    and mark the volume shared. Raises VolumeError / MetaError with one line: no such
    database, not a casfs database, schema of another version, no join settings yet, a
    live exclusive session, a volume ``name`` that exists here."""
    path = volume_path(name)
    if (path / "volume.toml").exists():
        raise VolumeError(f"volume {name!r} already exists on this machine ({path})")
    db = Database(_target(meta_url, tls))
    try:
        try:
            rows = dbvolume.values_of(db, ["schema_version", "volume_uuid", "chunk_size"])
        except MetaError as exc:
            raise MetaError(f"database {db.target.describe()} holds no casfs volume "
                            f"({str(exc).splitlines()[0]})") from exc
        if "volume_uuid" not in rows or "chunk_size" not in rows:
            raise MetaError(f"database {db.target.describe()} holds no casfs volume (no volume_uuid in meta)")
        if rows.get("schema_version") != str(SCHEMA_VERSION):
            raise MetaError(f"the volume in {db.target.describe()} has schema {rows.get('schema_version')}, "
                            f"this casfs speaks {SCHEMA_VERSION}: mount it once with this casfs on the "
                            "machine that created it, then join")
        text = read_join_text(db)
        if text is None:
            raise VolumeError(f"the volume in {db.target.describe()} has no join settings yet: mount it once "
                              "with this casfs on the machine that created it, then join")
        settings = json.loads(text)
        creds_name = str(settings.get("credentials", ""))
        if drive_credentials is not None and not creds_name:
            raise VolumeError("--drive-credentials given, but the volume's cloud tier uses no credentials file")

        def share(cur: Cursor) -> None:
            dbsessions.lock_registrations(cur)
            for o in dbsessions.live_others(cur, 0):
                if o.mode == dbsessions.EXCLUSIVE:
                    raise VolumeError(f"volume {name} is mounted exclusively by {o.host}:{o.pid}; "
                                      "unmount it or remount it after `casfs join`")
            dbvolume.set_shared(cur)
        vol = create_volume_dir(name, int(rows["chunk_size"]), str(settings["compression"]), meta_url)
        try:
            db.transaction(share)
            vol.uuid = rows["volume_uuid"]
            vol.store_id = secrets.token_hex(16)
            if tls:
                vol.meta_tls = dict(tls)
            drive = dict(settings.get("drive") or {})
            if creds_name:
                drive["credentials"] = creds_name
                if drive_credentials is not None:
                    write_private(vol.path / creds_name, drive_credentials.read_bytes())
            vol.drive = drive
            vol.s3 = dict(settings.get("s3") or {})
            vol.encryption = dict(settings.get("encryption") or {})
            vol.save()
        except BaseException:
            shutil.rmtree(vol.path, ignore_errors=True)
            raise
    finally:
        db.close()
    return vol


@click.command()
@click.argument("name", default=DEFAULT_NAME)
@click.option("--meta", "meta_url", required=True, metavar="URL",
              help="mysql://USER@HOST[:PORT]/DB of the volume's database (password: CASFS_MYSQL_PASSWORD).")
@click.option("--tls", "tls_mode", type=click.Choice(metatls.TLS_MODES), default=None,
              help="TLS to the server, as for `casfs init`.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="PEM CA bundle the server's certificate must chain to.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="PEM client certificate (with --tls-key).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="PEM key of --tls-cert.")
@click.option("--drive-credentials", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="This machine's credentials file for the volume's cloud store (a service "
                                   "account key or an OAuth token file, as `casfs drive auth` writes).")
@user_errors
def join(name: str, meta_url: str, tls_mode: str | None, tls_ca: str | None, tls_cert: str | None,
         tls_key: str | None, drive_credentials: Path | None) -> None:
    """Create the local side of an existing volume on this machine, as volume NAME, and
    mark the volume shared: several machines may then mount it at once (docs/sharing.md).

    Refused while the volume is mounted exclusively (a mount started before it was
    shared): unmount it, join, mount again."""
    from tools.cli import tls_table   # the CLI package's helper (imported late: no cycle)
    tls = tls_table(meta_url, tls_mode, tls_ca, tls_cert, tls_key)
    vol = join_volume(name, meta_url, tls, drive_credentials)
    note = ""
    if vol.drive.get("credentials") and drive_credentials is None:
        note = (f"; its cloud tier needs credentials here: put them in {vol.path / str(vol.drive['credentials'])} "
                "(`--drive-credentials FILE`)")
    click.echo(f"joined volume {vol.name} ({vol.uuid}) at {vol.path}, local store {vol.store}; "
               f"the volume is shared{note}")


@click.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def sessions(volume: str, as_json: bool) -> None:
    """List VOLUME's mounts on every machine: id, host, pid, store, mode, consistency,
    heartbeat age, live or dead, sustained inodes, queued chunks of its store."""
    vol = open_volume(volume)
    with connect(vol) as meta:
        found = dbsessions.list_sessions(meta.db, store_of_first=uuid.UUID(vol.uuid).hex)
        shared = dbvolume.is_shared(meta.db)
    if as_json:
        click.echo(json.dumps({"volume": vol.name, "shared": shared, "timeout_s": dbsessions.timeout_s(),
                               "sessions": [s._asdict() for s in found]}, sort_keys=True))
        return
    click.echo(f"volume {vol.name}: {'shared' if shared else 'not shared'}, {len(found)} sessions "
               f"(timeout {dbsessions.timeout_s():.0f} s)")
    if found:
        click.echo(f"{'id':>6} {'host':<20} {'pid':>7} {'store':<12} {'mode':<9} {'consistency':<11} "
                   f"{'heartbeat':>9} {'state':<5} {'sustained':>9} {'queued':>7}")
    for s in found:
        click.echo(f"{s.id:>6} {s.host[:20]:<20} {s.pid:>7} {s.store[:12]:<12} {s.mode:<9} {s.consistency:<11} "
                   f"{s.age_s:>8.1f}s {'live' if s.live else 'dead':<5} {s.sustained:>9} {s.queued:>7}")


def register(group: click.Group) -> None:
    """Add `join` and `sessions` to the casfs command group."""
    group.add_command(join)
    group.add_command(sessions)


def after_init(vol: Volume, shared: bool) -> None:
    """`casfs init --meta`: record the join settings and, with ``shared``, mark the volume
    shared. Raises MetaError (the volume exists then; `casfs join` or the first mount
    records the settings again)."""
    with connect(vol) as meta:
        record_join_settings(meta)
        if shared:
            meta.db.transaction(lambda cur: dbvolume.set_shared(cur))
