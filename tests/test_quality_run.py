"""Quality signals in a real run (random weights: plumbing, not results): computed by the worker from the masks
in memory, they equal the same accumulator fed afterwards from the stored Zarr masks; flags follow the run's
qa.* thresholds; `masklet qa --set` re-flags a finished run, changing only flags and review priority."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline import open_run
from pipeline.cli import main
from pipeline.plan import config_fingerprint, load_run
from pipeline.quality.flags import FLAG_NAMES, QAConfig, flag_masklets
from pipeline.quality.signals import MASKLET_SIGNALS_SCHEMA, MaskletSignals, PromptSignals
from pipeline.samples import make_image, make_video
from pipeline.store.lease import acquire


@pytest.fixture(scope="module")
def signal_run(tmp_path_factory, demo_config, fast_overrides):
    root = tmp_path_factory.mktemp("quality")
    media = root / "media"
    make_video(media / "clip.mp4", frames=9, width=160, height=120, seed=11)
    make_image(media / "photo.jpg", width=128, height=96, seed=12)
    manifest = root / "manifest.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    out = root / "run"
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides]) == 0
    return out


def _signals_from_zarr(res, item_id: str) -> MaskletSignals:
    """The accumulator fed again, after the run, from what the run stored: its masks and object scores."""
    masks = res.masks(item_id)[:]
    ml = res.masklets_for(item_id).sort_by("object_id").to_pylist()
    frames = res.frames_for(item_id).sort_by([("frame", "ascending"), ("object_id", "ascending")])
    prompts = [PromptSignals(r["object_id"], r["prompt_frame"], r["predicted_iou"], r["stability_score"],
                             r["prompt_area"]) for r in ml]
    acc = MaskletSignals(prompts, masks.shape[2], masks.shape[3])
    ids = [r["object_id"] for r in ml]
    scores = np.asarray(frames.column("object_score").to_numpy(zero_copy_only=False), dtype=np.float32)
    for t in range(masks.shape[1]):
        acc.add(t, ids, masks[ids, t], scores[t * len(ids):(t + 1) * len(ids)])
    return acc


def test_worker_signals_equal_the_accumulator_fed_from_the_stored_masks(signal_run):
    res = open_run(signal_run)
    items = {r["item_id"]: r for r in res.items.to_pylist()}
    assert len(items) == 2 and all(r["status"] == "done" for r in items.values())
    for item_id, item in items.items():
        assert item["num_objects"] >= 1, "the demo settings keep at least one object"
        again = _signals_from_zarr(res, item_id).finish()
        stored = res.masklets_for(item_id).sort_by("object_id")
        names = [n for n in MASKLET_SIGNALS_SCHEMA.names]
        assert stored.select(names).to_pylist() == again.masklets.select(names).to_pylist(), item_id
        cov = again.item.to_pylist()[0]
        assert (item["coverage_mean"], item["coverage_min"]) == (cov["coverage_mean"], cov["coverage_min"])
        assert 0 < item["seconds_signals"] <= item["seconds_write"] + item["seconds_total"]
        frames = res.frames_for(item_id).sort_by([("frame", "ascending"), ("object_id", "ascending")])
        for name in ("area_share", "perimeter", "complexity", "components", "holes", "touches_border", "iou_prev"):
            assert frames.column(name).to_pylist() == again.frames.column(name).to_pylist(), (item_id, name)
        flagged = flag_masklets(stored.drop_columns(["flags", "review_priority"]), QAConfig())
        assert stored.column("flags").to_pylist() == flagged.column("flags").to_pylist()
        assert stored.column("review_priority").to_pylist() == flagged.column("review_priority").to_pylist()


def test_reflag_changes_flags_only_and_keeps_the_fingerprint(signal_run, capsys, tmp_path):
    before = open_run(signal_run).masklets.sort_by([("item_id", "ascending"), ("object_id", "ascending")])
    fingerprint = config_fingerprint(load_run(signal_run).config)
    # Thresholds every masklet crosses: each gets `low_score`, each visible one `tiny` and `fragmented` too
    # (a never-visible masklet has no area or components: null signals fire no flag).
    assert main(["qa", str(signal_run), "--set", "qa.tiny_area=1.0", "qa.huge_area=1.0",
                 "qa.fragmented_components=1", "qa.low_score=1.0"]) == 0
    text = capsys.readouterr().out
    assert f"re-flagged {before.num_rows} masklets" in text and "qa.fragmented_components=1.0" in text
    after = open_run(signal_run).masklets.sort_by([("item_id", "ascending"), ("object_id", "ascending")])
    keep = [n for n in before.column_names if n not in ("flags", "review_priority")]
    assert after.select(keep).equals(before.select(keep)), "re-flagging must not touch a signal"
    visible = pc.greater(after["frames_visible"], 0).to_pylist()
    for flags, vis in zip(after.column("flags").to_pylist(), visible):
        assert "low_score" in flags and ("tiny" in flags) == vis and ("fragmented" in flags) == vis, flags
    assert any(visible), "the run should hold a visible masklet"
    assert after.column("flags").to_pylist() != before.column("flags").to_pylist()
    assert config_fingerprint(load_run(signal_run).config) == fingerprint
    assert json.loads((signal_run / "qa.json").read_text())["fragmented_components"] == 1.0
    # Back to the defaults: the first flags come back exactly.
    defaults = [f"qa.{k}={v}" for k, v in vars(QAConfig()).items()]
    assert main(["qa", str(signal_run), "--set", *[d.lower() for d in defaults]]) == 0
    back = open_run(signal_run).masklets.sort_by([("item_id", "ascending"), ("object_id", "ascending")])
    assert back.equals(before)
    assert set(FLAG_NAMES) >= {f for row in back.column("flags").to_pylist() for f in row}


def test_reflag_refuses_other_keys_and_shards_in_flight(signal_run, capsys):
    assert main(["qa", str(signal_run), "--set", "prompt.points_per_side=8"]) == 2
    assert "changes only qa.* keys" in capsys.readouterr().err
    assert main(["qa", str(signal_run), "--set", "qa.low_score=2"]) == 2
    assert "qa.low_score=2.0 is out of range" in capsys.readouterr().err
    before = (signal_run / "qa.json").read_bytes() if (signal_run / "qa.json").exists() else None
    lease = acquire(load_run(signal_run).paths, 0)  # a live worker owns shard 0
    try:
        assert main(["qa", str(signal_run), "--set", "qa.low_score=0.5"]) == 2
        assert "being worked on now" in capsys.readouterr().err
    finally:
        lease.release()
    after = (signal_run / "qa.json").read_bytes() if (signal_run / "qa.json").exists() else None
    assert after == before, "a refused re-flag writes nothing"
    assert main(["qa", str(signal_run)]) == 0
    assert "thresholds in force: qa.tiny_area=" in capsys.readouterr().out


def test_a_run_from_before_the_signals_still_opens_and_is_not_reflagged(signal_run, tmp_path, capsys):
    """Committed files without the signal columns (a run made by an earlier version) read as nulls."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.quality.signals import MASKLET_SIGNALS_SCHEMA as SIG
    from pipeline.store.metadata import MASKLETS_SCHEMA

    old = tmp_path / "old"
    shutil.copytree(signal_run, old)
    (old / "qa.json").unlink(missing_ok=True)
    files = sorted(old.glob("meta/shard-*/*/masklets.parquet"))
    assert files
    drop = [n for n in (*SIG.names, "flags", "review_priority") if n not in
            ("object_id", "predicted_iou", "stability_score", "frames_visible")]
    for f in files:
        pq.write_table(pq.read_table(f).drop_columns(drop), f)
    masklets = open_run(old).masklets
    assert masklets.select(MASKLETS_SCHEMA.names).schema.equals(MASKLETS_SCHEMA) and masklets.num_rows > 0
    assert masklets.column("iou_mean").null_count == masklets.num_rows
    assert main(["qa", str(old), "--set", "qa.low_score=0.5"]) == 2
    assert "has no quality signals" in capsys.readouterr().err
