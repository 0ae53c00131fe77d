"""Phase 1's linking: per-frame automatic masks joined into masklets by one-to-one IoU matching.

SA-V's phase 1 ran SAM on every annotated frame; masks of consecutive frames are the same object when they
overlap enough. `Linker.step` takes one frame's generator records (after the seed rule,
pipeline/stages/prompt.py `select_records`) and returns that frame's masks for every masklet so far:

- Each masklet keeps the mask of the last frame it was visible on. This frame's masks are matched one to one
  against those (Hungarian on IoU, pipeline/evaluate/matching.py `hungarian`); a pair is kept at
  IoU >= `link_iou`, and the kept pairs maximise the total IoU.
- Matching against the last *visible* mask, not only the previous frame's, lets a masklet come back after a
  gap. SAM per frame misses objects on single frames (a mask just under the generator's IoU or stability
  threshold, or removed by its NMS); without this every such flicker would split one object into two
  masklets and spend the object budget twice. The cost: an object that appears later exactly where another
  one left can take the old id; an IoU >= `link_iou` with the old mask is needed for that, and masklets
  visible on the previous frame compete in the same matching, so the assignment with the larger overlap wins.
- A current mask left unmatched starts a new masklet; new ids are given in record order (best first, as
  `select_records` sorts them), 0, 1, ... across the item. At `max_objects` masklets no more are born: the
  masks that would have been are counted (`LinkStep.dropped_at_cap`, `Linker.dropped_at_cap`) and not kept.
- A masklet not matched on a frame has an empty mask there. Masks are the records' masks, unaltered.

IoU is computed only for pairs whose boxes overlap and whose areas allow IoU >= link_iou
(min area / max area bounds IoU), and then only inside the boxes' intersection.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.matching import hungarian
from pipeline.records import FrameMasks, Prompt
from pipeline.stages.prompt import prompts_from_records


@dataclass(frozen=True)
class LinkStep:
    """One frame linked: what the worker writes for it."""

    frame: int
    object_ids: tuple[int, ...]  # every masklet so far, 0..O-1
    masks: np.ndarray = field(repr=False)  # bool (O, H, W) in id order; empty where the masklet is not visible
    object_scores: np.ndarray = field(repr=False)  # float32 (O,) NaN: SAM 1 has no object-presence logit
    predicted_iou: np.ndarray = field(repr=False)  # float32 (O,) the generator's predicted IoU; NaN where not visible
    born: tuple[Prompt, ...]  # masklets that start on this frame (source "sam1", from their first record)
    record_ids: tuple[int | None, ...]  # the masklet each input record went to (None: not born, at the cap)
    dropped_at_cap: int  # records that would have started a masklet past max_objects

    def frame_masks(self, source_frame: int) -> FrameMasks:
        return FrameMasks(self.frame, source_frame, self.object_ids, self.masks, self.object_scores)


@dataclass(frozen=True)
class LinkState:
    """What a Linker needs to go on (a checkpoint): each masklet's last visible mask and the cap count."""

    last_masks: np.ndarray = field(repr=False)  # bool (O, H, W)
    dropped_at_cap: int


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1), ends exclusive; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def pair_iou(a: np.ndarray, box_a, area_a: int, b: np.ndarray, box_b, area_b: int) -> float:
    """Mask IoU, counting the intersection inside the boxes' overlap only (0.0 when they do not overlap)."""
    if box_a is None or box_b is None:
        return 0.0
    y0, x0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    y1, x1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if y0 >= y1 or x0 >= x1:
        return 0.0
    inter = int(np.count_nonzero(a[y0:y1, x0:x1] & b[y0:y1, x0:x1]))
    return inter / (area_a + area_b - inter)


