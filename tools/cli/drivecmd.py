"""The cloud-tier commands: `casfs drive auth | status | push` and `casfs restore`.

`drive auth` stores credentials in the volume directory (files 0600), writes the
``[drive]`` table of volume.toml, creates the volume's folder on Drive and enables the
tier (every chunk not yet in a pack joins the upload queue). The next mount uploads.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import click

from cas.tier import cloud, snapshot
from cas.errors import VolumeError
from cas.db.database import Metadata, connect
from cas.db import volume as meta_rows
from cas.tier.objstore import DailyLimit
from cas.config.volume import DEFAULT_NAME, Volume, open_volume, write_private

from tools.cli import joincmd
from tools.cli.common import enable_tier, human, open_tier, parse_size, refuse_live_sessions, user_errors
from tools.cli.keycmd import key_options, unlock_volume
from tools.cli.mountcmd import is_mounted
from tools.cli.progress import progress

DRIVE_SCOPES = ["https://www.googleapis.com/auth/drive.file"]
TOKEN_FILE = "drive-token.json"
SERVICE_ACCOUNT_FILE = "drive-service-account.json"


def _oauth_token(client_secrets: Path, open_browser: bool) -> bytes:
    """Run Google's OAuth installed-app flow; return the authorized-user JSON."""
    from google_auth_oauthlib.flow import InstalledAppFlow
    try:
        flow = InstalledAppFlow.from_client_secrets_file(str(client_secrets), scopes=DRIVE_SCOPES)
    except (OSError, ValueError) as exc:
        raise VolumeError(f"cannot use client secrets {client_secrets}: {exc}") from exc
    creds = flow.run_local_server(port=0, open_browser=open_browser)
    return str(creds.to_json()).encode()


@click.group()
def drive() -> None:
    """Google Drive cloud tier: credentials, status, uploads."""


@drive.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--client-secrets", type=click.Path(dir_okay=False, path_type=Path),
              help="OAuth client JSON of a Desktop app (Google Cloud console): runs the browser "
                   "sign-in and keeps the token in the volume directory.")
@click.option("--service-account", type=click.Path(dir_okay=False, path_type=Path),
              help="A service-account key JSON file instead of a user sign-in.")
@click.option("--endpoint", default="", metavar="URL",
              help="A Drive-compatible server instead of Google (e.g. python -m tools.drivesim, "
                   "run from a source checkout: it is not installed).")
