"""Objects that appear after the first frame: which automatic masks become new masklets, on which frames the
generator runs, and which young masklets are duplicates (issue 12). Pure numpy: no model, no tracker; the
worker runs the generator and the tracker and asks this module what to do.

- `new_prompts` is SAM-Track's rule (`SegTracker.find_new_objs`: a generator mask is a new object when at least
  0.8 of it lies outside every tracked mask and it is big enough), with AutoSeg-SAM2's mask NMS among the
  candidates. Order of the tests, and why: size, then uncovered, then NMS, then the cap. A candidate that
  cannot become new (too small, or mostly inside a current mask) never suppresses one that can: if a
  better-scored mask A overlaps B at IoU > `reseed_nms_iou` but A is covered and B is not, B is a new object
  (B has at most 1 - `reseed_uncovered` of its pixels on current masks, so it duplicates none of them), and
  NMS first would lose it. Testing first also shrinks the NMS to the few uncovered candidates (on a later
  frame most candidates are objects already tracked). No two accepted candidates overlap above
  `reseed_nms_iou` either way.
- `ReseedSchedule` is SAM-Track's fixed gap (frames k, 2k, ... of the decoded sequence) plus AutoSeg-SAM2's
  adaptive keyframes (the uncovered share grew by more than `reseed_adaptive` since the last seed frame).
- `Hotstart` is SAM 3's hotstart rule: within a re-seeded masklet's first `hotstart_frames` frames it is
  dropped once its mask was empty on `hotstart_min` of them (SAM 3: unmatched to a detection; we have no
  detector, an empty mask is our evidence that nothing is there), or once it duplicated an older masklet
  (IoU >= `dup_iou`) on `hotstart_min` of them. Two separate counts, as SAM 3's two thresholds.

Both classes keep their state as plain JSON-able data (`state()` / `restore()`), so a checkpoint taken
between frames resumes to the same decisions.

Cost at 1080p with 64 current masks and ~100 candidates: the union of current masks is computed once, and
every per-candidate test and IoU reads only the candidate's bounding box (IoUs only for boxes that overlap);
tests/test_reseed.py times it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.config import PromptConfig
from pipeline.records import Dropped, Prompt
from pipeline.stages.prompt import prompts_from_records

Box = tuple[int, int, int, int]  # y0, y1, x0, x1: a half-open slice of the frame


@dataclass(frozen=True)
class ReseedResult:
    """What one re-seed found: the new masklets' prompts (best first) and why the other candidates were not
    taken. Every candidate is counted once: considered == len(prompts) + the four rejected counts."""

    prompts: tuple[Prompt, ...]
    considered: int  # generator records given
    rejected_small: int  # below prompt.min_area, prompt.reseed_min_area or prompt.reseed_min_area_share
    rejected_covered: int  # less than prompt.reseed_uncovered of it outside every current mask
    rejected_nms: int  # IoU > prompt.reseed_nms_iou with a better-scored candidate that was kept
    rejected_cap: int  # past the room left under prompt.max_objects


def covered_union(current: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of the frame that some current mask covers: bool (H, W). `current` is bool (O, H, W); with
    O = 0 its shape still gives (H, W) (or pass `shape`)."""
    current = np.asarray(current, dtype=bool)
    if current.ndim != 3:
        raise ValueError(f"current masks must be bool (O, H, W), got shape {current.shape}")
    if shape is not None and tuple(current.shape[1:]) != tuple(shape):
        raise ValueError(f"current masks are {current.shape[1:]} but the frame is {tuple(shape)}")
    return current.any(axis=0)


def uncovered_share(current: np.ndarray) -> float:
    """The share of the frame that no current mask covers (ReseedSchedule.due's `uncovered_share`)."""
    current = np.asarray(current, dtype=bool)
    h, w = current.shape[1:]
    return 1.0 - np.count_nonzero(covered_union(current)) / float(h * w)


def _mask_box(mask: np.ndarray, hint: Sequence[float] | None) -> tuple[Box, int]:
    """The half-open bounding box of a mask and its pixel count. The AMG's XYWH bbox (inclusive right and
    bottom edges: w = last column - first column) is a hint: used when it holds every pixel, which a full
    count checks; otherwise the box is computed from the mask."""
    area = int(np.count_nonzero(mask))
    h, w = mask.shape
    if area == 0:
        return (0, 0, 0, 0), 0
    if hint is not None:
        x, y, bw, bh = (int(round(float(v))) for v in hint)
        box = (max(y, 0), min(y + bh + 1, h), max(x, 0), min(x + bw + 1, w))
        if box[0] < box[1] and box[2] < box[3] and np.count_nonzero(_crop(mask, box)) == area:
            return box, area
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1), area


