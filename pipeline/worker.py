"""run_shard(run_dir, shard_id): the unit every executor launches, with plain arguments only.

It reads the frozen plan from disk, skips items already committed, builds the model once (only if there
is work), and for each item composes the stages decode -> prompt -> propagate -> write, then commits the
item's rows last. A long video is checkpointed while it is tracked (pipeline/store/partial.py), so an item
interrupted by a kill or a requeue goes on from its last checkpoint. Failures are sorted by pipeline/faults.py:
one bad item never fails the shard: it is retried `retries` times (from frame 0), then committed as a failed
row with its error; an item out of memory is retried down the out-of-memory ladder (smaller object batches,
then the state offloaded) before it is; a fault of the environment (GPU, output file system, model) stops the
shard with the item uncommitted and its checkpoint kept, for `masklet resume`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator


from pipeline import faults, numerics
from pipeline.config import RunConfig
from pipeline.device import WorkSizing, detect_device, size_for_device, size_item
from pipeline.plan import RunPlan, config_fingerprint, load_run
from pipeline.quality.reflag import current_qa
from pipeline.quality.signals import MaskletSignals, PromptSignals
from pipeline.records import ItemResult, MediaItem
from pipeline.stages.decode import display_path, open_frames, utf8_text
from pipeline.stages.models import LoadedModel, load_model
from pipeline import phase1
from pipeline.item_tracking import ItemJob, track_and_write
from pipeline.seeding import initial_prompts
from pipeline.stages.prompt import make_generator
from pipeline.stages.track import TrackOptions, TrackStats
from pipeline.store import metadata
from pipeline.store.commit import (CommitRefused, clear_staging, commit_item, compact_shard, committed_items,
                                   release_staging)
from pipeline.store.lease import OwnerEnded, SchedulerTask, acquire
from pipeline.store.atomic import write_text_atomic
from pipeline.store.masks import MaskWriter
from pipeline.store.partial import PartialItem

log = logging.getLogger("masklet.worker")


@dataclass
class ShardSummary:
    """Mergeable per-shard counts (`a + b`)."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    frames: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    def __add__(self, other: "ShardSummary") -> "ShardSummary":
        return ShardSummary(self.done + other.done, self.failed + other.failed, self.skipped + other.skipped,
                            self.frames + other.frames, self.seconds + other.seconds, {**self.errors, **other.errors})


class Models:
    """The models a shard needs, built once on first use (a shard whose items are all done loads nothing)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._model: LoadedModel | None = None
        self._generator = None
        self._sam1 = None
        self.sizing: WorkSizing | None = None

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            self._model = load_model(self.cfg.model)
            log.info("model %s on %s", self._model.label, self._model.device)
            if self._model.device.type == "cuda":
                # Size the work to this GPU or MIG slice (pipeline/device.py has the rule).
                try:
                    info = detect_device()
                except Exception as e:  # noqa: BLE001 - sized from slurm.gpu_memory_gb below, or refused there
                    log.warning("cannot read the device's memory (%s); sizing from slurm.gpu_memory_gb", e)
                    info = None
                self.sizing = size_for_device(info, self.cfg.model.name, self._model.image_size,
                                              self.cfg.prompt.max_objects, self.cfg.slurm.gpu_memory_gb)
                log.info("device %s: object batch %d, frames ahead %d, state %s",
                         info.describe() if info else f"{self.sizing.memory_bytes / 1e9:g} GB (slurm.gpu_memory_gb)",
                         self.sizing.object_batch, self.sizing.frames_ahead,
                         "offloaded to host memory" if self.sizing.offload_state else "on the device")
                if self.sizing.refusal():
                    raise RuntimeError(self.sizing.refusal())
        return self._model

    def track_options(self, item_id: str = "", height: int | None = None, width: int | None = None) -> TrackOptions:
        """How to track, sized to this device and, given the item's frame size, to that item (its AMG and
        upsampling grow with it): ItemTooLargeError (a ValueError: that item fails) when it cannot fit."""
        p = self.cfg.propagate
        sizing = self.sizing
        if sizing is not None and height and width:
            sizing = size_item(sizing, item_id, height, width, self.cfg.prompt.points_per_batch)
        object_batch = p.object_batch or (sizing.object_batch if sizing else None)
        prefetch = max(p.prefetch, self.sizing.frames_ahead) if self.sizing else p.prefetch
        offload = p.offload_state if p.offload_state is not None else bool(self.sizing and self.sizing.offload_state)
        return TrackOptions(object_batch=object_batch, prefetch=prefetch, autocast=p.autocast, tf32=p.tf32,
                            compile=p.compile, mask_threshold=p.mask_threshold, offload_state=offload)

    @property
    def sam1(self):
        """segment-anything's model (phases 1 and 2: `prompt.generator: sam1`), built once on first use."""
        if self._sam1 is None:
            from pipeline.stages.sam1 import load_sam1

            self._sam1 = load_sam1(self.cfg.sam1, self.cfg.model)
            log.info("SAM 1 model %s on %s", self._sam1.label, self._sam1.device)
        return self._sam1

    @property
    def generator(self):
        """The automatic mask generator that seeds masklets (prompt.generator): SAM 2's or SAM 1's."""
        if self._generator is None:
            if self.cfg.prompt.generator == "sam1":
                from pipeline.stages.sam1 import make_sam1_generator

                self._generator = make_sam1_generator(self.sam1, self.cfg.prompt)
            else:
                self._generator = make_generator(self.model, self.cfg.prompt)
        return self._generator


