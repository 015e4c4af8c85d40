"""The S3 cloud-store commands: `casfs s3 enable | status | push | restore`.

`s3 enable` writes the ``[s3]`` table of volume.toml (bucket, prefix, endpoint_url,
region, profile, credentials_file and the tier settings; never a key or a secret: those
come from the AWS credential chain or the credentials file it names), checks that the
bucket is there (``--create-bucket`` creates it) and that the prefix holds no other
volume's objects, and enables the tier (every chunk not yet in a pack joins the upload
queue). The next mount uploads. `s3 status` and `s3 push` are `drive status` and
`drive push`, which act on whichever store the volume has (docs/cloud.md,
"S3-compatible stores"). `s3 restore` recreates a volume on a new machine from its
prefix in the bucket (the S3 twin of `casfs restore --from-drive`, docs/backup.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path
import click

from cas.config.volume import DEFAULT_NAME, Volume, open_volume
from cas.db import packs as pack_rows
from cas.db.database import connect
from cas.errors import VolumeError
from cas.tier import cloud

from tools.cli import drivecmd
from tools.cli.common import enable_tier, human, parse_size, refuse_live_sessions, user_errors
from tools.cli.keycmd import key_options, unlock_volume
from tools.cli.mountcmd import is_mounted


@click.group()
def s3() -> None:
    """S3-compatible cloud store (AWS S3, MinIO, Ceph ...): enable, status, uploads."""


@s3.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--bucket", required=True, help="The bucket (it must exist, or give --create-bucket).")
@click.option("--prefix", default=None, help="Key prefix of this volume's objects [default: casfs-<volume uuid>/].")
@click.option("--endpoint", default="", metavar="URL",
              help="An S3-compatible server (e.g. http://minio:9000) instead of AWS.")
@click.option("--region", default="", help="The bucket's region [default: us-east-1].")
@click.option("--profile", default="", help="A profile of the AWS config files.")
@click.option("--credentials-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An AWS shared-credentials file to use instead of ~/.aws/credentials (its path is kept "
                   "in volume.toml, never its content).")
@click.option("--create-bucket", is_flag=True, help="Create the bucket when it does not exist.")
@click.option("--pack-size", default="32MiB", show_default=True, help="Target size of a pack object.")
@click.option("--pack-age", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds after which a partly filled pack is uploaded anyway.")
@click.option("--bwlimit", default="0", help="Upload bandwidth limit, bytes/s (e.g. 2MiB); 0 = none.")
@click.option("--repack-threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="gc rewrites packs whose live fraction is below this.")
@click.option("--keep-generations", default=7, show_default=True, type=click.IntRange(min=1),
              help="Metadata snapshots kept in the bucket (docs/backup.md).")
@click.option("--snapshot-interval", default=600.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between a mount's metadata snapshots, at most one per interval after a change.")
@user_errors
def enable(volume: str, bucket: str, prefix: str | None, endpoint: str, region: str, profile: str,
           credentials_file: Path | None, create_bucket: bool, pack_size: str, pack_age: float, bwlimit: str,
           repack_threshold: float, keep_generations: int, snapshot_interval: float) -> None:
    """Put VOLUME's cloud tier in an S3 bucket and enable uploads."""
    from cas.tier.s3 import DEFAULT_REGION, S3ObjectStore   # boto3 loads only for this command
    vol = open_volume(volume)
    if is_mounted(vol):
        raise VolumeError(f"volume {vol.name} is mounted: unmount it before `casfs s3 enable`")
    if vol.drive:
        raise VolumeError(f"volume {vol.name} keeps its cloud tier on Google Drive ([drive] in volume.toml); "
                          "a volume has one cloud store")
    cfg = cloud.CloudConfig.from_volume(vol)
    before = dict(cfg.s3)
    if prefix is not None and prefix and not prefix.endswith("/"):
        prefix += "/"
    if credentials_file is not None:
        credentials_file = credentials_file.expanduser().resolve()
        if not credentials_file.is_file():
            raise VolumeError(f"credentials file {credentials_file} does not exist")
    cfg.s3 = {"bucket": bucket, "prefix": cloud.default_prefix(vol.uuid) if prefix is None else prefix}
    for k, v in (("region", region), ("profile", profile),
                 ("credentials_file", str(credentials_file) if credentials_file else "")):
        if v:
            cfg.s3[k] = v
    cfg.endpoint = endpoint
    cfg.pack_size = parse_size(pack_size)
    cfg.pack_age_s = pack_age
    cfg.bwlimit = parse_size(bwlimit)
    cfg.repack_threshold = repack_threshold
    cfg.keep_generations = keep_generations
    cfg.snapshot_interval_s = snapshot_interval
    with connect(vol) as meta:
        refuse_live_sessions(meta, "s3 enable")
        _refuse_moving_packs(vol, before, cfg, pack_rows.figures(meta.db))
        objects = cloud.open_s3(vol, cfg)
        assert isinstance(objects, S3ObjectStore)
        try:
            created = objects.ensure_bucket(create=create_bucket, region=region or DEFAULT_REGION)
            other = cloud.foreign_object(objects, vol.uuid)
        finally:
            objects.close()
        if other is not None:
            owner = other.properties.get(cloud.VOLUME_PROPERTY)
            whose = f"volume {owner}" if owner else "no casfs volume"
            raise VolumeError(f"{cfg.label()} already holds objects of another volume ({other.id} belongs "
                              f"to {whose}); give this volume its own --prefix")
        vol.s3 = cfg.as_table()
        vol.save()
        queued = enable_tier(meta)
    click.echo(f"volume {vol.name}: cloud tier in {cfg.label()}" + (" (bucket created)" if created else "")
               + f"; {queued} chunks queued for upload (the next mount uploads them)")


