"""The SLURM executor: the only module that imports submitit or knows SLURM's commands, flags and job states.

- `sbatch_parameters(cfg)` turns `slurm.*` settings into submitit's SLURM parameters (a pure function);
  `sbatch_script(...)` is the script submitit writes for them, made by submitit's own `_make_sbatch_string`.
- `SlurmExecutor.submit(run_dir, shard_ids)` submits the shards of a frozen plan as one submitit job array:
  one array task per group of `slurm.shards_per_task` shards. Each task is a `ShardTask`, which holds plain
  arguments only (the run folder and shard ids) and calls `run_shard` per shard. Every submission is appended
  to OUT/slurm/jobs.jsonl so that status, cancel and resume find the run's jobs; submitit's own files (job
  pickles, stdout/stderr of every task) live under OUT/slurm/<job>_<task>/.
- Preemption and time limits: SLURM sends USR2 `slurm.signal_delay_s` before the limit (`--signal`); submitit
  then calls `ShardTask.checkpoint()` (a resubmission with the same plain arguments: progress is on disk) and
  requeues the task, at most `slurm.max_requeues` times. A plain requeue or a node crash (`--requeue`)
  restarts the task from its arguments; `run_shard` skips what is committed.
- One owner per shard (pipeline/store/lease.py): each task names itself in the shard's lease
  (`current_task`) and tells a dead owner from a live one by asking SLURM (`lease_owner_ended`). A shard
  whose lease another live task holds is refused: the task runs its other shards, then exits with
  EX_TEMPFAIL (75). `busy_shards` counts a shard as running when SLURM answers UNKNOWN for its task
  but its lease is held and fresh.
- `scheduler_states`, `shard_jobs`, `cancel`, `wait` read the scheduler back: squeue for jobs the
  controller still holds, sacct (accounting) for older ones. The parsers are pure functions of their text.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence

import submitit
from submitit.core.utils import DelayedSubmission, FailedJobError, JobPaths
from submitit.helpers import Checkpointable
from submitit.slurm.slurm import _make_sbatch_string

from pipeline.config import ConfigError, SlurmConfig
from pipeline.paths import RunPaths
from pipeline.status import UNKNOWN, SchedulerView, ShardJob
from pipeline.store.lease import LeaseHeld, LeaseOwner, LeaseView, SchedulerTask, read_lease

EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, try again later (a shard owned by another live task)


class SlurmError(RuntimeError):
    """SLURM refused or could not be reached; the message says what it said and what to do."""


# --- the job -------------------------------------------------------------------------------------------------

class ShardTask(Checkpointable):
    """One array task: run these shards of this run folder, in order. Plain arguments only: submitit pickles
    this object (by reference to this module) into the job, and `checkpoint()` resubmits the same arguments."""

    def __init__(self, run_dir: str, shard_ids: tuple[int, ...], redo_failed: bool = False):
        self.run_dir = str(run_dir)
        self.shard_ids = tuple(int(s) for s in shard_ids)
        self.redo_failed = bool(redo_failed)

    def __call__(self) -> list[dict]:
        from pipeline.worker import run_shard  # the job imports torch and sam2; the submitter does not

        summaries, refused = [], []
        for shard_id in self.shard_ids:
            try:
                summary = run_shard(self.run_dir, shard_id, redo_failed=self.redo_failed, task=current_task(),
                                    owner_ended=lease_owner_ended)
            except LeaseHeld as e:
                print(f"masklet: refused: {e}", flush=True)
                refused.append(shard_id)
                continue
            summaries.append({"shard_id": shard_id, **dataclasses.asdict(summary)})
        if refused:
            # Not an error of this task, and nothing for submitit to retry: the shards have a live owner.
            print(f"masklet: shards {refused} are owned by other live workers; exiting with {EX_TEMPFAIL}", flush=True)
            raise SystemExit(EX_TEMPFAIL)
        return summaries

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        # Called by submitit on USR2 (preemption or the time limit near). Everything committed is on disk, so
        # the resubmission is the same task; an item in flight goes on from its last checkpoint
        # (pipeline/store/partial.py), or from its start when it had none.
        return DelayedSubmission(ShardTask(self.run_dir, self.shard_ids, self.redo_failed))

    def __repr__(self) -> str:
        return f"ShardTask({self.run_dir!r}, shards={list(self.shard_ids)}, redo_failed={self.redo_failed})"


class CallTask(Checkpointable):
    """One array task that calls `module.function(*args)`: plain arguments only, the function found by name in
    the job (so nothing but names and strings is pickled), the same call resubmitted on USR2. For work other
    than shards (exports) whose function is idempotent: it skips what it has done."""

    def __init__(self, module: str, function: str, args: tuple):
        self.module, self.function, self.args = str(module), str(function), tuple(args)

    def __call__(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.function)(*self.args)

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        return DelayedSubmission(CallTask(self.module, self.function, self.args))

    def __repr__(self) -> str:
        return f"CallTask({self.module}.{self.function}, {len(self.args)} args)"


# --- scheduler settings (pure) --------------------------------------------------------------------------------

def check_slurm_config(cfg: SlurmConfig) -> SlurmConfig:
    """Reject settings SLURM would refuse or that cannot work, naming the key."""
    positive = ("time_min", "cpus_per_task", "array_parallelism", "shards_per_task")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"slurm.{key}={getattr(cfg, key)} must be >= 1")
    if cfg.mem_gb <= 0:
        raise ConfigError(f"slurm.mem_gb={cfg.mem_gb} must be > 0")
    if cfg.max_requeues < 0:
        raise ConfigError(f"slurm.max_requeues={cfg.max_requeues} must be >= 0")
    if not 0 <= cfg.signal_delay_s < cfg.time_min * 60:
        raise ConfigError(f"slurm.signal_delay_s={cfg.signal_delay_s} must be >= 0 and shorter than the time limit "
                          f"(slurm.time_min={cfg.time_min} minutes)")
    if cfg.gres is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*", cfg.gres):
        raise ConfigError(f"slurm.gres={cfg.gres!r} is not a gres request (e.g. gpu:1, gpu:a100:1, gpu:1g.10gb:1)")
    if cfg.gpu_memory_gb is not None and cfg.gpu_memory_gb <= 0:
        raise ConfigError(f"slurm.gpu_memory_gb={cfg.gpu_memory_gb} must be > 0 or null")
    return cfg


def _mem_flag(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def sbatch_parameters(cfg: SlurmConfig) -> dict:
    """submitit SlurmExecutor parameters for these settings. `--requeue` lets SLURM restart a task after a node
    failure or `scontrol requeue`; `signal_delay_s` becomes `--signal=USR2@N`."""
    check_slurm_config(cfg)
    params: dict = {
        "job_name": cfg.job_name,
        "time": cfg.time_min,
        "cpus_per_task": cfg.cpus_per_task,
        "mem": _mem_flag(cfg.mem_gb),
        "signal_delay_s": cfg.signal_delay_s,
        "array_parallelism": cfg.array_parallelism,
        "additional_parameters": {"requeue": True},
    }
    for key in ("partition", "account", "qos", "constraint", "gres"):
        if getattr(cfg, key):
            params[key] = getattr(cfg, key)
    if cfg.setup:
        params["setup"] = list(cfg.setup)
    return params


def submit_command(folder: str | Path, python: str) -> str:
    """The command submitit puts in the script (what runs the pickled ShardTask)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: SlurmConfig, folder: str | Path, num_tasks: int, python: str = sys.executable) -> str:
    """The sbatch script submitit writes for `num_tasks` array tasks (a single task is a plain job)."""
    return _make_sbatch_string(command=submit_command(folder, python), folder=folder,
                               map_count=num_tasks if num_tasks > 1 else None, **sbatch_parameters(cfg))


