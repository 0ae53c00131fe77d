"""A committed run of N items and M masklets in the project's own layout, without a model: for the report's
benchmark (benchmarks/bench_report.py) and tests (tests/test_report.py, tests/test_health.py).

The plan is made by `prepare_run` and every shard is written by the store itself (`commit_item` of the
shard's rows under its lease, then `compact_shard`), as benchmarks/bench_orchestration.py does, so what
`open_run` and `masklet report` read is what a real run leaves. Every column of the three schemas is
filled, the quality signals with plausible random values, and `flags` / `review_priority` are computed from
them with the run's qa thresholds (pipeline/quality/flags.py), vectorised. Frame rows are few: the masklets
of the first item of each shard get one row per frame (their `iou_prev` feeds the gallery's worst
transition); a run of 2 million masklets does not need 600 million frame rows to test the report.

`drift` lowers the scores of the items that finish last (a linear ramp in finish order), so the drift
alert has something to find.
"""
from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import QAConfig, load_config
from pipeline.paths import RunPaths
from pipeline.records import MediaItem
from pipeline.store import metadata
from pipeline.store.commit import commit_item, compact_shard
from pipeline.store.lease import acquire

T0 = datetime(2026, 12, 5, 3, 0, tzinfo=timezone.utc)
SIZES = ((640, 360), (1280, 720), (1920, 1080), (3840, 2160))
ERRORS = ("ValueError: cannot decode /data/x.mp4: frame 12 is damaged",
          "DecodeError: /data/y.mp4: invalid data found when processing input",
          "out of memory at every rung down to object batch 1: needs 9.1 GiB, 8.0 GiB free; use a larger GPU")


@dataclass(frozen=True)
class Spec:
    items: int
    masklets: int
    shards: int
    seed: int = 0
    fail_share: float = 0.02
    retry_share: float = 0.05
    drift: float = 0.0  # scores of the last item are lowered by this much (linear in finish order)
    seconds_per_item: float = 20.0  # spacing of finish times
    frame_rows: bool = True


def synthetic_items(spec: Spec) -> list[MediaItem]:
    rng = np.random.default_rng(spec.seed)
    frames = rng.integers(8, 300, spec.items)
    size = rng.integers(0, len(SIZES), spec.items)
    return [MediaItem(f"v{i:07d}", f"/data/videos/v{i:07d}.mp4", "video", int(frames[i]), 30.0,
                      SIZES[size[i]][0], SIZES[size[i]][1], "h264", 10**6) for i in range(spec.items)]


def _arr(values, field: pa.Field) -> pa.Array:
    return pa.array(values, type=field.type)


def shard_tables(spec: Spec, shard_id: int, items: list[MediaItem], first_index: list[int], qa: QAConfig,
                 random_weights: bool) -> dict[str, pa.Table]:
    """The three tables of one shard's items (`first_index`: each item's position in the whole run). One
    generator per shard draws the items' columns, then the masklets', then the frame rows, in that order."""
    rng = np.random.default_rng([spec.seed, shard_id])
    pos = np.asarray(first_index, dtype=np.float64)
    ramp = spec.drift * pos / max(1, spec.items - 1)  # 0 for the first item, drift for the last
    frames = np.array([it.num_frames for it in items], dtype=np.int32)
    width = np.array([it.width for it in items], dtype=np.int32)
    height = np.array([it.height for it in items], dtype=np.int32)
    cols, failed = _item_columns(spec, rng, shard_id, items, pos, frames, width, height, random_weights)
    items_table = pa.table({f.name: _arr(_nulls(cols[f.name]), f) for f in metadata.ITEMS_SCHEMA},
                           schema=metadata.ITEMS_SCHEMA)
    num_obj = cols["num_objects"]
    mcols = _masklet_columns(rng, cols["item_id"], num_obj, frames, width, height, ramp)
    base = [f for f in metadata.MASKLETS_SCHEMA if f.name not in ("flags", "review_priority")]
    n = len(mcols["masklet_id"])
    # Columns the fabricator draws nothing for are null: the re-seeding fate (dropped_reason, dropped_frame,
    # merged_into) of masklets that were all kept.
    masklets = pa.table({f.name: _arr(_nulls(mcols[f.name]), f) if f.name in mcols else pa.nulls(n, f.type)
                         for f in base}, schema=pa.schema(base))
    masklets = flag_vectorised(masklets, qa)
    frames_table = _frame_rows(rng, items, num_obj, masklets, failed) if spec.frame_rows else \
        metadata.empty(metadata.FRAMES_SCHEMA)
    return {"items": items_table, "masklets": masklets, "frames": frames_table}


