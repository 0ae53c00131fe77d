"""Progress of a run from what is on disk: items done / failed / pending per shard, errors of failures."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.store.commit import read_shard_table
from pipeline.store.metadata import ITEMS_SCHEMA

from pipeline.plan import RunPlan, load_run


@dataclass
class ShardStatus:
    shard_id: int
    total: int
    done: int = 0
    failed: int = 0
    frames_done: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    def __add__(self, other: "ShardStatus") -> "ShardStatus":
        return ShardStatus(-1, self.total + other.total, self.done + other.done, self.failed + other.failed,
                           self.frames_done + other.frames_done, {**self.errors, **other.errors})


def shard_status(plan: RunPlan, shard_id: int) -> ShardStatus:
    shard = plan.shard(shard_id)
    st = ShardStatus(shard_id, len(shard.item_ids))
    # Resolved through the store (compacted folders and item folders alike), never by listing folders here.
    rows = read_shard_table(plan.paths, shard_id, "items", ITEMS_SCHEMA).select(
        ["item_id", "status", "error", "num_frames"]).to_pylist()
    for row in rows:
        if row["status"] == "done":
            st.done += 1
            st.frames_done += row["num_frames"] or 0
        else:
            st.failed += 1
            st.errors[row["item_id"]] = row["error"] or ""
    return st


def run_status(out: str | Path) -> tuple[RunPlan, list[ShardStatus]]:
    plan = load_run(out)
    return plan, [shard_status(plan, s.shard_id) for s in plan.shards]


def format_status(plan: RunPlan, shards: list[ShardStatus]) -> str:
    total = sum(shards[1:], shards[0]) if shards else ShardStatus(-1, 0)
    lines = [f"run {plan.paths.root}"]
    if plan.snapshot.get("random_weights"):
        lines.append("  model: RANDOM WEIGHTS (plumbing check only: these masks are not results)")
    lines.append(f"  items: {total.done} done, {total.failed} failed, {total.pending} pending "
                 f"of {total.total}; frames done: {total.frames_done}")
    lines.append(f"  {'shard':>6} {'items':>6} {'done':>6} {'failed':>6} {'pending':>7}")
    for s in shards:
        lines.append(f"  {s.shard_id:>6} {s.total:>6} {s.done:>6} {s.failed:>6} {s.pending:>7}")
    if total.errors:
        lines.append("  failed items:")
        for item_id, err in sorted(total.errors.items()):
            lines.append(f"    {item_id}: {err}")
    return "\n".join(lines)
