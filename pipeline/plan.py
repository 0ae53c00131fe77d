"""The frozen plan of a run: shards balanced by cost, written once under the run folder with the run
snapshot (resolved config, versions, manifest fingerprint). Shard ids never depend on how many workers run
them, so a relaunch or resume never re-shards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pipeline.config import PlanConfig, RunConfig, config_from_dict, config_to_dict
from pipeline.manifest import items_to_table, manifest_fingerprint, read_manifest, write_table_atomic
from pipeline.paths import RunPaths, check_component
from pipeline.records import MediaItem, Shard
from pipeline.store.atomic import write_text_atomic

PLAN_VERSION = 1


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
    order = sorted(range(len(items)), key=lambda i: (-items[i].cost, i))
    heap = [(0.0, s) for s in range(n_shards)]  # (cost so far, shard id)
    members: list[list[int]] = [[] for _ in range(n_shards)]
    for i in order:
        cost, s = heapq.heappop(heap)  # the cheapest shard that still has room (n_shards * cap >= items)
        members[s].append(i)
        if len(members[s]) < cap:
            heapq.heappush(heap, (cost + items[i].cost, s))
    shards = []
    for s, idx in enumerate(members):
        idx.sort()
        shards.append(Shard(s, tuple(items[i].item_id for i in idx), float(sum(items[i].cost for i in idx))))
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
    for volatile in ("executor", "local", "slurm", "retries"):
        d.pop(volatile, None)
    for volatile in ("device", "threads", "cache_dir", "allow_download"):
        d["model"].pop(volatile, None)
    d["store"].pop("checkpoint_seconds", None)  # when to checkpoint never changes what is written
    d["propagate"].pop("offload_state", None)  # where the state is kept neither
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class RunPlan:
    paths: RunPaths
    config: RunConfig
    items: dict[str, MediaItem]
    shards: list[Shard]
    snapshot: dict

    @property
    def random_weights(self) -> bool:
        """Whether any of this run's masks come from random weights: the config said so when it was planned,
        or a worker has since loaded a checkpoint that is marked random (`RunPaths.random_weights_mark`)."""
        return bool(self.snapshot.get("random_weights")) or self.paths.random_weights_mark.exists()

    def shard(self, shard_id: int) -> Shard:
        for s in self.shards:
            if s.shard_id == shard_id:
                return s
        raise KeyError(f"shard {shard_id} is not in the plan of {self.paths.root} (shards 0..{len(self.shards) - 1})")


def prepare_run(out: str | Path, items: list[MediaItem], cfg: RunConfig) -> RunPlan:
    """Freeze the plan under OUT, or reopen it: a second `run` on the same OUT with the same manifest and
    config resumes; a changed one is refused (mixing outputs of two configs would make a corrupt dataset)."""
    paths = RunPaths.of(out)
    for it in items:
        check_component(it.item_id)
    fingerprint = manifest_fingerprint(items)
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
    write_table_atomic(items_to_table(items), str(paths.manifest))
    plan = {"version": PLAN_VERSION, "shards": [dataclasses.asdict(s) for s in shards]}
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
    paths = RunPaths.of(out)
    if not paths.snapshot.exists():
        raise FileNotFoundError(f"{paths.root} is not a masklet run folder (no run.json); start one with `masklet run`")
    snapshot = json.loads(paths.snapshot.read_text())
    plan = json.loads(paths.plan.read_text())
    shards = [Shard(s["shard_id"], tuple(s["item_ids"]), s["cost"]) for s in plan["shards"]]
    items = {it.item_id: it for it in read_manifest(str(paths.manifest))}
    return RunPlan(paths, config_from_dict(snapshot["config"]), items, shards, snapshot)
