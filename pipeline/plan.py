"""The frozen plan of a run: shards balanced by cost, written once under the run folder with the run
snapshot (resolved config, versions, manifest fingerprint). Shard ids never depend on how many workers run
them, so a relaunch or resume never re-shards.

Plan version 2 is built for a million items in ten thousand shards, where every array task loads the plan:
the frozen manifest copy is written in shard order (row groups of MANIFEST_ROW_GROUP rows) and plan.json
holds only each shard's row span and cost. Loading a plan reads that small file; `shard(i)` reads the one or
two row groups holding shard i's rows, so a worker starts in well under a second instead of re-reading the
whole manifest (about 24 s per task for a million rows: days of CPU over 10,000 tasks). Version 1 folders
(plan.json listing every shard's item ids, the copy in manifest order) still load, reading the copy whole.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import heapq
import json
import math
import platform
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import PlanConfig, RunConfig, config_from_dict, config_to_dict
from pipeline.paths import RunPaths, check_component
from pipeline.records import MediaItem, Shard
from pipeline.store.atomic import write_text_atomic

PLAN_VERSION = 2
MANIFEST_ROW_GROUP = 16384  # rows per row group of the frozen copy: a shard's rows sit in one or two of them


class RunMismatchError(RuntimeError):
    """The run folder was made from another config or manifest; mixing outputs is refused."""


def make_plan(items: list[MediaItem], cfg: PlanConfig) -> list[Shard]:
    """Greedy longest-processing-time balancing of frames x pixels over a fixed number of shards, each
    holding at most max_items_per_shard items; items keep manifest order inside a shard."""
    if not items:
        return []
    n_shards = cfg.num_shards or math.ceil(len(items) / cfg.max_items_per_shard)
    n_shards = max(1, min(n_shards, len(items)))
    cap = math.ceil(len(items) / n_shards) if cfg.num_shards else cfg.max_items_per_shard
    costs = [it.cost for it in items]  # once: a million property calls per use add up
    order = sorted(range(len(items)), key=lambda i: (-costs[i], i))
    heap = [(0.0, s) for s in range(n_shards)]  # (cost so far, shard id)
    members: list[list[int]] = [[] for _ in range(n_shards)]
    for i in order:
        cost, s = heapq.heappop(heap)  # the cheapest shard that still has room (n_shards * cap >= items)
        members[s].append(i)
        if len(members[s]) < cap:
            heapq.heappush(heap, (cost + costs[i], s))
    shards = []
    for s, idx in enumerate(members):
        idx.sort()
        shards.append(Shard(s, tuple(items[i].item_id for i in idx), float(sum(costs[i] for i in idx))))
    return [sh for sh in shards if sh.item_ids]


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("masklet", "torch", "sam2", "zarr", "numpy", "av", "pyarrow", "dask", "submitit"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def config_fingerprint(cfg: RunConfig) -> str:
    """What must not change within a run: everything that decides the masks (not executor settings)."""
    d = config_to_dict(cfg)
    for volatile in ("executor", "local", "slurm", "retries", "qa"):  # qa: read after the model (masklet qa)
        d.pop(volatile, None)
    for volatile in ("device", "threads", "cache_dir", "allow_download"):
        d["model"].pop(volatile, None)
    d["store"].pop("checkpoint_seconds", None)  # when to checkpoint never changes what is written
    d["propagate"].pop("offload_state", None)  # where the state is kept neither
    # Keys added after runs existed enter the fingerprint only when they change what is written, so a run
    # planned before them keeps its fingerprint (and resumes): re-seeding off, SAM 2 seeding, no SAM 1.
    if d["prompt"].get("reseed_every") is None and d["prompt"].get("reseed_adaptive") is None:
        for key in [k for k in d["prompt"] if k.startswith(("reseed_", "hotstart_")) or k == "dup_iou"]:
            d["prompt"].pop(key)
        d["propagate"].pop("reverse", None)
        d["propagate"].pop("reverse_frames", None)
    if not d["prompt"].get("every_frame"):
        d["prompt"].pop("every_frame", None)
        d["prompt"].pop("link_iou", None)
    if d["prompt"].get("generator", "sam2") == "sam2":
        d["prompt"].pop("generator", None)
        d.pop("sam1", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardSpan:
    """A shard as plan.json records it: where its rows are in the frozen manifest copy (version 2; None in a
    version 1 plan, which lists the ids instead), how many there are, and their cost."""

    shard_id: int
    start: int | None
    num_items: int
    cost: float


class PlanItems(Mapping):
    """`plan.items`: item id -> MediaItem. Items of shards already read (`plan.shard(i)`) are served from
    memory; any other lookup, iteration, or a version 1 plan reads the whole frozen copy once."""

    def __init__(self, plan: "RunPlan"):
        self._plan = plan

    def __getitem__(self, item_id: str) -> MediaItem:
        loaded = self._plan._loaded
        if item_id in loaded:
            return loaded[item_id]
        return self._plan._all_items[item_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan._all_items)

    def __len__(self) -> int:
        return self._plan.num_items


@dataclasses.dataclass(frozen=True, eq=False)
class RunPlan:
    paths: RunPaths
    config: RunConfig
    snapshot: dict
    spans: dict[int, ShardSpan]  # shard id -> span, in shard id order
    listed: dict[int, Shard] | None = None  # version 1: plan.json lists every shard's item ids
    _loaded: dict[str, MediaItem] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def random_weights(self) -> bool:
        """Whether any of this run's masks come from random weights: the config said so when it was planned,
        or a worker has since loaded a checkpoint that is marked random (`RunPaths.random_weights_mark`)."""
        return bool(self.snapshot.get("random_weights")) or self.paths.random_weights_mark.exists()

    @property
    def shard_ids(self) -> list[int]:
        return list(self.spans)

    @property
    def num_items(self) -> int:
        return sum(s.num_items for s in self.spans.values())

    def shard_size(self, shard_id: int) -> int:
        return self._span(shard_id).num_items

    def _span(self, shard_id: int) -> ShardSpan:
        try:
            return self.spans[shard_id]  # a dict: 10,000 lookups cost nothing, not a scan each
        except KeyError:
            raise KeyError(f"shard {shard_id} is not in the plan of {self.paths.root} "
                           f"(shards 0..{len(self.spans) - 1})") from None

    def shard(self, shard_id: int) -> Shard:
        span = self._span(shard_id)
        if self.listed is not None:
            return self.listed[shard_id]
        return Shard(shard_id, tuple(self.shard_items(shard_id)), span.cost)

    def shard_items(self, shard_id: int) -> dict[str, MediaItem]:
        """The shard's items, in plan order, reading only the row groups that hold them (version 2)."""
        from pipeline.manifest.columns import items_of_table

        span = self._span(shard_id)
        if self.listed is not None:
            return {i: self._all_items[i] for i in self.listed[shard_id].item_ids}
        items = items_of_table(_read_rows(self.paths.manifest, span.start, span.start + span.num_items))
        self._loaded.update((it.item_id, it) for it in items)
        return {it.item_id: it for it in items}

    def shard_of(self, item_id: str) -> int:
        """The shard that holds `item_id` (KeyError when the run has none): a scan of the copy's id column
        (a million ids in milliseconds once read), then a binary search over the shards' row spans."""
        if self.listed is not None:
            found = self._listed_index.get(item_id)
        else:
            row = pc.index(self._id_column, item_id).as_py()
            found = None if row < 0 else self._span_order[bisect.bisect_right(self._span_starts, row) - 1]
        if found is None:
            raise KeyError(f"item {item_id!r} is not in the plan of {self.paths.root}")
        return found

    @cached_property
    def _id_column(self) -> pa.ChunkedArray:
        return pq.read_table(self.paths.manifest, columns=["item_id"]).column("item_id")

    @cached_property
    def _span_order(self) -> list[int]:
        return sorted(self.spans, key=lambda i: self.spans[i].start)

    @cached_property
    def _span_starts(self) -> list[int]:
        return [self.spans[i].start for i in self._span_order]

    @cached_property
    def _listed_index(self) -> dict[str, int]:
        return {item_id: s.shard_id for s in self.listed.values() for item_id in s.item_ids}

    @cached_property
    def items(self) -> PlanItems:
        return PlanItems(self)

    @cached_property
    def shards(self) -> list[Shard]:
        """Every shard with its item ids (reads the copy's id column once: for whole-run views)."""
        if self.listed is not None:
            return list(self.listed.values())
        ids = self._id_column.to_pylist()
        return [Shard(s.shard_id, tuple(ids[s.start:s.start + s.num_items]), s.cost) for s in self.spans.values()]

    @cached_property
    def _all_items(self) -> dict[str, MediaItem]:
        from pipeline.manifest.columns import items_of_table

        return {it.item_id: it for it in items_of_table(pq.read_table(self.paths.manifest))}


