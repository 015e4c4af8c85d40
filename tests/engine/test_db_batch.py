"""The metadata layer's batching helper (cas/db/batch.py)."""
from __future__ import annotations

import pytest

from cas.db.batch import BATCH_ROWS, batches, values


def test_batches_cover_every_item_once_in_order() -> None:
    items = list(range(2 * BATCH_ROWS + 7))
    got = list(batches(items))
    assert [len(b) for b in got] == [BATCH_ROWS, BATCH_ROWS, 7]
    assert [x for b in got for x in b] == items
    assert list(batches([])) == []
    with pytest.raises(ValueError):
        list(batches(items, 0))


def test_values_list_and_flat_parameters() -> None:
    sql, params = values([(1, b"a"), (2, b"b")])
    assert sql == "(%s,%s),(%s,%s)"
    assert params == [1, b"a", 2, b"b"]
    with pytest.raises(ValueError):
        values([(1, 2), (3,)])
    with pytest.raises(ValueError):
        values([])
