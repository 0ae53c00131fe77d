"""Quality signals against hand-made masks with known answers, and the incremental accumulator against a
whole-array computation written independently (full frames, no boxes, no running sums)."""
from __future__ import annotations

import io
import math
import pickle

import cv2
import numpy as np
import pytest

from pipeline.quality.signals import (FRAME_SIGNALS_SCHEMA, MASKLET_SIGNALS_SCHEMA, MaskletSignals, PromptSignals,
                                      shape_of)

H, W = 40, 50


def square(y: int, x: int, size: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y:y + size, x:x + size] = True
    return m


def ring(y: int = 10, x: int = 10, outer: int = 12, hole: int = 4) -> np.ndarray:
    m = square(y, x, outer)
    off = (outer - hole) // 2
    m[y + off:y + off + hole, x + off:x + off + hole] = False
    return m


def prompts(n: int, frame: int = 0, predicted_iou: float = 0.9) -> list[PromptSignals]:
    return [PromptSignals(i, frame, predicted_iou, 0.95, 100) for i in range(n)]


def run(frames: list[np.ndarray], n_prompts: int | None = None, scores=None, jump_iou: float = 0.5,
        prompt_frame: int = 0):
    """Feed frames of (O, H, W) masks; returns masklet rows as dicts and the Signals."""
    o = frames[0].shape[0]
    acc = MaskletSignals(prompts(n_prompts or o, prompt_frame), H, W, jump_iou=jump_iou)
    for t, masks in enumerate(frames):
        s = np.zeros(o, dtype=np.float32) if scores is None else np.asarray(scores[t], dtype=np.float32)
        acc.add(t, tuple(range(o)), masks, s)
    sig = acc.finish()
    return sig.masklets.to_pylist(), sig


# --- shape ---------------------------------------------------------------------------------------------

def test_ring_is_one_component_with_one_hole():
    s = shape_of(ring())
    assert (s.components, s.holes, s.area, s.touches_border) == (1, 1, 12 * 12 - 16, False)


def test_two_squares_are_two_components_without_holes():
    s = shape_of(square(2, 2, 5) | square(20, 30, 6))
    assert (s.components, s.holes, s.area) == (2, 0, 25 + 36)


def test_diagonal_neighbours_are_one_component():
    """8-connectivity: squares meeting only at a corner are one region."""
    assert shape_of(square(2, 2, 5) | square(7, 7, 5)).components == 1


def test_square_perimeter_runs_through_pixel_centres():
    assert shape_of(square(5, 5, 10)).perimeter == pytest.approx(4 * 9)
    assert shape_of(square(5, 5, 1)).perimeter == 0.0


def test_ring_perimeter_adds_the_hole_outline():
    """Outer outline 4 * 11; the 4 x 4 hole's outline through the surrounding mask pixels cuts its corners:
    4 straight runs of 3 and 4 diagonal steps."""
    assert shape_of(ring()).perimeter == pytest.approx(44 + 4 * 3 + 4 * math.sqrt(2))


def test_mask_on_the_border_touches_it_and_one_pixel_in_does_not():
    for y, x in [(0, 10), (10, 0), (H - 5, 10), (10, W - 5)]:
        assert shape_of(square(y, x, 5)).touches_border
    assert not shape_of(square(1, 1, H - 2)).touches_border


def test_background_open_to_the_frame_border_is_no_hole():
    """A ring on the top edge with its wall above the hole removed: the hole reaches the frame border, so it
    is background, not a hole; with the wall it is a hole."""
    cut = ring(y=0)
    cut[0:4, 14:18] = False  # the wall above the hole: the hole now meets row 0
    assert shape_of(ring(y=0)).holes == 1
    assert shape_of(cut).holes == 0
    assert shape_of(ring(y=1)).holes == 1


def test_box_limited_shape_equals_the_whole_frame():
    m = ring(0, 0) | square(30, 40, 10)  # touches two borders; its box is the whole frame
    assert shape_of(m) == shape_of(m, (0, H, 0, W))
    assert shape_of(np.zeros((H, W), bool)).area == 0


