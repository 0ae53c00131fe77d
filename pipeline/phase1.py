"""Phase 1 of SA-V's data engine: the automatic mask generator on every decoded frame, no propagation.

With `prompt.every_frame` (configs/phases/phase1.yaml) an item's frames each go through the generator
(`prompt.generator`: SAM 1's SamAutomaticMaskGenerator in the preset), its records are selected as the first
frame's are (pipeline/stages/prompt.py's select_records: minimum area, best `max_objects`), and
pipeline/stages/link.py's Linker joins them into masklets by one-to-one IoU matching of consecutive frames.
The outputs are the same tables and arrays as a tracked run's: one Zarr array (objects, frames, H, W), the
masklets' rows (prompt_source sam1, the frame each was born on), frame rows and quality signals.

Object scores are NaN (there is no SAM 2 object-presence logit). An item is not checkpointed inside: a killed
phase-1 item starts again from frame 0 (each frame is independent; nothing is lost but time).
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from pipeline.quality.reflag import current_qa
from pipeline.quality.signals import MaskletSignals, PromptSignals
from pipeline.records import ItemResult, MediaItem
from pipeline.stages.prompt import select_records
from pipeline.store import metadata
from pipeline.store.masks import MaskWriter


def process(plan, item: MediaItem, models, source, frames, first: np.ndarray,
            t_start: float) -> tuple[ItemResult, dict]:
    """One item through phase 1 (see the module's docstring); `frames` (a timed iterator) yields the frames
    after `first`. Returns the item's result and its tables; masks are staged, then published."""
    from pipeline.stages.link import Linker

    cfg = plan.config
    height, width = first.shape[:2]
    num_frames = len(source)
    attrs = {"item_id": item.item_id, "source_frames": list(source.source_frames[:num_frames]),
             "object_ids": [], "model": models.sam1.label if cfg.prompt.generator == "sam1" else models.model.label,
             "random_weights": _random(models, cfg)}
    writer = MaskWriter(plan.paths, item.item_id, cfg.prompt.max_objects, num_frames, height, width, cfg.store,
                        attrs)
    prompts: list = []
    signals = MaskletSignals([], height, width, keep_rows=False)
    rows = metadata.FrameRows(item.item_id, signals)
    linker = Linker(cfg.prompt.link_iou, cfg.prompt.max_objects, shape=(height, width))
    seconds_prompt = seconds_write = 0.0
    t_prop = time.perf_counter()
    count = 0
    try:
        for t, rgb in enumerate(itertools.chain([first], frames)):
            if t >= num_frames:
                break
            t0 = time.perf_counter()
            step = linker.step(t, select_records(models.generator.generate(rgb), cfg.prompt))
            seconds_prompt += time.perf_counter() - t0
            t0 = time.perf_counter()
            if step.born:
                prompts.extend(step.born)
                signals.add_prompts([PromptSignals.from_prompt(p) for p in step.born])
            fm = step.frame_masks(source.source_frames[t])
            writer.write(fm)
            rows.add(t, fm.source_frame, fm.object_ids, fm.masks, fm.object_scores)
            seconds_write += time.perf_counter() - t0
            count = t + 1
        writer.finish(num_frames=count, num_objects=len(prompts),
                      attributes={"source_frames": list(source.source_frames[:count]),
                                  "object_ids": [p.object_id for p in prompts]})
        writer.publish()
    except BaseException:
        writer.abort()
        raise
    seconds_frames = time.perf_counter() - t_prop
    frames_table = rows.table()
    t_sig = time.perf_counter()
    computed = signals.finish()
    masklets = metadata.masklets_table(item.item_id, prompts, source.source_frames, frames_table,
                                       computed.masklets, current_qa(plan.paths, cfg))
    coverage = computed.item.to_pylist()[0]
    result = ItemResult(
        item_id=item.item_id, status="done", num_frames=count, num_objects=len(prompts), width=width,
        height=height, scale=float(source.scale), seconds_decode=frames.seconds, seconds_prompt=seconds_prompt,
        seconds_propagate=max(0.0, seconds_frames - seconds_prompt - seconds_write), seconds_write=seconds_write,
        seconds_total=time.perf_counter() - t_start,
        seconds_signals=rows.seconds_signals + time.perf_counter() - t_sig,
        coverage_mean=coverage["coverage_mean"], coverage_min=coverage["coverage_min"])
    return result, {"masklets": masklets, "frames": frames_table}


def _random(models, cfg) -> bool:
    if cfg.prompt.generator == "sam1":
        return bool(models.sam1.random_weights)
    return bool(models.model.random_weights)