def _refuse_moving_packs(vol: Volume, before: dict[str, str], cfg: cloud.CloudConfig,
                         figures: pack_rows.PackFigures) -> None:
    """Raise VolumeError when the volume already has packs and the new settings name
    another bucket or prefix: its packs are found by key, and casfs does not move them
    (another endpoint for the same bucket is fine)."""
    if not before or (figures.confirmed == 0 and figures.uploading == 0):
        return
    if (before.get("bucket"), before.get("prefix")) != (cfg.s3["bucket"], cfg.s3["prefix"]):
        raise VolumeError(f"volume {vol.name} has {figures.confirmed} packs in s3://{before.get('bucket')}/"
                          f"{before.get('prefix')}: casfs does not move them to another bucket or prefix")


@s3.command(name="restore")
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--bucket", required=True, help="The bucket that holds the volume's objects.")
@click.option("--prefix", default=None,
              help="The volume's key prefix [default: the only casfs-<uuid>/ prefix in the bucket].")
@click.option("--endpoint", default="", metavar="URL", help="An S3-compatible server instead of AWS.")
@click.option("--region", default="", help="The bucket's region [default: us-east-1].")
@click.option("--profile", default="", help="A profile of the AWS config files.")
@click.option("--credentials-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An AWS shared-credentials file (its path is kept in volume.toml).")
@click.option("--generation", default=None, type=click.IntRange(min=1),
              help="The snapshot generation to restore [default: the newest].")
@click.option("--eager", is_flag=True, help="Download every chunk now instead of on first read.")
@click.option("--meta", "meta_url", default="", metavar="URL",
              help="Load the database into this (empty) MySQL database instead of a new embedded MariaDB.")
@key_options
@user_errors
def restore(volume: str, bucket: str, prefix: str | None, endpoint: str, region: str, profile: str,
            credentials_file: Path | None, generation: int | None, eager: bool, meta_url: str) -> None:
    """Recreate VOLUME on this machine from its objects in an S3 bucket: volume.toml
    (with an [s3] table), the database (from a metadata snapshot) and the chunk store.

    Exits 1 when chunks were not in the bucket when the snapshot was taken (the files
    using them read as errors; casfs fsck lists them). An existing volume is never
    overwritten; the new directory is removed again when anything fails.
    """
    from cas.config.volume import check_new_volume_dir, create_volume_dir, volume_path
    from cas.tier import snapshot
    from cas.tier.s3 import DEFAULT_REGION, S3ObjectStore, make_client

    path = volume_path(volume)
    if path.exists() and any(path.iterdir()):
        raise VolumeError(f"refusing to restore into {path}: it exists and is not empty (an existing "
                          "volume is never overwritten); give another volume name")
    check_new_volume_dir(path)
    if credentials_file is not None:
        credentials_file = credentials_file.expanduser().resolve()
    client = make_client(endpoint or None, region or DEFAULT_REGION, profile=profile or None,
                         credentials_file=credentials_file)
    if prefix is None:
        found = S3ObjectStore(client, bucket).prefixes("casfs-")
        if len(found) != 1:
            raise VolumeError(f"{'several' if found else 'no'} casfs-<uuid>/ prefixes in bucket {bucket}; "
                              "give --prefix" + (": " + ", ".join(found[:10]) if found else ""))
        prefix = found[0]
    elif prefix and not prefix.endswith("/"):
        prefix += "/"
    objects = S3ObjectStore(client, bucket, prefix)
    plan = snapshot.plan_restore(objects, generation)
    doc = plan.volume
    vol = create_volume_dir(volume, int(doc["chunk_size"]), str(doc["compression"]), meta_url)
    try:
        vol.uuid = str(doc["uuid"])
        table: dict[str, object] = {k: v for k, v in dict(doc.get("s3") or doc.get("drive") or {}).items()
                                    if k not in cloud.DRIVE_ONLY_KEYS}
        table.update({"bucket": bucket, "prefix": prefix})
        for k, v in (("endpoint_url", endpoint), ("region", region), ("profile", profile),
                     ("credentials_file", str(credentials_file) if credentials_file else "")):
            table.pop(k, None)
            if v:
                table[k] = v
        vol.s3 = table
        if doc.get("encryption"):
            vol.encryption = dict(doc["encryption"])
            unlock_volume(vol)
        cfg = cloud.CloudConfig.from_volume(vol)
        click.echo(f"restoring volume {vol.name} ({vol.uuid}) from {cfg.label()}: generation "
                   f"{plan.chosen.generation} of {plan.chosen.created:%Y-%m-%d %H:%M:%S} UTC")
        r = snapshot.restore_into(vol, objects, cfg, "", plan, keys=vol.keys, eager=eager, progress=click.echo)
        vol.save()
    except BaseException:
        shutil.rmtree(vol.path, ignore_errors=True)
        raise
    finally:
        objects.close()
    how = (f"{r.downloaded} chunks downloaded ({human(r.downloaded_bytes)})" if eager
           else f"{r.live_chunks} chunks in the bucket, fetched on first read")
    click.echo(f"restored volume {vol.name} at {vol.path} from generation {r.generation} (taken {r.created}): "
               f"{r.inodes} inodes, {how}; mount it with `casfs mount MOUNTPOINT {volume}`")
    if r.lost:
        click.echo(f"{len(r.lost)} chunks were not in the bucket when generation {r.generation} was taken: "
                   "the files using them read as errors (casfs fsck lists them)")
        raise SystemExit(1)


s3.add_command(drivecmd.status)
s3.add_command(drivecmd.push)


def register(group: click.Group) -> None:
    """Add the S3 commands to the casfs command group."""
    group.add_command(s3)
