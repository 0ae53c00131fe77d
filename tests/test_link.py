"""Phase 1's linking of per-frame masks into masklets, exactly, on synthetic records."""
import numpy as np
import pytest

from pipeline.stages.link import Linker, pair_iou, mask_box
from pipeline.stages.prompt import prompts_from_records

H, W = 40, 60


def rect(y0, x0, y1, x1, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def rec(mask: np.ndarray, piou: float = 0.9, stab: float = 0.97) -> dict:
    """A record shaped like the generator's (bbox XYWH, the grid point at the mask's first pixel)."""
    ys, xs = np.nonzero(mask)
    return {"segmentation": mask, "area": int(mask.sum()),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())],
            "predicted_iou": piou, "point_coords": [[float(xs[0]), float(ys[0])]], "stability_score": stab,
            "crop_box": [0, 0, mask.shape[1], mask.shape[0]]}


def assert_masks_are_the_records(step, records):
    """Every plane is a record's mask, bit for bit, or empty."""
    assert step.masks.dtype == bool and step.masks.shape == (len(step.object_ids), H, W)
    assert step.object_ids == tuple(range(len(step.object_ids)))
    linked = {i: j for j, i in enumerate(step.record_ids) if i is not None}
    for i in step.object_ids:
        if i in linked:
            assert np.array_equal(step.masks[i], records[linked[i]]["segmentation"])
            assert step.predicted_iou[i] == np.float32(records[linked[i]]["predicted_iou"])
        else:
            assert not step.masks[i].any() and np.isnan(step.predicted_iou[i])
    assert np.isnan(step.object_scores).all()


def scene(t: int) -> list[dict]:
    """A moves right 2 px a frame; B stays until frame 2 and leaves; C enters at frame 3."""
    records = [rec(rect(5, 2 + 2 * t, 15, 14 + 2 * t), piou=0.9 + t / 100)]
    if t <= 2:
        records.append(rec(rect(25, 40, 35, 55)))
    if t >= 3:
        records.append(rec(rect(22, 5, 36, 20)))
    return records


def test_moving_leaving_and_entering_objects():
    linker = Linker(link_iou=0.5, max_objects=8)
    steps = [linker.step(t, scene(t)) for t in range(6)]
    assert [s.record_ids for s in steps] == [(0, 1), (0, 1), (0, 1), (0, 2), (0, 2), (0, 2)]
    assert [len(s.object_ids) for s in steps] == [2, 2, 2, 3, 3, 3]
    assert [[p.object_id for p in s.born] for s in steps] == [[0, 1], [], [], [2], [], []]
    for t, s in enumerate(steps):
        assert_masks_are_the_records(s, scene(t))
        assert s.dropped_at_cap == 0 and s.frame == t
    assert not steps[3].masks[1].any()  # B left
    born = steps[3].born[0]
    first = prompts_from_records([scene(3)[1]], 3)[0]
    assert born.source == "sam1" and born.frame == 3 and np.array_equal(born.mask, first.mask)
    assert (born.point, born.bbox, born.area, born.predicted_iou, born.stability_score) == \
           (first.point, first.bbox, first.area, first.predicted_iou, first.stability_score)
    assert steps[0].frame_masks(source_frame=0).object_ids == (0, 1)


def test_ids_follow_objects_not_record_order():
    a, b = rect(2, 2, 12, 12), rect(20, 30, 30, 50)
    linker = Linker(0.5, 8)
    linker.step(0, [rec(a), rec(b)])
    s = linker.step(1, [rec(b), rec(a)])
    assert s.record_ids == (1, 0) and not s.born
    assert np.array_equal(s.masks[0], a) and np.array_equal(s.masks[1], b)


@pytest.mark.parametrize("inside, link_iou, linked", [(50, 0.5, True), (49, 0.5, False), (51, 0.5, True),
                                                      (50, 0.51, False)])
def test_iou_threshold_is_inclusive(inside, link_iou, linked):
    prev = rect(0, 0, 10, 10)  # 100 px
    cur = np.zeros((H, W), dtype=bool)
    cur[np.unravel_index(np.arange(inside), (10, 10))] = True  # `inside` px of it: IoU = inside / 100 exactly
    assert pair_iou(prev, mask_box(prev), 100, cur, mask_box(cur), inside) == inside / 100
    linker = Linker(link_iou, 8)
    linker.step(0, [rec(prev)])
    s = linker.step(1, [rec(cur)])
    assert s.record_ids == ((0,) if linked else (1,))
    assert s.masks[0].any() == linked


def test_one_to_one_maximises_total_iou_not_greedy():
    # masklets P0, P1 (overlapping); R1 fits P0 best, but giving it to P0 would leave R0 and P1 unlinked
    p0, p1 = rect(0, 0, 4, 10), rect(0, 2, 4, 12)
    r0, r1 = rect(0, 0, 4, 8), rect(0, 0, 4, 11)
    ious = {(i, j): pair_iou(p, mask_box(p), p.sum(), r, mask_box(r), r.sum())
            for i, p in enumerate((p0, p1)) for j, r in enumerate((r0, r1))}
    assert ious[0, 1] > ious[0, 0] > 0.6 and ious[1, 1] > 0.6 > ious[1, 0]
    linker = Linker(0.6, 8)
    linker.step(0, [rec(p0), rec(p1)])
    s = linker.step(1, [rec(r0), rec(r1)])
    assert s.record_ids == (0, 1) and not s.born


def test_masklet_comes_back_after_a_gap():
    a = rect(5, 5, 15, 15)
    linker = Linker(0.5, 8)
    linker.step(0, [rec(a)])
    gap = linker.step(1, [])
    assert gap.masks.shape == (1, H, W) and not gap.masks.any()
    back = linker.step(2, [rec(rect(5, 6, 15, 16))])
    assert back.record_ids == (0,) and not back.born


def test_cap_counts_what_is_not_born():
    linker = Linker(0.5, max_objects=2)
    objects = [rect(0, 0, 10, 10), rect(0, 20, 10, 30), rect(20, 0, 30, 10)]
    s0 = linker.step(0, [rec(m) for m in objects])
    assert s0.record_ids == (0, 1, None) and s0.dropped_at_cap == 1 and len(s0.object_ids) == 2
    s1 = linker.step(1, [rec(m) for m in objects] + [rec(rect(20, 30, 30, 40))])
    assert s1.record_ids == (0, 1, None, None) and s1.dropped_at_cap == 2
    assert linker.dropped_at_cap == 3
    assert_masks_are_the_records(s1, [rec(m) for m in objects])


def test_state_and_restore_go_on_identically():
    whole = Linker(0.5, 8)
    expected = [whole.step(t, scene(t)) for t in range(6)]
    first = Linker(0.5, 8)
    for t in range(3):
        first.step(t, scene(t))
    resumed = Linker(0.5, 8)
    resumed.restore(first.state())
    for t in range(3, 6):
        got, want = resumed.step(t, scene(t)), expected[t]
        assert got.record_ids == want.record_ids and np.array_equal(got.masks, want.masks)
        assert [p.object_id for p in got.born] == [p.object_id for p in want.born]


def test_empty_start_and_bad_input():
    s = Linker(0.5, 4, shape=(H, W)).step(0, [])
    assert s.masks.shape == (0, H, W) and s.object_ids == () and not s.born
    linker = Linker(0.5, 4)
    linker.step(0, [rec(rect(0, 0, 5, 5))])
    with pytest.raises(ValueError, match="several sizes"):
        linker.step(1, [rec(rect(0, 0, 5, 5, shape=(10, 10)))])
    with pytest.raises(ValueError, match="link_iou"):
        Linker(0.0, 4)