# --- time ----------------------------------------------------------------------------------------------

def test_square_shifted_by_k_pixels_has_known_iou():
    s, k = 10, 2
    rows, sig = run([square(5, 5, s)[None], square(5, 5 + k, s)[None]])
    expected = s * (s - k) / (s * (s + k))
    assert rows[0]["iou_mean"] == pytest.approx(expected)
    assert rows[0]["iou_min"] == pytest.approx(expected)
    assert rows[0]["iou_pairs"] == 1
    assert sig.frames.column("iou_prev").to_pylist() == [None, pytest.approx(expected)]


def test_jumps_count_ious_below_the_threshold():
    frames = [square(5, 5, 10)[None], square(5, 7, 10)[None]]  # IoU 2/3
    assert run(frames, jump_iou=0.7)[0][0]["iou_jumps"] == 1
    assert run(frames, jump_iou=0.6)[0][0]["iou_jumps"] == 0


def test_area_change_is_the_largest_ratio_either_way():
    a, b = square(5, 5, 10), np.zeros((H, W), bool)
    b[5:25, 5:15] = True  # twice the area
    rows, _ = run([a[None], b[None], a[None]])
    assert rows[0]["area_change_max"] == pytest.approx(2.0)


def test_an_object_that_vanishes_and_returns_has_one_gap():
    v, e = square(5, 5, 10)[None], np.zeros((1, H, W), bool)
    rows, _ = run([v, e, e, v, v])
    r = rows[0]
    assert (r["visibility_gaps"], r["frames_visible"], r["frames_tracked"]) == (1, 3, 5)
    assert r["visible_share"] == pytest.approx(3 / 5)
    assert r["iou_pairs"] == 1  # only frames 3-4 are consecutive and both visible
    assert run([v, e, v, e, v])[0][0]["visibility_gaps"] == 2
    assert run([e, v, v, e, e])[0][0]["visibility_gaps"] == 0  # late start and end are no gaps


def test_never_visible_after_its_prompt_frame():
    v, e = square(5, 5, 10)[None], np.zeros((1, H, W), bool)
    r = run([v, e, e])[0][0]
    assert (r["frames_tracked_after_prompt"], r["frames_visible_after_prompt"]) == (2, 0)
    assert r["area_share_mean"] == pytest.approx(100 / (H * W))
    r = run([e, e])[0][0]
    assert r["area_share_mean"] is None and r["iou_mean"] is None and r["visible_share"] == 0.0


def test_object_score_statistics_skip_missing_scores():
    v = square(5, 5, 10)[None]
    r = run([v, v, v], scores=[[2.0], [np.nan], [-1.0]])[0][0]
    assert (r["object_score_mean"], r["object_score_min"]) == (pytest.approx(0.5), -1.0)


# --- overlap and item --------------------------------------------------------------------------------

def test_two_identical_masklets_are_duplicates_with_iou_one():
    m = np.stack([square(5, 5, 10), square(5, 5, 10), square(25, 30, 8)])
    rows, _ = run([m, m])
    assert [(r["dup_iou"], r["dup_object_id"]) for r in rows] == [(1.0, 1), (1.0, 0), (0.0, -1)]


def test_duplicate_iou_sums_over_shared_frames():
    a = square(5, 5, 10)
    frames = [np.stack([a, a]), np.stack([a, np.zeros_like(a)])]  # shared on frame 0 only, tracked on both
    rows, _ = run(frames)
    assert rows[0]["dup_iou"] == pytest.approx(100 / 200)


def test_coverage_counts_overlapping_pixels_once():
    a, b = square(0, 0, 10), square(5, 5, 10)  # union 175 pixels
    rows, sig = run([np.stack([a, b]), np.stack([a, np.zeros_like(a)])])
    item = sig.item.to_pylist()[0]
    assert item["num_masklets"] == 2 and item["frames"] == 2
    assert item["coverage_mean"] == pytest.approx((175 + 100) / 2 / (H * W))
    assert item["coverage_min"] == pytest.approx(100 / (H * W))