@click.option("--folder", default="", help="Drive folder name [default: casfs-<volume uuid>].")
@click.option("--pack-size", default="32MiB", show_default=True, help="Target size of a pack file.")
@click.option("--pack-age", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds after which a partly filled pack is uploaded anyway.")
@click.option("--bwlimit", default="0", help="Upload bandwidth limit, bytes/s (e.g. 2MiB); 0 = none.")
@click.option("--repack-threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="gc rewrites packs whose live fraction is below this.")
@click.option("--no-browser", is_flag=True, help="Print the sign-in URL instead of opening a browser.")
@click.option("--keep-generations", default=7, show_default=True, type=click.IntRange(min=1),
              help="Metadata snapshots kept on Drive (docs/backup.md).")
@click.option("--snapshot-interval", default=600.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between a mount's metadata snapshots, at most one per interval after a change.")
@user_errors
def auth(volume: str, client_secrets: Path | None, service_account: Path | None, endpoint: str,
         folder: str, pack_size: str, pack_age: float, bwlimit: str, repack_threshold: float,
         no_browser: bool, keep_generations: int = 7, snapshot_interval: float = 600.0) -> None:
    """Connect VOLUME to Google Drive (or a Drive-compatible server) and enable uploads."""
    vol = open_volume(volume)
    if is_mounted(vol):
        raise VolumeError(f"volume {vol.name} is mounted: unmount it before `casfs drive auth`")
    if client_secrets and service_account:
        raise click.UsageError("give --client-secrets or --service-account, not both")
    if not (client_secrets or service_account or endpoint):
        raise click.UsageError("give --client-secrets FILE (Google sign-in), --service-account FILE, "
                               "or --endpoint URL (a test server)")
    if vol.s3:
        raise VolumeError(f"volume {vol.name} keeps its cloud tier in S3 ([s3] in volume.toml); a volume "
                          "has one cloud store")
    cfg = cloud.CloudConfig.from_volume(vol)
    cfg.endpoint = endpoint
    cfg.folder = folder or cfg.folder
    cfg.pack_size = parse_size(pack_size)
    cfg.pack_age_s = pack_age
    cfg.bwlimit = parse_size(bwlimit)
    cfg.repack_threshold = repack_threshold
    cfg.keep_generations = keep_generations
    cfg.snapshot_interval_s = snapshot_interval
    staged: Path | None = None     # new credentials, kept only once the folder is accepted
    if service_account:
        data = read_service_account(service_account)
        cfg.credentials = SERVICE_ACCOUNT_FILE
    elif client_secrets:
        data = _oauth_token(client_secrets, not no_browser)
        cfg.credentials = TOKEN_FILE
    else:
        cfg.credentials = ""
    if cfg.credentials:
        staged = vol.path / (cfg.credentials + ".new")
        write_private(staged, data)
    try:
        with connect(vol) as meta:
            refuse_live_sessions(meta, "drive auth")
            _refuse_foreign_folder(vol, cfg, meta, staged)
    except BaseException:
        if staged is not None:
            staged.unlink(missing_ok=True)
        raise
    if staged is not None:
        os.replace(staged, vol.path / cfg.credentials)
    _save_drive(vol, cfg)
    with connect(vol) as meta:
        _forget_other_folder(meta, cfg)
        cloud.open_objects(vol, cfg, meta.db)   # creates the folder; proves the credentials work
        joincmd.record_join_settings(meta)      # what `casfs join` copies (docs/sharing.md)
        queued = enable_tier(meta)
        folder_id = meta_rows.get(meta.db, "drive_folder_id")
    where = cfg.endpoint or "Google Drive"
    click.echo(f"volume {vol.name}: cloud tier on {where}, folder {cfg.folder} ({folder_id}); "
               f"{queued} chunks queued for upload (the next mount uploads them)")


def _refuse_foreign_folder(vol: Volume, cfg: cloud.CloudConfig, meta: Metadata, creds: Path | None) -> None:
    """Raise VolumeError when the folder ``cfg`` names holds an object that is not this
    volume's (another volume's pack: its gc and ours would each see the other's packs as
    orphans). Writes nothing locally; the folder is created on Drive when missing."""
    objects = cloud.open_objects(vol, cfg, meta.db, credentials_file=creds, record=False)
    other = cloud.foreign_object(objects, vol.uuid)
    if other is not None:
        owner = other.properties.get(cloud.VOLUME_PROPERTY)
        whose = f"volume {owner}" if owner else "no casfs volume"
        raise VolumeError(f"folder {cfg.folder} already holds objects of another volume "
                          f"({other.name} belongs to {whose}); give this volume its own --folder")


def _forget_other_folder(meta: Metadata, cfg: cloud.CloudConfig) -> None:
    """Drop the recorded folder id when it was made for another endpoint or folder name
    (open_objects then finds or creates the right one), and record which it is for."""
    key = cloud.folder_key(cfg)
    if meta_rows.get(meta.db, "drive_folder_key") != key:
        meta_rows.delete_keys(meta.db, ["drive_folder_id"])
        cloud.set_meta(meta.db, {"drive_folder_key": key})


def _save_drive(vol: Volume, cfg: cloud.CloudConfig) -> None:
    table = cfg.as_table()
    if cfg.folder == f"casfs-{vol.uuid}":
        table.pop("folder", None)
    vol.drive = table
    vol.save()


@drive.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def status(volume: str, as_json: bool) -> None:
    """Upload queue, packs and bytes on Drive, last error, paused or not."""
    vol = open_volume(volume)
    with connect(vol) as meta:
        st = cloud.status(meta.db)
        rp = snapshot.recovery_point(meta.db)
    if as_json:
        d = asdict(st)
        d["snapshot"] = rp.as_dict()
        click.echo(json.dumps(d, sort_keys=True))
        return
    if not st.enabled:
        click.echo(f"volume {vol.name}: no cloud tier (set one up with `casfs drive auth` or `casfs s3 enable`)")
        return
    cfg = cloud.CloudConfig.from_volume(vol)
    rows = [
        ("store", cfg.label()),
        ("queue", f"{st.queued_chunks} chunks, {human(st.queued_bytes)}"
                  + (f" ({st.uploading_packs} packs uploading)" if st.uploading_packs else "")
                  + (f"; oldest not yet on Drive: {_age(st.oldest_queued_s)}" if st.queued_chunks else "")),
        ("on drive", f"{st.packs} packs, {human(st.cloud_bytes)} ({human(st.live_cloud_bytes)} live)"),
        ("last upload", st.last_upload_at or "never"),
        ("uploads", f"PAUSED until {st.paused_until} (daily upload limit)" if st.paused_until else "running"),
        ("last error", (f"{st.last_error} at {st.last_error_at}"
                        + (" (uploads succeeded since)" if st.last_upload_at > st.last_error_at else ""))
                       if st.last_error else "none"),
        ("snapshot", recovery_text(rp)),
    ]
    for k, v in rows:
        click.echo(f"{k:12} {v}")


def recovery_text(rp: snapshot.RecoveryPoint) -> str:
    """The recovery point in one line, for `drive status` and `stats` (docs/backup.md)."""
    if not rp.generation:
        return f"none on Drive yet ({rp.changes_since} files and directories not backed up)"
    text = (f"generation {rp.generation}, confirmed on Drive at {rp.confirmed_at}; "
            f"{rp.changes_since} files and directories changed since")
    if rp.lacking_chunks:
        text += f"; it lacks {rp.lacking_chunks} chunks that were not on Drive yet"
    return text


def _age(seconds: float) -> str:
    """A duration in seconds as a short text (``42 s``, ``3 min``, ``5.2 h``, ``2.0 days``)."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@drive.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--timeout", default=None, type=float, help="Give up after this many seconds.")
@click.option("--drive-endpoint", default=None, metavar="URL", help="Override the volume's endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object; no progress.")
@key_options
@user_errors
def push(volume: str, timeout: float | None, drive_endpoint: str | None, as_json: bool = False) -> None:
    """Upload everything queued now, without waiting for a full pack, then a metadata
    snapshot when something changed since the last one (safe while mounted; docs/backup.md).

    Shows progress (bytes of packs uploaded, of the bytes queued at the start) on stderr.
    Exits 1 with a one-line message when Drive refuses uploads; the daily upload cap is
    named as such ("daily upload limit"): retrying before it resets is pointless.
    """
    vol = open_volume(volume)
    unlock_volume(vol)
    with connect(vol) as meta:
        tier = open_tier(meta, drive_endpoint)
        snap: snapshot.SnapshotResult | None = None
        try:
            with progress("drive push", total=cloud.status(meta.db).queued_bytes, unit="B",
                          json_mode=as_json) as p:
                n = tier.drain(timeout, on_pack=p)
            rp = snapshot.recovery_point(meta.db)
            if not rp.generation or rp.changes_since or rp.lacking_chunks:
                snap = snapshot.take(tier, tier.cfg.keep_generations)
            else:   # volume.toml may have changed (key passwd), or an upload of it failed
                snapshot.refresh_volume_object(tier)
        except DailyLimit as exc:
            tier.note_error(exc)
            left = cloud.status(meta.db).queued_chunks
            raise click.ClickException(
                f"Drive's daily upload limit is reached (about 750 GB a day): {left} chunks stay "
                f"queued; push again later or let the mount upload them ({str(exc).splitlines()[0]})") from None
        finally:
            tier.close()
    if as_json:
        click.echo(json.dumps({"uploaded_packs": tier.uploaded_packs, "uploaded_bytes": n,
                               "snapshot_generation": snap.generation if snap is not None else rp.generation}))
        return
    click.echo(f"uploaded {tier.uploaded_packs} packs ({human(n)}); queue empty")
    if snap is not None:
        click.echo(f"uploaded metadata snapshot generation {snap.generation} ({human(snap.size)})"
                   + (f"; deleted generations {', '.join(map(str, snap.deleted))}" if snap.deleted else ""))
    else:
        click.echo(f"metadata snapshot generation {rp.generation} is current")


def read_service_account(path: Path) -> bytes:
    """The bytes of service-account key file ``path``. Raises VolumeError (one line) when
    it cannot be read or is not a service-account key (its JSON ``type``)."""
    try:
        data = path.read_bytes()
        if json.loads(data).get("type") != "service_account":
            raise VolumeError(f"{path} is not a service-account key file")
    except (OSError, ValueError) as exc:
        raise VolumeError(f"cannot read service-account key {path}: {exc}") from exc
    return data

@click.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--lazy", is_flag=True, help="Only mark missing chunks as cloud-only; reads fetch them "
              "(the default with --from-drive).")
@click.option("--all", "everything", is_flag=True, help="Also bring back chunks evicted on purpose.")
@click.option("--drive-endpoint", default=None, metavar="URL", help="Override the volume's endpoint.")
@click.option("--from-drive", is_flag=True, help="Recreate VOLUME on this machine from its Drive folder: "
              "volume.toml, the database (from a metadata snapshot) and the chunk store.")
@click.option("--generation", default=None, type=click.IntRange(min=1),
              help="With --from-drive: the snapshot generation to restore [default: the newest].")
@click.option("--eager", is_flag=True, help="With --from-drive: download every chunk now instead of "
              "on first read.")
@click.option("--meta", "meta_url", default="", metavar="URL", help="With --from-drive: load the database into this "
              "(empty) MySQL database instead of a new embedded MariaDB.")
@click.option("--client-secrets", type=click.Path(dir_okay=False, path_type=Path),
              help="With --from-drive: OAuth client JSON (as for `casfs drive auth`).")
@click.option("--service-account", type=click.Path(dir_okay=False, path_type=Path),
              help="With --from-drive: a service-account key JSON file.")
@click.option("--endpoint", default="", metavar="URL",
              help="With --from-drive: a Drive-compatible server instead of Google.")
@click.option("--folder", default="", help="With --from-drive: the Drive folder name [default: the only "
              "casfs-<uuid> folder].")
@click.option("--no-browser", is_flag=True, help="Print the sign-in URL instead of opening a browser.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object; no progress (not with --from-drive).")
@key_options
@user_errors
def restore(volume: str, lazy: bool, everything: bool, drive_endpoint: str | None, as_json: bool = False,
            from_drive: bool = False,
            generation: int | None = None, eager: bool = False, meta_url: str = "",
            client_secrets: Path | None = None, service_account: Path | None = None, endpoint: str = "",
            folder: str = "", no_browser: bool = False) -> None:
    """Rebuild VOLUME's local chunk store from Drive, given its database; with
    --from-drive, recreate the whole volume from Drive (docs/backup.md).


    Shows progress (envelope bytes downloaded of those to download) on stderr.

    Says how many chunks stay cloud-only. A pack that Drive fails to give (after retries
    with backoff) does not stop the others. Exits 1, listing them, when some chunk is
    neither local nor on Drive, or could not be read from Drive (run restore again).
    """
    if from_drive:
        if lazy and eager:
            raise click.UsageError("give --lazy or --eager, not both")
        _restore_from_drive(volume, generation, eager, meta_url, client_secrets, service_account, endpoint,
                            folder, no_browser)
        return
    if generation is not None or eager or meta_url or client_secrets or service_account or endpoint or folder:
        raise click.UsageError("--generation, --eager, --meta, --client-secrets, --service-account, "
                               "--endpoint and --folder go with --from-drive")
    vol = open_volume(volume)
    if is_mounted(vol):
        raise VolumeError(f"volume {vol.name} is mounted: unmount it before `casfs restore`")
    unlock_volume(vol)
    vol.chunk_dir.mkdir(parents=True, exist_ok=True)
    with connect(vol) as meta:
        tier = open_tier(meta, drive_endpoint)
        try:
            with progress("restore", unit="B", json_mode=as_json) as p:
                r = cloud.restore(tier, lazy=lazy, everything=everything, progress=p, on_total=p.set_total)
        finally:
            tier.close()
    if as_json:
        click.echo(json.dumps(asdict(r), sort_keys=True))
        if r.lost or r.failed_packs:
            raise SystemExit(1)
        return
    click.echo(f"restored {r.restored} chunks ({human(r.restored_bytes)}), marked {r.marked_remote} "
               f"cloud-only, {len(r.lost)} lost")
    click.echo(f"{r.cloud_only} chunks stay cloud-only (read from Drive when needed"
               + ("" if everything or not r.cloud_only else "; `casfs restore --all` brings them back") + ")")
    for cid in r.lost[:20]:
        click.echo(f"  lost chunk {cid}")
    if r.failed_packs:
        click.echo(f"not restored: {len(r.unreadable)} chunks in {len(r.failed_packs)} packs Drive did not "
                   f"give; run this restore again later")
        for line in r.failed_packs[:20]:
            click.echo(f"  pack {line}")
        for cid in r.unreadable[:20]:
            click.echo(f"  not restored chunk {cid}")
    if r.lost or r.failed_packs:
        raise SystemExit(1)


def _restore_from_drive(name: str, generation: int | None, eager: bool, meta_url: str,
                        client_secrets: Path | None, service_account: Path | None, endpoint: str,
                        folder: str, no_browser: bool) -> None:
    """`casfs restore --from-drive`: find the volume's folder, read its volume object,
    create the volume directory and database, load the snapshot (cas.tier.snapshot). The
    directory is removed again when anything fails; an existing one is refused."""
    import shutil
    import tempfile

    from cas.tier import drive as drive_mod
    from cas.tier import snapshot
    from cas.config.volume import check_new_volume_dir, create_volume_dir, volume_path

    path = volume_path(name)
    if path.exists() and (path / "volume.toml").exists() or path.exists() and any(path.iterdir()):
        raise VolumeError(f"refusing to restore into {path}: it exists and is not empty (an existing "
                          "volume is never overwritten); give another volume name")
    check_new_volume_dir(path)
    if client_secrets and service_account:
        raise click.UsageError("give --client-secrets or --service-account, not both")
    if not (client_secrets or service_account or endpoint):
        raise click.UsageError("give --client-secrets FILE (Google sign-in), --service-account FILE, "
                               "or --endpoint URL (a test server)")
    cred_name, cred_data = "", b""
    if service_account:
        cred_data = read_service_account(service_account)
        cred_name = SERVICE_ACCOUNT_FILE
    elif client_secrets:
        cred_data = _oauth_token(client_secrets, not no_browser)
        cred_name = TOKEN_FILE
    cfg = cloud.CloudConfig()
    cfg.endpoint = endpoint
    with tempfile.TemporaryDirectory() as tmp:
        creds = None
        if cred_name:
            staged = Path(tmp) / cred_name
            write_private(staged, cred_data)
            creds = drive_mod.load_credentials(staged)
        elif not endpoint:
            raise VolumeError("Google Drive needs credentials")
        cred_obj = creds if creds is not None else drive_mod.load_credentials(None)

        def factory() -> object:
            return drive_mod.build_service(endpoint or None, cred_obj, timeout=cfg.timeout_s)
        svc = factory()
        found = drive_mod.find_folders(svc, folder or None)
        if not found:
            raise VolumeError(f"no folder {folder or 'casfs-<uuid>'} on Drive for these credentials")
        if len(found) > 1:
            raise VolumeError("several casfs folders on Drive, choose one with --folder: "
                              + ", ".join(f"{n} ({i})" for i, n in found))
        folder_id, folder_name = found[0]
        objects = drive_mod.DriveObjectStore(factory, folder_id, chunk_size=cfg.upload_chunk)
        plan = snapshot.plan_restore(objects, generation)
        doc = plan.volume
        vol = create_volume_dir(name, int(doc["chunk_size"]), str(doc["compression"]), meta_url)
        try:
            vol.uuid = str(doc["uuid"])
            table: dict[str, object] = dict(doc.get("drive", {}))
            table["endpoint"] = endpoint
            table["credentials"] = cred_name
            table.pop("folder", None)
            if folder_name != f"casfs-{vol.uuid}":
                table["folder"] = folder_name
            vol.drive = {k: v for k, v in table.items() if v != ""}
            if doc.get("encryption"):
                # the wrapped master key came with the volume object: the passphrase (or
                # key file) unlocks it here, before the snapshot is opened
                vol.encryption = dict(doc["encryption"])
                unlock_volume(vol)
            if cred_name:
                write_private(vol.path / cred_name, cred_data)
            cfg = cloud.CloudConfig.from_volume(vol)
            click.echo(f"restoring volume {vol.name} ({vol.uuid}) from folder {folder_name}: generation "
                       f"{plan.chosen.generation} of {plan.chosen.created:%Y-%m-%d %H:%M:%S} UTC")
            # the eager download gets a bar with rate and ETA (tools/cli/progress.py); the
            # steps before it are one line each
            with progress("restore", unit="B") if eager else contextlib.nullcontext() as bar:
                r = snapshot.restore_into(vol, objects, cfg, folder_id, plan, keys=vol.keys, eager=eager,
                                          progress=click.echo, chunk_progress=bar,
                                          chunk_total=None if bar is None else bar.set_total)
            vol.save()
        except BaseException:
            shutil.rmtree(vol.path, ignore_errors=True)
            raise
    how = (f"{r.downloaded} chunks downloaded ({human(r.downloaded_bytes)})" if eager
           else f"{r.live_chunks} chunks on Drive, fetched on first read")
    click.echo(f"restored volume {vol.name} at {vol.path} from generation {r.generation} (taken {r.created}): "
               f"{r.inodes} inodes, {how}; mount it with `casfs mount MOUNTPOINT {name}`")
    if r.lost:
        click.echo(f"{len(r.lost)} chunks were not on Drive when generation {r.generation} was taken: the "
                   "files using them read as errors (casfs fsck lists them)")
        for cid in r.lost[:20]:
            click.echo(f"  lost chunk {cid}")
    if r.failed_packs:
        click.echo(f"not downloaded: {len(r.unreadable)} chunks in {len(r.failed_packs)} packs Drive did not "
                   "give; they stay cloud-only (fetched on first read)")
        for line in r.failed_packs[:20]:
            click.echo(f"  pack {line}")
    if r.lost:
        raise SystemExit(1)


def register(group: click.Group) -> None:
    """Add the cloud commands to the casfs command group."""
    group.add_command(drive)
    group.add_command(restore)

