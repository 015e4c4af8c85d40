"""Mounting through mount(8), /etc/fstab and systemd: the mount-helper calling conventions.

mount(8) mounts a volume of type ``fuse.casfs`` in one of two ways (docs/mounting.md):

* fuse3's ``mount.fuse3`` (``/sbin/mount.fuse``, found by mount(8) for every ``fuse.*``
  type) runs ``/bin/sh -c "casfs SOURCE MOUNTPOINT -o OPTIONS"``: the program named by the
  type's subtype, found on PATH, with the options it does not handle itself (it drops
  ``user``, ``nouser``, ``users``, ``auto``, ``noauto``, ``_netdev``, ``nofail`` and
  always adds ``dev,suid`` unless ``nodev``/``nosuid`` were given; fuse3 util/mount.fuse.c);
* a helper ``/sbin/mount.fuse.casfs`` (this package's ``mount.fuse.casfs`` script linked
  there), which mount(8) runs as ``mount.fuse.casfs SOURCE MOUNTPOINT [-sfnv] [-o
  OPTIONS] [-t TYPE]`` (mount(8), "EXTERNAL HELPERS").

Both end up as ``casfs mount MOUNTPOINT SOURCE -o OPTIONS`` (:class:`MountCommand`),
which returns once the kernel mount exists and leaves the daemon in the background, as
mount(8) expects. umount(8) runs ``/sbin/umount.fuse.casfs MOUNTPOINT [-nlfvr] [-t
TYPE]`` when that exists (this package's ``umount.fuse.casfs`` script), which is
`casfs umount`; without it umount(8) unmounts directly and the daemon commits everything
before it exits (tools/cli/mountcmd.py).

``-o`` options (comma-separated, :func:`expand_options`):

* kernel mount flags libfuse passes on (:data:`KERNEL_FLAGS`: ro, rw, nosuid, nodev,
  noexec, sync, dirsync, noatime ...) go to the kernel mount;
* fstab-only options (:data:`IGNORED`, ``x-*``, ``comment=``) and the atime variants
  libfuse cannot pass (:data:`IGNORED_ATIME`) are ignored;
* any other ``NAME[=VALUE]`` is the `casfs mount` option ``--NAME [VALUE]`` (``_`` or
  ``-`` alike): ``durability=immediate``, ``local_limit=20G``, ``cache_size=1G``,
  ``allow_other``, ``debug`` ...; anything else is a usage error (exit 2, one line).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from tools.cli.common import CasfsGroup

FSTYPE = "fuse.casfs"
#: kernel mount flags that libfuse 3 accepts and passes to mount(2) (checked against
#: libfuse 3.14's fuse_session_new: these mount; relatime, strictatime, nodiratime and
#: lazytime make it fail)
KERNEL_FLAGS = frozenset({"ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
                          "sync", "async", "dirsync", "atime", "noatime"})
#: options that only mean something to mount(8), fstab or systemd (mount(8) "FILESYSTEM-
#: INDEPENDENT MOUNT OPTIONS", systemd.mount(5)); default_permissions is always on
IGNORED = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
                     "_netdev", "nofail", "default_permissions"})
IGNORED_PREFIXES = ("x-", "comment=")
#: atime variants libfuse cannot pass on: accepted and ignored like mount(8) users expect
IGNORED_ATIME = frozenset({"relatime", "norelatime", "strictatime", "nostrictatime", "diratime",
                           "nodiratime", "lazytime", "nolazytime", "iversion", "noiversion"})
_OPPOSITE = {"ro": "rw", "suid": "nosuid", "dev": "nodev", "exec": "noexec", "sync": "async",
             "atime": "noatime"}
_OPPOSITE.update({v: k for k, v in list(_OPPOSITE.items())})
NOT_AS_OPTION = frozenset({"foreground", "help", "fuse_options"})  # never from -o


def _option_param(cmd: click.Command, name: str) -> click.Option | None:
    """The option of ``cmd`` that mount option ``name`` names (``--name`` with ``_`` as
    ``-``), or None."""
    flag = "--" + name.replace("_", "-")
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden and p.name not in NOT_AS_OPTION and flag in p.opts:
            return p
    return None


def expand_options(cmd: click.Command, text: str) -> list[str]:
    """Translate one ``-o`` value (``opt1,opt2=value,...``) into `casfs mount` arguments
    (see the module docstring). Raises click.UsageError for an unknown option, a flag
    given a value, or an option missing its value."""
    out: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        name, eq, value = item.partition("=")
        if not item or item in IGNORED or item in IGNORED_ATIME or item.startswith(IGNORED_PREFIXES):
            continue
        if item in KERNEL_FLAGS:
            out += ["--fuse-option", item]
            continue
        param = _option_param(cmd, name)
        if param is None:
            raise click.UsageError(f"unknown mount option {item!r} (casfs mount options: durability=, "
                                   "local_limit=, cache_size=, allow_other, ...; see docs/mounting.md)")
        flag = param.opts[0] if param.opts[0].startswith("--") else "--" + name.replace("_", "-")
        if param.is_flag:
            if eq:
                raise click.UsageError(f"mount option {name!r} takes no value")
            out.append(flag)
        else:
            if not eq or not value:
                raise click.UsageError(f"mount option {name!r} needs a value: {name}=VALUE")
            out += [flag, value]
    return out


def kernel_flags(flags: Sequence[str]) -> tuple[str, ...]:
    """``flags`` (KERNEL_FLAGS, in the order given) with the later of two opposites
    winning (``rw,ro`` is ``ro``), as mount(8) reads an option list."""
    out: list[str] = []
    for f in flags:
        out = [g for g in out if g != f and g != _OPPOSITE.get(f)]
        out.append(f)
    return tuple(out)


class MountCommand(click.Command):
    """`casfs mount`, which also takes mount(8)-style ``-o OPT[,OPT...]`` (repeatable,
    ``-oOPTS`` too), expanded by :func:`expand_options` before click parses."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                out += args[i:]
                break
            if a == "-o":
                if i + 1 == len(args):
                    raise click.UsageError("option -o needs a value: -o OPT[,OPT...]")
                out += expand_options(self, args[i + 1])
                i += 2
                continue
            if a.startswith("-o") and not a.startswith("--"):
                out += expand_options(self, a[2:])
            else:
                out.append(a)
            i += 1
        return super().parse_args(ctx, out)


