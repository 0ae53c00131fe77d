"""Checkpoints inside a long item, so that a killed or requeued job goes on inside the video.

While an item is tracked, its folder tmp/partial/<item_id>/ holds:

    masks.zarr                   the item's staged mask array; frames before `next_frame` are final
    prompts.pt                   the item's prompts (written at the first checkpoint; re-seeding adds masklets:
                                 then prompts-<next frame>.pt, named by progress.json, holds them all)
    rows-<first frame>.parquet   the frame rows of one stretch between two checkpoints
    state-<next frame>.pt        the tracker's state after frame next_frame - 1 (TrackerState.payload())
    signals-<next frame>.npz     the quality signals' running statistics at that point (MaskletSignals.state())
    progress.json                the commit point: next_frame and the files above that belong to it

A checkpoint is taken at a `store.frames_per_file` boundary, after the mask shard files up to it are
written: the new rows and state files are written under new names, the mask files and these are fsynced,
then progress.json is replaced in one rename (pipeline/store/atomic.py), then files it no longer names are
removed. A kill, or a node crash, at any instant leaves either the old checkpoint or the new one whole; frames past `next_frame` are rewritten on resume (whole shard files). Nothing here
is visible to readers: the item reaches the run only through the normal commit (masks published, rows
committed), after which the folder is removed.

The `key` (item, frame count, size, frame stride, config fingerprint; the tracker checks the object ids)
guards against continuing from another item's or run's state; a checkpoint that does not match or cannot
be read is discarded and the item starts from frame 0. Everything is loaded with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.paths import RunPaths
from pipeline.records import Prompt
from pipeline.store.atomic import fsync_tree, write_atomic
from pipeline.store.metadata import FRAMES_SCHEMA

log = logging.getLogger("masklet.partial")

PARTIAL_VERSION = 2  # 2: signals-<next frame>.npz


@dataclass(frozen=True)
class Resume:
    """What an item needs to go on from its last checkpoint."""

    next_frame: int
    prompts: list[Prompt]
    tracker: dict  # TrackerState.payload()
    rows: pa.Table  # frame rows of frames 0 .. next_frame - 1
    seconds_prompt: float
    signals: dict[str, np.ndarray]  # MaskletSignals.state() after frame next_frame - 1
    extra: dict  # plain JSON the worker keeps beside (re-seeding's schedule, duplicate rule and drops)


def prompts_payload(prompts: list[Prompt]) -> dict:
    """Prompts as tensors and lists (weights_only-loadable); masks bit-packed."""
    masks = np.stack([p.mask for p in prompts]).astype(bool) if prompts else np.zeros((0, 0, 0), dtype=bool)
    return {
        "shape": list(masks.shape),
        "masks": torch.from_numpy(np.packbits(masks, axis=None)),
        "object_id": [int(p.object_id) for p in prompts],
        "frame": [int(p.frame) for p in prompts],
        "point": [[float(v) for v in p.point] for p in prompts],
        "predicted_iou": [float(p.predicted_iou) for p in prompts],
        "stability_score": [float(p.stability_score) for p in prompts],
        "area": [int(p.area) for p in prompts],
        "bbox": [[int(v) for v in p.bbox] for p in prompts],
        "source": [str(p.source) for p in prompts],
    }


def prompts_from_payload(d: dict) -> list[Prompt]:
    shape = tuple(d["shape"])
    bits = np.unpackbits(d["masks"].numpy(), count=int(np.prod(shape))).astype(bool).reshape(shape)
    return [
        Prompt(object_id=d["object_id"][i], frame=d["frame"][i], mask=bits[i], point=tuple(d["point"][i]),
               predicted_iou=d["predicted_iou"][i], stability_score=d["stability_score"][i], area=d["area"][i],
               bbox=tuple(d["bbox"][i]), source=d["source"][i])
        for i in range(shape[0])
    ]


def _save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a temporary name
        np.savez(f, **arrays)


class PartialItem:
    """The checkpoint folder of one item (see the module's docstring)."""

    def __init__(self, paths: RunPaths, item_id: str, key: dict):
        self.item_id = item_id
        self.dir = paths.partial(item_id)
        self.trash = paths.item_tmp(item_id)
        self.key = {"version": PARTIAL_VERSION, **key}
        self._rows: list[str] = []
        self._rows_from = 0  # first frame of the rows not yet in a checkpoint
        self._prompts: tuple[str, int] | None = None  # the prompts file of the last checkpoint, and its count

    @property
    def masks(self):
        return self.dir / "masks.zarr"

    @property
    def progress(self):
        return self.dir / "progress.json"

    def start(self) -> Resume | None:
        """The item's last checkpoint, if there is a usable one; otherwise an empty folder (returns None)."""
        resume = None
        if self.progress.exists():
            try:
                resume = self._load()
            except Exception as e:  # noqa: BLE001 - any unusable checkpoint means: start again from frame 0
                log.warning("item %s: discarding its checkpoint in %s (%s: %s); starting from frame 0",
                            self.item_id, self.dir, type(e).__name__, e)
        if resume is None:
            self.discard()
            self.dir.mkdir(parents=True)
        return resume

    def _load(self) -> Resume:
        progress = json.loads(self.progress.read_text())
        if progress.get("key") != self.key:
            raise ValueError(f"it was made for {progress.get('key')}, this attempt is {self.key}")
        if not self.masks.is_dir():
            raise FileNotFoundError(f"{self.masks} is missing")
        state = torch.load(self.dir / progress["state"], weights_only=True, map_location="cpu")
        prompts = torch.load(self.dir / progress.get("prompts", "prompts.pt"), weights_only=True, map_location="cpu")
        rows = [pq.read_table(self.dir / name, schema=FRAMES_SCHEMA) for name in progress["rows"]]
        table = pa.concat_tables(rows) if rows else FRAMES_SCHEMA.empty_table()
        next_frame = int(progress["next_frame"])
        if int(state["next_frame"]) != next_frame:
            raise ValueError(f"state is for frame {state['next_frame']}, progress says {next_frame}")
        with np.load(self.dir / progress["signals"], allow_pickle=False) as npz:
            signals = {name: npz[name] for name in npz.files}
        self._rows = list(progress["rows"])
        self._rows_from = next_frame
        self._prompts = (progress.get("prompts", "prompts.pt"), len(prompts["prompts"]["object_id"]))
        return Resume(next_frame=next_frame, prompts=prompts_from_payload(prompts["prompts"]), tracker=state,
                      rows=table, seconds_prompt=float(prompts["seconds_prompt"]), signals=signals,
                      extra=dict(progress.get("extra") or {}))

    def save(self, next_frame: int, rows: pa.Table, tracker: dict, prompts: list[Prompt],
             seconds_prompt: float, signals: dict[str, np.ndarray], extra: dict | None = None) -> None:
        """Checkpoint after frame next_frame - 1. `rows` are the frame rows since the last checkpoint; the mask
        shard files up to next_frame must already be written. `prompts` are all the item's prompts so far (they
        only grow); `extra`: small JSON-able state kept with this checkpoint."""
        if self._prompts is None or self._prompts[1] != len(prompts):
            name = "prompts.pt" if self._prompts is None else f"prompts-{next_frame:08d}.pt"
            payload = {"prompts": prompts_payload(prompts), "seconds_prompt": seconds_prompt}
            write_atomic(self.dir / name, lambda p: torch.save(payload, p))
            self._prompts = (name, len(prompts))
        prompts_name = self._prompts[0]
        rows_name = f"rows-{self._rows_from:08d}.parquet"
        write_atomic(self.dir / rows_name, lambda p: pq.write_table(rows, p))
        state_name = f"state-{next_frame:08d}.pt"
        write_atomic(self.dir / state_name, lambda p: torch.save(tracker, p))
        signals_name = f"signals-{next_frame:08d}.npz"
        write_atomic(self.dir / signals_name, lambda p: _save_npz(p, signals))
        fsync_tree(self.masks)  # the mask files this checkpoint vouches for are on disk before it is
        names = [*self._rows, rows_name]
        progress = {"key": self.key, "next_frame": next_frame, "rows": names, "state": state_name,
                    "signals": signals_name, "prompts": prompts_name, "extra": extra or {}}
        write_atomic(self.progress, lambda p: p.write_text(json.dumps(progress)))  # the commit point
        self._rows, self._rows_from = names, next_frame
        keep = {*names, state_name, signals_name, prompts_name, "progress.json", "masks.zarr"}
        for p in self.dir.iterdir():
            if p.name not in keep and not p.name.startswith("."):
                p.unlink(missing_ok=True)

    def discard(self) -> None:
        if self.dir.exists():
            trash = self.trash / f"partial.{uuid.uuid4().hex[:8]}"  # the shard's next owner clears what is left
            trash.parent.mkdir(parents=True, exist_ok=True)
            self.dir.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
