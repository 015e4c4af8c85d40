"""Encryption on the command line: unlocking a volume, `casfs init --encrypt`, and
`casfs key passwd | export`.

Every command that opens chunks of an encrypted volume takes the same options
(:func:`key_options`): ``--key-file F`` and ``--passphrase-file F``; without them the
passphrase comes from $CASFS_PASSPHRASE, else a hidden prompt when stdin is a terminal.
Never from a command-line value: a command line is readable by every local user
(/proc/PID/cmdline). A wrong passphrase is a one-line error and exit status 1, and an
audit event (cas.config.keys.audit_unlock_failure). docs/security.md.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
import tomli_w

from cas.config import audit, keys
from cas.config.volume import DEFAULT_NAME, Volume, open_volume

from tools.cli.common import user_errors

P = ParamSpec("P")
R = TypeVar("R")
_CTX_KEY = "casfs_key_options"


def key_options(fn: Callable[P, R]) -> Callable[P, R]:
    """Add ``--key-file`` and ``--passphrase-file`` to a click command; they are kept in
    the click context for :func:`unlock_volume`, not passed to ``fn``."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ctx = click.get_current_context()
        ctx.meta[_CTX_KEY] = (kwargs.pop("key_file", None), kwargs.pop("passphrase_file", None))
        return fn(*args, **kwargs)
    # help texts: the passphrase never on the command line
    wrapped = click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help="Read the passphrase of an encrypted volume from this file (first line). "
                                "Default: $CASFS_PASSPHRASE, else a prompt on a terminal.")(wrapper)
    wrapped = click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                           help="Unlock an encrypted volume with this key file (32 bytes or 64 hex digits) "
                                "instead of the passphrase.")(wrapped)
    return wrapped  # type: ignore[return-value]


def _options() -> tuple[Path | None, Path | None]:
    ctx = click.get_current_context(silent=True)
    found = ctx.meta.get(_CTX_KEY) if ctx is not None else None
    return found if found is not None else (None, None)


def unlock_volume(vol: Volume) -> keys.VolumeKeys | None:
    """Unlock ``vol`` with the command's key options (:func:`key_options`), the
    environment, or a prompt; sets ``vol.keys``. None for an unencrypted volume.
    Raises WrongPassphrase (one line, exit 1 through user_errors; audited)."""
    if not vol.encryption:
        return None
    key_file, passphrase_file = _options()
    passphrase = None
    if key_file is None:
        passphrase = keys.passphrase_from_env_or_file(passphrase_file)
        if passphrase is None and sys.stdin.isatty():
            passphrase = click.prompt(f"Passphrase of volume {vol.name}", hide_input=True, err=True)
    # a failed unlock is an audit event (cas.config.keys): into this volume's audit log too, for
    # this call only (a mount's daemon attaches its own handler after the fork)
    handler = audit.attach(vol)
    try:
        return keys.unlock(vol, passphrase, key_file)
    finally:
        audit.detach(handler)
        # read once: out of the environment that the mount's daemon and an embedded
        # mariadbd started later would inherit (/proc/PID/environ)
        os.environ.pop(keys.PASSPHRASE_ENV, None)


def new_secrets(key_file: Path | None, passphrase_file: Path | None) -> tuple[str | None, Path | None]:
    """The passphrase and key file of a new encrypted volume (`casfs init --encrypt`).

    The passphrase: ``passphrase_file``, $CASFS_PASSPHRASE, else (without a key file) a
    hidden prompt with confirmation on a terminal. A key file that does not exist is
    created (mode 0600, a new random key). Raises click.UsageError when there is neither
    (no terminal to ask), WrongPassphrase for an empty passphrase.
    """
    passphrase = keys.passphrase_from_env_or_file(passphrase_file)
    if passphrase is None and key_file is None:
        if not sys.stdin.isatty():
            raise click.UsageError("--encrypt needs a passphrase ($CASFS_PASSPHRASE, --passphrase-file, "
                                   "or a terminal to ask on) or --key-file")
        passphrase = click.prompt("Passphrase for the new volume", hide_input=True,
                                  confirmation_prompt=True, err=True)
    if passphrase is not None and not passphrase:
        raise keys.WrongPassphrase("the passphrase must not be empty")
    if key_file is not None and not key_file.exists():
        keys.create_key_file(key_file)
        click.echo(f"created key file {key_file}: keep a copy; without it (or the passphrase) "
                   "the volume cannot be read", err=True)
    return passphrase, key_file