def group_shards(shard_ids: Sequence[int], shards_per_task: int) -> list[tuple[int, ...]]:
    """Consecutive groups of `shards_per_task` shards, in the order given: one group per array task."""
    ids = [int(s) for s in shard_ids]
    return [tuple(ids[i:i + shards_per_task]) for i in range(0, len(ids), shards_per_task)]


# --- the record of submissions -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Submission:
    """One sbatch submission of a run: its job id and, per task id (`<job>_<i>`, or `<job>` for a single
    task), the shards it runs."""

    job_id: str
    submitted_at: str  # ISO 8601, UTC
    tasks: dict[str, tuple[int, ...]]
    redo_failed: bool = False
    command: str = "run"

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["tasks"] = {k: list(v) for k, v in self.tasks.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Submission":
        return cls(job_id=str(d["job_id"]), submitted_at=d["submitted_at"],
                   tasks={k: tuple(v) for k, v in d["tasks"].items()}, redo_failed=bool(d.get("redo_failed")),
                   command=d.get("command", "run"))


def append_record(path: Path, lock_path: Path, line: str) -> None:
    """Append one line atomically: under a lock, write the whole file anew and rename it into place, so a
    reader (or a crash) sees the old file or the new one, never half a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text() if path.exists() else ""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(old + line.rstrip("\n") + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_records(paths: RunPaths) -> list[Submission]:
    if not paths.slurm_jobs.exists():
        return []
    return [Submission.from_dict(json.loads(line)) for line in paths.slurm_jobs.read_text().splitlines()
            if line.strip()]


# --- parsing what the scheduler says (pure) ------------------------------------------------------------------

# States in which a task is queued or running (or about to be again): its shards are being taken care of.
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING", "RESIZING",
    "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED", "SPECIAL_EXIT",
})


def expand_task_ids(job_id: str) -> list[str]:
    """`123_[0-2,5%2]` -> ['123_0', '123_1', '123_2', '123_5']; `123_4` and `123` stay as they are."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out.extend(f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1))
    return out


def parse_job_states(text: str) -> dict[str, str]:
    """`JOBID|STATE` lines, as `squeue -h -r -o %i|%T` and `sacct -n -X -P -o JobID,State` print them ->
    {task id: state}. Job steps (`123_4.batch`) are skipped; `CANCELLED by 0` is CANCELLED."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        job, state = (field.strip() for field in line.split("|")[:2])
        if not job or "." in job or "+" in job or not state:
            continue
        word = state.split()[0].rstrip("+")
        for task in expand_task_ids(job):
            out[task] = word
    return out


# --- talking to the scheduler ----------------------------------------------------------------------------------

def _query(cmd: list[str]) -> str:
    """stdout of a read-only SLURM command; '' when it fails (an id the controller forgot, accounting down):
    the other source, or UNKNOWN, stands in."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""


def scheduler_reachable() -> bool:
    return shutil.which("squeue") is not None and shutil.which("sacct") is not None


def scheduler_states(job_ids: Iterable[str]) -> dict[str, str]:
    """{task id: state} of these jobs: sacct (kept for good) overridden by squeue (the controller's current
    view; sacct lags it by a moment)."""
    ids = sorted({str(j).split("_")[0] for j in job_ids})
    if not ids:
        return {}
    states = parse_job_states(_query(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)]))
    states.update(parse_job_states(_query(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(ids)])))
    return states


