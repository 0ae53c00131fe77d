"""The run's flag thresholds and re-flagging a run without the model (`masklet qa OUT --set qa.KEY=VALUE`).

The thresholds in force are OUT/qa.json when `masklet qa` wrote one, else the run config's `qa` section. The
worker flags each item's masklets with them at commit time; `reflag_run` changes them and rewrites only the
`flags` and `review_priority` columns of every committed masklets.parquet, from the stored signals (no masks,
no model, no change to the run's fingerprint: `qa` is left out of it, see pipeline/plan.py), and of every
masklet version `masklet refine` published (OUT/versions/.../masklet.parquet carries its own signals, flags
and review priority: the review queue and exports rank and filter by them).

Each shard is re-flagged under its lease (pipeline/store/lease.py), so no worker commits or compacts it
meanwhile; a shard a live worker owns is refused before anything is written, naming it. Each file is
replaced in one rename (pipeline/store/atomic.py): a kill leaves every file old or new, and running the
same command again finishes the job.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import ConfigError, QAConfig, RunConfig, merge_dicts, parse_overrides
from pipeline.paths import RunPaths
from pipeline.quality.flags import FLAG_NAMES, flag_masklets
from pipeline.store.atomic import write_atomic, write_text_atomic


def current_qa(paths: RunPaths, cfg: RunConfig) -> QAConfig:
    """The thresholds in force for the run at `paths` (OUT/qa.json if `masklet qa` set any, else cfg.qa)."""
    try:
        text = paths.qa.read_text()
    except FileNotFoundError:
        return cfg.qa
    try:
        return QAConfig.from_dict(json.loads(text))
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{paths.qa} is not a valid set of qa thresholds ({e}); remove it to go back to the "
                          f"run config's, or set them again with `masklet qa {paths.root} --set qa.KEY=VALUE`") from e


def qa_from_overrides(base: QAConfig, overrides: list[str]) -> QAConfig:
    """`base` with `qa.KEY=VALUE` overrides; any other key is refused (it would change the masks)."""
    tree = parse_overrides(overrides)
    other = sorted(k for k in tree if k != "qa")
    if other:
        raise ConfigError(f"masklet qa changes only qa.* keys, not {other}: those decide the masks; start a new "
                          f"run (or `masklet run` into a new OUT) to change them")
    return QAConfig.from_dict(merge_dicts(dataclasses.asdict(base), tree.get("qa", {})))


@dataclass
class ReflagSummary:
    """What a re-flag changed: masklets whose flags changed, and the count of each flag before and after."""

    qa: QAConfig
    files: int = 0
    masklets: int = 0
    versions: int = 0  # of those masklets, rows of refined versions (OUT/versions)
    changed: int = 0
    before: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FLAG_NAMES, 0))
    after: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FLAG_NAMES, 0))

    def lines(self) -> list[str]:
        out = [f"re-flagged {self.masklets} masklets in {self.files} files ({self.versions} of them refined "
               f"versions): flags changed on {self.changed}"]
        out += [f"  {name:<11} {self.before[name]:>9} -> {self.after[name]}" for name in FLAG_NAMES]
        return out


def _count(summary: dict[str, int], flags: list) -> None:
    for row in flags:
        for name in row or ():
            summary[name] += 1


def _masklet_files(paths: RunPaths, shard_id: int) -> list[Path]:
    """The shard's committed masklets files as readers resolve them (the store's own layout: the newest
    compacted folder and the item folders; a stale compacted version, never read, is not rewritten)."""
    from pipeline.store.commit import _shard_layout

    compacted, _, items = _shard_layout(paths, shard_id)
    folders = ([compacted] if compacted is not None else []) + [items[k] for k in sorted(items)]
    return [d / "masklets.parquet" for d in folders if (d / "masklets.parquet").exists()]


def _reflag_file(path: Path, qa: QAConfig, summary: ReflagSummary) -> None:
    table = pq.read_table(path)
    if "flags" not in table.column_names:
        raise ConfigError(f"{path} has no quality signals (a run made before they existed); it cannot be re-flagged")
    old = table.column("flags").to_pylist()
    new_table = flag_masklets(table, qa).select(table.column_names)
    new = new_table.column("flags").to_pylist()
    summary.files += 1
    summary.masklets += len(old)
    summary.changed += sum((a or []) != (b or []) for a, b in zip(old, new))
    _count(summary.before, old)
    _count(summary.after, new)
    write_atomic(path, lambda p: pq.write_table(new_table, p))


def reflag_run(out: str | Path, overrides: list[str]) -> ReflagSummary:
    """Set qa.* thresholds on a run and recompute every committed masklet's flags and review priority."""
    from pipeline.plan import load_run
    from pipeline.store.commit import shard_ids_on_disk
    from pipeline.store.lease import acquire, read_lease

    plan = load_run(out)
    paths = plan.paths
    qa = qa_from_overrides(current_qa(paths, plan.config), overrides)
    shards = shard_ids_on_disk(paths)
    busy = [s for s in shards if (view := read_lease(paths, s)) is not None and view.fresh()]
    if busy:
        raise ConfigError(f"shard(s) {busy[:10]}{' ...' if len(busy) > 10 else ''} of {paths.root} are being "
                          f"worked on now; re-flag once `masklet status {paths.root}` shows no shard running")
    write_text_atomic(paths.qa, json.dumps(dataclasses.asdict(qa), indent=1) + "\n")  # new commits use these
    summary = ReflagSummary(qa)
    for shard_id in shards:
        with acquire(paths, shard_id) as lease:  # no worker commits or compacts the shard meanwhile
            for path in _masklet_files(paths, shard_id):
                lease.check(shard_id)
                _reflag_file(path, qa, summary)
    _reflag_versions(paths, qa, summary)
    return summary


def _reflag_versions(paths: RunPaths, qa: QAConfig, summary: ReflagSummary) -> None:
    """The refined versions' rows too. No lease: a version is written once, never by a worker; a refine
    publishing one meanwhile flags it with qa.json, which is written before this runs."""
    from pipeline.review.versions import version_masklet_files

    for path in version_masklet_files(paths.root):
        before = summary.masklets
        _reflag_file(path, qa, summary)
        summary.versions += summary.masklets - before