def _item_columns(spec: Spec, rng, shard_id: int, items: list[MediaItem], pos: np.ndarray, frames: np.ndarray,
                  width: np.ndarray, height: np.ndarray, random_weights: bool) -> tuple[dict, np.ndarray]:
    """The items table's columns (by name) and which items failed."""
    n = len(items)
    failed = rng.random(n) < spec.fail_share
    attempts = np.where(rng.random(n) < spec.retry_share, rng.integers(2, 4, n), 1).astype(np.int32)
    per_item = spec.masklets / (spec.items * (1 - spec.fail_share))  # failed items have none
    num_obj = np.where(failed, 0, rng.poisson(per_item, n)).astype(np.int32)
    pixels = width.astype(np.float64) * height
    per_frame = 0.2 * pixels / (1280 * 720) * rng.lognormal(0, 0.3, n)  # seconds per frame, propagate
    sec = {"decode": 0.01 * frames * rng.lognormal(0, 0.2, n), "prompt": 0.5 * rng.lognormal(0, 0.2, n),
           "propagate": per_frame * frames * (1 + 0.1 * num_obj), "write": 0.005 * frames * (1 + num_obj * 0.05)}
    sec["signals"] = sec["write"] * 0.4
    sec["total"] = sec["decode"] + sec["prompt"] + sec["propagate"] + sec["write"]
    device = np.where(rng.random(n) < 0.8, "cuda", "cpu")
    finished = [T0 + timedelta(seconds=float(p * spec.seconds_per_item + rng.uniform(0, spec.seconds_per_item)))
                for p in pos]
    cols = {
        "item_id": [it.item_id for it in items], "path": [it.path for it in items], "kind": ["video"] * n,
        "shard_id": [shard_id] * n, "status": np.where(failed, "failed", "done").tolist(),
        "error": [ERRORS[k % len(ERRORS)] if f else None for k, f in zip(rng.integers(0, 99, n), failed)],
        "attempts": attempts, "num_frames": np.where(failed, 0, frames), "source_num_frames": frames.astype(np.int64),
        "stride": [1] * n, "width": width, "height": height, "source_width": width, "source_height": height,
        "scale": [1.0] * n, "fps": [30.0] * n, "num_objects": num_obj, "model": ["sam2.1_hiera_tiny"] * n,
        "image_size": [1024] * n, "checkpoint_sha256": ["0" * 64] * n, "random_weights": [random_weights] * n,
        "device": device.tolist(), "device_class": np.where(device == "cuda", "cuda-sm90", "cpu").tolist(),
        "device_name": ["NVIDIA H100"] * n, "autocast": ["bf16"] * n, "object_batch": [8] * n, "tf32": [True] * n,
        "compile": [False] * n, "torch_version": ["2.5.1"] * n, "sam2_version": ["1.1.0"] * n,
        **{f"seconds_{k}": np.where(failed & (k != "decode"), np.nan, v) for k, v in sec.items()},
        "coverage_mean": np.where(failed, np.nan, rng.beta(4, 3, n)), "finished_at": finished,
    }
    cols["coverage_min"] = np.where(failed, np.nan, cols["coverage_mean"] * rng.uniform(0.3, 1.0, n))
    return cols, failed


