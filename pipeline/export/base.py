"""The seam between the export runner and the formats: what a format is given per item, and what it returns.

A format is a module under pipeline/export/ exposing one `Format` object (see `Format` below). The runner
(pipeline/export/runner.py) selects items and masklets (pipeline/export/filters.py), builds one `ItemExport`
per item, calls `format.write_item(item, stage)` with an empty per-item staging folder, publishes that folder
into DEST atomically and records the item as done (so an export resumes per item, like a run), and once
every item is done calls `format.finish(dest, done, run)` with every item's summary, in item order: formats
that write one file per item have nothing left to do; single-file formats (YouTube-VIS, COCO, CVAT XML)
write their item's part under `stage/.parts/` and merge the parts there, streaming, in bounded memory (then
remove them).

Masks are read lazily: `item.mask(k, t)` is object k's (H, W) bool mask on decoded frame t (one Zarr chunk),
so a format never needs a whole item's masks in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa

RANDOM_WEIGHTS_LABEL = ("RANDOM WEIGHTS: these masks come from a model with random weights; they are a "
                        "plumbing check of the pipeline, not segmentation results")


@dataclass(frozen=True)
class RunInfo:
    """What every export carries about the run it came from."""

    root: str  # the run folder
    model: str  # model label (with its RANDOM WEIGHTS tag when so)
    random_weights: bool
    fingerprint: str  # the run's config fingerprint

    @property
    def label(self) -> str | None:
        """The text every export of a random-weight run carries in its metadata (None otherwise)."""
        return RANDOM_WEIGHTS_LABEL if self.random_weights else None


@dataclass
class ItemExport:
    """One item, as a format sees it. Objects are the selected masklets only, in object_id order; index k
    (0 .. len(object_ids) - 1) addresses them in `mask(k, t)` and in `masklets` rows."""

    item_id: str
    item: dict  # the item's row of items.parquet (path, kind, width, height, fps, num_frames, ...)
    object_ids: list[int]
    masklets: pa.Table  # the selected masklets' rows of masklets.parquet, in object_ids order
    frames: pa.Table  # their rows of frames.parquet (frame, source_frame, area, bbox, object_score, signals)
    source_frames: list[int]  # decoded frame t -> frame index in the media (the Zarr time axis)
    height: int
    width: int
    run: RunInfo
    mask: Callable[[int, int], np.ndarray]  # (k, t) -> (H, W) bool, read on demand
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. review decisions or labels, when they exist

    @property
    def num_frames(self) -> int:
        return len(self.source_frames)


class Format(Protocol):
    """An export format. `name` is what `masklet export --format NAME` takes."""

    name: str
    description: str

    def write_item(self, item: ItemExport, stage: Path) -> dict:
        """Write the item's files under `stage` (an empty folder that the runner publishes into DEST as is:
        the paths under it are the item's paths in the export). Returns a JSON-able summary of the item
        (counts, and what the format lost, e.g. overwritten pixels), kept for `finish` and the export log."""
        ...

    def finish(self, dest: Path, items: list[dict], run: RunInfo) -> dict:
        """Called once every item is written; `items` are their summaries in item order. Merges per-item
        parts into the format's final files when it has any; returns the export's JSON-able summary."""
        ...