def _crop(mask: np.ndarray, box: Box) -> np.ndarray:
    return mask[..., box[0]:box[1], box[2]:box[3]]


def _overlap(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[1] and box[2] < box[3] else None


def _iou(mask_a: np.ndarray, box_a: Box, area_a: int, mask_b: np.ndarray, box_b: Box, area_b: int) -> float:
    """Mask IoU read only where the two boxes overlap; 0 when they do not (or both masks are empty)."""
    both = _overlap(box_a, box_b)
    if both is None or area_a + area_b == 0:
        return 0.0
    inter = int(np.count_nonzero(_crop(mask_a, both) & _crop(mask_b, both)))
    return inter / float(area_a + area_b - inter)


@dataclass
class _Candidate:
    index: int  # position in the generator's records
    mask: np.ndarray
    box: Box
    area: int


def _by_score(records: list[dict]) -> list[int]:
    """Best first by predicted IoU x stability, ties in generator order: the order of
    pipeline/stages/prompt.py's select_records (Python's sort is stable)."""
    return sorted(range(len(records)),
                  key=lambda i: -(records[i]["predicted_iou"] * records[i]["stability_score"]))


def new_prompts(records: list[dict], current: np.ndarray, cfg: PromptConfig, frame: int, first_id: int,
                room: int) -> ReseedResult:
    """The generator's `records` on `frame` that become new masklets, given the live masklets' masks there
    (`current`, bool (O, H, W), O may be 0). Returned prompts have source "reseed", ids first_id, first_id+1,
    ... best first, at most `room` of them (prompt.max_objects minus the masklets the item already has: at the
    cap the rest are counted in rejected_cap, and a later re-seed can take them only if masklets are dropped)."""
    current = np.asarray(current, dtype=bool)
    if current.ndim != 3:
        raise ValueError(f"current masks must be bool (O, H, W), got shape {current.shape}")
    h, w = current.shape[1:]
    min_area = max(1, cfg.reseed_min_area)  # an empty mask is always small: its uncovered share is undefined
    min_share_area = cfg.reseed_min_area_share * h * w
    union = None  # computed once, and only if some candidate is big enough
    small = covered = 0
    uncovered: list[_Candidate] = []
    for i in _by_score(records):
        r = records[i]
        # min_area reads the record's area as select_records does (the AMG's area is its mask's pixel count)
        if int(r["area"]) < cfg.min_area:
            small += 1
            continue
        mask = np.asarray(r["segmentation"], dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"generator mask {i} on frame {frame} is {mask.shape}, the current masks "
                             f"{(h, w)}: both must be at the item's resolution")
        box, area = _mask_box(mask, r.get("bbox"))
        if area < min_area or area < min_share_area:
            small += 1
            continue
        if union is None:
            union = covered_union(current)
        outside = area - int(np.count_nonzero(_crop(mask, box) & _crop(union, box)))
        if outside / area < cfg.reseed_uncovered:
            covered += 1
            continue
        uncovered.append(_Candidate(i, mask, box, area))
    kept, nms = _mask_nms(uncovered, cfg.reseed_nms_iou)
    room = max(0, room)
    taken = [records[c.index] for c in kept[:room]]
    prompts = tuple(dataclasses.replace(p, object_id=first_id + k, source="reseed")
                    for k, p in enumerate(prompts_from_records(taken, frame)))
    return ReseedResult(prompts=prompts, considered=len(records), rejected_small=small,
                        rejected_covered=covered, rejected_nms=nms, rejected_cap=len(kept) - len(taken))


def _mask_nms(candidates: list[_Candidate], iou_thresh: float) -> tuple[list[_Candidate], int]:
    """Greedy mask NMS over candidates already best first: one is dropped when its IoU with a kept one is
    above `iou_thresh`. Boxes first; and IoU <= smaller area / larger area, so pairs of very different
    sizes are never read."""
    kept: list[_Candidate] = []
    dropped = 0
    for c in candidates:
        for k in kept:
            if min(c.area, k.area) <= iou_thresh * max(c.area, k.area):
                continue
            if _iou(c.mask, c.box, c.area, k.mask, k.box, k.area) > iou_thresh:
                dropped += 1
                break
        else:
            kept.append(c)
    return kept, dropped


class ReseedSchedule:
    """On which decoded frames the generator runs again. Periodic (`prompt.reseed_every` = k: frames k, 2k, ...,
    counted from the start of the item whatever the adaptive rule did) and adaptive (`prompt.reseed_adaptive`:
    a frame whose uncovered share exceeds the one recorded at the last seed by more than that). The first
    prompting (frame 0) is not a re-seed, but it is the first seed: record it with `seeded(0, share)` before
    asking `due`; record each re-seed's frame with the uncovered share after its new masklets are added, so the
    adaptive rule measures growth from what tracking covers now (a re-seed that found nothing new resets the
    baseline too, and does not fire again on the next frame)."""

    def __init__(self, cfg: PromptConfig):
        self._every = cfg.reseed_every
        self._adaptive = cfg.reseed_adaptive
        self._last_frame: int | None = None
        self._last_share: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._every) or self._adaptive is not None

    def due(self, frame: int, uncovered_share: float) -> bool:
        if self._last_frame is None:
            raise RuntimeError("ReseedSchedule.due before any seed: call seeded(first_frame, uncovered_share) "
                               "after the first prompting")
        if frame <= self._last_frame:
            return False
        if self._every and frame % self._every == 0:
            return True
        return self._adaptive is not None and uncovered_share - self._last_share > self._adaptive

    def seeded(self, frame: int, uncovered_share: float) -> None:
        if self._last_frame is not None and frame < self._last_frame:
            raise ValueError(f"seed on frame {frame} recorded after one on frame {self._last_frame}")
        self._last_frame, self._last_share = int(frame), float(uncovered_share)

    def state(self) -> dict[str, Any]:
        return {"last_frame": self._last_frame, "last_share": self._last_share}

    def restore(self, state: dict[str, Any]) -> None:
        if set(state) != {"last_frame", "last_share"}:
            raise ValueError(f"not a ReseedSchedule state (keys {sorted(state)}; expected last_frame, last_share)")
        frame, share = state["last_frame"], state["last_share"]
        self._last_frame = None if frame is None else int(frame)
        self._last_share = None if share is None else float(share)


