"""volume.toml's [audit] table (cas.config.audit.AuditConfig): values that would make the log
misbehave are one-line VolumeErrors, not a log that grows without bound."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cas.config.audit import DEFAULT_BACKUPS, AuditConfig
from cas.errors import VolumeError
from cas.config.volume import create_volume_dir


def test_backups_zero_is_refused(tmp_path: Path) -> None:
    vol = create_volume_dir(str(tmp_path / "vol"), 64 << 10, "zstd:3", "mysql://root@localhost/none")
    assert AuditConfig.from_volume(vol).backups == DEFAULT_BACKUPS
    ok = dataclasses.replace(vol, audit={"backups": 1, "max_bytes": 0})
    assert AuditConfig.from_volume(ok).backups == 1
    for bad in ({"backups": 0}, {"backups": -1}, {"max_bytes": -5}, {"level": "most"}, {"rotate": 1}):
        with pytest.raises(VolumeError) as ei:
            AuditConfig.from_volume(dataclasses.replace(vol, audit=bad))
        msg = str(ei.value)
        assert "\n" not in msg and ("[audit]" in msg or "audit level" in msg), msg