def _read_rows(manifest: Path, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    f = pq.ParquetFile(manifest)
    groups, first_row, row = [], None, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if row < stop and row + n > start:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    if not groups:
        raise ValueError(f"{manifest} has {row} rows, not rows {start}..{stop - 1} as plan.json says; the run "
                         f"folder was edited or truncated: start a new run with another --out")
    return f.read_row_groups(groups).slice(start - first_row, stop - start)


def prepare_run(out: str | Path, items: list[MediaItem], cfg: RunConfig) -> RunPlan:
    """Freeze the plan under OUT, or reopen it: a second `run` on the same OUT with the same manifest and
    config resumes; a changed one is refused (mixing outputs of two configs would make a corrupt dataset)."""
    # Here, not at the top: pipeline.manifest imports dask and PyAV, which loading a plan (every worker,
    # every `masklet status`) does not need.
    from pipeline.manifest import items_to_table, write_table_atomic
    from pipeline.manifest.table import table_fingerprint

    paths = RunPaths.of(out)
    for it in items:
        check_component(it.item_id)
    table = items_to_table(items)
    fingerprint = table_fingerprint(table)  # manifest_fingerprint(items), by Arrow kernels
    if paths.snapshot.exists():
        existing = load_run(out)
        old = existing.snapshot
        if old["manifest_fingerprint"] != fingerprint:
            raise RunMismatchError(
                f"{paths.root} was planned from a different manifest (fingerprint {old['manifest_fingerprint'][:12]} "
                f"vs {fingerprint[:12]}); resume it with its own manifest, or start a new run with another --out"
            )
        if old["config_fingerprint"] != config_fingerprint(cfg):
            raise RunMismatchError(
                f"{paths.root} was made with another config (see {paths.snapshot}: 'config'); its masks would "
                f"not match the new settings. Use the same config to resume, or another --out for a new run"
            )
        if config_to_dict(cfg) != old["config"]:
            # Only launch settings differ (device, threads, retries, executor, profile): jobs read them from
            # run.json, so this launch's settings must be the ones written there.
            snapshot = {**old, "config": config_to_dict(cfg), "relaunched_at": datetime.now(timezone.utc).isoformat()}
            write_text_atomic(paths.snapshot, json.dumps(snapshot, indent=1))
            return load_run(out)
        return existing
    paths.ensure()
    shards = make_plan(items, cfg.plan)
    position = {it.item_id: k for k, it in enumerate(items)}
    # The copy in shard order, so that a shard is a row span: a worker reads its rows and nothing else.
    ordered = table.take(pa.array([position[i] for s in shards for i in s.item_ids], pa.int64()))
    write_table_atomic(ordered, str(paths.manifest), row_group_size=MANIFEST_ROW_GROUP)
    starts = [0]
    for s in shards[:-1]:
        starts.append(starts[-1] + len(s.item_ids))
    plan = {"version": PLAN_VERSION, "manifest_order": "shards",
            "shards": {"shard_id": [s.shard_id for s in shards], "start": starts,
                       "num_items": [len(s.item_ids) for s in shards], "cost": [s.cost for s in shards]}}
    write_text_atomic(paths.plan, json.dumps(plan, indent=1))
    snapshot = {
        "created_at": datetime.now(timezone.utc).isoformat(),
        "config": config_to_dict(cfg),
        "config_fingerprint": config_fingerprint(cfg),
        "manifest_fingerprint": fingerprint,
        "num_items": len(items),
        "num_shards": len(shards),
        "random_weights": cfg.model.random_weights,
        "versions": _versions(),
    }
    write_text_atomic(paths.snapshot, json.dumps(snapshot, indent=1))  # written last: marks the plan complete
    return load_run(out)


def load_run(out: str | Path) -> RunPlan:
    """The frozen plan of a run folder: reads run.json and plan.json only (items are read when asked for)."""
    paths = RunPaths.of(out)
    if not paths.snapshot.exists():
        raise FileNotFoundError(f"{paths.root} is not a masklet run folder (no run.json); start one with `masklet run`")
    snapshot = json.loads(paths.snapshot.read_text())
    plan = json.loads(paths.plan.read_text())
    config = config_from_dict(snapshot["config"])
    version = plan.get("version", 1)
    if version == 1:
        listed = {s["shard_id"]: Shard(s["shard_id"], tuple(s["item_ids"]), s["cost"]) for s in plan["shards"]}
        spans = {i: ShardSpan(i, None, len(s.item_ids), s.cost) for i, s in listed.items()}
        return RunPlan(paths, config, snapshot, spans, listed)
    if version != PLAN_VERSION:
        raise ValueError(f"{paths.plan} is plan version {version}; this masklet reads versions 1 and "
                         f"{PLAN_VERSION}: upgrade masklet to open this run")
    cols = plan["shards"]
    spans = {i: ShardSpan(i, start, n, cost)
             for i, start, n, cost in zip(cols["shard_id"], cols["start"], cols["num_items"], cols["cost"])}
    return RunPlan(paths, config, snapshot, spans)
