"""Operator commands: `casfs stats`, `casfs gc`, `casfs fsck`.

Each opens the volume's database directly (starting the embedded server if no mount
runs) and works while the volume is mounted.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import click

from cas.tier import cloud
from cas.maint import cloudcheck
from cas.maint import fsck as fsck_mod
from cas.maint import sessioncheck
from cas.engine import rescue
from cas.engine import sessions
from cas.tier import snapshot
from cas.maint import gc as gc_mod
from cas.maint import repair as repair_mod
from cas.maint import stats as stats_mod
from cas.errors import CasError, VolumeError
from cas.db import sessions as dbsessions
from cas.db.database import Metadata, connect
from cas.tier.objstore import ObjectStoreError
from cas.maint.safety import DEFAULT_GRACE_S
from cas.config.volume import DEFAULT_NAME, Volume, open_volume
from fusefront.daemon import STATS_FILE

from tools.cli import statwatch
from tools.cli.common import human, open_tier, user_errors
from tools.cli.keycmd import key_options, unlock_volume
from tools.cli.mountcmd import is_mounted
from tools.cli.progress import progress


@click.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (with --watch: one per interval).")
@click.option("--watch", is_flag=True, help="Show the mount's rates every --interval seconds until Ctrl-C: "
              "ops/s, MiB/s written and read, dedup saved, cache hit ratio, upload rate, queue and ETA.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between --watch reports.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop --watch after N reports.")
@user_errors
def stats(volume: str, as_json: bool, watch: bool = False, interval: float = 1.0, count: int | None = None) -> None:
    """Show VOLUME's files, logical/unique/stored bytes and dedup ratio."""
    vol = open_volume(volume)
    if watch:
        statwatch.watch(vol, interval, count, as_json)
        return
    with connect(vol) as meta:
        s = stats_mod.collect(meta)
        rp = snapshot.recovery_point(meta.db) if cloud.enabled(meta.db) else None
    live = _live_stats(vol)
    rescue_files, rescue_bytes = rescue.area_bytes(rescue.rescue_dir(vol.path))
    if as_json:
        d: dict[str, object] = dict(s.as_dict())
        d["mount"] = live
        d["rescue_files"] = rescue_files
        d["rescue_bytes"] = rescue_bytes
        d["snapshot"] = rp.as_dict() if rp is not None else None
        click.echo(json.dumps(d, sort_keys=True))
        return
    # live figures first, each line a part of the one above it; garbage (chunks at
    # refcount 0 that gc has not deleted yet) on its own line, never inside stored bytes
    rows = [
        ("files", f"{s.files} ({s.directories} directories, {s.symlinks} symlinks)"),
        ("logical bytes", f"{human(s.logical_bytes)} ({s.logical_bytes}): the sizes of the files"),
        ("sparse bytes", f"{human(s.sparse_bytes)} ({s.sparse_bytes}): in holes, not stored "
                         "(not counted as dedup)"),
        ("dedup saved", f"{human(s.dedup_saved_bytes)} ({s.dedup_saved_bytes}): data stored once "
                        "for several places"),
        ("unique bytes", f"{human(s.unique_bytes)} ({s.unique_bytes}): live chunks, before compression"),
        ("stored bytes", f"{human(s.live_stored_bytes)} ({s.live_stored_bytes}): live chunks, "
                         "after compression"),
        ("dedup ratio", f"{s.dedup_ratio:.3f} (logical - sparse) / unique"),
        ("compression ratio", f"{s.compression_ratio:.3f} unique / stored"),
        ("live chunks", f"{s.live_chunks} (chunk size {human(s.chunk_size)})"),
        ("garbage", f"{s.garbage_chunks} chunks, {human(s.garbage_bytes)} ({s.garbage_bytes}) stored: "
                    "no longer referenced, freed by `casfs gc` after the grace period"),
        ("local store", f"{human(s.local_bytes)} ({s.local_bytes})"),
        ("cloud", f"{human(s.cloud_bytes)} in {s.cloud_packs} packs; live chunks: {s.local_only_chunks} "
                  f"local only, {s.both_chunks} local and cloud, {s.cloud_only_chunks} cloud only; "
                  f"{s.queued_chunks} queued for upload"),
    ]
    if rp is not None:
        from tools.cli.drivecmd import recovery_text
        rows.append(("recovery point", recovery_text(rp)))
    if live:
        lookups = int(live["cache_hits"]) + int(live["cache_misses"])
        rows.append(("RAM cache", f"hit ratio {float(live['cache_hit_ratio']) * 100:.1f}% of {lookups} "
                                  f"chunk reads since mount; {human(int(live['cache_bytes']))} of "
                                  f"{human(int(live['cache_capacity_bytes']))} used"))
        if "dirty_bytes" in live:
            text = (f"{human(int(live['dirty_bytes']))} ({live['dirty_bytes']}) in {live['dirty_files']} "
                    f"files, {live['uncommitted_ops']} namespace operations")
            if live.get("writeback_error"):
                text += f"; writeback failing: {live['writeback_error']}"
            elif live.get("last_writeback_error"):
                text += f"; last writeback error (since resolved): {live['last_writeback_error']}"
            rows.append(("uncommitted", text))
    else:
        rows.append(("RAM cache", "not mounted"))
    if rescue_files:
        rows.append(("rescue area", f"{rescue_files} files, {human(rescue_bytes)} ({rescue_bytes}) kept by "
                                    "a mount that could not commit them; the next mount replays them"))
    for k, v in rows:
        click.echo(f"{k:18} {v}")