# --- the accumulator against a whole-array computation -----------------------------------------------

def random_video(rng: np.random.Generator, t: int, o: int) -> np.ndarray:
    """(T, O, H, W) masks: moving ellipses, some with holes or a second blob, some frames empty."""
    video = np.zeros((t, o, H, W), dtype=np.uint8)
    for j in range(o):
        cy, cx = rng.integers(5, H - 5), rng.integers(5, W - 5)
        for f in range(t):
            if rng.random() < 0.15:
                continue
            cy2 = int(np.clip(cy + rng.integers(-3, 4), 0, H - 1))
            cx2 = int(np.clip(cx + rng.integers(-3, 4), 0, W - 1))
            axes = (int(rng.integers(2, 14)), int(rng.integers(2, 14)))
            cv2.ellipse(video[f, j], (cx2, cy2), axes, float(rng.integers(0, 180)), 0, 360, 1, -1)
            if rng.random() < 0.3:
                cv2.circle(video[f, j], (cx2, cy2), 1, 0, -1)
            if rng.random() < 0.3:
                cv2.circle(video[f, j], (int(rng.integers(0, W)), int(rng.integers(0, H))), 2, 1, -1)
    if o > 1:
        video[:, 1] = video[:, 0]  # a duplicate pair
    return video.astype(bool)


def reference_shape(m: np.ndarray) -> tuple[int, float, int, int, bool]:
    u8 = m.astype(np.uint8)
    area = int(u8.sum())
    contours, _ = cv2.findContours(u8, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(c, True) for c in contours)
    n, _ = cv2.connectedComponents(u8, connectivity=8)
    nb, labels = cv2.connectedComponents(1 - u8, connectivity=4)
    border = set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist()) - {0}
    holes = (nb - 1) - len(border) if area else 0
    touches = bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    return area, perimeter, (n - 1) if area else 0, holes, touches


def test_incremental_equals_whole_array():
    rng = np.random.default_rng(0)
    t, o = 24, 4
    video = random_video(rng, t, o)
    scores = rng.normal(size=(t, o)).astype(np.float32)
    rows, sig = run(list(video), scores=scores, jump_iou=0.6)
    frames = sig.frames.to_pydict()
    px = H * W
    for j in range(o):
        shapes = [reference_shape(video[f, j]) for f in range(t)]
        area = np.array([s[0] for s in shapes])
        vis = area > 0
        assert vis.any() and (~vis).any()
        sel = [k for k in range(len(frames["frame"])) if frames["object_id"][k] == j]
        assert [frames["frame"][k] for k in sel] == list(range(t))
        for f, k in enumerate(sel):
            a, p, c, h, b = shapes[f]
            assert (frames["components"][k], frames["holes"][k], frames["touches_border"][k]) == (c, h, b)
            assert frames["perimeter"][k] == pytest.approx(p)
            assert frames["area_share"][k] == pytest.approx(a / px)
        ious = [np.logical_and(video[f - 1, j], video[f, j]).sum() / np.logical_or(video[f - 1, j], video[f, j]).sum()
                for f in range(1, t) if vis[f - 1] and vis[f]]
        changes = [max(area[f - 1], area[f]) / min(area[f - 1], area[f]) for f in range(1, t) if vis[f - 1] and vis[f]]
        runs = "".join("1" if v else "0" for v in vis).strip("0")
        gaps = len([g for g in runs.split("1") if g])
        others = [k for k in range(o) if k != j]
        dup = [np.logical_and(video[:, j], video[:, k]).sum() / np.logical_or(video[:, j], video[:, k]).sum()
               for k in others]
        r = rows[j]
        comp = np.array([s[2] for s in shapes])[vis]
        assert r["frames_visible"] == vis.sum() and r["visibility_gaps"] == gaps
        assert r["area_share_mean"] == pytest.approx(area[vis].mean() / px)
        assert r["area_share_min"] == pytest.approx(area[vis].min() / px)
        assert r["complexity_max"] == pytest.approx(max(shapes[f][1] / shapes[f][0] for f in range(t) if vis[f]))
        assert r["components_mean"] == pytest.approx(comp.mean()) and r["components_max"] == comp.max()
        assert r["holes_max"] == max(s[3] for s in shapes)
        assert r["iou_pairs"] == len(ious)
        assert r["iou_mean"] == pytest.approx(np.mean(ious)) and r["iou_min"] == pytest.approx(min(ious))
        assert r["iou_jumps"] == sum(i < 0.6 for i in ious)
        assert r["area_change_max"] == pytest.approx(max(changes))
        assert r["object_score_mean"] == pytest.approx(float(scores[:, j].mean()), rel=1e-5)
        assert r["dup_iou"] == pytest.approx(max(dup)) and r["dup_object_id"] == others[int(np.argmax(dup))]
    assert rows[0]["dup_iou"] == 1.0
    coverage = video.any(axis=1).reshape(t, -1).mean(axis=1)
    item = sig.item.to_pylist()[0]
    assert item["coverage_mean"] == pytest.approx(coverage.mean())
    assert item["coverage_min"] == pytest.approx(coverage.min())
    assert sig.masklets.schema == MASKLET_SIGNALS_SCHEMA and sig.frames.schema == FRAME_SIGNALS_SCHEMA


