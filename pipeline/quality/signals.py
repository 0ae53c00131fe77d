"""Quality signals of masklets, computed from the masks already in memory while an item is tracked.

`MaskletSignals` is fed one frame at a time with that frame's (O, H, W) bool masks and object scores, in
the order the tracker emits them (the worker's writer thread can feed it next to the Zarr writer), and
`finish()` returns per-masklet rows, per-frame rows and per-item values as Arrow tables with the schemas
below. No second pass over the Zarr store: what it keeps between frames is bounded whatever the length of
the video: running sums and extrema per object, the previous frame's mask of each object cropped to its
box, and O x O intersection/union sums for duplicates. Only the per-frame rows (a few scalars per
object-frame, like frames.parquet's) grow with the video.

Definitions (each is a column; the README's "Quality signals" section repeats them):
- area_share: mask pixels / (H * W).
- perimeter: the summed lengths (cv2.arcLength, closed) of every contour cv2.findContours returns with
  RETR_LIST and CHAIN_APPROX_NONE: outer outlines and hole outlines alike. The contour runs through the
  centres of the boundary pixels, so a k x k square has perimeter 4 (k - 1) and a single pixel 0; diagonal
  steps count sqrt(2).
- complexity: perimeter / area, in 1 / pixels (so it depends on resolution: a k x k square has 4 (k-1)/k^2).
- components: foreground regions, cv2.connectedComponents with 8-connectivity.
- holes: background regions, 4-connected (the dual of 8-connected foreground, so a diagonal gap in a
  ring's wall does not open the hole), that do not touch the frame border.
- touches_border: a mask pixel lies on the first or last row or column.
- iou_prev: IoU of the mask with the same object's mask on the previous frame fed, when both are non-empty
  (null otherwise). A jump is an iou_prev below `jump_iou`, a parameter of the accumulator (changing it
  needs the masks again; flag thresholds do not).
- area_change_max: the largest max(a, b) / min(a, b) over consecutive frames where both are visible (>= 1).
- visibility_gaps: runs of empty frames with a non-empty frame before and after them (each
  disappearance followed by a reappearance counts once).
- visible_share: frames visible / frames tracked (frames fed with the object).
- dup_iou: the highest, over other masklets of the item, of sum(intersection) / sum(union) over the frames
  where both were tracked; dup_object_id names that masklet (-1: none overlaps).
- coverage (per item, per frame): share of the frame's pixels under any masklet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import pyarrow as pa

DEFAULT_JUMP_IOU = 0.5

MASKLET_SIGNALS_SCHEMA = pa.schema([
    ("object_id", pa.int32()),
    # prompt: copied from the prompt record
    ("predicted_iou", pa.float32()),
    ("stability_score", pa.float32()),
    ("prompt_area_share", pa.float64()),
    ("prompt_fg_points", pa.int32()),
    ("prompt_bg_points", pa.int32()),
    # shape, over visible frames (null when never visible)
    ("area_share_mean", pa.float64()),
    ("area_share_min", pa.float64()),
    ("area_share_max", pa.float64()),
    ("perimeter_mean", pa.float64()),
    ("complexity_mean", pa.float64()),
    ("complexity_max", pa.float64()),
    ("components_mean", pa.float64()),
    ("components_max", pa.int32()),
    ("holes_max", pa.int32()),
    ("border_share", pa.float64()),  # share of visible frames where the mask touches the frame border
    # time
    ("frames_tracked", pa.int32()),
    ("frames_visible", pa.int32()),
    ("visible_share", pa.float64()),  # null when never tracked
    ("frames_tracked_after_prompt", pa.int32()),
    ("frames_visible_after_prompt", pa.int32()),
    ("visibility_gaps", pa.int32()),
    ("iou_pairs", pa.int32()),  # consecutive visible pairs behind the IoU statistics
    ("iou_mean", pa.float64()),  # null when iou_pairs == 0
    ("iou_min", pa.float64()),
    ("iou_jumps", pa.int32()),  # pairs with IoU < jump_iou
    ("jump_iou", pa.float64()),  # the threshold used for iou_jumps
    ("area_change_max", pa.float64()),  # null when iou_pairs == 0
    ("object_score_mean", pa.float64()),  # over tracked frames with a finite score (null: none)
    ("object_score_min", pa.float64()),
    # overlap
    ("dup_iou", pa.float64()),
    ("dup_object_id", pa.int32()),
])

FRAME_SIGNALS_SCHEMA = pa.schema([
    ("object_id", pa.int32()),
    ("frame", pa.int32()),
    ("area_share", pa.float64()),
    ("perimeter", pa.float64()),
    ("complexity", pa.float64()),  # null when the mask is empty
    ("components", pa.int32()),
    ("holes", pa.int32()),
    ("touches_border", pa.bool_()),
    ("iou_prev", pa.float64()),  # null unless visible on this and the previous frame fed
])

ITEM_SIGNALS_SCHEMA = pa.schema([
    ("num_masklets", pa.int32()),
    ("frames", pa.int32()),
    ("coverage_mean", pa.float64()),  # null when no frame was fed
    ("coverage_min", pa.float64()),
])


@dataclass(frozen=True)
class PromptSignals:
    """What the prompt record says about a masklet's seed; FG/BG counts grow when a reviewer corrects it."""

    object_id: int
    frame: int  # decoded frame where the prompt was given
    predicted_iou: float
    stability_score: float
    area: int  # pixels of the prompt mask
    fg_points: int = 1  # an automatic (AMG grid) prompt is one foreground point
    bg_points: int = 0

    @classmethod
    def from_prompt(cls, prompt) -> "PromptSignals":
        """From a pipeline.records.Prompt (automatic: one foreground point, no background point)."""
        return cls(prompt.object_id, prompt.frame, float(prompt.predicted_iou), float(prompt.stability_score),
                   int(prompt.area))


