"""The volume: its directory and volume.toml, its master key, its audit log."""
