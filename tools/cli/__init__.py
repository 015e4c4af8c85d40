"""The casfs command line: `casfs init | mount | umount | stats | gc | fsck | status ...`.

Each command group lives in its own module; this one holds the click group and the
volume commands (init, mount, umount).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import click

from cas.config import keys
from cas.db import tls as metatls
from cas.config.audit import LEVELS as AUDIT_LEVELS
from cas.db.database import initialize
from cas.errors import VolumeError
from cas.engine.fs import DURABILITY_MODES
from cas.engine.coherence import CONSISTENCY_LEVELS
from cas.config.volume import DEFAULT_CHUNK, DEFAULT_NAME, create_volume_dir, open_volume, volume_path

from fusefront.metrics import parse_listen

from tools.cli import drivecmd, maint, mountcmd
from tools.cli import findcmd, keycmd
from tools.cli import joincmd
from tools.cli import scrubcmd
from tools.cli import s3cmd
from tools.cli import statuscmd
from tools.cli.common import human, parse_size, user_errors
from tools.cli.fstab import CasfsMainGroup, MountCommand, kernel_flags


@click.group(cls=CasfsMainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="casfs")
def main() -> None:
    """casfs: a deduplicating FUSE filesystem (SHA-256 chunks, zstd, MySQL metadata)."""
    logging.basicConfig(level=logging.WARNING, format="casfs: %(levelname)s: %(message)s")
    # audit events (records with an ``audit`` dict) are for the audit log, not the user's
    # terminal: the command's own one-line error already tells the user
    for h in logging.getLogger().handlers:
        h.addFilter(lambda r: not hasattr(r, "audit"))


def init_volume(name: str, chunk_size: int, compression: str, meta: str,
                tls: dict[str, object] | None = None,
                encrypt: tuple[str | None, Path | None] | None = None) -> None:
    """Create volume ``name`` (directory, config, database); undo the directory on failure.
    ``tls``: the volume.toml ``[meta]`` table (cas/db/tls.py), for an external server;
    ``encrypt`` (passphrase, key file): an encrypted volume (cas.config.keys)."""
    existed = volume_path(name).exists()
    vol = create_volume_dir(name, chunk_size, compression, meta)
    if tls:
        vol.meta_tls = dict(tls)
    try:
        if encrypt is not None:
            vol.encryption = keys.new_encryption_table(keys.new_master_key(), encrypt[0], encrypt[1],
                                                       volume_uuid=vol.uuid)
        initialize(vol, os.getuid(), os.getgid())
        vol.save()
    except BaseException:
        if not existed:
            shutil.rmtree(vol.path, ignore_errors=True)
        raise


@main.command()
@click.option("--chunk-size", default="1MiB", show_default=True,
              help="Chunk size: a power of two from 64KiB to 16MiB, fixed for the volume's life.")
@click.option("--compression", default="zstd:3", show_default=True, help="zstd:LEVEL (1-22) or none.")
@click.option("--meta", default="", metavar="URL",
              help="mysql://USER@HOST[:PORT]/DB of an existing MariaDB>=10.6/MySQL 8 server "
                   "(password: config meta_password or CASFS_MYSQL_PASSWORD). Default: a private "
                   "embedded MariaDB in the volume directory.")
@click.option("--tls", "tls_mode", type=click.Choice(metatls.TLS_MODES), default=None,
              help="TLS to the --meta server: 'required' (verified; the default with --tls-ca), "
                   "'preferred' (if offered, unverified: the default otherwise) or 'off'. docs/database.md.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="PEM CA bundle the --meta server's certificate must chain to (implies --tls required; "
                   "without it: the system's CAs).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="PEM client certificate for the --meta server (with --tls-key).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
              help="PEM key of --tls-cert.")
@click.option("--encrypt", is_flag=True,
              help="Encrypt every chunk (AES-256-GCM, keyed BLAKE3 ids) under a random master key "
                   "wrapped by a passphrase (prompt, $CASFS_PASSPHRASE or --passphrase-file) and/or "
                   "--key-file. A lost passphrase and key file mean lost data. docs/security.md.")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --encrypt: also wrap the master key under this key file (created if missing).")
@click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --encrypt: read the passphrase from this file (first line).")
@click.option("--shared", is_flag=True,
              help="Let several machines mount the volume at once (`casfs join` on the others; needs "
                   "--meta: an embedded server's socket is private to this machine). docs/sharing.md.")
@click.argument("name", default=DEFAULT_NAME)
@user_errors
def init(chunk_size: str, compression: str, meta: str, name: str, tls_mode: str | None = None,
         tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
         encrypt: bool = False, key_file: Path | None = None, passphrase_file: Path | None = None,
         shared: bool = False) -> None:
    """Create volume NAME (default: "default")."""
    if shared and not meta:
        raise click.ClickException("--shared needs --meta: an embedded MariaDB's socket is private to "
                                   "this machine, other machines cannot reach it")
    size = parse_size(chunk_size)
    if not encrypt and (key_file is not None or passphrase_file is not None):
        raise click.UsageError("--key-file and --passphrase-file need --encrypt")
    tls = tls_table(meta, tls_mode, tls_ca, tls_cert, tls_key)
    secrets = keycmd.new_secrets(key_file, passphrase_file) if encrypt else None
    init_volume(name, size, compression, meta, tls, secrets)
    vol = open_volume(name)
    if meta:
        joincmd.after_init(vol, shared)
    enc = ""
    if vol.encryption:
        kinds = " and ".join(str(w["kind"]).replace("keyfile", "key file") for w in vol.encryption["wraps"])
        enc = f", encrypted (unlocks with its {kinds}; `casfs key export` prints a backup of the key)"
    click.echo(f"created volume {vol.name} at {vol.path} (chunk size {human(vol.chunk_size)}, "
               f"{vol.compression}, metadata: {vol.meta_url or 'embedded MariaDB'}{enc})"
               + ("; shared: join other machines with `casfs join`" if shared else ""))


def tls_table(meta: str, mode: str | None, ca: str | None, cert: str | None,
              key: str | None) -> dict[str, object] | None:
    """The volume.toml ``[meta]`` table for `casfs init`'s TLS options (None: none given).
    A CA, client certificate or key implies mode "required". Raises click.UsageError for
    TLS options without --meta (the embedded server has only its private socket), or a
    certificate without its key."""
    if mode is None and not (ca or cert or key):
        return None
    if not meta:
        raise click.UsageError("--tls options need --meta: the embedded server is reached through its "
                               "private unix socket only")
    if bool(cert) != bool(key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    settings = metatls.TlsSettings(mode=mode or metatls.REQUIRED,
                                   ca_file=os.path.abspath(ca) if ca else "",
                                   cert_file=os.path.abspath(cert) if cert else "",
                                   key_file=os.path.abspath(key) if key else "")
    return settings.to_config()


@main.command(cls=MountCommand)
@click.argument("mountpoint", type=click.Path(file_okay=True, dir_okay=True))
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option("--allow-other", is_flag=True, help="Let other users access the mount (needs "
              "user_allow_other in /etc/fuse.conf unless root).")
@click.option("--cache-size", default="256MiB", show_default=True, help="RAM for the LFU chunk cache.")
@click.option("--local-limit", default=None, metavar="SIZE",
              help="Keep at most SIZE of chunks on local disk; chunks already confirmed on Drive "
                   "are evicted (least frequently used first) and read back on demand.")
@click.option("--drive-endpoint", default=None, metavar="URL",
              help="Use this Drive-compatible server instead of the volume's configured one "
                   "(e.g. python -m tools.drivesim, run from a source checkout: it is not installed).")
@click.option("--durability", type=click.Choice(DURABILITY_MODES), default=None,
              help="When namespace operations (create, rename, unlink, chmod ...) become durable: "
                   "'group' (default) commits them together every 0.5 s and at fsync; 'immediate' "
                   "commits each before it returns (slower). Default: volume.toml [mount] durability, "
                   "else group. See docs/durability.md.")
@click.option("--consistency", type=click.Choice(CONSISTENCY_LEVELS), default=None,
              help="On a volume several machines mount (shared): 'session' (default; close-to-open, "
                   "other machines' namespace changes seen within 2 s), 'strong' (every lookup, "
                   "getattr and open reads the change log) or 'eventual' (seen within 20 s). "
                   "Default: volume.toml [mount] consistency, else session. No effect on a volume "
                   "that is not shared. See docs/sharing.md.")
@click.option("--metrics", default=None, metavar="[HOST:]PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1). "
                   "Off unless given. See docs/monitoring.md.")
@click.option("--audit", type=click.Choice(AUDIT_LEVELS), default=None,
              help="Audit log VOLUME/log/audit.jsonl: 'changes' (namespace changes, setattr, xattr "
                   "changes, opens), 'all' (also reads, writes, lookups) or 'off'. Default: "
                   "volume.toml [audit] level, else changes.")
@click.option("--snapshot-interval", default=None, type=click.FloatRange(min=0), metavar="SECONDS",
              help="Upload a metadata snapshot to Drive at most this often after a change "
                   "[default: volume.toml [drive] snapshot_interval_s, else 600]. docs/backup.md.")
@click.option("--debug", is_flag=True, help="Debug logging.")
@click.option("--fuse-option", "fuse_options", multiple=True, hidden=True)  # kernel flags from -o
@keycmd.key_options
@user_errors
def mount(mountpoint: str, volume: str, foreground: bool, allow_other: bool, cache_size: str,
          local_limit: str | None, drive_endpoint: str | None, durability: str | None,
          metrics: str | None, audit: str | None, debug: bool,
          fuse_options: tuple[str, ...] = (), snapshot_interval: float | None = None,
          consistency: str | None = None) -> None:
    """Mount VOLUME (default: "default", created if missing) at MOUNTPOINT.

    Returns once the mount is ready; the daemon runs in the background until
    `casfs umount MOUNTPOINT` (or umount(8)).

    \b
    -o OPT[,OPT...] takes mount(8)-style options (docs/mounting.md): kernel flags
    (ro, nosuid, nodev, noexec, noatime ...), fstab-only ones (_netdev, nofail,
    x-systemd.*: ignored), and this command's options as NAME[=VALUE]
    (durability=immediate, local_limit=20G, allow_other ...).
    """
    cache = parse_size(cache_size)
    if metrics is not None:
        parse_listen(metrics)   # a bad address fails here, before any daemon starts
    mountcmd.check_mountpoint(mountpoint)  # a bad mountpoint creates no default volume
    try:
        vol = open_volume(volume)
    except VolumeError:
        if volume != DEFAULT_NAME:
            raise
        init_volume(DEFAULT_NAME, DEFAULT_CHUNK, "zstd:3", "")
        vol = open_volume(DEFAULT_NAME)
        click.echo(f"created the default volume at {vol.path}", err=True)
    keycmd.unlock_volume(vol)   # before the daemon forks: it inherits vol.keys
    opts = mountcmd.MountOptions(allow_other=allow_other, cache_bytes=cache,
                                 local_limit=None if local_limit is None else parse_size(local_limit),
                                 drive_endpoint=drive_endpoint, durability=durability,
                                 fuse_options=kernel_flags(fuse_options),
                                 metrics=metrics, audit=audit, snapshot_interval_s=snapshot_interval,
                                 consistency=consistency)
    mountcmd.mount(vol, mountpoint, opts, foreground=foreground, debug=debug)


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--timeout", default=600.0, show_default=True,
              help="Seconds to keep asking the daemon to commit everything, and to wait for it to exit.")
@user_errors
def umount(mountpoint: str, timeout: float) -> None:
    """Unmount MOUNTPOINT: commit everything, then unmount and wait for the daemon to exit.

    While data cannot be committed (full disk, database down) the mount stays and the
    command exits 1 naming the files; free space and run it again.
    """
    mountcmd.umount(mountpoint, timeout)


maint.register(main)
findcmd.register(main)
drivecmd.register(main)
joincmd.register(main)
s3cmd.register(main)
main.add_command(scrubcmd.scrub)
statuscmd.register(main, drivecmd.drive)
main.add_command(keycmd.key)

if __name__ == "__main__":
    sys.exit(main())
