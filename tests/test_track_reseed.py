"""Objects that join tracking on later frames (`track(..., reseed=...)`), objects dropped mid-video
(`Tracking.drop`), snapshots across both, and tracking backwards (`track_backward`) against sam2's reverse
propagation. Random weights: the masks prove plumbing and exactness, not quality."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.records import FrameMasks, Prompt
from pipeline.samples import make_frame_folder
from pipeline.stages.models import MODEL_SPECS, load_model, patched_method
from pipeline.stages.track import TrackerState, TrackOptions, track, track_backward
from tests.conftest import IMAGE_SIZE, THREADS
from tests.test_track import HEIGHT, WIDTH, _CountingFrames, _prompts

FRAMES = 18  # past the model's 16 object pointers: the added objects' states are pruned too


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return make_frame_folder(tmp_path_factory.mktemp("reseed") / "clip", frames=FRAMES, width=WIDTH, height=HEIGHT,
                             ext="jpg", seed=7)


@pytest.fixture(scope="module")
def model(random_checkpoint):
    return load_model(ModelConfig(checkpoint=random_checkpoint, image_size=IMAGE_SIZE, device="cpu",
                                  threads=THREADS))


def _at(prompts: list[Prompt], frame: int) -> list[Prompt]:
    return [Prompt(**{**p.__dict__, "frame": frame}) for p in prompts]


class _Reseed:
    """A reseed callback that returns `adds[t]` on frame t and records what it was shown."""

    def __init__(self, adds: dict[int, list[Prompt]]):
        self.adds = adds
        self.seen: list[FrameMasks] = []

    def __call__(self, fm: FrameMasks) -> list[Prompt]:
        assert not torch.is_inference_mode_enabled(), "the caller's code runs outside the engine's inference_mode"
        self.seen.append(fm)
        return list(self.adds.get(fm.frame, []))


def _run(model, clip, prompts, object_batch, reseed=None, drops=None, stop_after=None, resume=None):
    """FrameMasks by frame; `drops[t]`: ids dropped after frame t is yielded; with `stop_after`, also the
    snapshot taken after that frame (through torch.save / torch.load, as the worker stores it)."""
    stream = track(model, _CountingFrames(clip), FRAMES, HEIGHT, WIDTH, prompts, list(range(FRAMES)),
                   TrackOptions(object_batch=object_batch), resume=resume, reseed=reseed)
    got, saved = {}, None
    for fm in stream:
        got[fm.frame] = fm
        for_drop = (drops or {}).get(fm.frame)
        if for_drop:
            stream.drop(for_drop)
        if fm.frame == stop_after:
            saved = stream.snapshot()
            break
    stream.close()
    return got, stream.stats, saved


def _assert_same(got: dict, want: dict, frames, objects=None):
    for t in frames:
        a, b = got[t], want[t]
        idx = slice(None) if objects is None else [b.object_ids.index(o) for o in objects]
        a_idx = slice(None) if objects is None else [a.object_ids.index(o) for o in objects]
        np.testing.assert_array_equal(a.masks[a_idx], b.masks[idx], err_msg=f"masks, frame {t}")
        np.testing.assert_array_equal(a.object_scores[a_idx], b.object_scores[idx], err_msg=f"scores, frame {t}")


# initial objects 10, 11 on frame 0 and 12 on frame 3; the callback adds 13, 14, 15 on frame 3 (13 joins 12's
# batch when object_batch=2) and 16 on frame 7
SHAPES = _prompts([0, 0, 3, 3, 3, 3, 7])
INITIAL, ADDS = SHAPES[:3], {3: SHAPES[3:6], 7: SHAPES[6:]}


@pytest.mark.parametrize("object_batch", [1, 2])
def test_objects_added_during_tracking_equal_objects_given_up_front(model, clip, object_batch):
    want, want_stats, _ = _run(model, clip, SHAPES, object_batch)
    reseed = _Reseed(ADDS)
    got, stats, _ = _run(model, clip, INITIAL, object_batch, reseed=reseed)
    assert sorted(got) == sorted(want) == list(range(FRAMES))
    assert all(fm.object_ids == tuple(p.object_id for p in SHAPES) for t, fm in got.items() if t >= 7)
    assert got[3].object_ids == (10, 11, 12, 13, 14, 15) and got[2].object_ids == (10, 11, 12)
    for t in range(FRAMES):
        n = len(got[t].object_ids)
        np.testing.assert_array_equal(got[t].masks, want[t].masks[:n], err_msg=f"masks, frame {t}")
        np.testing.assert_array_equal(got[t].object_scores, want[t].object_scores[:n], err_msg=f"scores, frame {t}")
    assert 0.05 < np.mean([fm.masks.mean() for fm in want.values()]) < 0.95, "empty or full masks prove nothing"
    # the callback saw every frame once, with the objects tracked before it, the very masks yielded
    assert [fm.frame for fm in reseed.seen] == list(range(FRAMES))
    assert reseed.seen[3].object_ids == (10, 11, 12) and reseed.seen[7].object_ids == (10, 11, 12, 13, 14, 15)
    np.testing.assert_array_equal(reseed.seen[3].masks, got[3].masks[:3])
    assert (stats.objects, stats.batches, stats.object_batch) == (want_stats.objects, want_stats.batches,
                                                                  want_stats.object_batch)


def test_tracking_can_start_with_no_objects_and_wait_for_the_callback(model, clip):
    want, _, _ = _run(model, clip, _at(SHAPES[3:6], 3), 1)
    got, _, _ = _run(model, clip, [], 1, reseed=_Reseed({3: SHAPES[3:6]}))
    assert [got[t].object_ids for t in range(3)] == [()] * 3 and got[0].masks.shape == (0, HEIGHT, WIDTH)
    _assert_same(got, want, range(3, FRAMES))


def test_bad_additions_are_refused(model, clip):
    for adds, match in [({2: _at(SHAPES[3:4], 4)}, "on other frames"), ({2: _at(SHAPES[:1], 2)}, "not used before"),
                        ({2: _at([SHAPES[3], SHAPES[3]], 2)}, "appear twice")]:
        with pytest.raises(ValueError, match=match):
            _run(model, clip, INITIAL[:1], 1, reseed=_Reseed(adds))


def _count_model_calls(model):
    calls = []

    def counting(own):
        def run(*args, **kwargs):
            calls.append(kwargs["frame_idx"])
            return own(*args, **kwargs)
        return run
    return calls, patched_method(model.predictor, "_run_single_frame_inference", counting)


@pytest.mark.parametrize("object_batch", [1, 2])
def test_dropped_objects_leave_the_others_exactly_as_they_were(model, clip, object_batch):
    """Dropped after frame 5: empty masks and NaN scores from frame 6 on, the same layout, no compute for a
    batch whose objects are all dropped. The others keep their bits: at object_batch=1 they equal a run that never
    had the dropped objects (batches are independent; memory attention's shared first self-attention reads only
    the frame's features); at object_batch=2 the dropped member of a batch is still computed beside the others
    (masked out, not sliced out), so they equal the run without the drop."""
    prompts = _at(SHAPES[:4], 0)  # object_batch=2: batches (10, 11) and (12, 13)
    dropped = [11, 12, 13]  # 10's batch keeps computing 11; (12, 13) goes
    full, _, _ = _run(model, clip, prompts, object_batch)
    calls, counting = _count_model_calls(model)
    with counting:
        got, stats, _ = _run(model, clip, prompts, object_batch, drops={5: dropped})
    per_frame = {t: calls.count(t) for t in range(1, FRAMES)}
    # afterwards one batch computes: (10) at object_batch=1, (10, 11) at 2
    assert per_frame == {t: (4 // object_batch if t <= 5 else 1) for t in per_frame}
    assert stats.batches == 1
    _assert_same(got, full, range(6))
    for t in range(6, FRAMES):
        assert got[t].object_ids == (10, 11, 12, 13)
        assert not got[t].masks[1:].any() and np.isnan(got[t].object_scores[1:]).all()
    _assert_same(got, full, range(6, FRAMES), objects=[10])
    if object_batch == 1:
        alone, _, _ = _run(model, clip, prompts[:1], 1)
        _assert_same(got, alone, range(FRAMES), objects=[10])
    with pytest.raises(ValueError, match="not tracked"):
        stream = track(model, _CountingFrames(clip), FRAMES, HEIGHT, WIDTH, prompts, list(range(FRAMES)))
        stream.drop([99])


def _through_disk(state: TrackerState, path: Path) -> TrackerState:
    torch.save(state.payload(), path)
    return TrackerState.from_payload(torch.load(path, weights_only=True, map_location="cpu"))


def test_resuming_after_additions_and_drops_gives_the_same_masks(model, clip, tmp_path):
    """Objects added on frames 3 and 12, two dropped after frame 6 (one from each two-object batch), snapshot after
    frame 9; resumed with the first run's prompts plus those added before the snapshot, and the same callback
    (which adds the frame-12 object again) and another drop after frame 14: every later frame is the same."""
    prompts, adds = _at(SHAPES[:2], 0), {3: _at(SHAPES[2:4], 3), 12: _at(SHAPES[4:5], 12)}
    drops = {6: [11, 13], 14: [12]}
    want, _, _ = _run(model, clip, prompts, 2, reseed=_Reseed(adds), drops=drops)
    _, _, saved = _run(model, clip, prompts, 2, reseed=_Reseed(adds), drops=drops, stop_after=9)
    saved = _through_disk(saved, tmp_path / "state.pt")
    assert saved.next_frame == 10 and saved.object_ids == [10, 11, 12, 13]
    assert saved.dropped == {11: 7, 13: 7} and saved.object_batch == 2
    got, _, _ = _run(model, clip, prompts + adds[3], 2, reseed=_Reseed(adds), drops=drops, resume=saved)
    assert sorted(got) == list(range(10, FRAMES))
    assert got[FRAMES - 1].object_ids == (10, 11, 12, 13, 14)
    _assert_same(got, want, range(10, FRAMES))
    assert not got[FRAMES - 1].masks[1:4].any() and got[FRAMES - 1].masks[[0, 4]].any()
    with pytest.raises(ValueError, match="in the order they were added"):
        track(model, iter(()), FRAMES, HEIGHT, WIDTH, prompts, list(range(FRAMES)), resume=saved)


SEED = 10  # fewer frames before it than the model's 16 object pointers: model_frames matters


def _sam2_reverse(folder: str, checkpoint: str, prompts: list[Prompt]):
    """sam2's own reverse propagation from a fresh state: masks and scores by frame, SEED down to 0."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.set_num_threads(THREADS)
    predictor = build_sam2_video_predictor(MODEL_SPECS["sam2.1_hiera_tiny"].config_file, checkpoint, device="cpu",
                                           hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"])
    predictor.fill_hole_area = 0
    assert predictor.memory_temporal_stride_for_eval == 1
    state = predictor.init_state(video_path=folder)
    for p in prompts:
        predictor.add_new_mask(state, frame_idx=p.frame, obj_id=p.object_id, mask=p.mask)
    out = {}
    with torch.inference_mode():
        for t, obj_ids, masks in predictor.propagate_in_video(state, start_frame_idx=SEED, reverse=True):
            scores = []
            for i in range(len(obj_ids)):
                per_obj = state["output_dict_per_obj"][i]
                o = per_obj["cond_frame_outputs"].get(t) or per_obj["non_cond_frame_outputs"][t]
                scores.append(float(o["object_score_logits"].flatten()[0]))
            out[t] = ((masks[:, 0] > 0.0).numpy(), np.asarray(scores, dtype=np.float32))
    return out


def _reversed_frames(folder: str):
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))[:SEED + 1]
    for name in reversed(names):
        yield np.array(Image.open(os.path.join(folder, name)).convert("RGB"))