def _masklet_columns(rng, item_ids: list[str], num_obj: np.ndarray, frames: np.ndarray, width: np.ndarray,
                     height: np.ndarray, ramp: np.ndarray) -> dict:
    """The masklets table's columns (by name; flags and review_priority are added from them), `num_obj` per
    item, with scores lowered by each item's `ramp`."""
    pixels = width.astype(np.float64) * height
    m = int(num_obj.sum())
    owner = np.repeat(np.arange(len(num_obj)), num_obj)
    obj = (np.arange(m) - np.repeat(np.cumsum(num_obj) - num_obj, num_obj)).astype(np.int32)
    ids = np.asarray(item_ids, dtype=object)[owner]
    f_item = frames[owner]
    shift = ramp[owner]
    score = lambda a, b: np.clip(rng.beta(a, b, m) - shift, 0, 1).astype(np.float32)  # noqa: E731
    first = rng.integers(0, np.maximum(1, f_item // 4))
    visible = np.maximum(1, (f_item - first) * rng.uniform(0.3, 1.0, m)).astype(np.int32)
    visible[rng.random(m) < 0.01] = 0
    last = np.where(visible > 0, first + visible - 1, -1)
    first = np.where(visible > 0, first, -1)
    share = np.exp(rng.uniform(np.log(1e-4), np.log(0.9), m))
    area = share * pixels[owner]
    iou_mean = np.clip(rng.beta(8, 1.5, m), 0, 1)
    vis_share = visible / np.maximum(1, f_item)
    none = visible == 0
    return {
        "item_id": ids, "object_id": obj, "masklet_id": [f"{i}/{o}" for i, o in zip(ids, obj)],
        "prompt_source": ["amg"] * m, "prompt_frame": np.zeros(m, np.int32),
        "prompt_source_frame": np.zeros(m, np.int64),
        "prompt_x": rng.uniform(0, 1, m) * width[owner], "prompt_y": rng.uniform(0, 1, m) * height[owner],
        "predicted_iou": score(12, 1.2), "stability_score": score(20, 1.0), "prompt_area": area.astype(np.int64),
        "first_frame": first, "last_frame": last, "frames_visible": visible,
        "area_mean": np.where(none, 0.0, area), "area_min": np.where(none, 0, area * 0.7).astype(np.int64),
        "area_max": np.where(none, 0, area * 1.3).astype(np.int64),
        "prompt_area_share": share, "prompt_fg_points": np.ones(m, np.int32), "prompt_bg_points": np.zeros(m, np.int32),
        "area_share_mean": np.where(none, np.nan, share), "area_share_min": np.where(none, np.nan, share * 0.7),
        "area_share_max": np.where(none, np.nan, np.minimum(1, share * 1.3)),
        "perimeter_mean": np.where(none, np.nan, 4 * np.sqrt(area)),
        "complexity_mean": np.where(none, np.nan, 4 / np.sqrt(np.maximum(area, 1))),
        "complexity_max": np.where(none, np.nan, 6 / np.sqrt(np.maximum(area, 1))),
        "components_mean": np.where(none, np.nan, 1 + rng.exponential(0.5, m)),
        "components_max": rng.integers(1, 8, m).astype(np.int32), "holes_max": rng.integers(0, 3, m).astype(np.int32),
        "border_share": np.where(none, np.nan, rng.uniform(0, 1, m)),
        "frames_tracked": f_item, "visible_share": vis_share,
        "frames_tracked_after_prompt": np.maximum(0, f_item - 1),
        "frames_visible_after_prompt": np.maximum(0, visible - 1),
        "visibility_gaps": rng.poisson(0.3, m).astype(np.int32), "iou_pairs": np.maximum(0, visible - 1),
        "iou_mean": np.where(visible > 1, iou_mean, np.nan),
        "iou_min": np.where(visible > 1, iou_mean * rng.uniform(0.3, 1, m), np.nan),
        "iou_jumps": rng.poisson(0.5, m).astype(np.int32), "jump_iou": np.full(m, 0.5),
        "area_change_max": np.where(visible > 1, 1 + rng.exponential(0.3, m), np.nan),
        "object_score_mean": rng.normal(8, 3, m) - 10 * shift, "object_score_min": rng.normal(2, 3, m),
        "dup_iou": rng.beta(1, 8, m), "dup_object_id": np.full(m, -1, np.int32),
    }


def _nulls(values):
    """numpy NaN -> None (Arrow null), like the signals' nulls."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return pa.array(values, from_pandas=True)
    return values


def flag_vectorised(table: pa.Table, qa: QAConfig) -> pa.Table:
    """flags and review_priority as pipeline.quality.flags.flag_masklets sets them, built without a Python
    loop over rows (2 million rows)."""
    from pipeline.quality.flags import FLAG_NAMES, flag_arrays, review_priority

    flags = flag_arrays(table, qa)
    fired = np.stack([flags[name] for name in FLAG_NAMES], axis=1)  # (rows, flags), FLAG_NAMES order
    counts = fired.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    names = np.asarray(FLAG_NAMES, dtype=object)[np.nonzero(fired)[1]]
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(names.tolist(), pa.string()))
    out = table.append_column(pa.field("flags", pa.list_(pa.string())), lists)
    out = out.append_column(pa.field("review_priority", pa.float64()),
                            pa.array(review_priority(table, flags), pa.float64()))
    return out.cast(metadata.MASKLETS_SCHEMA)


def _frame_rows(rng, items, num_obj, masklets: pa.Table, failed) -> pa.Table:
    """One row per frame for the masklets of the shard's first done item."""
    k = next((i for i in range(len(items)) if not failed[i] and num_obj[i]), None)
    if k is None:
        return metadata.empty(metadata.FRAMES_SCHEMA)
    it = items[k]
    t = it.num_frames
    rows = {f.name: [] for f in metadata.FRAMES_SCHEMA}
    mk = masklets.filter(pa.compute.equal(masklets["item_id"], it.item_id)).to_pylist()
    for m in mk:
        for f in range(t):
            vis = m["first_frame"] >= 0 and m["first_frame"] <= f <= m["last_frame"]
            area = int(m["area_mean"]) if vis else 0
            side = int(math.sqrt(area)) if vis else 0
            vals = dict(item_id=it.item_id, object_id=m["object_id"], frame=f, source_frame=f, area=area,
                        bbox_x=0, bbox_y=0, bbox_w=side, bbox_h=side, object_score=float(rng.normal(5, 2)),
                        area_share=area / (it.width * it.height), perimeter=4.0 * side,
                        complexity=(4.0 / side) if side else None, components=1 if vis else 0, holes=0,
                        touches_border=False,
                        iou_prev=float(rng.beta(8, 1.5)) if vis and f > m["first_frame"] else None)
            for name in rows:
                rows[name].append(vals[name])
    return pa.table(rows, schema=metadata.FRAMES_SCHEMA)


def commit_shards(args) -> None:
    root, spec, shards, qa, random_weights, edit = args
    paths = RunPaths.of(root)
    from pipeline.plan import load_run

    plan = load_run(root)
    index = {item_id: k for k, item_id in enumerate(plan.items)}  # position in the plan = finish order here
    for shard_id in shards:
        items = list(plan.shard_items(shard_id).values())
        tables = shard_tables(spec, shard_id, items, [index[it.item_id] for it in items], qa, random_weights)
        if edit is not None:
            tables = edit(shard_id, tables)
        lease = acquire(paths, shard_id)  # as a worker does: commits and compactions only under the lease
        try:
            commit_item(paths, shard_id, "fabricated-rows", tables, lease)
            compact_shard(paths, shard_id, lease)
        finally:
            lease.release()


def fabricate_run(out: str | Path, spec: Spec, *, items: list[MediaItem] | None = None, random_weights: bool = False,
                  commit: list[int] | None = None, workers: int = 1, overrides: list[str] | None = None,
                  edit=None):
    """Plan `spec.items` items (or `items`) under `out` and commit the shards in `commit` (default: all; fewer
    leave a run in flight). `edit(shard_id, tables) -> tables` changes a shard's rows before they are committed
    (tests set columns to values they computed by hand; with workers > 1 it must pickle). Returns the plan."""
    from pipeline.plan import prepare_run

    cfg = load_config(None, [f"plan.num_shards={spec.shards}", *(overrides or [])])
    plan = prepare_run(out, items if items is not None else synthetic_items(spec), cfg)
    if random_weights:
        from pipeline.store.atomic import write_text_atomic

        write_text_atomic(plan.paths.random_weights_mark, '{"random_weights": true, "why": "fabricated"}')
    todo = plan.shard_ids if commit is None else commit
    chunks = [(str(out), spec, todo[w::workers], cfg.qa, random_weights, edit) for w in range(workers)]
    if workers == 1:
        commit_shards(chunks[0])
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(commit_shards, chunks))
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--masklets", type=int, default=20_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--drift", type=float, default=0.0)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    fabricate_run(args.out, Spec(args.items, args.masklets, args.shards, drift=args.drift),
                  random_weights=args.random_weights, workers=args.workers)
    print(f"fabricated {args.out}: {args.items} items, about {args.masklets} masklets, {args.shards} shards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
