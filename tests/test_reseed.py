"""The re-seed rule exactly (issue 12), with injected generator masks on synthetic frames: no model, no tracker.

Masks are rectangles and discs on 120x160 frames; generator records are built as SAM 2's / segment-anything's
automatic mask generators return them (XYWH bbox with inclusive right/bottom edges). The last tests run a whole
synthetic video (schedule -> new_prompts -> hotstart) in which a stand-in tracker follows each masklet's object.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from pipeline.config import PromptConfig
from pipeline.records import Dropped
from pipeline.stages.prompt import prompts_from_records, select_records
from pipeline.stages.reseed import Hotstart, ReseedSchedule, new_prompts, uncovered_share

H, W = 120, 160


def rect(y0, y1, x0, x1, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return m


def disc(cy, cx, r, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def record(mask: np.ndarray, iou: float = 0.9, stability: float = 0.95) -> dict:
    """A generator record as the AMG returns it (bbox: x, y, last x - first x, last y - first y)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = (int(xs.min()), int(ys.min())) if len(xs) else (0, 0)
    x1, y1 = (int(xs.max()), int(ys.max())) if len(xs) else (0, 0)
    point = [[float(xs[len(xs) // 2]), float(ys[len(ys) // 2])]] if len(xs) else [[0.0, 0.0]]
    return {"segmentation": mask, "area": int(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
            "predicted_iou": iou, "stability_score": stability, "point_coords": point,
            "crop_box": [0, 0, mask.shape[1], mask.shape[0]]}


def cfg(**kw) -> PromptConfig:
    base = dict(min_area=1, max_objects=64, reseed_uncovered=0.8, reseed_min_area=50, reseed_min_area_share=0.0005,
                reseed_nms_iou=0.8, hotstart_frames=15, hotstart_min=8, dup_iou=0.8)
    base.update(kw)
    return PromptConfig(**base)


def stack(*masks) -> np.ndarray:
    return np.stack(masks) if masks else np.zeros((0, H, W), bool)


# --- new_prompts ---------------------------------------------------------------------------------------

def scene():
    """One tracked object A and the generator's candidates on a later frame."""
    a = rect(10, 50, 10, 60)  # tracked
    half = rect(10, 50, 35, 85)  # its left half lies on A: uncovered share 0.5
    new = disc(90, 120, 15)  # an object that entered
    dup = disc(90, 121, 15)  # the same object found again, shifted a pixel (IoU ~0.96), scored lower
    small = rect(100, 105, 10, 18)  # 40 px < reseed_min_area 50
    records = [record(a, 0.95), record(half, 0.9), record(new, 0.92), record(dup, 0.91), record(small, 0.99)]
    return a, records


def test_rule_at_sam_track_threshold():
    a, records = scene()
    result = new_prompts(records, stack(a), cfg(), frame=12, first_id=3, room=10)
    # only the entered object: A itself and the half-covered one are covered, dup loses NMS, small is small
    assert [p.object_id for p in result.prompts] == [3]
    p = result.prompts[0]
    assert np.array_equal(p.mask, records[2]["segmentation"])
    assert (p.source, p.frame, p.area) == ("reseed", 12, int(records[2]["segmentation"].sum()))
    expected = dataclasses.replace(prompts_from_records([records[2]], 12)[0], object_id=3, source="reseed")
    assert (p.point, p.bbox, p.predicted_iou, p.stability_score) == (
        expected.point, expected.bbox, expected.predicted_iou, expected.stability_score)
    assert (result.considered, result.rejected_small, result.rejected_covered, result.rejected_nms,
            result.rejected_cap) == (5, 1, 2, 1, 0)


def test_half_covered_candidate_is_new_at_a_lower_threshold():
    a, records = scene()
    result = new_prompts(records, stack(a), cfg(reseed_uncovered=0.4), frame=12, first_id=3, room=10)
    # best first by predicted IoU x stability: the entered object (0.92) before the half-covered one (0.9)
    assert [np.array_equal(p.mask, records[k]["segmentation"]) for p, k in zip(result.prompts, (2, 1))] == [True] * 2
    assert [p.object_id for p in result.prompts] == [3, 4]
    assert result.rejected_covered == 1  # A itself (uncovered share 0)


def test_exact_uncovered_boundary_is_accepted():
    a = rect(0, 10, 0, 100)  # 1000 px
    cand = rect(0, 50, 0, 100)  # 5000 px, 1000 of them on A: uncovered share exactly 0.8
    result = new_prompts([record(cand)], stack(a), cfg(), frame=5, first_id=0, room=1)
    assert len(result.prompts) == 1
    a2 = rect(0, 11, 0, 100)  # one more row covered: 0.78
    assert new_prompts([record(cand)], stack(a2), cfg(), frame=5, first_id=0, room=1).rejected_covered == 1


def test_cap_keeps_the_best():
    records = [record(disc(30, 30, 12), 0.8), record(disc(30, 100, 12), 0.95), record(disc(90, 60, 12), 0.9)]
    result = new_prompts(records, stack(), cfg(), frame=10, first_id=7, room=2)
    assert [p.predicted_iou for p in result.prompts] == [0.95, 0.9]
    assert [p.object_id for p in result.prompts] == [7, 8]
    assert result.rejected_cap == 1
    full = new_prompts(records, stack(), cfg(), frame=10, first_id=7, room=0)
    assert full.prompts == () and full.rejected_cap == 3


def test_minimum_areas():
    m = rect(0, 10, 0, 10)  # 100 px
    assert new_prompts([record(m)], stack(), cfg(min_area=101), 3, 0, 5).rejected_small == 1
    assert new_prompts([record(m)], stack(), cfg(reseed_min_area=101), 3, 0, 5).rejected_small == 1
    # 100 / 19200 = 0.0052
    assert new_prompts([record(m)], stack(), cfg(reseed_min_area_share=0.006), 3, 0, 5).rejected_small == 1
    assert len(new_prompts([record(m)], stack(), cfg(reseed_min_area_share=0.005), 3, 0, 5).prompts) == 1
    empty = record(np.zeros((H, W), bool))
    assert new_prompts([empty], stack(), cfg(min_area=0, reseed_min_area=0, reseed_min_area_share=0), 3, 0,
                       5).rejected_small == 1


def test_order_is_select_records_order():
    """Ties keep generator order, as in pipeline/stages/prompt.py."""
    masks = [disc(20 + 25 * (k // 5), 15 + 30 * (k % 5), 8) for k in range(15)]
    scores = [0.9, 0.8, 0.9, 0.95, 0.8, 0.7, 0.9, 0.95, 0.85, 0.8, 0.9, 0.7, 0.99, 0.8, 0.9]
    records = [record(m, s, 1.0) for m, s in zip(masks, scores)]
    ours = new_prompts(records, stack(), cfg(), 4, 0, 64).prompts
    theirs = select_records(records, cfg())
    assert len(ours) == len(theirs) == 15
    assert all(p.mask is r["segmentation"] for p, r in zip(ours, theirs))


def test_a_covered_candidate_does_not_suppress_an_uncovered_duplicate():
    """Why the uncovered test runs before NMS: the better-scored candidate is mostly on a tracked mask, its
    near-duplicate is not; the latter is a new object (it overlaps the tracked one on at most 20% of itself)."""
    tracked = rect(0, 60, 0, 33)
    better = rect(0, 60, 20, 80)  # 3600 px, 780 on the tracked mask: uncovered 0.78 -> covered
    worse = rect(0, 60, 27, 80)  # 3180 px, 360 on it: uncovered 0.89; IoU with `better` 0.88 > 0.8
    result = new_prompts([record(better, 0.95), record(worse, 0.9)], stack(tracked), cfg(), 8, 1, 5)
    assert [p.predicted_iou for p in result.prompts] == [0.9]
    assert (result.rejected_covered, result.rejected_nms) == (1, 0)


def test_nms_keeps_the_better_of_a_duplicate_pair_and_distinct_objects():
    a, b = disc(60, 50, 20), disc(60, 51, 20)  # IoU ~0.97
    c = disc(60, 120, 20)
    result = new_prompts([record(b, 0.8), record(a, 0.9), record(c, 0.85)], stack(), cfg(), 8, 0, 5)
    assert [p.predicted_iou for p in result.prompts] == [0.9, 0.85]
    assert result.rejected_nms == 1
    loose = new_prompts([record(b, 0.8), record(a, 0.9)], stack(), cfg(reseed_nms_iou=0.99), 8, 0, 5)
    assert len(loose.prompts) == 2


def test_bad_bbox_hint_falls_back_to_the_mask():
    m = rect(40, 60, 100, 140)
    r = record(m)
    r["bbox"] = [0, 0, 5, 5]  # wrong: the box is computed from the mask instead
    tracked = rect(40, 60, 100, 125)  # 62% of it
    assert new_prompts([r], stack(tracked), cfg(), 3, 0, 5).rejected_covered == 1


def test_fast_at_1080p():
    """64 current masks, 100 candidates at 1920x1080: the union once, boxes everywhere."""
    rng = np.random.default_rng(0)
    shape = (1080, 1920)
    current = np.zeros((64,) + shape, bool)
    for k in range(64):
        y, x = rng.integers(0, 1000), rng.integers(0, 1800)
        current[k, y:y + 80, x:x + 120] = True
    records = []
    for k in range(100):
        y, x, h, w = rng.integers(0, 900), rng.integers(0, 1700), rng.integers(20, 180), rng.integers(20, 220)
        m = rect(y, y + h, x, x + w, shape)
        records.append(record(m, float(rng.uniform(0.7, 1.0))))
    records += [record(rect(10, 90, 10, 90, shape), 0.5) for _ in range(20)]  # 20 duplicates of one mask
    t = time.perf_counter()
    result = new_prompts(records, current, cfg(max_objects=256), 30, 64, room=192)
    elapsed = time.perf_counter() - t
    assert result.considered == len(records) and result.rejected_nms >= 19
    assert len(result.prompts) + result.rejected_small + result.rejected_covered + result.rejected_nms \
        + result.rejected_cap == len(records)
    assert elapsed < 2.0, f"new_prompts took {elapsed:.2f} s at 1080p"


# --- schedule ----------------------------------------------------------------------------------------

def test_schedule_every_k_frames():
    s = ReseedSchedule(cfg(reseed_every=5))
    with pytest.raises(RuntimeError, match="seeded"):
        s.due(5, 0.5)
    s.seeded(0, 0.3)
    due = [f for f in range(1, 23) if s.due(f, 0.9)]
    assert due == [5, 10, 15, 20]
    assert not ReseedSchedule(cfg()).enabled and ReseedSchedule(cfg(reseed_every=5)).enabled


def test_schedule_adaptive():
    s = ReseedSchedule(cfg(reseed_adaptive=0.01))
    s.seeded(0, 0.50)
    assert not s.due(1, 0.505) and not s.due(2, 0.509)
    assert s.due(3, 0.52)
    s.seeded(3, 0.40)  # the new masklets cover more: the baseline drops
    assert s.due(4, 0.415) and not s.due(4, 0.405)
    s.seeded(4, 0.415)  # nothing new found: the baseline is what tracking covers now
    assert not s.due(5, 0.42)
    both = ReseedSchedule(cfg(reseed_every=10, reseed_adaptive=0.05))
    both.seeded(0, 0.2)
    assert [f for f in range(1, 21) if both.due(f, 0.3 if f == 7 else 0.2)] == [7, 10, 20]


def test_schedule_state_round_trips():
    s = ReseedSchedule(cfg(reseed_every=4, reseed_adaptive=0.02))
    s.seeded(0, 0.4)
    s.seeded(6, 0.3)
    t = ReseedSchedule(cfg(reseed_every=4, reseed_adaptive=0.02))
    t.restore(json.loads(json.dumps(s.state())))
    shares = [0.3, 0.31, 0.33, 0.29, 0.5, 0.3]
    expected = [False, True, True, False, True, True]  # 8 and 12 by period, 9 and 11 grew by > 0.02
    assert [s.due(f, x) for f, x in zip(range(7, 13), shares)] == expected
    assert [t.due(f, x) for f, x in zip(range(7, 13), shares)] == expected
    with pytest.raises(ValueError, match="ReseedSchedule state"):
        t.restore({"frame": 1})


# --- hotstart ----------------------------------------------------------------------------------------

OLD = rect(20, 60, 20, 60)  # an older masklet (id 0, first prompting)
ELSEWHERE = rect(80, 110, 100, 150)


def run_hotstart(h: Hotstart, young_masks: dict[int, np.ndarray], frames: range) -> list[Dropped]:
    """Masklet 0 is OLD throughout; masklet 5 (watched, seeded on frame 10) is young_masks.get(f, ELSEWHERE)."""
    out = []
    for f in frames:
        ids, masks = [0], [OLD]
        if f >= 10:
            ids.append(5)
            masks.append(young_masks.get(f, ELSEWHERE))
        out += h.update(f, ids, np.stack(masks))
    return out


def hot(**kw) -> Hotstart:
    h = Hotstart(cfg(**kw))
    h.watch(5, 10)
    return h


def test_duplicate_on_8_of_its_first_15_frames_is_merged():
    dup_frames = [10, 12, 14, 16, 18, 20, 22, 24]  # the 8th on frame 24, the 15th frame of its window
    dropped = run_hotstart(hot(), {f: OLD for f in dup_frames}, range(0, 30))
    assert dropped == [Dropped(5, 24, "duplicate", 0)]


def test_duplicate_on_7_is_kept_and_later_frames_do_not_count():
    dup_frames = [10, 12, 14, 16, 18, 20, 22] + list(range(25, 30))  # after the window: ignored
    h = hot()
    assert run_hotstart(h, {f: OLD for f in dup_frames}, range(0, 30)) == []
    assert h.watched == ()


def test_watch_ends_with_the_window():
    h = hot()
    assert run_hotstart(h, {f: OLD for f in range(10, 17)}, range(0, 25)) == [] and h.watched == ()
    h = hot()  # frames skipped past the window (not in the worker's loop, but a frame there never counts)
    assert run_hotstart(h, {f: OLD for f in range(10, 17)}, range(0, 17)) == [] and h.watched == (5,)
    assert h.update(40, [0, 5], np.stack([OLD, OLD])) == [] and h.watched == ()


def test_empty_on_8_frames_is_dropped_as_empty():
    empty = np.zeros((H, W), bool)
    dropped = run_hotstart(hot(), {f: empty for f in range(13, 21)}, range(0, 30))
    assert dropped == [Dropped(5, 20, "empty", None)]


def test_separate_counts():
    """4 empty and 4 duplicate frames: neither count reaches 8 (SAM 3's two thresholds, not their sum)."""
    empty = np.zeros((H, W), bool)
    young = {**{f: empty for f in range(10, 14)}, **{f: OLD for f in range(14, 18)}}
    assert run_hotstart(hot(), young, range(0, 30)) == []


def test_duplicate_threshold_is_inclusive():
    part = rect(20, 52, 20, 60)  # IoU with OLD 1280 / 1600 = 0.8 exactly
    assert run_hotstart(hot(dup_iou=0.8), {f: part for f in range(10, 18)}, range(0, 20)) == \
        [Dropped(5, 17, "duplicate", 0)]
    assert run_hotstart(hot(dup_iou=0.81), {f: part for f in range(10, 18)}, range(0, 20)) == []


def test_older_means_earlier_seed_or_smaller_id():
    """Two re-seeded masklets identical from the start: only the younger is dropped, into the older; the
    same with an older masklet that itself gets dropped first: the young one then follows the merge."""
    m = disc(60, 80, 15)
    h = Hotstart(cfg())
    h.watch(3, 10)
    h.watch(2, 10)  # same seed frame, smaller id: older
    out = []
    for f in range(10, 30):
        out += h.update(f, [0, 2, 3], np.stack([OLD, m, m]))
    assert out == [Dropped(3, 17, "duplicate", 2)]

    # x: masklet 0; y: IoU 0.87 with x; z: IoU 0.87 with y, 0.75 with x
    x, y, z = rect(20, 60, 0, 100), rect(20, 60, 7, 107), rect(20, 60, 14, 114)
    h = Hotstart(cfg())
    h.watch(2, 5)
    h.watch(3, 6)
    out = []
    for f in range(5, 30):
        masks = [x, y] + ([] if f < 6 else [z] if f < 14 else [x])
        out += h.update(f, [0, 2, 3][: len(masks)], np.stack(masks))
    # 2 duplicates 0 on frames 5-12 and is dropped on 12 (before 3 is judged on 12, being older); 3 duplicated
    # 2 on frames 6-11, nothing on 12-13 (2 is gone, z is not a duplicate of x), then 0 on 14-15: its 8th
    # duplicate frame is 15, 6 of them against 2, which was merged into 0, so they count for 0
    assert out == [Dropped(2, 12, "duplicate", 0), Dropped(3, 15, "duplicate", 0)]


def test_merged_into_is_the_most_duplicated_older_masklet_ties_smaller_id():
    a, b = rect(10, 50, 10, 50), rect(60, 100, 90, 130)
    h = Hotstart(cfg())
    h.watch(9, 1)
    out = []
    for f in range(1, 16):
        young = b if f in (2, 4, 6, 8) else a if f in (3, 5, 7, 9) else ELSEWHERE
        out += h.update(f, [4, 1, 9], np.stack([b, a, young]))
    assert out == [Dropped(9, 9, "duplicate", 1)]  # 4 frames each: the smaller id


def test_missing_watched_masklet_and_repeated_frames_are_errors():
    h = hot()
    with pytest.raises(ValueError, match="missing"):
        h.update(10, [0], np.stack([OLD]))
    h = hot()
    h.update(10, [0, 5], np.stack([OLD, OLD]))
    with pytest.raises(ValueError, match="once each"):
        h.update(10, [0, 5], np.stack([OLD, OLD]))


EMPTY = np.zeros((H, W), bool)
PATTERNS = {  # frames 10-29 of masklet 5: d duplicate of masklet 0, e empty, . elsewhere
    "merged on 21": "dd.dd.d.dd.dd.......",
    "empty on 22": "e.ee.ee.e.e.e.e.....",
    "kept (7 each)": "dededede.d.d.d.e..dd",
}


@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
@pytest.mark.parametrize("cut", [12, 17, 23])
def test_state_restore_mid_window_gives_the_same_decisions(pattern, cut):
    young = {10 + k: {"d": OLD, "e": EMPTY, ".": ELSEWHERE}[c] for k, c in enumerate(pattern)}
    whole_run = hot()
    whole = run_hotstart(whole_run, young, range(0, 30))
    first = hot()
    before = run_hotstart(first, young, range(0, cut))
    resumed = Hotstart(cfg())
    resumed.restore(json.loads(json.dumps(first.state())))
    after = run_hotstart(resumed, young, range(cut, 30))
    assert before + after == whole
    assert resumed.state() == whole_run.state()
    expected = {"merged on 21": [Dropped(5, 21, "duplicate", 0)], "empty on 22": [Dropped(5, 22, "empty", None)],
                "kept (7 each)": []}
    assert whole == expected[next(k for k, v in PATTERNS.items() if v == pattern)]


# --- a whole synthetic video -------------------------------------------------------------------------

def world(f: int) -> dict[str, np.ndarray]:
    """The objects visible on frame f. A: from the start, moving right. B: a disc entering at frame 10. C: a
    rectangle entering at frame 20. blip: on frames 5-6 only. ghost: on frame 15 only, beside A."""
    objects = {"A": rect(20, 60, 10 + f, 60 + f)}
    if f >= 10:
        objects["B"] = disc(90, 40 + f, 12)
    if f >= 20:
        objects["C"] = rect(70, 100, 110, 150)
    if f in (5, 6):
        objects["blip"] = rect(5, 15, 120, 150)
    if f == 15:
        objects["ghost"] = rect(62, 80, 20, 50)
    return objects


def tracked_mask(name: str, f: int) -> np.ndarray:
    """The stand-in tracker: a masklet follows its object; once it is gone, blip's masklet is empty and
    ghost's latches onto A two frames later (the tracker drifting onto a neighbour)."""
    objects = world(f)
    if name in objects:
        return objects[name]
    if name == "ghost" and f >= 17:
        return objects["A"]
    if name == "ghost":
        return rect(62, 80, 20, 50)
    return np.zeros((H, W), bool)


def generator(f: int) -> list[dict]:
    """Every visible object, plus a lower-scored near-duplicate of B and a small speck."""
    objects = world(f)
    records = [record(m, 0.9 - 0.01 * k) for k, m in enumerate(objects.values())]
    if "B" in objects:
        records.append(record(disc(90, 41 + f, 12), 0.7))
    records.append(record(rect(110, 114, 5, 10), 0.99))  # 20 px
    return records


def simulate(c: PromptConfig, cut: int | None = None):
    """schedule -> new_prompts -> hotstart over 30 frames; with `cut`, both states go through JSON there."""
    names: dict[int, str] = {}
    seeds: dict[int, int] = {}
    schedule, hotstart = ReseedSchedule(c), Hotstart(c)
    dropped: list[Dropped] = []
    found = new_prompts(generator(0), stack(), c, frame=0, first_id=0, room=c.max_objects)
    for p in found.prompts:
        names[p.object_id], seeds[p.object_id] = _which(p.mask, 0), 0
    for f in range(30):
        if cut is not None and f == cut:
            s, h = ReseedSchedule(c), Hotstart(c)
            s.restore(json.loads(json.dumps(schedule.state())))
            h.restore(json.loads(json.dumps(hotstart.state())))
            schedule, hotstart = s, h
        gone = {d.object_id for d in dropped}
        live = [i for i in sorted(names) if i not in gone]
        current = stack(*[tracked_mask(names[i], f) for i in live])
        if f == 0:
            schedule.seeded(0, uncovered_share(current))
        elif schedule.due(f, uncovered_share(current)):
            room = c.max_objects - len(names)  # dropped masklets keep their rows and planes: they count
            found = new_prompts(generator(f), current, c, frame=f, first_id=max(names) + 1, room=room)
            for p in found.prompts:
                names[p.object_id], seeds[p.object_id] = _which(p.mask, f), f
                hotstart.watch(p.object_id, f)
                live.append(p.object_id)
            current = stack(*[tracked_mask(names[i], f) for i in live])
            schedule.seeded(f, uncovered_share(current))
        dropped += hotstart.update(f, live, current)
    return names, seeds, dropped


def _which(mask: np.ndarray, f: int) -> str:
    return next(name for name, m in world(f).items() if np.array_equal(m, mask))


def test_video_objects_entering_later_become_masklets():
    names, seeds, dropped = simulate(cfg(reseed_every=5))
    assert names == {0: "A", 1: "blip", 2: "B", 3: "ghost", 4: "C"}
    assert seeds == {0: 0, 1: 5, 2: 10, 3: 15, 4: 20}
    # blip: empty from frame 7, the 8th empty frame is 14; ghost: a duplicate of A from 17, the 8th is 24
    assert dropped == [Dropped(1, 14, "empty", None), Dropped(3, 24, "duplicate", 0)]


def test_video_at_the_cap():
    names, seeds, dropped = simulate(cfg(reseed_every=5, max_objects=3))
    # A, blip, B fill the cap (blip's drop does not free a place: its row and frames 5-13 stay)
    assert names == {0: "A", 1: "blip", 2: "B"}
    assert dropped == [Dropped(1, 14, "empty", None)]


def test_video_without_reseeding_keeps_the_first_frame_only():
    names, _, dropped = simulate(cfg(reseed_every=None, reseed_adaptive=None))
    assert names == {0: "A"} and dropped == []


@pytest.mark.parametrize("cut", [8, 16, 22])
def test_video_resumed_mid_window_decides_the_same(cut):
    assert simulate(cfg(reseed_every=5), cut=cut) == simulate(cfg(reseed_every=5))