def _live_stats(vol: Volume) -> dict[str, Any] | None:
    """The running mount's live counters (run/stats.json), or None when not mounted."""
    if not is_mounted(vol):
        return None
    try:
        data = json.loads((vol.run_dir / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "cache_hits" in data else None


@click.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--dry-run", is_flag=True, help="Report what would be freed; delete nothing.")
@click.option("--grace", default=DEFAULT_GRACE_S, show_default=True, type=click.FloatRange(min=0),
              help="Seconds a chunk must have been unreferenced (or an orphan cloud object "
                   "unrecorded) before it is deleted.")
@click.option("--drive-endpoint", default=None, metavar="URL", help="Override the volume's Drive endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object; no progress.")
@key_options
@user_errors
def gc(volume: str, dry_run: bool, grace: float, drive_endpoint: str | None, as_json: bool = False) -> None:
    """Delete chunks no file references, then empty, sparse and orphan packs on Drive
    (safe while mounted). Shows progress (chunks and files examined; then packs and
    Drive objects) on stderr."""
    vol = open_volume(volume)
    unlock_volume(vol)
    with connect(vol) as meta:
        with progress("gc", unit="chunks", json_mode=as_json) as p:
            r = gc_mod.collect(meta, grace_s=grace, dry_run=dry_run, progress=p, on_total=p.set_total)
        verb = "would free" if dry_run else "freed"
        if not as_json:
            click.echo(f"{verb} {r.chunks_deleted} chunks ({human(r.bytes_freed)}) and {r.orphans_deleted} "
                       f"orphan files ({human(r.orphan_bytes_freed)})")
        c = None
        if cloud.enabled(meta.db):
            tier = open_tier(meta, drive_endpoint)
            try:
                with progress("gc cloud", unit="packs", json_mode=as_json) as p:
                    c = gc_mod.collect_cloud(tier, grace_s=grace, dry_run=dry_run, progress=p,
                                             on_total=p.set_total)
            finally:
                tier.close()
    if as_json:
        click.echo(json.dumps({"local": asdict(r), "cloud": None if c is None else asdict(c)}, sort_keys=True))
        return
    if c is None:
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"cloud: {verb} {c.packs_deleted} empty packs ({human(c.pack_bytes_deleted)}), "
               f"{'would rewrite' if dry_run else 'rewrote'} {c.packs_rewritten} sparse packs "
               f"({human(c.bytes_rewritten)} live) into {c.new_packs} new ones, {verb} "
               f"{c.orphans_deleted} orphan objects ({human(c.orphan_bytes_deleted)})")


@click.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--repair", is_flag=True, help="Rewrite refcounts and link counts from the manifests; "
              "replace bad or missing chunks from Drive, else list the damaged files.")
