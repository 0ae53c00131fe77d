"""RunPaths: the one place that names the files of a run folder. No other module builds run paths.

    OUT/
      run.json                      run snapshot: resolved config, versions, manifest fingerprint
      numerics.json                 the run's reference numerics (device class, dtype, versions...), by its first commit
      random-weights.json           present when a worker loaded random weights (whatever the config said)
      manifest.parquet              the manifest rows this run was planned from (frozen copy)
      plan.json                     the frozen shards (ids never depend on how many workers run them); version 2:
                                    each shard's row span of manifest.parquet, which is in shard order
      masks/                        Zarr v3 group; masks/<item_id> is a bool array (objects, frames, H, W)
      meta/shard-00007/<item_id>/   one committed item: items.parquet, masklets.parquet, frames.parquet,
                                    summary.json (store/summary.py: what `masklet status` reads),
                                    items.arrow (the items rows as Arrow: what open_run reads)
      logs/shard-00007.log          one log per shard
      faults/shard-00007.json       why shard 7 stopped on an environment fault (pipeline/faults.py); removed
                                    when the shard next finishes cleanly
      cache/items-<key>.parquet     open_run's items table of every shard in one file (a cache: see results.py)
      leases/shard-00007.lease      the shard's owner while a worker runs it (pipeline/store/lease.py)
      tmp/                          staging area; anything here is uncommitted
      tmp/shards/shard-00007/       the shard's staged commits, compactions and trash (its owner clears it)
      tmp/items/<item_id>/          one item's staged masks and trash (its shard's owner clears it)
      tmp/partial/<item_id>/        a long item's checkpoint: masks and rows so far, tracker state (kept)
      slurm/jobs.jsonl              one line per SLURM submission: job id, array tasks and their shard ids
      slurm/<job>_<task>/           submitit's folder of one array task (pickles, stdout/stderr logs)
      review/sessions/<session_id>/ one review session's append-only actions (pipeline/review/records.py)
      versions/<item_id>/<object_id>/v<NNN>/  a masklet's version after refine (pipeline/review/versions.py)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


def check_component(name: str, what: str = "item id") -> str:
    """Refuse anything that could escape the run folder when used as one path component."""
    if not _SAFE_COMPONENT.match(name) or name in (".", ".."):
        raise ValueError(
            f"{what} {name!r} is not safe as a file name (allowed: letters, digits, '.', '_', '-'; "
            f"no leading '.'; at most 200 characters); rebuild the manifest with `masklet manifest build`"
        )
    return name


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, root: str | Path) -> RunPaths:
        return cls(Path(root).expanduser().resolve())

    @property
    def snapshot(self) -> Path:
        return self.root / "run.json"

    @property
    def numerics(self) -> Path:
        """The numerics of the run's first commit, which every later item must share (pipeline/numerics.py)."""
        return self.root / "numerics.json"

    @property
    def random_weights_mark(self) -> Path:
        """Written by a worker that loaded a checkpoint marked random (see stages/models.py)."""
        return self.root / "random-weights.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    def mask_array(self, item_id: str) -> Path:
        return self.masks / check_component(item_id)

    @property
    def meta(self) -> Path:
        return self.root / "meta"

    def shard_meta(self, shard_id: int) -> Path:
        return self.meta / f"shard-{shard_id:05d}"

    def item_commit(self, shard_id: int, item_id: str) -> Path:
        return self.shard_meta(shard_id) / check_component(item_id)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def shard_log(self, shard_id: int) -> Path:
        return self.logs / f"shard-{shard_id:05d}.log"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def shard_tmp(self, shard_id: int) -> Path:
        """Staging of one shard's commits and compactions, and its trash: only the shard's owner writes here."""
        return self.tmp / "shards" / f"shard-{shard_id:05d}"

    def item_tmp(self, item_id: str) -> Path:
        """Staging of one item's masks, and its trash: only the owner of the item's shard writes here."""
        return self.tmp / "items" / check_component(item_id)

    @property
    def partials(self) -> Path:
        return self.tmp / "partial"

    @property
    def leases(self) -> Path:
        return self.root / "leases"

    def shard_lease(self, shard_id: int) -> Path:
        """The lease naming the worker that owns a shard (pipeline/store/lease.py)."""
        return self.leases / f"shard-{shard_id:05d}.lease"

    @property
    def table_cache(self) -> Path:
        """Whole-run tables `open_run` rebuilt from every shard's files, named by the files they came from."""
        return self.root / "cache"

    def partial(self, item_id: str) -> Path:
        """Where a long item's checkpoint lives until the item is committed (pipeline/store/partial.py)."""
        return self.partials / check_component(item_id)

    @property
    def qa(self) -> Path:
        """The qa.* thresholds `masklet qa` set on the run last (absent: the run config's own)."""
        return self.root / "qa.json"

    @property
    def faults(self) -> Path:
        return self.root / "faults"

    def shard_fault(self, shard_id: int) -> Path:
        """The record of the environment fault that last stopped a shard (pipeline/faults.py)."""
        return self.faults / f"shard-{shard_id:05d}.json"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def slurm_jobs(self) -> Path:
        """The record of SLURM submissions (JSON lines, appended atomically by the SLURM executor)."""
        return self.slurm / "jobs.jsonl"

    @property
    def slurm_jobs_lock(self) -> Path:
        return self.slurm / "jobs.jsonl.lock"

    @property
    def submitit_folder(self) -> Path:
        """submitit's folder pattern: it puts %j (the job id; `<array>_<task>` for array tasks) in itself."""
        return self.slurm / "%j"

    @property
    def refine_submitit_folder(self) -> Path:
        """submitit's folder pattern for `masklet refine --executor slurm` (slurm/refine/<job>_<task>/)."""
        return self.slurm / "refine" / "%j"

    @property
    def review(self) -> Path:
        return self.root / "review"

    @property
    def review_sessions(self) -> Path:
        """One folder per review session; every file in it is one action (pipeline/review/records.py)."""
        return self.review / "sessions"

    def review_session(self, session_id: str) -> Path:
        return self.review_sessions / check_component(session_id, "session id")

    @property
    def versions(self) -> Path:
        """Masklet versions written by `masklet refine` (pipeline/review/versions.py)."""
        return self.root / "versions"

    def masklet_versions(self, item_id: str, object_id: int) -> Path:
        return self.versions / check_component(item_id) / str(int(object_id))

    def masklet_version(self, item_id: str, object_id: int, version: int) -> Path:
        return self.masklet_versions(item_id, object_id) / f"v{int(version):03d}"

    def version_tmp(self, item_id: str, object_id: int) -> Path:
        """Staging for a version being written (renamed into versions/ when complete)."""
        return self.tmp / "versions" / check_component(item_id) / str(int(object_id))

    def ensure(self) -> RunPaths:
        for d in (self.root, self.masks, self.meta, self.logs, self.tmp, self.leases):
            d.mkdir(parents=True, exist_ok=True)
        return self