def test_tracking_backwards_equals_sam2s_reverse_propagation(model, clip, random_checkpoint):
    prompts = _at(SHAPES[:2], SEED)
    plain = _sam2_reverse(clip, random_checkpoint, prompts)
    assert sorted(plain) == list(range(SEED + 1))
    got = list(track_backward(model, _reversed_frames(clip), SEED, HEIGHT, WIDTH, prompts, list(range(FRAMES)),
                              FRAMES, TrackOptions(object_batch=1)))
    assert [fm.frame for fm in got] == list(range(SEED - 1, -1, -1))
    assert [fm.source_frame for fm in got] == [fm.frame for fm in got]
    for fm in got:
        np.testing.assert_array_equal(fm.masks, plain[fm.frame][0], err_msg=f"masks, frame {fm.frame}")
        np.testing.assert_array_equal(fm.object_scores, plain[fm.frame][1], err_msg=f"scores, frame {fm.frame}")
    assert np.mean([fm.masks.mean() for fm in got]) > 0.01
    # The model must be told the item's length: with only the SEED + 1 frames it reads, sam2's pointer horizon
    # min(num_frames, 16) and so the pointers' temporal encodings differ.
    short = list(track(model, _reversed_frames(clip), SEED + 1, HEIGHT, WIDTH, _at(prompts, 0),
                       list(range(SEED + 1)), TrackOptions(object_batch=1)))
    assert any(not np.array_equal(fm.object_scores, plain[SEED - fm.frame][1]) for fm in short[1:])
