"""`casfs scrub`: verify every local chunk (and with --cloud every pack on Drive),
rate-limited, resumable, with progress (cas/maint/scrub.py, docs/integrity.md).

Progress goes to stderr through tools/cli/progress.py: a tqdm bar with rate and ETA on a
terminal, plain periodic lines otherwise, nothing with --json. The result goes to stdout.
"""
from __future__ import annotations

import json

import click

from cas.maint import scrub as scrub_mod
from cas.db.database import connect
from cas.config.volume import DEFAULT_NAME, open_volume

from tools.cli.common import human, open_tier, user_errors
from tools.cli.progress import progress
from tools.cli.keycmd import key_options, unlock_volume


@click.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--cloud", "with_cloud", is_flag=True,
              help="Also verify every pack on Drive (ranged reads of its recorded chunks).")
@click.option("--rate", default=50.0, show_default=True, type=click.FloatRange(min=0),
              help="Read at most this many MiB/s (0: no limit).")
@click.option("--restart", is_flag=True, help="Start from the beginning, not from the saved cursor.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object; no progress.")
@click.option("--drive-endpoint", default=None, metavar="URL", help="Override the volume's Drive endpoint.")
@click.option("--stop-after", default=None, type=click.IntRange(min=1), hidden=True,
              help="Stop after verifying this many chunks (the cursor is saved).")
@key_options
@user_errors
def scrub(volume: str, with_cloud: bool, rate: float, restart: bool, as_json: bool,
          drive_endpoint: str | None, stop_after: int | None) -> None:
    """Verify every local chunk of VOLUME (hash and envelope) and mark bad ones, so that
    the next write of their bytes rewrites them and `casfs fsck --repair` can replace
    them. Continues an interrupted scrub unless --restart. Safe while mounted.

    Exits 1 when a bad chunk was found.
    """
    vol = open_volume(volume)
    unlock_volume(vol)
    with connect(vol) as meta:
        tier = open_tier(meta, drive_endpoint) if with_cloud else None
        try:
            if restart:
                scrub_mod.reset(meta.db)
            p = scrub_mod.plan(meta.db, with_cloud)
            with progress("scrub", total=p.local_bytes + p.cloud_bytes, unit="B", json_mode=as_json) as bar:
                r = scrub_mod.scrub(meta, tier, rate=rate * (1 << 20), stop_after=stop_after,
                                    progress=bar)
        finally:
            if tier is not None:
                tier.close()
    if as_json:
        click.echo(json.dumps(r.as_dict()))
    else:
        _echo(r)
    if r.bad:
        raise SystemExit(1)


def _echo(r: scrub_mod.ScrubResult) -> None:
    """The human report of a scrub run."""
    loc = r.local
    if loc.skipped:
        click.echo("local: done by the previous run")
    else:
        click.echo(f"local: verified {loc.checked} chunks ({human(loc.bytes)}), {len(loc.bad)} bad"
                   + (" (continued a scrub)" if loc.resumed else ""))
    for cid in loc.bad[:50]:
        click.echo(f"  bad chunk {cid}: marked; the next write of its bytes or `casfs fsck --repair` heals it")
    if r.cloud is not None:
        c = r.cloud
        click.echo(f"cloud: verified {c.checked} chunks in packs ({human(c.bytes)}), {len(c.bad)} bad"
                   + (" (continued a scrub)" if c.resumed else ""))
        for name, ids in c.bad_packs.items():
            click.echo(f"  pack {name}: {len(ids)} bad chunks")
        if c.requeued:
            click.echo(f"  {len(c.requeued)} chunks with a good local copy queued for upload again")
        for err in c.errors:
            click.echo(f"  could not read pack {err}")
    if not r.complete:
        click.echo("scrub stopped before the end: `casfs scrub` continues from here")