def test_a_pickled_accumulator_goes_on_where_it_stopped():
    """A checkpoint can carry the state: stopping, pickling and resuming gives the uninterrupted result."""
    video = random_video(np.random.default_rng(1), 10, 3)
    ids, scores = (0, 1, 2), np.zeros(3, np.float32)
    whole = MaskletSignals(prompts(3), H, W)
    first = MaskletSignals(prompts(3), H, W)
    for f in range(10):
        whole.add(f, ids, video[f], scores)
        if f < 6:
            first.add(f, ids, video[f], scores)
    resumed = pickle.loads(pickle.dumps(first))
    for f in range(6, 10):
        resumed.add(f, ids, video[f], scores)
    a, b = whole.finish(), resumed.finish()
    assert a.masklets.equals(b.masklets) and a.frames.equals(b.frames) and a.item.equals(b.item)


def test_state_between_frames_does_not_grow_with_the_masks_area_of_the_frame():
    """Between frames the accumulator keeps each object's previous mask cropped to its box, not the frame."""
    acc = MaskletSignals(prompts(1), H, W)
    acc.add(0, (0,), square(5, 5, 4)[None], np.zeros(1, np.float32))
    box, crop = acc.prev[0]
    assert crop.shape == (4, 4) and list(box) == [5, 9, 5, 9]


def test_prompt_signals_are_copied_from_the_prompt_record():
    p = PromptSignals(0, 0, 0.8, 0.9, 200, fg_points=3, bg_points=2)
    acc = MaskletSignals([p], H, W)
    r = acc.finish().masklets.to_pylist()[0]
    assert (r["prompt_fg_points"], r["prompt_bg_points"]) == (3, 2)
    assert r["predicted_iou"] == pytest.approx(0.8)
    assert r["prompt_area_share"] == pytest.approx(200 / (H * W))
    assert r["frames_tracked"] == 0 and r["visible_share"] is None


@pytest.mark.parametrize("call, message", [
    (lambda a: a.add(0, (0,), np.zeros((1, H, W), np.uint8), np.zeros(1)), "must be bool"),
    (lambda a: a.add(0, (0,), np.zeros((1, H, W + 1), bool), np.zeros(1)), "must be bool"),
    (lambda a: a.add(0, (7,), np.zeros((1, H, W), bool), np.zeros(1)), "object id 7 has no prompt"),
    (lambda a: a.add(0, (0, 1), np.zeros((1, H, W), bool), np.zeros(1)), "2 object ids"),
    (lambda a: (a.add(1, (0,), np.zeros((1, H, W), bool), np.zeros(1)),
                a.add(1, (0,), np.zeros((1, H, W), bool), np.zeros(1))), "frames must increase"),
])
def test_bad_input_is_refused_with_its_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call(MaskletSignals(prompts(1), H, W))