def _stride(item: MediaItem, cfg: RunConfig) -> int:
    if cfg.decode.target_fps and item.fps:
        return max(1, round(item.fps / cfg.decode.target_fps))
    return cfg.decode.stride


class _Timer:
    """Wraps the frame iterator so decode time is measured apart from model time."""

    def __init__(self, it: Iterator):
        self.it = it
        self.seconds = 0.0
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            value = next(self.it)
        finally:
            self.seconds += time.perf_counter() - t0
        self.count += 1
        return value


def process_item(plan: RunPlan, shard_id: int, item: MediaItem, models: Models,
                 attempt: "_Attempt | None" = None) -> tuple[ItemResult, dict]:
    """Decode, prompt, propagate and write one item (going on from its checkpoint when it has one); returns
    its result and its three tables. Raises on any failure (the caller records it); masks are staged and only
    published on success. `attempt`: the rung of the out-of-memory ladder to track at; what the tracker used
    is left in it. Phase 1 (`prompt.every_frame`) goes to pipeline/phase1.py instead."""
    cfg = plan.config
    t_start = time.perf_counter()
    if item.error:
        raise ValueError(f"probe failed: {item.error}")
    source = open_frames(item, stride=_stride(item, cfg), max_frames=cfg.decode.max_frames,
                         max_side=cfg.decode.max_side)
    frames = _Timer(rgb for _, rgb in source)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{display_path(item.path)}: no frame could be decoded")
    height, width = first.shape[:2]
    model = models.model
    options = models.track_options(item.item_id, height, width)  # before the AMG: it grows with the frame too
    if model.random_weights or (cfg.prompt.generator == "sam1" and models.sam1.random_weights):
        _mark_random_weights(plan, model if model.random_weights else models.sam1)
    if cfg.prompt.every_frame:
        out = phase1.process(plan, item, models, source, frames, first, t_start)
        return dataclasses.replace(out[0], stride=_stride(item, cfg)), out[1]
    num_frames = len(source) if cfg.propagate.enabled else 1
    partial = _partial_item(plan, item, num_frames, height, width, worker_numerics(models).key())
    resume = partial.start() if partial else None
    if resume is None:
        t0 = time.perf_counter()
        prompts, keyframe = initial_prompts(models, first, cfg)
        seconds_prompt = time.perf_counter() - t0
    else:
        prompts, seconds_prompt, keyframe = resume.prompts, resume.seconds_prompt, None
        log.info("item %s: continuing from its checkpoint at frame %d of %d", item.item_id, resume.next_frame,
                 num_frames)
    reseeding = bool(cfg.propagate.enabled and (cfg.prompt.reseed_every or cfg.prompt.reseed_adaptive))
    if partial and not ((prompts or reseeding) and cfg.propagate.enabled):
        partial.discard()  # nothing is tracked: nothing to checkpoint
        partial = None
    attrs = {
        "item_id": item.item_id,
        "source_frames": list(source.source_frames[:num_frames]),
        "object_ids": [p.object_id for p in prompts],
        "model": model.label,
        "random_weights": model.random_weights,
    }
    # With re-seeding the array holds up to prompt.max_objects masklets, trimmed to those there were at finish.
    capacity = cfg.prompt.max_objects if reseeding else len(prompts)
    writer = MaskWriter(plan.paths, item.item_id, capacity, num_frames, height, width, cfg.store, attrs,
                        stage=partial.masks if partial else None, resume_at=resume.next_frame if resume else 0)
    signals = MaskletSignals([PromptSignals.from_prompt(p) for p in prompts], height, width, keep_rows=False)
    rows = metadata.FrameRows(item.item_id, signals)
    if resume is not None:
        rows.extend(resume.rows)
        signals.restore(resume.signals)
    job = ItemJob(plan, item, models, source, frames, first, num_frames, height, width, prompts, writer, rows,
                  signals, partial, resume, keyframe, seconds_prompt, stride=_stride(item, cfg))
    t_prop = time.perf_counter()
    tracked, seeder, real_frames = track_and_write(job, options, attempt, reseeding)
    if partial is not None:
        partial.discard()  # the masks are published; the rows are committed by the caller, from memory
    seconds_propagate = time.perf_counter() - t_prop  # wall time; decoding and writing overlap it (threads)
    if seeder is not None:  # the generator on re-seed frames ran inside tracking: count it as prompting
        seconds_prompt += seeder.seconds
        seconds_propagate -= seeder.seconds
    rows, signals = job.rows, job.signals  # recomputed when re-seeded masklets were tracked backwards
    frames_table = rows.table()
    t_sig = time.perf_counter()
    computed = signals.finish()
    masklets = metadata.masklets_table(item.item_id, prompts, source.source_frames, frames_table,
                                       computed.masklets, current_qa(plan.paths, cfg),
                                       dropped=seeder.dropped if seeder else None)
    seconds_signals = rows.seconds_signals + time.perf_counter() - t_sig
    coverage = computed.item.to_pylist()[0]
    result = ItemResult(
        item_id=item.item_id, status="done", num_frames=real_frames, num_objects=len(prompts),
        width=width, height=height, stride=_stride(item, cfg), scale=float(source.scale),
        seconds_decode=frames.seconds, seconds_prompt=seconds_prompt,
        seconds_propagate=max(0.0, seconds_propagate), seconds_write=job.seconds_write,
        seconds_total=time.perf_counter() - t_start, seconds_signals=seconds_signals,
        coverage_mean=coverage["coverage_mean"], coverage_min=coverage["coverage_min"], object_batch=(tracked.object_batch or None) if tracked else None,
    )
    return result, {"masklets": masklets, "frames": frames_table}