def task_log(paths: RunPaths, task_id: str) -> Path:
    """submitit's stderr of a task (tracebacks of a task that failed outside any item are here)."""
    return JobPaths(paths.submitit_folder, job_id=task_id, task_id=0).stderr


def task_output(paths: RunPaths, task_id: str) -> str:
    """Everything a task printed, over all its starts (submitit appends): its stdout, then its stderr."""
    job_paths = JobPaths(paths.submitit_folder, job_id=task_id, task_id=0)
    return "".join(p.read_text(errors="replace") for p in (job_paths.stdout, job_paths.stderr) if p.exists())


def shard_jobs(paths: RunPaths, states: dict[str, str] | None = None) -> dict[int, ShardJob]:
    """For every shard ever submitted, the task of its latest submission and that task's state; an earlier task
    that is still queued or running wins over a later one that is not."""
    records = read_records(paths)
    if states is None:
        states = scheduler_states(r.job_id for r in records)
    out: dict[int, ShardJob] = {}
    for rec in records:  # in submission order: a later submission of a shard replaces the earlier one...
        for task_id, shard_ids in rec.tasks.items():
            state = states.get(task_id, UNKNOWN)
            job = ShardJob(task_id, state, state in ACTIVE_STATES, str(task_log(paths, task_id)))
            for s in shard_ids:
                if s in out and out[s].active and not job.active:
                    continue  # ...unless the earlier one still runs it (the later one was refused its lease)
                out[s] = job
    return out


