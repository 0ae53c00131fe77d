"""The data engine's presets end to end (configs/phases/phase{1,2,3}.yaml) on one clip with SEEDED RANDOM
WEIGHTS (SAM 2.1 tiny, SAM 1 vit_b at 64 px): whatever each phase found, its tables and arrays agree with
each other as a plain run's do (tests/test_end_to_end.py's checks), masklets say where they came from, and
each masklet's rows cover exactly the frames it was tracked on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline import open_run
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
SOURCES = {1: {"sam1"}, 2: {"sam1", "reseed"}, 3: {"amg", "reseed"}}  # phase_runs re-seeds in 2 and 3


def test_the_presets_load_and_say_what_they_run():
    p1, p2, p3 = (load_config(str(REPO / "configs" / "phases" / f"phase{k}.yaml"), []) for k in (1, 2, 3))
    assert (p1.prompt.generator, p1.prompt.every_frame, p1.propagate.enabled) == ("sam1", True, False)
    assert (p2.prompt.generator, p2.prompt.every_frame, p2.propagate.enabled) == ("sam1", False, True)
    assert (p3.prompt.generator, p3.propagate.enabled, p3.propagate.reverse) == ("sam2", True, True)
    assert p3.prompt.reseed_every and not p2.prompt.reseed_every
    # overridable as usual
    assert load_config(str(REPO / "configs" / "phases" / "phase1.yaml"), ["sam1.name=vit_h"]).sam1.name == "vit_h"


@pytest.mark.parametrize("phase", [1, 2, 3])
def test_each_phase_writes_consistent_tables_and_arrays(phase_runs, phase):
    run = open_run(Path(phase_runs) / f"phase{phase}")
    assert run.random_weights
    items = run.items.to_pylist()
    assert items and all(r["status"] == "done" for r in items), [r["error"] for r in items]
    for item in items:
        masks = run.masks(item["item_id"])[:]
        ms = run.masklets.filter(pc.equal(run.masklets["item_id"], item["item_id"])).to_pylist()
        assert masks.shape == (len(ms), item["num_frames"], item["height"], item["width"])
        assert item["num_objects"] == len(ms)
        assert [m["object_id"] for m in ms] == list(range(len(ms)))
        assert {m["prompt_source"] for m in ms} <= SOURCES[phase]
        frames = run.frames.filter(pc.equal(run.frames["item_id"], item["item_id"])).to_pylist()
        by_object: dict[int, list[int]] = {}
        for r in frames:
            m = masks[r["object_id"], r["frame"]]
            assert r["area"] == int(m.sum())
            by_object.setdefault(r["object_id"], []).append(r["frame"])
        for m in ms:
            o = m["object_id"]
            tracked = sorted(by_object.get(o, []))
            assert tracked == list(range(tracked[0], tracked[-1] + 1)), f"masklet {o}: rows on a contiguous span"
            assert tracked[0] <= m["prompt_frame"]  # from its seed (or earlier: tracked backwards)
            end = m["dropped_frame"] if m["dropped_frame"] is not None else item["num_frames"] - 1
            assert tracked[-1] == end
            outside = np.ones(item["num_frames"], dtype=bool)
            outside[tracked[0]:tracked[-1] + 1] = False
            assert not masks[o, outside].any(), f"masklet {o}: masks outside the frames it was tracked on"
            visible = [t for t in range(item["num_frames"]) if masks[o, t].any()]
            assert m["frames_visible"] == len(visible)
            assert m["first_frame"] == (visible[0] if visible else -1)
            if m["prompt_source"] != "reseed":
                assert tracked[0] == m["prompt_frame"]
            if phase == 1:
                assert m["first_frame"] == m["prompt_frame"]  # linking starts a masklet where it is seen


def test_phase_one_masks_are_the_generators_masks_on_every_frame(phase_runs):
    """Phase 1 runs no tracker: every stored mask is empty or one the generator made on that frame, so no
    two masklets share a frame's mask and object scores are NaN (SAM 1 has no presence logit)."""
    run = open_run(Path(phase_runs) / "phase1")
    for item in run.items.to_pylist():
        masks = run.masks(item["item_id"])[:]
        for t in range(masks.shape[1]):
            planes = [masks[o, t] for o in range(masks.shape[0]) if masks[o, t].any()]
            for i in range(len(planes)):
                for j in range(i + 1, len(planes)):
                    assert not np.array_equal(planes[i], planes[j])
    scores = run.frames["object_score"].to_numpy(zero_copy_only=False)
    assert np.isnan(scores).all()
