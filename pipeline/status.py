"""Progress of a run: items done / failed / pending per shard from what is on disk, the errors of failed
items, the rate and an ETA, and, when an executor reports them, the state of the jobs that run each shard.

Scheduler-agnostic: an executor that runs shards elsewhere (SLURM) hands in a `SchedulerView` built from its
own records; this module only combines it with the disk and formats it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.faults import read_shard_fault
from pipeline.numerics import status_lines as numerics_status_lines
from pipeline.plan import RunPlan, load_run
from pipeline.store.commit import read_shard_table
from pipeline.store.metadata import ITEMS_SCHEMA


@dataclass
class ShardStatus:
    shard_id: int
    total: int
    done: int = 0
    failed: int = 0
    frames_done: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    finished: list[tuple[datetime, int]] = field(default_factory=list)  # (commit time, frames) per item
    fault: str | None = None  # why the shard last stopped on an environment fault (OUT/faults/), until it finishes

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    def __add__(self, other: "ShardStatus") -> "ShardStatus":
        return ShardStatus(-1, self.total + other.total, self.done + other.done, self.failed + other.failed,
                           self.frames_done + other.frames_done, {**self.errors, **other.errors},
                           self.finished + other.finished)


@dataclass(frozen=True)
class ShardJob:
    """What the scheduler says about the task that last took a shard."""

    task_id: str  # the scheduler's id of the task (e.g. 1234_7)
    state: str  # the scheduler's word for it (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...)
    active: bool  # queued or running: the shard is being taken care of
    log: str | None = None  # the task's own log (what a task that died outside any item printed)


@dataclass(frozen=True)
class SchedulerView:
    summary: str  # one line about the run's jobs
    shard_jobs: dict[int, ShardJob]
    since: datetime | None  # when the latest submission went in (the rate is measured from there)


def shard_status(plan: RunPlan, shard_id: int) -> ShardStatus:
    shard = plan.shard(shard_id)
    st = ShardStatus(shard_id, len(shard.item_ids))
    # Resolved through the store (compacted folders and item folders alike), never by listing folders here.
    rows = read_shard_table(plan.paths, shard_id, "items", ITEMS_SCHEMA).select(
        ["item_id", "status", "error", "num_frames", "finished_at"]).to_pylist()
    for row in rows:
        if row["status"] == "done":
            st.done += 1
            st.frames_done += row["num_frames"] or 0
        else:
            st.failed += 1
            st.errors[row["item_id"]] = row["error"] or ""
        if row["finished_at"] is not None:
            frames = (row["num_frames"] or 0) if row["status"] == "done" else 0
            st.finished.append((row["finished_at"], frames))
    fault = read_shard_fault(plan.paths, shard_id)
    st.fault = fault.line if fault else None
    return st


def run_status(out: str | Path) -> tuple[RunPlan, list[ShardStatus]]:
    plan = load_run(out)
    return plan, [shard_status(plan, s.shard_id) for s in plan.shards]


SHARD_STATES = ("done", "running", "queued", "failed", "pending")
UNKNOWN = "UNKNOWN"  # the scheduler's word when it cannot say (unreachable, or it forgot the job)


def shard_state(st: ShardStatus, job: ShardJob | None) -> str:
    """done: nothing pending. running / queued: its task is. failed: its task ended with items still pending
    (crashed, cancelled, out of requeues), or it stopped on an environment fault (`masklet resume` runs them).
    unknown: the scheduler cannot say. pending: never submitted (or run locally)."""
    if st.pending == 0:
        return "done"
    if job is None:
        return "failed" if st.fault else "pending"
    if st.fault and not job.active:
        return "failed"
    if job.active:
        return "running" if job.state == "RUNNING" else "queued"
    return "unknown" if job.state == UNKNOWN else "failed"


@dataclass(frozen=True)
class Rate:
    items_per_s: float
    frames_per_s: float
    window_s: float

    def eta_s(self, pending_items: int) -> float | None:
        return pending_items / self.items_per_s if self.items_per_s > 0 and pending_items else None


def measure_rate(finished: list[tuple[datetime, int]], since: datetime | None, now: datetime,
                 running: bool) -> Rate | None:
    """Items and frames committed per second. From `since` (the latest launch) when given, else from the first
    commit (which is then not counted: its own start is unknown); up to now while work runs, else to the
    last commit. None until there is something to measure."""
    if since is None:
        if len(finished) < 2:
            return None
        ordered = sorted(finished)
        start, counted = ordered[0][0], ordered[1:]
    else:
        start, counted = since, [f for f in finished if f[0] >= since]
    if not counted:
        return None
    end = now if running else max(t for t, _ in counted)
    window = (end - start).total_seconds()
    if window <= 0:
        return None
    return Rate(len(counted) / window, sum(n for _, n in counted) / window, window)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(plan: RunPlan, shards: list[ShardStatus], scheduler: SchedulerView | None = None,
                  now: datetime | None = None) -> str:
    total = sum(shards[1:], shards[0]) if shards else ShardStatus(-1, 0)
    jobs = scheduler.shard_jobs if scheduler else {}
    states = {s.shard_id: shard_state(s, jobs.get(s.shard_id)) for s in shards}
    counts = {k: sum(1 for v in states.values() if v == k) for k in (*SHARD_STATES, "unknown")}
    lines = [f"run {plan.paths.root}"]
    if plan.random_weights:
        lines.append("  model: RANDOM WEIGHTS (plumbing check only: these masks are not results)")
    lines.extend(numerics_status_lines(plan.paths, plan.snapshot))
    lines.append(f"  items: {total.done} done, {total.failed} failed, {total.pending} pending "
                 f"of {total.total}; frames done: {total.frames_done}")
    shown = SHARD_STATES + (("unknown",) if counts["unknown"] else ())
    lines.append("  shards: " + ", ".join(f"{counts[k]} {k}" for k in shown) + f" of {len(shards)}")
    now = now or datetime.now(timezone.utc)
    running = counts["running"] > 0
    rate = measure_rate(total.finished, scheduler.since if scheduler else None, now, running)
    if rate is not None:
        text = (f"  rate: {rate.items_per_s * 3600:.1f} items/h, {rate.frames_per_s:.2f} frames/s "
                f"over {_duration(rate.window_s)}")
        eta = rate.eta_s(total.pending)
        if eta is not None and (running or counts["queued"]):
            text += f"; ETA {_duration(eta)} at this rate"
        lines.append(text)
    if scheduler:
        lines.append(f"  {scheduler.summary}")
    lines.append(f"  {'shard':>6} {'items':>6} {'done':>6} {'failed':>6} {'pending':>7}  {'state':<8} job")
    for s in shards:
        job = jobs.get(s.shard_id)
        job_text = f"{job.task_id} {job.state}" if job else ""
        lines.append(f"  {s.shard_id:>6} {s.total:>6} {s.done:>6} {s.failed:>6} {s.pending:>7}  "
                     f"{states[s.shard_id]:<8} {job_text}".rstrip())
    failed_tasks = {jobs[sid].task_id: jobs[sid] for sid, st in states.items() if st == "failed" and sid in jobs}
    if failed_tasks:
        lines.append("  tasks that ended with items pending (`masklet resume OUT` runs them again):")
        for task_id, job in sorted(failed_tasks.items()):
            lines.append(f"    {task_id} {job.state}: log {job.log}")
    stopped = [s for s in shards if s.fault and states[s.shard_id] == "failed"]
    if stopped:
        lines.append("  shards stopped by an environment fault (their items are pending, not failed; "
                     "`masklet resume OUT` runs them once it is fixed):")
        lines.extend(f"    {s.fault}" for s in stopped)
    if total.errors:
        lines.append("  failed items:")
        for item_id, err in sorted(total.errors.items()):
            lines.append(f"    {item_id}: {err}")
    return "\n".join(lines)