def _partial_item(plan: RunPlan, item: MediaItem, num_frames: int, height: int, width: int,
                  numerics_key: dict) -> PartialItem | None:
    """The item's checkpoint folder, where checkpoints can happen: tracking on, more than one shard file of
    frames, and store.checkpoint_seconds set."""
    cfg = plan.config
    if (not cfg.propagate.enabled or cfg.store.checkpoint_seconds is None
            or num_frames <= cfg.store.frames_per_file):
        return None
    # numerics too: a checkpoint made on another device, dtype or version is never continued (pipeline/numerics.py)
    key = {"item_id": item.item_id, "num_frames": num_frames, "height": height, "width": width,
           "stride": _stride(item, cfg), "config": config_fingerprint(cfg), "numerics": numerics_key}
    return PartialItem(plan.paths, item.item_id, key)


def _mark_random_weights(plan: RunPlan, model: LoadedModel) -> None:
    """Mark the run as holding random-weight masks before any are written, so that `status` and `open_run`
    say so even when run.json (written at plan time from the config) says otherwise. A file, not a run.json
    edit: workers on many nodes may write it at once, and readers check it with one stat."""
    mark = plan.paths.random_weights_mark
    if mark.exists():
        return
    write_text_atomic(mark, json.dumps({"model": model.label, "checkpoint": model.checkpoint,
                                        "checkpoint_sha256": model.checkpoint_sha256}) + "\n")


def worker_numerics(models: Models) -> numerics.Numerics:
    """The numerics of this worker's loaded model and track options (pipeline/numerics.py)."""
    return numerics.of_worker(models.model, models.track_options())


def _item_row(plan: RunPlan, shard_id: int, item: MediaItem, result: ItemResult, models: Models | None) -> dict:
    loaded = models._model if models else None
    cfg = plan.config
    n = worker_numerics(models) if loaded else None
    return {
        "item_id": item.item_id, "path": display_path(item.path), "kind": item.kind, "shard_id": shard_id,
        "status": result.status, "error": result.error, "attempts": result.attempts,
        "num_frames": result.num_frames, "source_num_frames": item.num_frames, "stride": result.stride,
        "width": result.width or None, "height": result.height or None, "scale": result.scale,
        "source_width": item.width, "source_height": item.height, "fps": item.fps,
        "num_objects": result.num_objects, "model": cfg.model.name,
        "image_size": loaded.image_size if loaded else cfg.model.image_size,
        "checkpoint_sha256": loaded.checkpoint_sha256 if loaded else None,
        "random_weights": _random_weights(cfg, models), "device": str(loaded.device) if loaded else None,
        "device_class": n and n.device_class, "device_name": n and n.device_name, "autocast": n and n.autocast,
        "object_batch": result.object_batch or (n and n.object_batch), "tf32": n and n.tf32, "compile": n and n.compile,
        "torch_version": n and n.torch, "sam2_version": n and n.sam2,
        "seconds_decode": result.seconds_decode, "seconds_prompt": result.seconds_prompt,
        "seconds_propagate": result.seconds_propagate, "seconds_write": result.seconds_write,
        "seconds_signals": result.seconds_signals if result.status == "done" else None,
        "seconds_total": result.seconds_total, "coverage_mean": result.coverage_mean,
        "coverage_min": result.coverage_min, "finished_at": datetime.now(timezone.utc),
    }