def export_text(vol: Volume) -> str:
    """The printable backup of ``vol``'s ``[encryption]`` table: a TOML block that goes
    back into volume.toml as it is (docs/format.md, "Restoring the key table")."""
    body = tomli_w.dumps({"encryption": vol.encryption})
    return (f"# casfs key backup of volume {vol.name} (uuid {vol.uuid})\n"
            "# The master key below is wrapped: it opens only with the passphrase or key file.\n"
            "# To restore: replace the [encryption] table of the volume's volume.toml with this block.\n"
            + body)


@click.group()
def key() -> None:
    """Keys of an encrypted volume: change the passphrase, export a backup."""


@key.command()
@click.argument("volume", default=DEFAULT_NAME)
@click.option("--new-passphrase-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the new passphrase from this file. Default: $CASFS_NEW_PASSPHRASE, else a prompt.")
@click.option("--add-key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also wrap the key under this key file (created if missing), replacing any key-file wrap.")
@key_options
@user_errors
def passwd(volume: str, new_passphrase_file: Path | None, add_key_file: Path | None) -> None:
    """Change VOLUME's passphrase: the master key is wrapped again, no chunk is rewritten.

    The old passphrase (or --key-file) unlocks it first; the new passphrase replaces the
    old one's wrap. volume.toml is replaced atomically.
    """
    vol = open_volume(volume)
    if not vol.encryption:
        raise click.ClickException(f"volume {vol.name} is not encrypted")
    vk = unlock_volume(vol)
    assert vk is not None
    new = keys.new_passphrase_from_env_or_file(new_passphrase_file)
    if new is None and add_key_file is None:
        if not sys.stdin.isatty():
            raise click.UsageError("the new passphrase comes from $CASFS_NEW_PASSPHRASE, "
                                   "--new-passphrase-file or a terminal")
        new = click.prompt("New passphrase", hide_input=True, confirmation_prompt=True, err=True)
    if new is not None and not new:
        raise keys.WrongPassphrase("the new passphrase must not be empty")
    wraps: list[dict[str, Any]] = list(vol.encryption["wraps"])
    if new is not None:
        wraps = [w for w in wraps if w.get("kind") != "passphrase"]
        wraps.append(keys.passphrase_wrap(vk.master, new, vol.uuid))
    if add_key_file is not None:
        if not add_key_file.exists():
            keys.create_key_file(add_key_file)
            click.echo(f"created key file {add_key_file}", err=True)
        wraps = [w for w in wraps if w.get("kind") != "keyfile"]
        wraps.append(keys.keyfile_wrap(vk.master, add_key_file, vol.uuid))
    vol.encryption = {**vol.encryption, "wraps": wraps}
    vol.save()
    what = "passphrase changed" if new is not None else "key file added"
    click.echo(f"volume {vol.name}: {what} (master key wrapped again; no chunk rewritten)")
    if vol.drive or vol.s3:
        # the key table on Drive (casfs-volume.json) still holds the old wraps until the
        # next snapshot or push uploads it again (docs/encryption.md)
        click.echo(f"run `casfs drive push {vol.name}` to update the key table on Drive: until then "
                   "a restore from Drive takes the old passphrase")


@key.command(name="export")
@click.argument("volume", default=DEFAULT_NAME)
@user_errors
def export_cmd(volume: str) -> None:
    """Print VOLUME's wrapped key table as text to keep somewhere safe (paper, a password
    manager). It is useless without the passphrase or key file, and they are useless
    without it: losing both volume.toml and this backup loses the data."""
    vol = open_volume(volume)
    if not vol.encryption:
        raise click.ClickException(f"volume {vol.name} is not encrypted")
    click.echo(export_text(vol), nl=False)
