"""A hand-made run folder with known masks (overlaps, gaps, an object never visible, an item without objects),
written through the store's own writers (prepare_run, MaskWriter, commit_item), so export tests can check
exact cases without the model. `make_run(root)` returns the run folder and each item's masks as written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import load_config
from pipeline.paths import RunPaths
from pipeline.plan import prepare_run
from pipeline.records import FrameMasks, MediaItem, Prompt
from pipeline.store import metadata
from pipeline.store.commit import commit_item, compact_shard
from pipeline.store.lease import acquire
from pipeline.store.masks import MaskWriter

H, W = 12, 16
MODEL = "sam2.1_hiera_tiny (RANDOM WEIGHTS)"


def _masks() -> dict[str, tuple[np.ndarray, list[int], float | None, int, str]]:
    """item id -> (bool (objects, frames, H, W), source frames, fps, source_num_frames, kind)."""
    rng = np.random.default_rng(7)
    a = np.zeros((3, 6, H, W), bool)
    a[0, :, 2:8, 2:10] = True  # a box on every frame
    a[1, :, 5:11, 6:14] = True  # overlaps object 0 on rows 5..7, cols 6..9
    a[1, 2] = False  # invisible on frame 2, back on 3: two visibility changes
    a[2, 1:4] = rng.random((3, H, W)) > 0.6  # appears on frame 1, noise overlapping both
    b = np.zeros((2, 4, H, W), bool)
    b[0, 1, 0:3, 0:3] = True  # first appears on frame 1 and leaves on 2
    b[0, 3, 0:4, 0:4] = True
    # object 1 of b is never visible
    c = np.zeros((0, 1, H, W), bool)  # an image where nothing was found
    return {"a.mp4": (a, [0, 2, 4, 6, 8, 10], 24.0, 12, "video"),
            "b.mp4": (b, [0, 3, 6, 9], 30.0, 11, "video"),
            "c.jpg": (c, [0], None, 1, "image")}


FLAGS = {("a.mp4", 0): [], ("a.mp4", 1): ["flicker"], ("a.mp4", 2): ["fragmented", "tiny"],
         ("b.mp4", 0): ["tiny", "flicker"], ("b.mp4", 1): ["lost"]}


def make_run(root: Path) -> tuple[str, dict[str, np.ndarray]]:
    out = root / "run"
    specs = _masks()
    items = [MediaItem(i, str(root / i), kind, num_frames=n, fps=fps, width=W, height=H)
             for i, (_, _, fps, n, kind) in specs.items()]
    cfg = load_config(None, ["model.random_weights=true", "plan.max_items_per_shard=2"])
    plan = prepare_run(out, items, cfg)
    paths = RunPaths.of(out)
    for shard_id in plan.shard_ids:
        lease = acquire(paths, shard_id)
        for item_id in plan.shard(shard_id).item_ids:
            masks, source_frames, fps, n_source, kind = specs[item_id]
            _commit(paths, shard_id, lease, item_id, masks, source_frames, fps, n_source, kind)
        compact_shard(paths, shard_id, lease)
        lease.release()
    return str(out), {i: s[0] for i, s in specs.items()}


def _commit(paths, shard_id, lease, item_id, masks, source_frames, fps, n_source, kind) -> None:
    objects, frames = masks.shape[:2]
    attrs = {"item_id": item_id, "source_frames": source_frames, "object_ids": list(range(objects)),
             "model": MODEL, "random_weights": True}
    writer = MaskWriter(paths, item_id, objects, frames, H, W, load_config(None).store, attrs)
    rows = metadata.FrameRows(item_id)
    for t in range(frames):
        fm = FrameMasks(t, source_frames[t], tuple(range(objects)), masks[:, t].copy(), np.zeros(objects, np.float32))
        writer.write(fm)
        if objects:  # an item without objects has no frame rows
            rows.add(t, source_frames[t], fm.object_ids, fm.masks, fm.object_scores)
    writer.finish(num_frames=frames)
    writer.publish()
    frames_table = rows.table()
    prompts = [Prompt(object_id=o, frame=0, mask=masks[o, 0], point=(1.0, 1.0), predicted_iou=0.9,
                      stability_score=0.5 + 0.1 * o, area=int(masks[o, 0].sum()), bbox=(0, 0, 1, 1))
               for o in range(objects)]
    table = metadata.masklets_table(item_id, prompts, source_frames, frames_table)
    flags = pa.array([FLAGS[(item_id, o)] for o in range(objects)], pa.list_(pa.string()))
    share = pa.array([float(masks[o][masks[o].any(axis=(1, 2))].sum(axis=(1, 2)).mean() / (H * W))
                      if masks[o].any() else None for o in range(objects)], pa.float64())
    table = table.set_column(table.schema.get_field_index("flags"), "flags", flags)
    table = table.set_column(table.schema.get_field_index("area_share_mean"), "area_share_mean", share)
    row = {name: None for name in metadata.ITEMS_SCHEMA.names}
    row.update(item_id=item_id, path=str(paths.root / item_id), kind=kind, shard_id=shard_id, status="done",
               attempts=1, num_frames=frames, source_num_frames=n_source, stride=source_frames[1] if frames > 1 else 1,
               width=W, height=H, source_width=W, source_height=H, scale=1.0, fps=fps, num_objects=objects,
               model=MODEL, random_weights=True)
    commit_item(paths, shard_id, item_id, {"items": metadata.items_table([row]), "masklets": table,
                                           "frames": frames_table}, lease)