def _random_weights(cfg: RunConfig, models: Models | None) -> bool:
    """Whether any model the item's masks came from has random weights (SAM 2, and SAM 1 when it seeds)."""
    loaded = models._model if models else None
    random = loaded.random_weights if loaded else cfg.model.random_weights
    if cfg.prompt.generator == "sam1":
        sam1 = models._sam1 if models else None
        random = random or (sam1.random_weights if sam1 else cfg.sam1.random_weights)
    return bool(random)


def _setup_shard_log(plan: RunPlan, shard_id: int) -> logging.Handler:
    plan.paths.logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(plan.paths.shard_log(shard_id))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("masklet")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def run_shard(run_dir: str, shard_id: int, redo_failed: bool = False,
              on_item: Callable[[ItemResult], None] | None = None, task: SchedulerTask | None = None,
              owner_ended: OwnerEnded | None = None) -> ShardSummary:
    """Process every uncommitted item of one shard (and, with redo_failed, those committed as failed), then
    compact the shard's metadata. Safe to call again after any interruption.

    The shard's lease is taken first (pipeline/store/lease.py): a shard another live worker owns raises
    LeaseHeld before any work. `task` names the scheduler's task this runs in, `owner_ended` says whether
    another task has ended (both from the executor that knows the scheduler). The owner then clears what
    earlier workers of the shard left in tmp/."""
    t0 = time.perf_counter()
    plan = load_run(run_dir)
    shard = plan.shard(shard_id)
    handler = _setup_shard_log(plan, shard_id)
    summary = ShardSummary()
    lease = None
    try:
        lease = acquire(plan.paths, shard_id, task=task, owner_ended=owner_ended)  # before any work
        done = committed_items(plan.paths, shard_id)
        for leftover in clear_staging(plan.paths, shard_id, shard.item_ids, done, lease):
            log.info("shard %d: removed %s, left by an earlier worker", shard_id, leftover)
        todo = [i for i in shard.item_ids if not (done.get(i) == "done" or (i in done and not redo_failed))]
        summary.skipped = len(shard.item_ids) - len(todo)
        models = Models(plan.config)
        if todo:
            _load_model(plan, shard_id, models)  # before any item: a model error is not an item's
            numerics.check_worker(plan, worker_numerics(models))  # the run's numerics, or refuse before any item
        for item_id in todo:
            item = plan.items[item_id]
            result, tables = _run_with_retries(plan, shard_id, item, models)
            row = _item_row(plan, shard_id, item, result, models)
            tables["items"] = metadata.items_table([row])
            numerics.claim_reference(plan, worker_numerics(models))  # the run's first commit fixes its numerics
            try:
                commit_item(plan.paths, shard_id, item_id, tables, lease)  # last: the item now exists for readers
            except CommitRefused as e:
                log.warning("%s", e)
                summary.skipped += 1
                continue
            log.info("item %s committed (%s)", item_id, result.status)
            if result.status == "done":
                summary.done += 1
                summary.frames += result.num_frames
            else:
                summary.failed += 1
                summary.errors[item_id] = result.error or ""
            if on_item:
                on_item(result)
        compact_shard(plan.paths, shard_id, lease)
        release_staging(plan.paths, shard_id, shard.item_ids)
        faults.clear_shard_fault(plan.paths, shard_id)  # finished cleanly: an earlier fault is history
    except Exception as e:  # noqa: BLE001 - an environment fault is recorded; anything else goes up as before
        stop = faults.shard_stop(e, shard_id, plan.paths.root)
        if stop is None:
            raise
        # INFO: the shard's log gets it; the terminal gets the CLI's one line (or, with -v, this too)
        log.info("%s; `masklet resume %s` runs the shard again", stop, plan.paths.root)
        faults.write_shard_fault(plan.paths, stop.fault)
        if stop is e:
            raise
        raise stop from e
    finally:
        if lease is not None:
            lease.release()
        logging.getLogger("masklet").removeHandler(handler)
        handler.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _load_model(plan: RunPlan, shard_id: int, models: Models) -> None:
    """Load the models (and size the work to the device): SAM 2, and SAM 1 when it seeds (phases 1 and 2);
    a failure is the shard's environment fault."""
    which = plan.config.model.name
    try:
        models.model
        if plan.config.prompt.generator == "sam1":
            which = f"sam1 {plan.config.sam1.name}"
            models.sam1
    except Exception as e:  # noqa: BLE001 - whatever stops the model from loading stops every item alike
        log.info("the model could not be loaded:\n%s", traceback.format_exc())
        fault = faults.model_load_fault(e, which)
        raise faults.EnvironmentFault(faults.ShardFault.now(shard_id, fault, None)) from e


