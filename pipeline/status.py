"""Progress of a run: items done / failed / pending per shard from what is on disk, the errors of failed
items, the rate and an ETA, and, when an executor reports them, the state of the jobs that run each shard.

Scheduler-agnostic: an executor that runs shards elsewhere (SLURM) hands in a `SchedulerView` built from its
own records; this module only combines it with the disk and formats it.

Built for 10,000 shards: each shard is read from its folders' summary.json (pipeline/store/summary.py), not
its Parquet; totals are merged in one pass; the text is a summary that fits a screen, with every shard's
line (`--shards`) and every failed item (`--failed`) on request; `StatusCache` re-reads only the shards whose
folder changed, for the progress bar that refreshes every second.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.faults import read_shard_fault
from pipeline.numerics import status_lines as numerics_status_lines
from pipeline.plan import RunPlan, load_run
from pipeline.store.summary import folder_mtime_ns, shard_summary

SHOWN_FAILED = 10  # failed items and tasks listed without --failed
SHOWN_SHARDS = 10  # a run with more shards lists them only with --shards


@dataclass
class ShardStatus:
    shard_id: int
    total: int
    done: int = 0
    failed: int = 0
    frames_done: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    finished_s: list[float] = field(default_factory=list)  # commit time of each item, s since the epoch
    finished_frames: list[int] = field(default_factory=list)  # its frames (0 if it failed)
    fault: str | None = None  # why the shard last stopped on an environment fault (OUT/faults/), until it finishes

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    @property
    def finished(self) -> list[tuple[datetime, int]]:
        """(commit time, frames) per item."""
        return [(datetime.fromtimestamp(t, timezone.utc), n) for t, n in zip(self.finished_s, self.finished_frames)]

    def __add__(self, other: "ShardStatus") -> "ShardStatus":
        return merge_status([self, other])


def merge_status(shards: list[ShardStatus]) -> ShardStatus:
    """The run's totals in one pass (adding 10,000 statuses pairwise copies the growing lists each time)."""
    total = ShardStatus(-1, 0)
    for s in shards:
        total.total += s.total
        total.done += s.done
        total.failed += s.failed
        total.frames_done += s.frames_done
        total.errors.update(s.errors)
        total.finished_s.extend(s.finished_s)
        total.finished_frames.extend(s.finished_frames)
    return total


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
    # Resolved through the store (compacted folders and item folders alike), never by listing folders here.
    sm = shard_summary(plan.paths, shard_id)
    fault = read_shard_fault(plan.paths, shard_id)
    return ShardStatus(shard_id, plan.shard_size(shard_id), sm.done, sm.failed, sm.frames_done, sm.errors,
                       sm.finished_s, sm.finished_frames, fault.line if fault else None)


def run_status(out: str | Path) -> tuple[RunPlan, list[ShardStatus]]:
    plan = load_run(out)
    return plan, [shard_status(plan, s) for s in plan.shard_ids]


class StatusCache:
    """Shard statuses kept between refreshes (the progress bar reads the disk every second): a shard is read
    again only when its folder changed. Every commit and compaction renames into the shard's folder, which
    changes its mtime; a folder changed within the last SETTLE_NS is read again each time, since two changes
    within one tick of the file system's clock leave the same mtime."""

    SETTLE_NS = 2_000_000_000

    def __init__(self, plan: RunPlan):
        self.plan = plan
        self.reads = 0  # shards read from disk so far
        self._seen: dict[int, tuple[int | None, ShardStatus]] = {}

    def refresh(self) -> list[ShardStatus]:
        now = time.time_ns()
        out = []
        for sid in self.plan.shard_ids:
            mtime = folder_mtime_ns(self.plan.paths, sid)
            seen = self._seen.get(sid)
            if seen is None or seen[0] != mtime or (mtime is not None and now - mtime < self.SETTLE_NS):
                st = shard_status(self.plan, sid) if mtime is not None else ShardStatus(sid, self.plan.shard_size(sid))
                self.reads += mtime is not None
                seen = self._seen[sid] = (mtime, st)
            out.append(seen[1])
        return out


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
    times = np.array([t.timestamp() for t, _ in finished], dtype=np.float64)
    frames = np.array([n for _, n in finished], dtype=np.int64)
    return measure_rate_s(times, frames, since, now, running)


