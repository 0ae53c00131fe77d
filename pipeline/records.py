"""The small typed values that cross the pipeline's seams.

Manifest -> MediaItem; plan -> Shard; prompt stage -> Prompt; propagate stage -> FrameMasks;
worker -> ItemResult. Each stage takes and returns these, never a shared dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

MediaKind = Literal["video", "frames", "image"]
ItemStatus = Literal["done", "failed"]


@dataclass(frozen=True)
class MediaItem:
    """One manifest row: a video, a folder of frames or an image, with what probing found."""

    item_id: str  # stable, path-safe, unique in the manifest
    path: str  # absolute path of the file or frame folder
    kind: MediaKind
    num_frames: int = 0
    fps: float | None = None
    width: int = 0
    height: int = 0
    codec: str | None = None
    bytes: int = 0
    error: str | None = None  # set when probing failed; such items are recorded as failed by the worker
    # Ground truth of a dataset layout (pipeline/manifest/layouts.py): its annotation folder and layout
    # (`davis` or `sav`); what `masklet evaluate OUT` reads. Not in the fingerprint: it does not change masks.
    gt_path: str | None = None
    gt_layout: str | None = None

    @property
    def cost(self) -> float:
        """Work estimate used to balance shards: frames x pixels (at least 1 so that empty items count)."""
        return max(1, self.num_frames) * max(1, self.width * self.height)


@dataclass(frozen=True)
class Shard:
    """A frozen unit of scheduling: a fixed list of items, run by one worker call."""

    shard_id: int
    item_ids: tuple[str, ...]
    cost: float


@dataclass(frozen=True)
class Prompt:
    """One object found by automatic prompting on a keyframe; it seeds one masklet."""

    object_id: int  # stable id of the masklet within its item (0..n-1, in prompt order)
    frame: int  # position of the keyframe in the item's decoded frame sequence
    mask: np.ndarray = field(repr=False)  # bool (H, W) at the item's original resolution
    point: tuple[float, float]  # the grid point (x, y) in original pixels that produced the mask
    predicted_iou: float
    stability_score: float
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h (AMG's XYWH convention)
    # where the masklet came from: amg (SAM 2's generator on the first frame), reseed (SAM 2's generator on a
    # later frame, pipeline/stages/reseed.py), sam1 (segment-anything's generator: phases 1 and 2),
    # correction (a reviewer's click on a missed object, pipeline/review/refine.py)
    source: str = "amg"


@dataclass(frozen=True)
class Dropped:
    """A re-seeded masklet removed by the duplicate rule (pipeline/stages/reseed.py's Hotstart): from `frame` on
    it is no longer tracked (empty masks); its row keeps what happened instead of losing it silently."""

    object_id: int
    frame: int  # the frame on which the rule decided; its masks before it are kept
    reason: str  # "duplicate" (IoU >= prompt.dup_iou with an older masklet) or "empty"
    merged_into: int | None  # the older masklet it duplicated most often (None for "empty")


@dataclass(frozen=True)
class FrameMasks:
    """All objects' binary masks on one decoded frame, at the item's original resolution."""

    frame: int  # position in the decoded sequence (the Zarr time axis)
    source_frame: int  # index of this frame in the original media (differs when frames are strided)
    object_ids: tuple[int, ...]
    masks: np.ndarray = field(repr=False)  # bool (O, H, W); objects may overlap, so one plane each
    object_scores: np.ndarray = field(repr=False)  # float32 (O,): SAM 2 object-presence logits


@dataclass(frozen=True)
class ItemResult:
    """What the worker records for one item, whether it succeeded or not."""

    item_id: str
    status: ItemStatus
    error: str | None = None
    num_frames: int = 0  # frames decoded and segmented
    num_objects: int = 0
    width: int = 0  # resolution of the stored masks (the decoded frames)
    height: int = 0
    stride: int = 1
    scale: float | None = None  # stored / original size (1.0 unless the frames exceeded decode.max_side)
    attempts: int = 1
    seconds_decode: float = 0.0
    seconds_prompt: float = 0.0
    seconds_propagate: float = 0.0
    seconds_write: float = 0.0
    seconds_total: float = 0.0
    seconds_signals: float = 0.0  # quality signals, in the writer thread (part of seconds_write)
    coverage_mean: float | None = None  # share of each frame under any masklet (pipeline/quality/signals.py)
    coverage_min: float | None = None
    object_batch: int | None = None  # objects per step the tracker really used (its sizing, the ladder's rung)