@dataclass
class _Attempt:
    """One try of an item: its number over all tries, the out-of-memory ladder's rung it tracks at, and what
    the tracker used (set by process_item when tracking starts; `tracked.object_batch` is the batch the engine
    chose, 0 until it has)."""

    number: int = 1
    rung: faults.Rung = faults.Rung()
    tracked: TrackStats | None = None
    offloaded: bool = False

    def after_oom(self, models: Models) -> "_Attempt | None":
        """The next try down the ladder, or None when none is left (or it failed before tracking started,
        where no rung changes what it holds)."""
        if self.tracked is None:
            return None
        rung = faults.next_rung(self.rung, self.tracked.object_batch or None, self.offloaded,
                                faults.can_offload(models.model.device))
        return _Attempt(self.number + 1, rung) if rung else None

    def used(self) -> faults.Rung:
        """The rung as the tracker ran it (its object batch as the engine chose it)."""
        batch = (self.tracked.object_batch if self.tracked else 0) or self.rung.object_batch
        return faults.Rung(batch, self.offloaded)


def _failed(plan: RunPlan, item: MediaItem, error: str, attempts: int) -> tuple[ItemResult, dict]:
    failed = ItemResult(item_id=item.item_id, status="failed", error=utf8_text(error), attempts=attempts,
                        stride=_stride(item, plan.config))
    empty = {"masklets": metadata.empty(metadata.MASKLETS_SCHEMA), "frames": metadata.empty(metadata.FRAMES_SCHEMA)}
    return failed, empty


def _run_with_retries(plan: RunPlan, shard_id: int, item: MediaItem, models: Models) -> tuple[ItemResult, dict]:
    """Process one item, sorting its failures (pipeline/faults.py): an item fault is retried `retries` times,
    then becomes a failed row; out of memory goes down the ladder, then becomes a failed row saying the memory
    it needed; an environment fault raises EnvironmentFault (the item stays uncommitted)."""
    retries_left = plan.config.retries
    attempt = _Attempt()
    while True:
        device = models.model.device
        faults.reset_peak_memory(device)
        try:
            result, tables = process_item(plan, shard_id, item, models, attempt)
            return dataclasses.replace(result, attempts=attempt.number), tables
        except Exception as e:  # noqa: BLE001 - sorted below; none escapes unrecorded
            fault = faults.classify(e, plan.paths.root)
            log.log(logging.INFO if fault.kind == "environment" else logging.WARNING,
                    "item %s attempt %d (%s fault) failed: %s\n%s", item.item_id, attempt.number, fault.kind,
                    fault.error, traceback.format_exc())
            if fault.kind == "environment":
                raise faults.EnvironmentFault(faults.ShardFault.now(shard_id, fault, item.item_id)) from e
            if fault.kind == "oom":
                sizing = getattr(models, "sizing", None)
                need = faults.memory_need(e, device, sizing.memory_bytes if sizing else None)
                following = attempt.after_oom(models)
                if following is None:
                    advice = faults.memory_advice(need, attempt.used())
                    return _failed(plan, item, f"{fault.error}; {advice}", attempt.number)
                log.warning("item %s: out of memory at %s; trying again from frame 0 at %s", item.item_id,
                            attempt.used().describe(), following.rung.describe())
            elif item.error is not None or retries_left == 0:
                # as before: the outermost error, UTF-8 (Parquet strings must be; paths may not be)
                return _failed(plan, item, f"{type(e).__name__}: {e}", attempt.number)
            else:
                retries_left -= 1
                following = _Attempt(attempt.number + 1, attempt.rung)
        # Out of the except block, so the failed try's traceback (and the tensors its frames hold) is gone.
        faults.release_memory(device)
        attempt = following