@click.option("--no-verify", is_flag=True, help="Check chunk files exist, without hashing them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--cloud", "check_cloud", is_flag=True,
              help="Also check that every pack the database names is on Drive with its recorded size "
                   "(and md5), and list the files that depend on any that is not.")
@key_options
@user_errors
def fsck(volume: str, repair: bool, no_verify: bool, as_json: bool, check_cloud: bool = False) -> None:
    """Check refcounts, link counts, and every referenced chunk's presence and hash.

    Exits 1 when a problem is found and not repaired.
    """
    vol = open_volume(volume)
    unlock_volume(vol)
    if repair and is_mounted(vol):
        raise click.ClickException(f"volume {vol.name} is mounted: unmount it before `casfs fsck --repair`")
    with connect(vol) as meta:
        keeper = _repair_session(meta) if repair else None
        try:
            with progress("fsck", unit="chunks", json_mode=as_json) as p:
                r = fsck_mod.check(meta, repair=repair, verify=not no_verify, progress=p, on_total=p.set_total)
            fixed = _repair_chunks(meta, r) if repair else None
            cr = _check_cloud(meta) if check_cloud else None
            sr = sessioncheck.check(meta, repair=repair)
        finally:
            if keeper is not None:
                keeper.stop()
    if as_json:
        d = {k: getattr(r, k) for k in r.__dataclass_fields__}
        d["clean"] = r.clean
        d["sessions"] = sr.as_dict()
        if fixed is not None:
            d["chunk_repair"] = fixed.as_dict()
        if cr is not None:
            d["cloud"] = cr.as_dict()
        click.echo(json.dumps(d))
    else:
        click.echo(f"checked {r.chunks_checked} live chunks: {len(r.refcount_mismatches)} refcount "
                   f"mismatches, {len(r.missing_rows)} missing rows, {len(r.missing_files)} missing files, "
                   f"{len(r.corrupt_chunks)} corrupt, {len(r.nlink_mismatches)} link count mismatches, "
                   f"{len(r.dangling_entries)} dangling entries, {r.orphan_files} orphan files, "
                   f"{r.cloud_only} chunks only in the cloud")
        for cid, had, actual in r.refcount_mismatches[:20]:
            click.echo(f"  refcount {cid}: recorded {had}, manifests say {actual}")
        for cid in r.missing_files[:20]:
            click.echo(f"  missing chunk file {cid}")
        for cid in r.corrupt_chunks[:20]:
            click.echo(f"  corrupt chunk {cid}")
        for cid in r.bad_marked[:20]:
            click.echo(f"  chunk {cid} is marked bad but its local file verifies")
        for ino in r.unreachable_dirs[:20]:
            click.echo(f"  directory inode {ino} is not reachable from the root (a dentry cycle)")
        for line in fsck_mod.store_lines(r):
            click.echo(line)
        if fixed is not None:
            _echo_chunk_repair(fixed)
    if cr is not None and not as_json:
        _print_cloud(cr)
    if not as_json:
        _print_sessions(sr)
    unrepaired = r.missing_rows or r.dangling_entries or r.unreachable_dirs or (
        fixed.unrepaired if fixed is not None else (r.missing_files or r.corrupt_chunks or r.bad_marked))
    if repair and r.repaired and not as_json:
        click.echo("repaired refcounts and link counts")
    if fixed is not None and fixed.unrepaired:
        raise click.ClickException(f"{len(fixed.unrepaired)} chunks stay unrepaired: "
                                   f"{len(fixed.damaged_files)} files damaged (listed above)")
    if not r.clean and (not repair or unrepaired):
        raise SystemExit(1)
    if cr is not None and not cr.clean:
        raise SystemExit(1)
    if not sr.clean:
        raise SystemExit(1)


