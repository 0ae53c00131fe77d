"""One item's tracked path, from its first frame's prompts to its staged, published masks and its rows.

`track_and_write` runs the tracker over the item's frames (adding re-seeded masklets and dropping duplicates
when re-seeding is on: pipeline/seeding.py), writes each frame's masks and rows as they come (in a writer
thread where a core is free), saves checkpoints of long items at shard-file boundaries
(pipeline/store/partial.py), tracks re-seeded masklets backwards when asked (pipeline/reverse.py), and
publishes the masks. pipeline/worker.py's process_item prepares the item (`ItemJob`) and builds its tables.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from pipeline import faults, reverse
from pipeline.plan import RunPlan
from pipeline.quality.signals import MaskletSignals, PromptSignals
from pipeline.records import FrameMasks, MediaItem
from pipeline.seeding import FrameTee, Seeder
from pipeline.stages.decode import open_frames
from pipeline.stages.track import (MediaEnded, TrackerState, TrackOptions, Tracking, TrackStats, spare_core, track,
                                   write_behind)
from pipeline.store import metadata
from pipeline.store.masks import MaskWriter
from pipeline.store.partial import PartialItem

log = logging.getLogger("masklet.worker")


@dataclass
class ItemJob:
    """One item on its way from decoded frames to staged masks and rows (process_item's parts share it)."""

    plan: RunPlan
    item: MediaItem
    models: object  # pipeline.worker.Models
    source: object  # pipeline.stages.decode's frame source
    frames: Iterator[np.ndarray]  # the frames after `first` (the worker's timed iterator)
    first: np.ndarray
    num_frames: int
    height: int
    width: int
    prompts: list  # grows with re-seeding
    writer: MaskWriter
    rows: metadata.FrameRows
    signals: MaskletSignals
    partial: PartialItem | None
    resume: object | None  # pipeline.store.partial.Resume
    keyframe: object | None
    seconds_prompt: float
    stride: int = 1
    seconds_write: float = 0.0


def track_and_write(job: ItemJob, options: TrackOptions, attempt,
                    reseeding: bool) -> tuple[TrackStats | None, Seeder | None, int]:
    """Track the item's prompts (adding re-seeded masklets) and write every frame; publish the masks.
    Returns the tracker's stats, the seeder (re-seeding on) and the frames really decoded. `attempt`: the
    worker's out-of-memory rung (pipeline/worker.py's _Attempt), or None."""
    cfg, prompts, writer, partial = job.plan.config, job.prompts, job.writer, job.partial
    tracked = seeder = None
    try:
        if (prompts or reseeding) and cfg.propagate.enabled:
            tracked, seeder = _track(job, options, attempt, reseeding)
        elif prompts:
            masks = np.stack([p.mask for p in prompts])
            fm = FrameMasks(0, job.source.source_frames[0], tuple(p.object_id for p in prompts), masks,
                            np.full(len(prompts), np.nan, dtype=np.float32))
            writer.write(fm)
            job.rows.add(0, fm.source_frame, fm.object_ids, masks, fm.object_scores)
        if cfg.propagate.enabled:
            for _ in job.frames:  # no-op after a propagation; counts the frames of an item without objects
                pass
            real_frames = writer.frames_buffered if tracked is not None else job.frames.count
        else:
            real_frames = 1
        writer.finish(num_frames=real_frames, num_objects=len(prompts),
                      attributes={"source_frames": list(job.source.source_frames[:real_frames]),
                                  "object_ids": [p.object_id for p in prompts]})
        if seeder is not None and cfg.propagate.reverse and reverse.targets(prompts, seeder.dropped):
            _reverse_pass(job, options, seeder)
        writer.publish()
    except Exception as e:
        if partial is not None and faults.classify(e, job.plan.paths.root).kind == "environment":
            # Not the item's fault: keep its checkpoint, so that `masklet resume` goes on from it.
            raise
        # A failed attempt leaves nothing: a retry starts afresh (a bad checkpoint cannot fail it twice; an
        # out-of-memory rung needs frame 0, see pipeline/faults.py).
        writer.abort()
        if partial is not None:
            partial.discard()
        raise
    except BaseException:
        # Killed or preempted (SystemExit from submitit's checkpoint, KeyboardInterrupt): keep the
        # checkpoint, so that the next attempt goes on from it.
        if partial is None:
            writer.abort()
        raise
    return tracked, seeder, real_frames


def _track(job: ItemJob, options: TrackOptions, attempt, reseeding: bool) -> tuple[TrackStats, Seeder | None]:
    """The tracker over the item's frames, each written as it comes (write-behind), with checkpoints."""
    cfg = job.plan.config
    if attempt:  # the out-of-memory ladder's rung, over this item's own sizing
        options = attempt.rung.apply(options)
    frames: Iterable[np.ndarray] = itertools.chain([job.first], job.frames)
    seeder = None
    if reseeding:
        tee = FrameTee(frames, keep=options.prefetch + 4)
        seeder = Seeder(cfg, job.models.generator, tee, job.prompts)
        if job.resume is not None:
            seeder.restore(job.resume.extra.get("seeder", {}))
        frames = tee
    stream = track(job.models.model, frames, job.num_frames, job.height, job.width, job.prompts,
                   job.source.source_frames, options,
                   resume=TrackerState.from_payload(job.resume.tracker) if job.resume else None,
                   keyframe=job.keyframe, reseed=seeder)
    if attempt:
        attempt.tracked, attempt.offloaded = stream.stats, options.offload_state
    job.keyframe = None  # tracking holds it until its first frame is done, then drops it
    thread = spare_core(stream.device)
    out = seeder.watch(stream) if seeder else stream
    if job.partial is not None:
        out = _with_checkpoints(out, stream, job.writer.per_file, job.num_frames, cfg.store.checkpoint_seconds,
                                job.prompts, seeder)
    try:
        write_behind(out, _FrameWriter(job, seeder), thread=thread)
    except MediaEnded as e:
        # Headers can overstate the frame count; keep what was really decoded.
        log.warning("%s: %s; keeping %d frames", job.item.item_id, e, job.writer.frames_buffered)
    return stream.stats, seeder


class _FrameWriter:
    """What the write-behind thread does with each frame (masks, rows, signals) and each checkpoint."""

    def __init__(self, job: ItemJob, seeder: Seeder | None):
        self.job, self.seeder = job, seeder
        self.checkpointed_rows = len(job.rows)
        self.by_id = {p.object_id: p for p in job.prompts}

    def __call__(self, x: "FrameMasks | _Checkpoint") -> None:
        job = self.job
        t_w = time.perf_counter()
        if isinstance(x, _Checkpoint):
            job.partial.save(x.next_frame, job.rows.table(self.checkpointed_rows), x.state.payload(), x.prompts,
                             job.seconds_prompt, job.signals.state(), extra={"seeder": x.seeder})
            self.checkpointed_rows = len(job.rows)
        else:
            job.writer.write(x)
            live = self.seeder.live_rows(x) if self.seeder else x
            new = [o for o in live.object_ids if o not in job.signals.index]
            if new:  # re-seeded masklets: the writer's side learns of them from their first frame
                self.by_id.update((p.object_id, p) for p in job.prompts[len(self.by_id):])
                job.signals.add_prompts([PromptSignals.from_prompt(self.by_id[o]) for o in new])
            job.rows.add(live.frame, live.source_frame, live.object_ids, live.masks, live.object_scores)
        job.seconds_write += time.perf_counter() - t_w


def _reverse_pass(job: ItemJob, options: TrackOptions, seeder: Seeder) -> None:
    """Re-seeded masklets tracked backwards into the staged array (pipeline/reverse.py); the item's frame rows
    and signals are then recomputed from that array."""
    cfg, item = job.plan.config, job.item
    source = open_frames(item, stride=job.stride, max_frames=cfg.decode.max_frames,
                         max_side=cfg.decode.max_side)
    t0 = time.perf_counter()
    back = reverse.track_backwards(job.models.model, (rgb for _, rgb in source), job.writer.shape[1], job.height,
                                   job.width, job.prompts, seeder.dropped, job.writer.array,
                                   cfg.propagate.reverse_frames, options, list(job.source.source_frames))
    table = job.rows.table()
    scores = {(o, f): s for o, f, s in zip(table.column("object_id").to_pylist(), table.column("frame").to_pylist(),
                                           table.column("object_score").to_pylist()) if s is not None}
    scores.update(back.scores)
    job.rows, job.signals = reverse.recompute_rows(item.item_id, job.writer.array, job.prompts,
                                                   list(job.source.source_frames), back.start, seeder.dropped,
                                                   scores, job.height, job.width)
    log.info("item %s: tracked %d re-seeded masklets backwards (%d object-frames added) in %.1f s", item.item_id,
             len([o for o, f in back.start.items() if f < next(p.frame for p in job.prompts if p.object_id == o)]),
             back.frames_added, time.perf_counter() - t0)


@dataclass(frozen=True)
class _Checkpoint:
    """Passed to the writer after the frame before `next_frame`: save this state once that frame is written.
    The prompts and the seeder's state are copies taken in the model's thread with the tracker's state."""

    next_frame: int
    state: TrackerState
    prompts: list
    seeder: dict


def _with_checkpoints(frames: Iterator[FrameMasks], stream: Tracking, per_file: int, num_frames: int,
                      every: float, prompts: list, seeder: "Seeder | None") -> Iterator:
    """The stream's frames, with a _Checkpoint after each shard-file boundary once `every` seconds have passed
    since the last one. The snapshot is taken here, in the model's thread, between two frames."""
    last = time.monotonic()
    try:
        for fm in frames:
            yield fm
            n = fm.frame + 1
            if n % per_file == 0 and n < num_frames and time.monotonic() - last >= every:
                yield _Checkpoint(n, stream.snapshot(), list(prompts), seeder.state() if seeder else {})
                last = time.monotonic()
    finally:
        stream.close()


