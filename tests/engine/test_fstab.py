"""The mount-helper calling conventions and -o option translation (tools/cli/fstab.py,
docs/mounting.md), without a mount."""
from __future__ import annotations

from pathlib import Path

import click
import pytest

from tools.cli import main, mount
from tools.cli.fstab import expand_options, helper_args, kernel_flags


def test_options_translate_to_mount_arguments() -> None:
    # what mount.fuse3 passes for "-o noatime,_netdev,durability=immediate,local_limit=2G"
    got = expand_options(mount, "rw,noatime,durability=immediate,local_limit=2G,allow_other,dev,suid")
    assert got == ["--fuse-option", "rw", "--fuse-option", "noatime", "--durability", "immediate",
                   "--local-limit", "2G", "--allow-other", "--fuse-option", "dev", "--fuse-option", "suid"]
    # fstab- and systemd-only options, and atime variants libfuse cannot pass: ignored
    assert expand_options(mount, "defaults,_netdev,nofail,noauto,x-systemd.automount,comment=x,"
                                 "relatime,nodiratime,default_permissions") == []
    assert expand_options(mount, "cache-size=1G") == ["--cache-size", "1G"]


@pytest.mark.parametrize("opts, message", [
    ("bogus", "unknown mount option 'bogus'"),
    ("fsname=x", "unknown mount option"),
    ("foreground", "unknown mount option"),        # would never return to mount(8)
    ("durability", "needs a value"),
    ("allow_other=1", "takes no value"),
])
def test_bad_options_are_usage_errors(opts: str, message: str) -> None:
    with pytest.raises(click.UsageError, match=message):
        expand_options(mount, opts)


def test_opposite_kernel_flags_later_wins() -> None:
    assert kernel_flags(["rw", "dev", "suid", "nodev", "ro", "nosuid"]) == ("nodev", "ro", "nosuid")


def test_helper_calling_conventions() -> None:
    # mount.fuse3: casfs SOURCE MOUNTPOINT -o OPTS; mount(8) with /sbin/mount.fuse.casfs
    assert helper_args(["vol", "/mnt", "-o", "rw,dev"]) == ["mount", "/mnt", "vol", "-o", "rw,dev"]
    assert helper_args(["/v/x", "/mnt", "-s", "-n", "-v", "-o", "ro", "-t", "fuse.casfs"]) == \
        ["mount", "/mnt", "/v/x", "-o", "ro"]
    assert helper_args(["casfs#vol", "/mnt"]) == ["mount", "/mnt", "vol"]
    assert helper_args(["vol", "/mnt", "-f", "-o", "rw"]) == []   # fake: nothing to do
    with pytest.raises(click.UsageError, match="not fuse.casfs"):
        helper_args(["vol", "/mnt", "-t", "fuse.sshfs"])
    with pytest.raises(click.UsageError, match="namespace"):
        helper_args(["vol", "/mnt", "-N", "/proc/1/ns/mnt"])


def test_casfs_routes_only_non_commands_to_the_helper(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    # "casfs VOLUME MOUNTPOINT -o OPTS" is `casfs mount`: it checks the mountpoint
    with pytest.raises(click.ClickException, match="mountpoint .*nowhere does not exist"):
        main(["vol", missing, "-o", "rw,noatime"], standalone_mode=False)
    with pytest.raises(click.UsageError, match="unknown mount option"):
        main(["vol", missing, "-o", "bogus"], standalone_mode=False)
    with pytest.raises(click.UsageError, match="No such command"):
        main(["nosuchcommand"], standalone_mode=False)
