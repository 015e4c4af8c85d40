"""The one batching helper of the metadata layer.

Multi-row statements (``IN (...)`` lists, multi-row ``VALUES``) are cut into batches of
at most :data:`BATCH_ROWS` rows: large enough that a 10,000-file flush costs 20 round
trips, small enough that one statement stays far below MySQL's ``max_allowed_packet``
(a row is at most a few hundred bytes: 500 rows < 1 MiB against the 16 MiB default of
MariaDB 10.6 and 64 MiB of MySQL 8).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

BATCH_ROWS = 500


def batches(items: Sequence[T], n: int = BATCH_ROWS) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items``, each of at most ``n`` (> 0) items; none when
    ``items`` is empty."""
    if n <= 0:
        raise ValueError(f"batch size must be positive, not {n}")
    for i in range(0, len(items), n):
        yield items[i:i + n]


def values(rows: Sequence[Sequence[object]]) -> tuple[str, list[object]]:
    """The ``VALUES`` list of a multi-row INSERT/REPLACE and its flat parameters:
    ``[(1, b"a"), (2, b"b")]`` -> ``("(%s,%s),(%s,%s)", [1, b"a", 2, b"b"])``.

    All rows must have the same, non-zero width; raises ValueError otherwise (a
    statement with a ragged VALUES list would fail in the server, later and less
    clearly)."""
    if not rows:
        raise ValueError("no rows")
    width = len(rows[0])
    if width == 0 or any(len(r) != width for r in rows):
        raise ValueError("rows of different or zero width")
    one = "(" + ",".join(["%s"] * width) + ")"
    return ",".join([one] * len(rows)), [v for r in rows for v in r]