@dataclass
class _Watch:
    object_id: int
    seed_frame: int
    empty: int = 0  # frames of the window with an empty mask
    duplicate: int = 0  # frames of the window with IoU >= dup_iou with some older masklet
    dup_with: dict[int, int] = dataclasses.field(default_factory=dict)  # older masklet -> such frames


class Hotstart:
    """SAM 3's hotstart rule for re-seeded masklets. `watch` each new masklet; call `update` once per frame, in
    frame order, with every live masklet's mask. A watched masklet is judged on its first `hotstart_frames`
    frames (its seed frame included) and dropped as soon as it was empty on `hotstart_min` of them ("empty") or
    had IoU >= `dup_iou` with an older masklet on `hotstart_min` of them ("duplicate", merged_into the older
    masklet it duplicated on most frames, ties the smaller id). An empty mask has IoU 0 with everything, so a
    frame raises at most one of the two counts and both cannot reach `hotstart_min` on the same frame; should
    they (a state restored under another config), "duplicate" wins, as it says more.

    Older: seeded on an earlier frame, or on the same frame with a smaller id; masklets never watched (the
    first prompting's) are older than every watched one. A dropped masklet is older than nothing from the
    frame it was dropped on, and watched masklets are judged oldest first, so one dropped on this frame does not
    count against a younger one on this frame. merged_into follows merges: frames that duplicated a masklet
    since merged into X count for X, so merged_into always names a masklet that was not merged away."""

    def __init__(self, cfg: PromptConfig):
        self._frames = cfg.hotstart_frames
        self._min = cfg.hotstart_min
        self._dup_iou = cfg.dup_iou
        self._seeds: dict[int, int] = {}  # every masklet ever watched -> its seed frame
        self._watched: dict[int, _Watch] = {}
        self._dropped: dict[int, int | None] = {}  # dropped masklet -> merged_into
        self._last_frame: int | None = None

    @property
    def watched(self) -> tuple[int, ...]:
        return tuple(sorted(self._watched))

    def watch(self, object_id: int, seed_frame: int) -> None:
        if object_id in self._seeds:
            raise ValueError(f"masklet {object_id} is already watched (seeded on frame {self._seeds[object_id]})")
        self._seeds[int(object_id)] = int(seed_frame)
        self._watched[int(object_id)] = _Watch(int(object_id), int(seed_frame))

    def _age(self, object_id: int) -> tuple[int, int]:
        return self._seeds.get(object_id, -1), object_id

    def update(self, frame: int, object_ids: Sequence[int], masks: np.ndarray) -> list[Dropped]:
        if self._last_frame is not None and frame <= self._last_frame:
            raise ValueError(f"Hotstart.update on frame {frame} after frame {self._last_frame}: frames must "
                             f"come once each, in order (after a resume, restore the state saved with it)")
        self._last_frame = frame
        if not self._watched:
            return []
        masks = np.asarray(masks, dtype=bool)
        ids = [int(i) for i in object_ids]
        if masks.ndim != 3 or masks.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} object ids but masks of shape {masks.shape}: expected bool (O, H, W)")
        row = {object_id: k for k, object_id in enumerate(ids)}
        dropped: list[Dropped] = []
        for watch in sorted(self._watched.values(), key=lambda wt: self._age(wt.object_id)):
            if frame < watch.seed_frame:
                continue
            if frame >= watch.seed_frame + self._frames:  # window passed (frames skipped): judged no more
                del self._watched[watch.object_id]
                continue
            if watch.object_id not in row:
                raise ValueError(f"watched masklet {watch.object_id} is missing from frame {frame}'s object ids: "
                                 f"update needs every live masklet's mask")
            decision = self._judge(watch, frame, ids, masks, row)
            if decision is not None:
                dropped.append(decision)
                self._dropped[watch.object_id] = decision.merged_into
                del self._watched[watch.object_id]
            elif frame == watch.seed_frame + self._frames - 1:
                del self._watched[watch.object_id]
        return dropped

    def _judge(self, watch: _Watch, frame: int, ids: list[int], masks: np.ndarray,
               row: dict[int, int]) -> Dropped | None:
        mask = masks[row[watch.object_id]]
        box, area = _mask_box(mask, None)
        if area == 0:
            watch.empty += 1
        else:
            older = [k for k, i in enumerate(ids)
                     if i not in self._dropped and self._age(i) < self._age(watch.object_id)]
            hits = _duplicates(mask, box, area, masks, older, self._dup_iou)
            if hits:
                watch.duplicate += 1
                for k in hits:
                    watch.dup_with[ids[k]] = watch.dup_with.get(ids[k], 0) + 1
        if watch.duplicate >= self._min:
            return Dropped(watch.object_id, frame, "duplicate", self._merge_target(watch))
        if watch.empty >= self._min:
            return Dropped(watch.object_id, frame, "empty", None)
        return None

    def _merge_target(self, watch: _Watch) -> int:
        frames: dict[int, int] = {}
        for object_id, n in watch.dup_with.items():
            seen = set()
            while self._dropped.get(object_id) is not None and object_id not in seen:
                seen.add(object_id)
                object_id = self._dropped[object_id]
            frames[object_id] = frames.get(object_id, 0) + n
        return min(frames, key=lambda i: (-frames[i], i))

    def state(self) -> dict[str, Any]:
        return {
            "last_frame": self._last_frame,
            "seeds": sorted([i, s] for i, s in self._seeds.items()),
            "dropped": sorted([i, m] for i, m in self._dropped.items()),
            "watched": [{"object_id": w.object_id, "seed_frame": w.seed_frame, "empty": w.empty,
                         "duplicate": w.duplicate, "dup_with": sorted([i, n] for i, n in w.dup_with.items())}
                        for w in sorted(self._watched.values(), key=lambda w: w.object_id)],
        }

    def restore(self, state: dict[str, Any]) -> None:
        expected = {"last_frame", "seeds", "dropped", "watched"}
        if set(state) != expected:
            raise ValueError(f"not a Hotstart state (keys {sorted(state)}; expected {sorted(expected)})")
        self._last_frame = None if state["last_frame"] is None else int(state["last_frame"])
        self._seeds = {int(i): int(s) for i, s in state["seeds"]}
        self._dropped = {int(i): None if m is None else int(m) for i, m in state["dropped"]}
        self._watched = {int(w["object_id"]): _Watch(int(w["object_id"]), int(w["seed_frame"]), int(w["empty"]),
                                                     int(w["duplicate"]), {int(i): int(n) for i, n in w["dup_with"]})
                         for w in state["watched"]}


def _duplicates(mask: np.ndarray, box: Box, area: int, masks: np.ndarray, rows: list[int],
                iou_thresh: float) -> list[int]:
    """The rows of `masks` (among `rows`) whose IoU with `mask` is >= iou_thresh. Intersections are read in
    `mask`'s box only (a mask outside it has none); a full count of the other mask's area is needed only
    when the intersection alone allows the threshold (IoU <= intersection / area)."""
    if not rows:
        return []
    inside = _crop(masks, box)[rows] & _crop(mask, box)  # crop first: the copy is of boxes, not frames
    inter = np.count_nonzero(inside.reshape(len(rows), -1), axis=1)
    hits = []
    for k, n in zip(rows, inter):
        if n == 0 or n < iou_thresh * area:
            continue
        other = int(np.count_nonzero(masks[k]))
        if n / float(area + other - n) >= iou_thresh:
            hits.append(k)
    return hits
