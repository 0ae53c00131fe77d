"""Masklets in Zarr v3: one bool array per item at `masks/<item_id>`, shape (objects, frames, H, W).

Each masklet-frame is its own chunk (1, 1, H, W), so one object on one frame reads without touching the
others; chunks are packed by Zarr's sharding codec into one file per `frames_per_file` frames (all objects),
so an item costs 1 + ceil(frames / frames_per_file) files. Blosc zstd with bit-shuffle: masks are mostly
runs of equal bytes, and bit-shuffling packs 8 bool bytes into one before compressing.

Arrays are written under the item's tmp/items/<item_id>/ and renamed into place when complete, fsynced
first (pipeline/store/atomic.py): a reader never sees half of one, not even after a node crash, and only
items committed in the metadata are read at all. The item's shard owner clears that folder when it starts.

Memory: the writer holds at most `buffer_bytes` (MASK_BUFFER_BYTES, 512 MiB) of masks, in one buffer
allocated once: frames are copied into it as they arrive and written when it is full or at a shard-file
boundary. A shard file of 64 objects x 8 frames at 4096 x 2304 is 4.8 GB of bool; it is then written in
several slabs, each a partial write of the same shard file: Zarr keeps the encoded chunks already there and
adds the new ones, so nothing is compressed twice and the file's bytes are the same as one whole write
(tests/test_store.py compares them). When one frame alone exceeds the budget it is written straight from the
tracker's array, with no copy at all.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.config import StoreConfig
from pipeline.paths import RunPaths
from pipeline.records import FrameMasks
from pipeline.store.atomic import fsync_dir, publish

# Most bytes of masks a MaskWriter holds between writes (one frame is written as it comes when it is larger).
MASK_BUFFER_BYTES = 512 * 1024**2
MASKS_GROUP_ATTRS = {"layout": "masks/<item_id>: bool (objects, frames, height, width)"}


def _compressors(cfg: StoreConfig):
    if cfg.compressor == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=cfg.level, shuffle="bitshuffle")]
    if cfg.compressor == "zstd":
        return [ZstdCodec(level=cfg.level)]
    return None


def ensure_group(paths: RunPaths) -> None:
    if not (paths.masks / "zarr.json").exists():
        zarr.open_group(str(paths.masks), mode="a", attributes=MASKS_GROUP_ATTRS)
        fsync_dir(paths.masks)


class MaskWriter:
    """Streams FrameMasks of one item into a staged Zarr array; `publish()` moves it into the run."""

    def __init__(self, paths: RunPaths, item_id: str, num_objects: int, num_frames: int, height: int,
                 width: int, cfg: StoreConfig, attributes: dict, stage: Path | None = None, resume_at: int = 0,
                 buffer_bytes: int = MASK_BUFFER_BYTES):
        """`stage`: where to stage the array (default: a new name under tmp/items/<item_id>/). `resume_at`: go
        on writing an array already staged there, whose frames before `resume_at` (a shard-file boundary) are
        final. `buffer_bytes`: most bytes of masks held between writes (see the module's docstring).

        `num_objects` is the array's capacity: a frame may carry fewer objects (masklets added while tracking,
        re-seeding or phase-1 linking, come after; objects never leave the layout), the rows past them stay
        empty, and `finish(num_objects=n)` trims the object axis to the n objects there were."""
        self.paths = paths
        self.item_id = item_id
        self.shape = (num_objects, num_frames, height, width)
        self.stage = stage or paths.item_tmp(item_id) / f"masks.{uuid.uuid4().hex[:8]}.zarr"
        self.stage.parent.mkdir(parents=True, exist_ok=True)
        per_file = max(1, min(cfg.frames_per_file, num_frames))
        if resume_at:
            self.array = zarr.open_array(str(self.stage), mode="r+")
            if self.array.shape != self.shape or resume_at % per_file or not 0 < resume_at < num_frames:
                raise ValueError(f"item {item_id}: the staged array {self.stage} has shape {self.array.shape}, "
                                 f"expected {self.shape}, resuming at frame {resume_at}")
        else:
            self.array = zarr.create_array(
                store=str(self.stage),
                shape=self.shape,
                dtype=bool,
                chunks=(1, 1, height, width),
                shards=(max(1, num_objects), per_file, height, width),
                compressors=_compressors(cfg),
                fill_value=False,
                attributes=attributes,
                overwrite=stage is not None,
            )
        self.per_file = per_file
        frame_bytes = num_objects * height * width  # bool
        # frames held between writes: as many as the budget allows, never more than a shard file
        self.buffer_frames = max(1, min(per_file, buffer_bytes // max(1, frame_bytes)))
        self._buffer: np.ndarray | None = None  # (O, buffer_frames, H, W), allocated at the first frame
        self._held = 0  # frames in the buffer
        self._start = resume_at  # first frame of the buffered slab
        self.frames_written = resume_at
        self.objects = 0  # objects on the latest frame (they never decrease within an item)

    @property
    def frames_buffered(self) -> int:
        """Frames received so far (written or waiting in the buffer)."""
        return self._start + self._held

    def write(self, fm: FrameMasks) -> None:
        if fm.frame != self._start + self._held:
            raise ValueError(f"item {self.item_id}: frame {fm.frame} arrived out of order")
        n = fm.masks.shape[0]
        if fm.masks.shape[1:] != self.shape[2:] or not self.objects <= n <= self.shape[0]:
            raise ValueError(f"item {self.item_id}: frame {fm.frame} has masks of shape {fm.masks.shape}, "
                             f"expected ({self.objects} to {self.shape[0]}, {self.shape[2]}, {self.shape[3]})")
        if n > self.objects and self._held:  # objects added: empty on the frames already held
            self._buffer[self.objects:n, :self._held] = False
        self.objects = n
        if self.buffer_frames == 1:  # a frame alone fills the budget: write it from the tracker's array
            self._write_slab(fm.masks[:, None], 1)
            return
        if self._buffer is None:
            self._buffer = np.empty((self.shape[0], self.buffer_frames, self.shape[2], self.shape[3]), dtype=bool)
        self._buffer[:n, self._held] = fm.masks
        self._held += 1
        if self._held == self.buffer_frames or (self._start + self._held) % self.per_file == 0:
            self._flush()

    def _flush(self) -> None:
        if self._held:
            self._write_slab(self._buffer[:self.objects, :self._held], self._held)

    def _write_slab(self, slab: np.ndarray, frames: int) -> None:
        """Write (O, frames, H, W) at the current frame; slabs never cross a shard-file boundary."""
        end = self._start + frames
        if slab.shape[0]:
            self.array[:slab.shape[0], self._start:end] = slab
        self._start = end
        self.frames_written = end
        self._held = 0

    def finish(self, num_frames: int | None = None, attributes: dict | None = None,
               num_objects: int | None = None) -> None:
        """Flush, and shrink the time axis if the media had fewer frames than probed (and the object axis to
        `num_objects`, the objects there were, when the capacity was larger)."""
        self._flush()
        self._buffer = None
        frames = self.shape[1] if num_frames is None else num_frames
        objects = self.shape[0] if num_objects is None else num_objects
        if objects > self.shape[0]:
            raise ValueError(f"item {self.item_id}: {objects} objects for an array of {self.shape[0]}")
        if (objects, frames) != self.shape[:2]:
            self.array.resize((objects, frames, self.shape[2], self.shape[3]))
            self.shape = (objects, frames, self.shape[2], self.shape[3])
        if attributes:
            self.array.update_attributes(attributes)

    def publish(self) -> Path:
        """Move the staged array to masks/<item_id> (replacing an uncommitted leftover of an earlier try)."""
        ensure_group(self.paths)
        final = self.paths.mask_array(self.item_id)
        if final.exists():
            trash = self.paths.item_tmp(self.item_id) / f"old.{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        return publish(self.stage, final)

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def open_masks(paths: RunPaths, item_id: str) -> zarr.Array:
    return zarr.open_array(str(paths.mask_array(item_id)), mode="r")
