"""Safety margins of maintenance, named in one place.

DEFAULT_GRACE_S: a chunk whose refcount reached 0 (and an orphan chunk file with no
row) is kept at least this long before gc may delete it. The row-lock protocol of
cas.chunk.manager makes gc safe at any grace, including 0; the grace period keeps recently
dropped data around for writers that are about to reference it again, and bounds how
old an orphan file must be before it is treated as left over from a crash.
"""
from __future__ import annotations

DEFAULT_GRACE_S = 3600.0