class Linker:
    """Masklets from per-frame masks, one frame at a time (see the module's docstring for the rule).

    `shape` (H, W) is only needed to give empty frames their size before any record has been seen."""

    def __init__(self, link_iou: float, max_objects: int, shape: tuple[int, int] | None = None):
        if not 0 < link_iou <= 1:
            raise ValueError(f"link_iou={link_iou} must be in (0, 1]")
        if max_objects < 1:
            raise ValueError(f"max_objects={max_objects} must be at least 1")
        self.link_iou = float(link_iou)
        self.max_objects = int(max_objects)
        self.shape = shape
        self.dropped_at_cap = 0
        self._last: list[np.ndarray] = []  # each masklet's last visible mask
        self._boxes: list[tuple[int, int, int, int] | None] = []
        self._areas: list[int] = []

    @property
    def num_objects(self) -> int:
        return len(self._last)

    def state(self) -> LinkState:
        h, w = self.shape or (0, 0)
        last = np.stack(self._last) if self._last else np.zeros((0, h, w), dtype=bool)
        return LinkState(last_masks=last, dropped_at_cap=self.dropped_at_cap)

    def restore(self, state: LinkState) -> None:
        masks = np.asarray(state.last_masks, dtype=bool)
        if len(masks) > self.max_objects:
            raise ValueError(f"a state of {len(masks)} masklets cannot go on under max_objects={self.max_objects}")
        self._last = [m.copy() for m in masks]
        self._boxes = [mask_box(m) for m in self._last]
        self._areas = [int(np.count_nonzero(m)) for m in self._last]
        self.dropped_at_cap = int(state.dropped_at_cap)
        if len(masks) and masks.shape[1] * masks.shape[2]:
            self.shape = (int(masks.shape[1]), int(masks.shape[2]))

    def _match(self, masks: list[np.ndarray], boxes: list, areas: list[int]) -> list[tuple[int, int]]:
        """(masklet, record) pairs: one to one, IoU >= link_iou, total IoU maximal."""
        n, m = len(self._last), len(masks)
        iou = np.zeros((n, m))
        for i in range(n):
            for j in range(m):
                small, big = sorted((self._areas[i], areas[j]))
                if big == 0 or small < self.link_iou * big:  # IoU <= small / big
                    continue
                iou[i, j] = pair_iou(self._last[i], self._boxes[i], self._areas[i], masks[j], boxes[j], areas[j])
        return hungarian(iou, iou >= self.link_iou) if n and m else []

    def step(self, frame: int, records: list[dict]) -> LinkStep:
        """Link one frame's records (dicts with the generator's keys; `segmentation` a bool (H, W) mask)."""
        masks = [np.asarray(r["segmentation"], dtype=bool) for r in records]
        shapes = {m.shape for m in masks} | ({self.shape} if self.shape and masks else set())
        if len(shapes) > 1:
            raise ValueError(f"frame {frame}: masks of several sizes {sorted(shapes)}; a Linker links one item's frames")
        if masks:
            self.shape = masks[0].shape
        boxes = [mask_box(m) for m in masks]
        areas = [int(np.count_nonzero(m)) for m in masks]
        record_ids: list[int | None] = [None] * len(records)
        for i, j in self._match(masks, boxes, areas):
            record_ids[j] = i
        born: list[Prompt] = []
        dropped = 0
        for j, r in enumerate(records):
            if record_ids[j] is not None:
                continue
            if len(self._last) >= self.max_objects:
                dropped += 1
                continue
            record_ids[j] = len(self._last)
            self._last.append(masks[j])
            self._boxes.append(boxes[j])
            self._areas.append(areas[j])
            first = prompts_from_records([r], frame)[0]
            born.append(dataclasses.replace(first, object_id=record_ids[j], source="sam1"))
        self.dropped_at_cap += dropped
        return self._emit(frame, records, masks, boxes, areas, record_ids, born, dropped)

    def _emit(self, frame, records, masks, boxes, areas, record_ids, born, dropped) -> LinkStep:
        h, w = self.shape or (0, 0)
        o = len(self._last)
        out = np.zeros((o, h, w), dtype=bool)
        piou = np.full(o, np.nan, dtype=np.float32)
        for j, i in enumerate(record_ids):
            if i is None:
                continue
            out[i] = masks[j]
            piou[i] = float(records[j]["predicted_iou"])
            self._last[i], self._boxes[i], self._areas[i] = masks[j], boxes[j], areas[j]
        return LinkStep(frame=frame, object_ids=tuple(range(o)), masks=out,
                        object_scores=np.full(o, np.nan, dtype=np.float32), predicted_iou=piou,
                        born=tuple(born), record_ids=tuple(record_ids), dropped_at_cap=dropped)