@pytest.mark.parametrize("width", [64, 50])  # whole 8-pixel words per row, and not
def test_bounding_boxes_equal_the_extent_of_the_pixels(width):
    from pipeline.quality.signals import bounding_boxes

    rng = np.random.default_rng(2)
    masks = np.zeros((5, 30, width), dtype=bool)
    for k, (y, x) in enumerate([(0, 0), (29, width - 1), (3, 17), (10, 40)]):
        masks[k, y, x] = True
        masks[k, rng.integers(0, 30), rng.integers(0, width)] = True
    boxes = bounding_boxes(masks)
    for k in range(4):
        ys, xs = np.nonzero(masks[k])
        assert list(boxes[k]) == [ys.min(), ys.max() + 1, xs.min(), xs.max() + 1]
    assert list(boxes[4]) == [0, 0, 0, 0]


def test_state_restores_to_identical_signals():
    """A checkpoint's state, restored into a fresh accumulator, goes on to exactly the uninterrupted result."""
    rng = np.random.default_rng(7)
    h, w, n = 40, 56, 4
    prompts = [PromptSignals(i, 0, 0.9, 0.95, 30) for i in range(n)]
    frames = []
    for t in range(12):
        masks = np.zeros((n, h, w), dtype=bool)
        for i in range(n):
            if rng.random() > 0.2:
                y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
                masks[i, y:y + rng.integers(2, 10), x:x + rng.integers(2, 10)] = True
        frames.append((t, masks, rng.normal(size=n).astype(np.float32)))
    whole = MaskletSignals(prompts, h, w)
    for t, m, sc in frames:
        whole.add(t, list(range(n)), m, sc)
    first = MaskletSignals(prompts, h, w, keep_rows=False)
    for t, m, sc in frames[:5]:
        first.add(t, list(range(n)), m, sc)
    state = first.state()
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    loaded = dict(np.load(buffer, allow_pickle=False))
    resumed = MaskletSignals(prompts, h, w, keep_rows=False).restore(loaded)
    for t, m, sc in frames[5:]:
        resumed.add(t, list(range(n)), m, sc)
    assert resumed.finish().masklets.equals(whole.finish().masklets)
    assert resumed.finish().item.equals(whole.finish().item)
    with pytest.raises(ValueError, match="signals state is for 40x56"):
        MaskletSignals(prompts, h, w + 1).restore(loaded)


def test_masklets_added_later_equal_masklets_known_from_the_start():
    """Re-seeding adds masklets mid-item (`add_prompts`); their statistics, and everyone's overlaps, equal an
    accumulator that knew them from the start and was fed them from the same frame on."""
    rng = np.random.default_rng(5)
    h, w, frames, seed = 24, 32, 9, 4
    a, b, c = (PromptSignals(i, f, 0.9, 0.95, 30) for i, f in ((0, 0), (1, seed), (2, seed)))
    masks = rng.random((3, frames, h, w)) > 0.6
    scores = rng.normal(size=(3, frames)).astype(np.float32)

    def feed(acc, t):
        n = 1 if t < seed else 3
        acc.add(t, list(range(n)), masks[:n, t], scores[:n, t])

    known = MaskletSignals([a, b, c], h, w)
    later = MaskletSignals([a], h, w)
    for t in range(frames):
        if t == seed:
            later.add_prompts([b, c])
        feed(known, t)
        feed(later, t)
    assert later.finish().masklets.equals(known.finish().masklets)
    assert later.finish().frames.equals(known.finish().frames)
    # and through a checkpoint: state() after the add restores into an accumulator built with all three
    resumed = MaskletSignals([a, b, c], h, w).restore(later.state())
    with pytest.raises(ValueError, match="repeat"):
        later.add_prompts([b])
    assert resumed.finish().masklets.equals(later.finish().masklets)
