"""Comparing two run folders: same masks, same rows (timings and commit times aside), nothing duplicated."""
from __future__ import annotations

import numpy as np

from pipeline import open_run

VOLATILE = {"seconds_decode", "seconds_prompt", "seconds_propagate", "seconds_write", "seconds_signals", "seconds_total",
            "finished_at", "device", "attempts"}


def _rows(table, keys):
    rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in table.to_pylist()]
    return sorted(rows, key=lambda r: tuple(r[k] for k in keys))


def assert_same_outputs(out_a, out_b) -> None:
    a, b = open_run(out_a), open_run(out_b)
    for name, keys in (("items", ["item_id"]), ("masklets", ["item_id", "object_id"]),
                       ("frames", ["item_id", "object_id", "frame"])):
        ta, tb = getattr(a, name), getattr(b, name)
        key_rows = [tuple(r[k] for k in keys) for r in ta.select(keys).to_pylist()]
        assert len(key_rows) == len(set(key_rows)), f"{out_a}: duplicate {name} rows"
        key_rows_b = [tuple(r[k] for k in keys) for r in tb.select(keys).to_pylist()]
        assert len(key_rows_b) == len(set(key_rows_b)), f"{out_b}: duplicate {name} rows"
        assert _rows(ta, keys) == _rows(tb, keys), f"{name} rows differ between {out_a} and {out_b}"
    for item_id in a.item_ids():
        np.testing.assert_array_equal(a.masks(item_id)[:], b.masks(item_id)[:], err_msg=f"masks of {item_id}")