def measure_rate_s(times: np.ndarray, frames: np.ndarray, since: datetime | None, now: datetime,
                   running: bool) -> Rate | None:
    """`measure_rate` over arrays of commit times (s since the epoch) and frames: a million items in
    milliseconds."""
    if since is None:
        if len(times) < 2:
            return None
        order = np.lexsort((frames, times))
        start, counted = float(times[order[0]]), order[1:]
    else:
        start = since.timestamp()
        counted = np.flatnonzero(times >= start)
    if not len(counted):
        return None
    end = now.timestamp() if running else float(times[counted].max())
    window = end - start
    if window <= 0:
        return None
    return Rate(len(counted) / window, float(frames[counted].sum()) / window, window)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(plan: RunPlan, shards: list[ShardStatus], scheduler: SchedulerView | None = None,
                  now: datetime | None = None, show_shards: bool = False, show_failed: bool = False) -> str:
    """A summary that fits a screen whatever the run's size; `show_shards` adds a line per shard (always shown
    for runs of at most SHOWN_SHARDS shards), `show_failed` every failed item and task (else the first ones)."""
    total = merge_status(shards)
    jobs = scheduler.shard_jobs if scheduler else {}
    states = {s.shard_id: shard_state(s, jobs.get(s.shard_id)) for s in shards}
    counts = {k: 0 for k in (*SHARD_STATES, "unknown")}
    for v in states.values():
        counts[v] += 1
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
    rate = measure_rate_s(np.asarray(total.finished_s, dtype=np.float64),
                          np.asarray(total.finished_frames, dtype=np.int64),
                          scheduler.since if scheduler else None, now, running)
    if rate is not None:
        text = (f"  rate: {rate.items_per_s * 3600:.1f} items/h, {rate.frames_per_s:.2f} frames/s "
                f"over {_duration(rate.window_s)}")
        eta = rate.eta_s(total.pending)
        if eta is not None and (running or counts["queued"]):
            text += f"; ETA {_duration(eta)} at this rate"
        lines.append(text)
    if scheduler:
        lines.append(f"  {scheduler.summary}")
    root = plan.paths.root
    if show_shards or len(shards) <= SHOWN_SHARDS:
        lines.extend(_shard_lines(shards, states, jobs))
    else:
        lines.append(f"  one line per shard: masklet status {root} --shards")
    failed_tasks = sorted({jobs[sid].task_id: jobs[sid] for sid, st in states.items()
                           if st == "failed" and sid in jobs}.items())
    if failed_tasks:
        lines.append("  tasks that ended with items pending (`masklet resume OUT` runs them again):")
        lines.extend(f"    {task_id} {job.state}: log {job.log}" for task_id, job in _first(failed_tasks, show_failed))
        lines.extend(_more(len(failed_tasks), show_failed, "failed task(s)", root))
    stopped = [s for s in shards if s.fault and states[s.shard_id] == "failed"]
    if stopped:
        lines.append("  shards stopped by an environment fault (their items are pending, not failed; "
                     "`masklet resume OUT` runs them once it is fixed):")
        lines.extend(f"    {s.fault}" for s in _first(stopped, show_failed))
        lines.extend(_more(len(stopped), show_failed, "stopped shard(s)", root))
    if total.errors:
        lines.append("  failed items:")
        errors = sorted(total.errors.items())
        lines.extend(f"    {item_id}: {err}" for item_id, err in _first(errors, show_failed))
        lines.extend(_more(len(errors), show_failed, "failed item(s)", root))
    return "\n".join(lines)


def _shard_lines(shards: list[ShardStatus], states: dict[int, str], jobs: dict[int, ShardJob]) -> list[str]:
    lines = [f"  {'shard':>6} {'items':>6} {'done':>6} {'failed':>6} {'pending':>7}  {'state':<8} job"]
    for s in shards:
        job = jobs.get(s.shard_id)
        job_text = f"{job.task_id} {job.state}" if job else ""
        lines.append(f"  {s.shard_id:>6} {s.total:>6} {s.done:>6} {s.failed:>6} {s.pending:>7}  "
                     f"{states[s.shard_id]:<8} {job_text}".rstrip())
    return lines


def _first(rows: list, show_all: bool) -> list:
    return rows if show_all else rows[:SHOWN_FAILED]


def _more(n: int, show_all: bool, what: str, root: Path) -> list[str]:
    if show_all or n <= SHOWN_FAILED:
        return []
    return [f"    ... and {n - SHOWN_FAILED} more {what}: masklet status {root} --failed"]