def helper_args(argv: Sequence[str]) -> list[str]:
    """`casfs` arguments for a mount-helper call ``SOURCE MOUNTPOINT [-sfnv] [-o OPTS]...
    [-t TYPE] [-N NS]``: ``["mount", MOUNTPOINT, SOURCE, "-o", OPTS, ...]``. ``-s``
    (sloppy), ``-n`` (no mtab) and ``-v`` are accepted and ignored; ``-f`` (fake) gives
    ``[]`` (nothing to do). Raises click.UsageError for another type or ``-N``."""
    if len(argv) < 2:
        raise click.UsageError("usage: mount.fuse.casfs VOLUME MOUNTPOINT [-o OPTIONS]")
    source, mountpoint, rest = argv[0], argv[1], list(argv[2:])
    source = source.removeprefix("casfs#")   # the old "-t fuse casfs#VOLUME" spelling
    out = ["mount", mountpoint, source]
    fake = False
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("-o", "-t", "-N") and i + 1 == len(rest):
            raise click.UsageError(f"option {a} needs a value")
        if a == "-o":
            out += ["-o", rest[i + 1]]
            i += 2
        elif a == "-t":
            if rest[i + 1] not in (FSTYPE, "casfs", "fuse"):
                raise click.UsageError(f"type {rest[i + 1]!r} is not {FSTYPE}")
            i += 2
        elif a == "-N":
            raise click.UsageError("mounting into another mount namespace (-N) is not supported")
        elif a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("sfnv"):
            fake = fake or "f" in a
            i += 1
        else:
            raise click.UsageError(f"unexpected argument {a!r}")
    return [] if fake else out


class CasfsMainGroup(CasfsGroup):
    """The `casfs` group, which also answers fuse3's mount.fuse3 convention ``casfs
    SOURCE MOUNTPOINT -o OPTS`` (a first argument that is not a command, followed by a
    second one): it is run as ``casfs mount MOUNTPOINT SOURCE -o OPTS``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if (len(args) >= 2 and args[0] not in self.commands and not args[0].startswith("-")
                and not args[1].startswith("-")):
            args = helper_args(args)
            if not args:
                ctx.exit(0)
        return super().parse_args(ctx, args)


def mount_helper() -> None:
    """Console script ``mount.fuse.casfs``: mount(8)'s helper for type fuse.casfs (link
    it as /sbin/mount.fuse.casfs). Exit status as `casfs mount`."""
    from tools.cli import main
    try:
        args = helper_args(sys.argv[1:])
    except click.UsageError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    if args:
        main(args=args, prog_name="mount.fuse.casfs")


def umount_helper() -> None:
    """Console script ``umount.fuse.casfs``: umount(8)'s helper for type fuse.casfs (link
    it as /sbin/umount.fuse.casfs), called ``MOUNTPOINT [-nlfvr] [-t TYPE] [-N NS]``:
    runs `casfs umount MOUNTPOINT` (commit everything, then unmount). -n, -v are
    ignored; -l, -f and -r are refused (a lazy or forced unmount cannot commit first:
    use fusermount3 -u -z)."""
    from tools.cli import main
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        click.echo("usage: umount.fuse.casfs MOUNTPOINT", err=True)
        sys.exit(2)
    for a in argv[1:]:
        if a.startswith("-") and set(a[1:]) & set("lfr"):
            click.echo(f"umount.fuse.casfs: {a} is not supported: casfs commits before unmounting "
                       "(use fusermount3 -u -z for a lazy unmount)", err=True)
            sys.exit(2)
    main(args=["umount", argv[0]], prog_name="umount.fuse.casfs")