def _repair_session(meta: Metadata) -> sessions.SessionKeeper:
    """fsck --repair rewrites counts a mount may be changing: register an exclusive
    session for the repair's length (cas.engine.sessions.start), refused while any
    session is live, on any machine, and refusing every mount that starts meanwhile
    (docs/sharing.md). Stop it when the repair ends. Raises click.ClickException."""
    try:
        return sessions.start(meta, exclusive=True)
    except VolumeError as exc:
        live = dbsessions.any_live(meta.db)
        if live:
            s = live[0]
            raise click.ClickException(f"volume {meta.volume.name} is mounted by {s.host}:{s.pid} (session "
                                       f"{s.id}): unmount every mount before `casfs fsck --repair`") from exc
        raise click.ClickException(str(exc)) from exc


def _print_sessions(sr: sessioncheck.SessionReport) -> None:
    """fsck's lines about sessions: one per session, then orphan sustained rows."""
    click.echo(f"{len(sr.sessions)} sessions ({len(sr.dead)} dead, not yet reaped), "
               f"{len(sr.orphan_sustained)} sustained inodes of vanished sessions")
    for s in sr.sessions:
        click.echo(f"  session {s.id}: {s.host}:{s.pid} store {s.store} {s.mode} "
                   f"{'live' if s.live else 'dead'} (heartbeat {s.age_s:.1f} s ago), "
                   f"{s.sustained} sustained inodes, {s.queued} chunks queued")
    for session, ino in sr.orphan_sustained[:20]:
        click.echo(f"  inode {ino} sustained by vanished session {session}"
                   + (" (freed)" if sr.repaired else ""))


def _repair_chunks(meta: Metadata, r: fsck_mod.FsckReport) -> repair_mod.ChunkRepair:
    """fsck --repair of chunk data: from the cloud tier when the volume has one (an
    unreachable tier is reported, not fatal: the damaged files are listed instead)."""
    ids = repair_mod.candidates(meta.db, [*r.missing_files, *r.corrupt_chunks, *r.bad_marked])
    if not ids:
        return repair_mod.ChunkRepair()
    tier = None
    why = ""
    if cloud.enabled(meta.db):
        try:
            tier = open_tier(meta)
        except (CasError, ObjectStoreError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    try:
        return repair_mod.repair_chunks(meta, ids, tier, why)
    finally:
        if tier is not None:
            tier.close()


def _echo_chunk_repair(fixed: repair_mod.ChunkRepair) -> None:
    """The chunk part of an fsck --repair report: a summary line, then each damaged path."""
    click.echo(f"chunk repair: {len(fixed.replaced)} replaced from the cloud, {len(fixed.cleared)} "
               f"bad marks cleared (file verifies), {len(fixed.unrepaired)} unrepaired")
    if fixed.cloud_error:
        click.echo(f"  cloud tier unavailable: {fixed.cloud_error}")
    for path in fixed.damaged_files:
        click.echo(f"  damaged file {path}")


def _check_cloud(meta: Metadata) -> cloudcheck.CloudCheck:
    """`fsck --cloud`: the volume's packs against Drive (cas.maint.cloudcheck)."""
    tier = open_tier(meta)
    try:
        return cloudcheck.check_packs(tier.db, tier.objects)
    finally:
        tier.close()


def _print_cloud(cr: cloudcheck.CloudCheck) -> None:
    click.echo(f"cloud: checked {cr.packs_checked} packs on Drive: {len(cr.problems)} missing or different")
    for p in cr.problems:
        click.echo(f"  pack {p.name} ({p.object_id}): {p.problem}; {p.chunks} chunks, {p.cloud_only} of them "
                   f"with no local copy; {p.files} files depend on it")
        for path in p.paths:
            click.echo(f"    {path}")


def register(group: click.Group) -> None:
    """Add the operator commands to the casfs command group."""
    for cmd in (stats, gc, fsck):
        group.add_command(cmd)