@dataclass(frozen=True)
class Shape:
    """Shape signals of one mask on one frame."""

    area: int
    perimeter: float
    components: int
    holes: int
    touches_border: bool


@dataclass(frozen=True)
class FrameSignals:
    """What `MaskletSignals.add` returns for one frame, in the order of the objects fed: their areas, their
    boxes (y0, y1, x0, x1, half-open; zeros when empty) and their FRAME_SIGNALS_SCHEMA row values."""

    areas: np.ndarray  # (O,) int64
    boxes: np.ndarray  # (O, 4) int64
    rows: dict[str, list]


@dataclass(frozen=True)
class Signals:
    """What `MaskletSignals.finish` returns: Arrow tables with the schemas above."""

    masklets: pa.Table  # MASKLET_SIGNALS_SCHEMA, one row per prompt, in prompt order
    frames: pa.Table  # FRAME_SIGNALS_SCHEMA, one row per object per frame fed
    item: pa.Table  # ITEM_SIGNALS_SCHEMA, one row


def bounding_boxes(masks: np.ndarray) -> np.ndarray:
    """(O, H, W) bool -> (O, 4) int64 boxes y0, y1, x0, x1 (half-open); all 0 where the mask is empty.

    Rows are found on 8-pixel words where the row length allows it (8 times fewer elements to reduce;
    `any` over bools is the accumulator's largest cost at 1080p), columns only within the rows found.
    """
    o, h, w = masks.shape
    if w % 8 == 0 and masks.flags.c_contiguous:
        rows = masks.view(np.uint64).any(axis=2)
    else:
        rows = masks.any(axis=2)
    boxes = np.zeros((o, 4), dtype=np.int64)
    for k in np.flatnonzero(rows.any(axis=1)):
        ys = np.flatnonzero(rows[k])
        xs = np.flatnonzero(masks[k, ys[0]:ys[-1] + 1].any(axis=0))
        boxes[k] = (ys[0], ys[-1] + 1, xs[0], xs[-1] + 1)
    return boxes


