"""masklet refine: corrections replayed with SAM 2 into masklet versions; readers, exports and resume."""
from __future__ import annotations

import shutil

import pytest

from pipeline.review import store, versions
from pipeline.review.refine import (
    pending_masklets,
    refine_masklet,
)
from pipeline.review.store import ReviewSession


@pytest.fixture()
def run_copy(small_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    return str(out)


def _clip(out):
    from pipeline import open_run

    run = open_run(out, versions="original")
    items = [i for i in run.item_ids() if i.endswith(".mp4")]
    return run, items[0]


def test_refine_one_masklet_writes_a_manual_version(run_copy):
    run, item = _clip(run_copy)
    arr = run.masks(item)
    s = ReviewSession(run_copy, "ann")
    h, w = arr.shape[2:]
    cid = s.correct(item, 0, 2, [(w / 2, h / 2)], [1], candidate=1)
    assert pending_masklets(run_copy) == [(item, 0)]
    seen = []
    v = refine_masklet(run_copy, item, 0, progress=lambda *a: seen.append(a))
    assert v == 1 and seen
    assert pending_masklets(run_copy) == []
    assert store.corrections(run_copy, pending_only=True).num_rows == 0
    row = versions.latest_versions(run_copy).to_pylist()[0]
    assert row["masklet_type"] == "manual" and row["edited_frame_count"] == 1 and row["corrections"] == [cid]
    m = versions.masklet_mask(run_copy, item, 0)
    assert m.shape == arr.shape[1:] and m.dtype == bool