def scheduler_view(paths: RunPaths) -> SchedulerView | None:
    """What `masklet status` shows of the scheduler for this run (None if it never used SLURM)."""
    records = read_records(paths)
    if not records:
        return None
    reachable = scheduler_reachable()
    states = scheduler_states(r.job_id for r in records) if reachable else {}
    latest = records[-1]
    counts = Counter(states.get(task_id, UNKNOWN) for task_id in latest.tasks)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    line = (f"slurm: {len(records)} submission(s); latest job {latest.job_id} ({len(latest.tasks)} task(s)): "
            f"{summary}")
    if not reachable:
        line += " (squeue/sacct not found on this machine: states unknown)"
    since = datetime.fromisoformat(latest.submitted_at)
    return SchedulerView(line, shard_jobs(paths, states), since)


def active_tasks(paths: RunPaths) -> dict[int, ShardJob]:
    """Shards whose latest task is still queued or running."""
    if not paths.slurm_jobs.exists():
        return {}
    return {s: j for s, j in shard_jobs(paths).items() if j.active}


def current_task() -> SchedulerTask | None:
    """The SLURM task this process runs in (None outside SLURM), as a lease names its owner."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    task_id = f"{array_job}_{array_task}" if array_job and array_task else job
    return SchedulerTask("slurm", task_id, job, array_job, array_task,
                         int(os.environ.get("SLURM_RESTART_COUNT") or 0))


def lease_owner_ended(owner: LeaseOwner) -> bool:
    """Whether SLURM says the task named in a lease is over: an earlier incarnation of this very task (SLURM
    requeued it and started us instead), or a task SLURM knows and no longer runs. UNKNOWN is not over."""
    task = owner.task
    if task is None or task.scheduler != "slurm":
        return False
    me = current_task()
    if me is not None and me.task_id == task.task_id:
        return me.restart_count > task.restart_count
    state = scheduler_states([task.task_id]).get(task.task_id, UNKNOWN)
    return state != UNKNOWN and state not in ACTIVE_STATES


def busy_shards(paths: RunPaths, shard_ids: Iterable[int]) -> dict[int, tuple[ShardJob, LeaseView | None]]:
    """Of these shards, those a launch must not start again: their latest task is queued or running, or SLURM
    answers UNKNOWN for it (accounting down, controller restarted) while a fresh lease says a worker runs it.
    With the lease view that decided it (None when the scheduler did)."""
    jobs = shard_jobs(paths) if paths.slurm_jobs.exists() else {}
    busy: dict[int, tuple[ShardJob, LeaseView | None]] = {}
    for shard_id in shard_ids:
        job = jobs.get(shard_id)
        if job is None:
            continue
        if job.active:
            busy[shard_id] = (job, None)
        elif job.state == UNKNOWN and (view := read_lease(paths, shard_id)) is not None and view.fresh():
            busy[shard_id] = (job, view)
    return busy


def cancel(paths: RunPaths) -> list[str]:
    """scancel every job of this run that still has a queued or running task; returns the job ids cancelled.
    Committed items stay; an item in flight goes on from its last checkpoint at the next resume."""
    jobs = sorted({j.task_id.split("_")[0] for j in active_tasks(paths).values()}, key=int)
    if jobs:
        _scancel(jobs)
    return jobs


def _scancel(job_ids: list[str]) -> None:
    result = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise SlurmError(f"scancel {' '.join(job_ids)} failed: {result.stderr.strip() or result.stdout.strip()}")


def wait(paths: RunPaths | None, job_ids: Iterable[str], poll_s: float = 2.0, timeout_s: float | None = None,
         on_poll: Callable[[], None] | None = None, lost_hint: str | None = None) -> dict[str, str]:
    """Block until no task of these jobs is queued or running; returns their final states. `lost_hint` says what
    to do if SLURM forgets the jobs (default: the run's status and resume commands)."""
    ids = {str(j) for j in job_ids}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    unseen_since = time.monotonic()
    while True:
        states = {t: s for t, s in scheduler_states(ids).items() if t.split("_")[0] in ids}
        if on_poll:
            on_poll()
        if states:
            unseen_since = time.monotonic()
            if not any(s in ACTIVE_STATES for s in states.values()):
                return states
        elif time.monotonic() - unseen_since > 60:  # neither squeue nor sacct knows them (cluster restarted?)
            hint = lost_hint or f"see `masklet status {paths.root}` and resume with `masklet resume {paths.root}`"
            raise SlurmError(f"SLURM no longer knows jobs {sorted(ids)} (neither squeue nor sacct lists them); {hint}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"jobs {sorted(ids)} still active after {timeout_s}s: {states}")
        time.sleep(poll_s)


# --- submitting ------------------------------------------------------------------------------------------------

def submit_array(folder: str | Path, cfg: SlurmConfig, tasks: Sequence[Callable], python: str = sys.executable
                 ) -> list[str]:
    """Submit `tasks` (callables with plain arguments, pickled by reference to their module; Checkpointable ones
    are requeued on USR2) as one job array under these settings; returns the task ids, in order. submitit's files
    go under `folder` (a pattern holding %j). Shared by runs (ShardTask) and exports (pipeline/export/runner.py)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SlurmError("sbatch/srun are not on PATH: this machine is not a SLURM login node. Submit from "
                         "one, or run here with --executor local")
    check_slurm_config(cfg)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeues, python=shlex.quote(python))
    executor.update_parameters(**sbatch_parameters(cfg))
    try:
        jobs = executor.submit_array(list(tasks))
    except FailedJobError as e:
        raise SlurmError(f"sbatch refused the job: {str(e).strip()[-500:]}\nCheck the profile's slurm.partition, "
                         f"slurm.gres, slurm.account and slurm.qos against `sinfo` and `sacctmgr show assoc`")
    return [job.job_id for job in jobs]


class SlurmExecutor:
    name = "slurm"

    def __init__(self, cfg: SlurmConfig, python: str = sys.executable):
        self.cfg = check_slurm_config(cfg)
        self.python = python  # the job runs this very interpreter (and so this venv)

    def launch(self, run_dir: str, shard_ids: Sequence[int]) -> Submission:
        """Submit and return at once (the executor protocol's launch; SLURM runs the shards)."""
        return self.submit(run_dir, shard_ids)

    def submit(self, run_dir: str, shard_ids: Sequence[int], redo_failed: bool = False,
               command: str = "run") -> Submission:
        if not shard_ids:
            raise ValueError("no shards to submit")
        paths = RunPaths.of(run_dir)
        paths.slurm.mkdir(parents=True, exist_ok=True)
        groups = group_shards(shard_ids, self.cfg.shards_per_task)
        tasks = [ShardTask(str(paths.root), group, redo_failed) for group in groups]
        task_ids = submit_array(paths.submitit_folder, self.cfg, tasks, self.python)
        record = Submission(
            job_id=task_ids[0].split("_")[0],
            submitted_at=datetime.now(timezone.utc).isoformat(),
            tasks={task_id: group for task_id, group in zip(task_ids, groups)},
            redo_failed=redo_failed, command=command,
        )
        append_record(paths.slurm_jobs, paths.slurm_jobs_lock, record.to_json())
        return record