def shape_of(mask: np.ndarray, box: Sequence[int] | None = None) -> Shape:
    """Shape signals of one (H, W) bool mask; `box` (y0, y1, x0, x1), when known, limits the work to it.

    The crop is padded by one background pixel, so background touching the box's edge joins the padding:
    such background is connected to the frame border in the full frame too (everything outside the box is
    background and reaches the border), so holes are the same as on the whole frame.
    """
    h, w = mask.shape
    if box is None:
        box = bounding_boxes(mask[None])[0]
    y0, y1, x0, x1 = (int(v) for v in box)
    if y1 <= y0 or x1 <= x0:
        return Shape(0, 0.0, 0, 0, False)
    crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), dtype=np.uint8)
    crop[1:-1, 1:-1] = mask[y0:y1, x0:x1]
    area = int(np.count_nonzero(crop))
    if area == 0:
        return Shape(0, 0.0, 0, 0, False)
    contours, _ = cv2.findContours(crop, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = float(sum(cv2.arcLength(c, True) for c in contours))
    n_fg, _ = cv2.connectedComponents(crop, connectivity=8)
    n_bg, _ = cv2.connectedComponents(1 - crop, connectivity=4)
    # Label 0 is the mask itself in the background labelling; the padding is one region; the rest are holes.
    holes = n_bg - 2
    touches = bool(y0 == 0 or x0 == 0 or y1 == h or x1 == w)
    return Shape(area, perimeter, n_fg - 1, holes, touches)


_INF_START = ("share_min", "iou_min", "score_min")  # running minima start at +inf


class MaskletSignals:
    """Incremental quality signals of one item's masklets: `add` each frame, then `finish` once.

    State is plain numpy arrays and lists, so the accumulator pickles: a checkpoint can carry it and a
    resumed attempt goes on feeding it from the next frame.
    """

    def __init__(self, prompts: Sequence[PromptSignals], height: int, width: int,
                 jump_iou: float = DEFAULT_JUMP_IOU, keep_rows: bool = True):
        if not 0.0 <= jump_iou <= 1.0:
            raise ValueError(f"jump_iou={jump_iou} out of range [0, 1]")
        if height <= 0 or width <= 0:
            raise ValueError(f"frame size {height}x{width}: both sides must be positive")
        self.prompts = list(prompts)
        self.height, self.width, self.jump_iou = height, width, jump_iou
        self.pixels = height * width
        self.index = {p.object_id: i for i, p in enumerate(self.prompts)}
        if len(self.index) != len(self.prompts):
            raise ValueError(f"object ids repeat among the prompts: {[p.object_id for p in self.prompts]}")
        n = len(self.prompts)
        z = lambda dtype=np.float64: np.zeros(n, dtype=dtype)  # noqa: E731
        self.tracked, self.visible = z(np.int64), z(np.int64)
        self.tracked_after, self.visible_after = z(np.int64), z(np.int64)
        self.share_sum, self.share_min, self.share_max = z(), np.full(n, np.inf), z()
        self.perimeter_sum, self.complexity_sum, self.complexity_max = z(), z(), z()
        self.components_sum, self.components_max, self.holes_max = z(), z(np.int64), z(np.int64)
        self.border = z(np.int64)
        self.gaps = z(np.int64)
        self.in_gap = np.zeros(n, dtype=bool)  # seen visible, then empty since
        self.iou_pairs, self.iou_sum, self.iou_min, self.jumps = z(np.int64), z(), np.full(n, np.inf), z(np.int64)
        self.area_change_max = z()
        self.score_n, self.score_sum, self.score_min = z(np.int64), z(), np.full(n, np.inf)
        self.inter = np.zeros((n, n), dtype=np.int64)
        self.union = np.zeros((n, n), dtype=np.int64)
        self.prev: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n  # (box, cropped mask) if visible
        self.last_frame = -1
        self.coverage_n, self.coverage_sum, self.coverage_min = 0, 0.0, math.inf
        # Per-frame rows are kept here unless the caller keeps them itself (the worker's frame rows do, from
        # what `add` returns), so that a long video holds them once.
        self.keep_rows = keep_rows
        self.rows: dict[str, list] = {name: [] for name in FRAME_SIGNALS_SCHEMA.names}

    def add(self, frame: int, object_ids: Sequence[int], masks: np.ndarray, object_scores: np.ndarray) -> FrameSignals:
        """Feed one frame: `masks` (O, H, W) bool for `object_ids`, `object_scores` (O,) (NaN: no score).
        Returns this frame's areas, boxes and per-frame rows."""
        if masks.dtype != np.bool_ or masks.ndim != 3 or masks.shape[1:] != (self.height, self.width):
            raise ValueError(f"frame {frame}: masks must be bool (O, {self.height}, {self.width}), "
                             f"got {masks.dtype} {masks.shape}")
        if len(object_ids) != masks.shape[0] or len(object_scores) != masks.shape[0]:
            raise ValueError(f"frame {frame}: {len(object_ids)} object ids and {len(object_scores)} scores "
                             f"for {masks.shape[0]} masks")
        if frame <= self.last_frame:
            raise ValueError(f"frame {frame} fed after frame {self.last_frame}: frames must increase")
        try:
            idx = np.array([self.index[o] for o in object_ids], dtype=np.int64)
        except KeyError as e:
            raise ValueError(f"frame {frame}: object id {e.args[0]} has no prompt") from e
        self.last_frame = frame
        boxes = bounding_boxes(masks)
        areas = np.zeros(len(idx), dtype=np.int64)
        rows: dict[str, list] = {name: [] for name in FRAME_SIGNALS_SCHEMA.names}
        for k, i in enumerate(idx):
            areas[k] = self._add_object(frame, int(i), masks[k], boxes[k], float(object_scores[k]), rows)
        if self.keep_rows:
            for name, values in rows.items():
                self.rows[name].extend(values)
        self._add_overlaps(idx, masks, boxes, areas)
        if len(idx):
            # The union is built inside each object's box: cheaper than any() over all O full planes.
            covered = np.zeros((self.height, self.width), dtype=bool)
            for k, (y0, y1, x0, x1) in enumerate(boxes):
                covered[y0:y1, x0:x1] |= masks[k, y0:y1, x0:x1]
            coverage = float(np.count_nonzero(covered)) / self.pixels
            self.coverage_n += 1
            self.coverage_sum += coverage
            self.coverage_min = min(self.coverage_min, coverage)
        return FrameSignals(areas, boxes, rows)

    def _add_object(self, frame: int, i: int, mask: np.ndarray, box: np.ndarray, score: float,
                    r: dict[str, list]) -> int:
        s = shape_of(mask, box)
        p = self.prompts[i]
        self.tracked[i] += 1
        after = frame > p.frame
        self.tracked_after[i] += after
        if math.isfinite(score):
            self.score_n[i] += 1
            self.score_sum[i] += score
            self.score_min[i] = min(self.score_min[i], score)
        iou = None
        complexity = None
        if s.area:
            share = s.area / self.pixels
            complexity = s.perimeter / s.area
            self.visible[i] += 1
            self.visible_after[i] += after
            self.share_sum[i] += share
            self.share_min[i] = min(self.share_min[i], share)
            self.share_max[i] = max(self.share_max[i], share)
            self.perimeter_sum[i] += s.perimeter
            self.complexity_sum[i] += complexity
            self.complexity_max[i] = max(self.complexity_max[i], complexity)
            self.components_sum[i] += s.components
            self.components_max[i] = max(self.components_max[i], s.components)
            self.holes_max[i] = max(self.holes_max[i], s.holes)
            self.border[i] += s.touches_border
            if self.in_gap[i]:
                self.gaps[i] += 1
                self.in_gap[i] = False
            crop = mask[box[0]:box[1], box[2]:box[3]]
            if self.prev[i] is not None:
                prev_box, prev_crop = self.prev[i]
                prev_area = int(np.count_nonzero(prev_crop))
                inter = _box_intersection(prev_box, prev_crop, box, crop)
                iou = inter / (prev_area + s.area - inter)
                self.iou_pairs[i] += 1
                self.iou_sum[i] += iou
                self.iou_min[i] = min(self.iou_min[i], iou)
                self.jumps[i] += iou < self.jump_iou
                change = max(prev_area, s.area) / min(prev_area, s.area)
                self.area_change_max[i] = max(self.area_change_max[i], change)
            self.prev[i] = (box.copy(), crop.copy())
        else:
            share = 0.0
            if self.visible[i]:
                self.in_gap[i] = True
            self.prev[i] = None
        r["object_id"].append(p.object_id)
        r["frame"].append(frame)
        r["area_share"].append(share)
        r["perimeter"].append(s.perimeter)
        r["complexity"].append(complexity)
        r["components"].append(s.components)
        r["holes"].append(s.holes)
        r["touches_border"].append(s.touches_border)
        r["iou_prev"].append(iou)
        return s.area

    def _add_overlaps(self, idx: np.ndarray, masks: np.ndarray, boxes: np.ndarray, areas: np.ndarray) -> None:
        """Pairwise intersection and union sums of this frame's objects; pixels compared only where boxes meet."""
        if len(idx) < 2:
            return
        union = areas[:, None] + areas[None, :]  # minus the intersection, below
        y0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
        y1 = np.minimum(boxes[:, None, 1], boxes[None, :, 1])
        x0 = np.maximum(boxes[:, None, 2], boxes[None, :, 2])
        x1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
        inter = np.zeros_like(union)
        for a, b in zip(*np.nonzero(np.triu((y1 > y0) & (x1 > x0), k=1))):
            sl = (slice(y0[a, b], y1[a, b]), slice(x0[a, b], x1[a, b]))
            inter[a, b] = inter[b, a] = np.count_nonzero(masks[a][sl] & masks[b][sl])
        grid = np.ix_(idx, idx)
        self.inter[grid] += inter
        self.union[grid] += union - inter

    def add_prompts(self, prompts: Sequence[PromptSignals]) -> None:
        """Masklets that join after the first frame (re-seeding, phase-1 linking): fed from their next frame."""
        new = [p for p in prompts]
        ids = [p.object_id for p in new]
        if len(set(ids)) != len(ids) or any(o in self.index for o in ids):
            raise ValueError(f"object ids {ids} repeat, or repeat those of {list(self.index)}")
        k = len(new)
        if not k:
            return
        for name in self._STATE:
            value = getattr(self, name)
            if value.ndim == 2:
                setattr(self, name, np.pad(value, ((0, k), (0, k))))
            else:
                fill = np.inf if name in _INF_START else 0
                setattr(self, name, np.concatenate([value, np.full(k, fill, dtype=value.dtype)]))
        for p in new:
            self.index[p.object_id] = len(self.prompts)
            self.prompts.append(p)
            self.prev.append(None)

    # The running statistics, as named arrays (np.savez-able, no pickle): what a checkpoint keeps.
    _STATE = ("tracked", "visible", "tracked_after", "visible_after", "share_sum", "share_min", "share_max",
              "perimeter_sum", "complexity_sum", "complexity_max", "components_sum", "components_max",
              "holes_max", "border", "gaps", "in_gap", "iou_pairs", "iou_sum", "iou_min", "jumps",
              "area_change_max", "score_n", "score_sum", "score_min", "inter", "union")

    def state(self) -> dict[str, np.ndarray]:
        """Everything but the per-frame rows (the worker checkpoints those with its frame rows), as arrays.
        `restore` with the same prompts and frame size continues exactly where this left off."""
        out = {name: np.array(getattr(self, name)) for name in self._STATE}
        out["prev_boxes"] = np.array([p[0] if p is not None else (-1, -1, -1, -1) for p in self.prev],
                                     dtype=np.int64).reshape(len(self.prev), 4)
        crops = [p[1].ravel() for p in self.prev if p is not None]
        out["prev_bits"] = np.packbits(np.concatenate(crops)) if crops else np.zeros(0, dtype=np.uint8)
        out["scalars"] = np.array([self.last_frame, self.coverage_n, self.coverage_sum, self.coverage_min,
                                   self.jump_iou, self.height, self.width], dtype=np.float64)
        return out

    def restore(self, state: dict[str, np.ndarray]) -> "MaskletSignals":
        """Load `state()` into this accumulator (built with the same prompts and frame size); returns it."""
        last, cov_n, cov_sum, cov_min, jump_iou, height, width = (float(v) for v in state["scalars"])
        if (int(height), int(width)) != (self.height, self.width) or jump_iou != self.jump_iou:
            raise ValueError(f"signals state is for {int(height)}x{int(width)} frames and jump_iou={jump_iou}, "
                             f"this accumulator for {self.height}x{self.width} and {self.jump_iou}")
        n = len(self.prompts)
        for name in self._STATE:
            value = np.asarray(state[name])
            if value.shape != np.shape(getattr(self, name)):
                raise ValueError(f"signals state {name} has shape {value.shape}, expected "
                                 f"{np.shape(getattr(self, name))} for {n} prompts")
            setattr(self, name, value.astype(getattr(self, name).dtype, copy=True))
        bits = np.unpackbits(np.asarray(state["prev_bits"], dtype=np.uint8))
        at, self.prev = 0, [None] * n
        for i, box in enumerate(np.asarray(state["prev_boxes"], dtype=np.int64)):
            if box[0] < 0:
                continue
            size = int((box[1] - box[0]) * (box[3] - box[2]))
            self.prev[i] = (box.copy(), bits[at:at + size].astype(bool).reshape(box[1] - box[0], box[3] - box[2]))
            at += size
        self.last_frame, self.coverage_n = int(last), int(cov_n)
        self.coverage_sum, self.coverage_min = cov_sum, cov_min
        return self

    def finish(self) -> Signals:
        """Per-masklet, per-frame and per-item tables of everything fed so far."""
        n = len(self.prompts)
        vis = self.visible
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(self.union > 0, self.inter / np.where(self.union > 0, self.union, 1), -1.0)
        np.fill_diagonal(iou, -1.0)
        cols: dict[str, list] = {name: [] for name in MASKLET_SIGNALS_SCHEMA.names}
        for i, p in enumerate(self.prompts):
            v, t, pairs = int(vis[i]), int(self.tracked[i]), int(self.iou_pairs[i])
            per_visible = lambda x: float(x) / v if v else None  # noqa: E731
            if_visible = lambda x: float(x) if v else None  # noqa: E731
            if_pairs = lambda x: float(x) if pairs else None  # noqa: E731
            j = int(np.argmax(iou[i])) if n > 1 else -1
            dup = j >= 0 and iou[i, j] > 0
            row = {
                "object_id": p.object_id,
                "predicted_iou": p.predicted_iou,
                "stability_score": p.stability_score,
                "prompt_area_share": p.area / self.pixels,
                "prompt_fg_points": p.fg_points,
                "prompt_bg_points": p.bg_points,
                "area_share_mean": per_visible(self.share_sum[i]),
                "area_share_min": if_visible(self.share_min[i]),
                "area_share_max": if_visible(self.share_max[i]),
                "perimeter_mean": per_visible(self.perimeter_sum[i]),
                "complexity_mean": per_visible(self.complexity_sum[i]),
                "complexity_max": if_visible(self.complexity_max[i]),
                "components_mean": per_visible(self.components_sum[i]),
                "components_max": int(self.components_max[i]),
                "holes_max": int(self.holes_max[i]),
                "border_share": per_visible(self.border[i]),
                "frames_tracked": t,
                "frames_visible": v,
                "visible_share": v / t if t else None,
                "frames_tracked_after_prompt": int(self.tracked_after[i]),
                "frames_visible_after_prompt": int(self.visible_after[i]),
                "visibility_gaps": int(self.gaps[i]),
                "iou_pairs": pairs,
                "iou_mean": float(self.iou_sum[i]) / pairs if pairs else None,
                "iou_min": if_pairs(self.iou_min[i]),
                "iou_jumps": int(self.jumps[i]),
                "jump_iou": self.jump_iou,
                "area_change_max": if_pairs(self.area_change_max[i]),
                "object_score_mean": float(self.score_sum[i]) / self.score_n[i] if self.score_n[i] else None,
                "object_score_min": float(self.score_min[i]) if self.score_n[i] else None,
                "dup_iou": float(iou[i, j]) if dup else 0.0,
                "dup_object_id": self.prompts[j].object_id if dup else -1,
            }
            for k, value in row.items():
                cols[k].append(value)
        item = {
            "num_masklets": [n],
            "frames": [self.last_frame + 1 if self.last_frame >= 0 else 0],
            "coverage_mean": [self.coverage_sum / self.coverage_n if self.coverage_n else None],
            "coverage_min": [self.coverage_min if self.coverage_n else None],
        }
        return Signals(pa.table(cols, schema=MASKLET_SIGNALS_SCHEMA),
                       pa.table(self.rows, schema=FRAME_SIGNALS_SCHEMA),
                       pa.table(item, schema=ITEM_SIGNALS_SCHEMA))


def _box_intersection(box_a: np.ndarray, crop_a: np.ndarray, box_b: np.ndarray, crop_b: np.ndarray) -> int:
    """Pixels set in both masks, each given as its box (y0, y1, x0, x1) and the mask cropped to it."""
    y0, y1 = max(box_a[0], box_b[0]), min(box_a[1], box_b[1])
    x0, x1 = max(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if y1 <= y0 or x1 <= x0:
        return 0
    a = crop_a[y0 - box_a[0]:y1 - box_a[0], x0 - box_a[2]:x1 - box_a[2]]
    b = crop_b[y0 - box_b[0]:y1 - box_b[0], x0 - box_b[2]:x1 - box_b[2]]
    return int(np.count_nonzero(a & b))
