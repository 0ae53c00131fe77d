"""One owner per shard: a lease file, taken before any work, renewed while the worker works.

Nothing else stops two workers from running one shard: `masklet resume` while the scheduler cannot say
whether a task runs, two `masklet run` on one OUT, a requeued task whose old incarnation still runs on a hung
node. Two owners would publish masks over each other and commit the same item twice.

The rule:
- A worker creates OUT/leases/shard-NNNNN.lease before it reads what is committed. The file is written under
  a temporary name, then `os.link`ed to the lease name: link fails if the name exists, atomically, on local
  file systems and on NFS (where a lost reply is caught by the temporary file's link count, as open(2)
  advises). It names the owner: host, boot id, pid and the process's start time, the scheduler's task
  (SLURM job, array job, array task, restart count) when there is one, when it was taken, and a random token.
- While the worker runs, a thread touches the file every `HEARTBEAT_S` seconds (its mtime is the heartbeat).
- Another worker that finds the lease refuses the shard (`LeaseHeld`, one line naming the owner), unless the
  owner is gone:
  - same host (host name and boot id equal): the pid is dead, a zombie, or now another process (another
    start time); or the host has rebooted since (another boot id). This is certain, so the lease is broken
    at once: a killed worker's shard can be rerun immediately.
  - another host: only the scheduler can say. The lease is broken when the scheduler says the owner's task
    has ended (or the owner is an earlier incarnation of the caller's own requeued task) AND the heartbeat
    is older than `STALE_AFTER_S` by the observer's clock. Until the heartbeat is stale the caller waits (a
    requeued task on a new node waits for its old incarnation's heartbeat to stop); an owner that keeps
    renewing it is alive after all, and is refused. Without a scheduler (a local run on another host) a
    lease is never broken automatically: the message says which file to remove once that worker is gone.
  Breaking renames the file aside with a log line, then takes the lease afresh with `os.link`.
- Commits and compactions check the lease is still theirs (`ShardLease.check`) just before they publish.

Clock skew: only the other-host case reads a clock, comparing the file's mtime (set by the file server for
a touch) with the observer's clock. An observer whose clock runs ahead of the server's by D sees heartbeats
D seconds older: with D > STALE_AFTER_S - HEARTBEAT_S a live owner's lease looks stale, but it is still not
broken unless the scheduler says that task ended, so skew alone never makes two owners; it only shifts by D
when a dead owner's lease is broken (earlier or later).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.paths import RunPaths
from pipeline.store.atomic import fsync_dir

log = logging.getLogger("masklet.lease")

HEARTBEAT_S = 15.0  # how often an owner touches its lease
STALE_AFTER_S = 180.0  # a heartbeat older than this (observer's clock), with the owner's task ended: broken


class LeaseHeld(RuntimeError):
    """The shard is owned by another live (or not provably dead) worker; the message names it."""

    def __init__(self, message: str, owner: "LeaseOwner | None" = None):
        super().__init__(message)
        self.owner = owner


class LeaseLost(RuntimeError):
    """This worker's lease was broken or replaced: it must not commit anything more to the shard."""


@dataclass(frozen=True)
class SchedulerTask:
    """The scheduler's ids of the task a worker runs in, given by the executor that knows the scheduler."""

    scheduler: str  # "slurm"
    task_id: str  # the id its commands take: `<array job>_<array task>`, or the job id
    job_id: str
    array_job_id: str | None = None
    array_task_id: str | None = None
    restart_count: int = 0  # incarnation of a requeued task


@dataclass(frozen=True)
class LeaseOwner:
    shard_id: int
    token: str
    host: str
    boot_id: str | None
    pid: int
    pid_start: int | None  # the process's start, in clock ticks after boot (/proc/<pid>/stat)
    taken_at: str  # ISO 8601, UTC
    task: SchedulerTask | None = None

    def describe(self) -> str:
        task = (f", {self.task.scheduler.upper()} task {self.task.task_id} (job {self.task.job_id}, restart "
                f"{self.task.restart_count})") if self.task else ""
        return f"pid {self.pid} on {self.host}{task}, since {self.taken_at}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LeaseOwner":
        d = json.loads(text)
        task = SchedulerTask(**d["task"]) if d.get("task") else None
        return cls(**{**d, "task": task})


# --- this process ---------------------------------------------------------------------------------------------

def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of a live pid, from /proc; None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces
    return fields[0], int(fields[19])


def this_owner(shard_id: int, task: SchedulerTask | None = None) -> LeaseOwner:
    stat = _proc_stat(os.getpid())
    return LeaseOwner(shard_id=shard_id, token=uuid.uuid4().hex, host=socket.gethostname(), boot_id=_boot_id(),
                      pid=os.getpid(), pid_start=stat[1] if stat else None,
                      taken_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), task=task)


def local_owner_gone(owner: LeaseOwner) -> str | None:
    """Why an owner on this host is certainly gone, or None while it may be alive."""
    if owner.boot_id and _boot_id() and owner.boot_id != _boot_id():
        return "its host has rebooted since"
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return f"pid {owner.pid} is dead"
    except PermissionError:
        pass  # alive, another user's
    stat = _proc_stat(owner.pid)
    if stat is None:
        # No /proc (not Linux): the pid answered, so assume it lives. With /proc: it died since.
        return f"pid {owner.pid} is dead" if Path("/proc/self").exists() else None
    state, start = stat
    if state in ("Z", "X"):
        return f"pid {owner.pid} is dead (a zombie)"
    if owner.pid_start is not None and start != owner.pid_start:
        return f"pid {owner.pid} is now another process (started at tick {start}, not {owner.pid_start})"
    return None


# --- reading a lease ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LeaseView:
    owner: LeaseOwner
    age_s: float  # seconds since its last heartbeat, by this machine's clock

    def fresh(self, stale_after: float | None = None) -> bool:
        return self.age_s <= (STALE_AFTER_S if stale_after is None else stale_after)


def read_lease(paths: RunPaths, shard_id: int) -> LeaseView | None:
    """The shard's lease as it is now, or None when nobody holds it."""
    path = paths.shard_lease(shard_id)
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return LeaseView(LeaseOwner.from_json(text), time.time() - mtime)


OwnerEnded = Callable[[LeaseOwner], bool]


def _verdict(view: LeaseView, me: LeaseOwner, owner_ended: OwnerEnded | None,
             stale_after: float) -> tuple[str, str]:
    """('break' | 'wait' | 'held', why)."""
    owner = view.owner
    if owner.host == me.host:
        gone = local_owner_gone(owner)
        return ("break", gone) if gone else ("held", "it is alive on this host")
    ended = bool(owner.task and owner_ended and owner_ended(owner))
    if not ended:
        why = ("the scheduler says its task has not ended" if owner.task and owner_ended else
               "it runs on another host and no scheduler can say whether it has ended")
        return "held", why
    if view.age_s > stale_after:
        return "break", f"its task has ended and its heartbeat is {view.age_s:.0f}s old"
    return "wait", f"its task has ended but its heartbeat is only {view.age_s:.0f}s old"


# --- holding a lease ------------------------------------------------------------------------------------------

class ShardLease:
    """This worker's hold on one shard. Use as a context manager, or call `release()`."""

    def __init__(self, paths: RunPaths, owner: LeaseOwner, heartbeat_s: float):
        self.paths = paths
        self.owner = owner
        self.path = paths.shard_lease(owner.shard_id)
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"lease-shard-{owner.shard_id}")
        self._thread.start()

    @property
    def shard_id(self) -> int:
        return self.owner.shard_id

    def _still_mine(self) -> str | None:
        try:
            current = LeaseOwner.from_json(self.path.read_text())
        except FileNotFoundError:
            return f"{self.path} was removed"
        except ValueError as e:
            return f"{self.path} cannot be read ({e})"
        if current.token != self.owner.token:
            return f"{self.path} now names {current.describe()}"
        return None

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                lost = self._still_mine()
                if lost is None:
                    os.utime(self.path)
            except FileNotFoundError:
                lost = f"{self.path} was removed"
            except OSError as e:  # a file server's hiccup: the next beat tries again; a commit checks anyway
                log.warning("shard %d: could not renew the lease %s: %s", self.shard_id, self.path, e)
                continue
            if lost:
                self._lost = lost
                log.error("shard %d: lease lost: %s; this worker commits nothing more to it", self.shard_id, lost)
                return

    def check(self, shard_id: int | None = None) -> None:
        """Raise LeaseLost unless this lease (of `shard_id`, when given) is still held by this worker."""
        if shard_id is not None and shard_id != self.shard_id:
            raise LeaseLost(f"the lease held is for shard {self.shard_id}, not shard {shard_id}")
        lost = self._lost or self._still_mine()
        if lost:
            self._lost = lost
            raise LeaseLost(f"shard {self.shard_id}: this worker no longer owns it ({lost}); nothing more is "
                            f"committed by it. Another worker took it over: see `masklet status`")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._still_mine() is None:
            self.path.unlink(missing_ok=True)
            fsync_dir(self.path.parent)

    def __enter__(self) -> "ShardLease":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _link_new(path: Path, owner: LeaseOwner) -> bool:
    """Create `path` holding `owner`, atomically; False if it exists."""
    tmp = path.with_name(f".{path.name}.{owner.token}.tmp")
    with open(tmp, "w") as f:
        f.write(owner.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            # On NFS a retried LINK whose first reply was lost says EEXIST although it worked: the count tells.
            if tmp.stat().st_nlink != 2:
                return False
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _break(path: Path, view: LeaseView, why: str) -> None:
    """Move a dead owner's lease aside (one rename; a rival breaker's rename fails on the missing name)."""
    aside = path.with_name(f".{path.name}.broken.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else broke or released it first
    try:
        moved = LeaseOwner.from_json(aside.read_text())
        if moved.token != view.owner.token:
            # A rival broke the dead lease and took it between our read and our rename: give it back.
            try:
                os.link(aside, path)
            except FileExistsError:
                pass  # a third worker holds it now; the rival finds its lease lost at its next check
            return
        log.warning("shard %d: breaking the lease of %s: %s", view.owner.shard_id, view.owner.describe(), why)
    finally:
        aside.unlink(missing_ok=True)


def acquire(paths: RunPaths, shard_id: int, task: SchedulerTask | None = None,
            owner_ended: OwnerEnded | None = None, stale_after: float | None = None,
            heartbeat_s: float | None = None) -> ShardLease:
    """Take the shard's lease (see the module's docstring), or raise LeaseHeld naming its owner."""
    stale_after = STALE_AFTER_S if stale_after is None else stale_after
    heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
    paths.leases.mkdir(parents=True, exist_ok=True)
    path = paths.shard_lease(shard_id)
    me = this_owner(shard_id, task)
    waited_since = None
    while True:
        if _link_new(path, me):
            return ShardLease(paths, me, heartbeat_s)
        view = read_lease(paths, shard_id)
        if view is None:
            continue  # released between our link and our read
        verdict, why = _verdict(view, me, owner_ended, stale_after)
        if verdict == "break":
            _break(path, view, why)
            continue
        if verdict == "wait":
            waited_since = waited_since or time.monotonic()
            if time.monotonic() - waited_since <= stale_after + 2 * heartbeat_s:
                log.info("shard %d: waiting for the lease of %s: %s", shard_id, view.owner.describe(), why)
                time.sleep(min(heartbeat_s, max(0.1, stale_after - view.age_s + 0.5)))
                continue
            why = f"its heartbeat is still renewed {time.monotonic() - waited_since:.0f}s after its task ended"
        raise LeaseHeld(
            f"shard {shard_id} is already owned by {view.owner.describe()} (heartbeat {view.age_s:.0f}s ago; {why}): "
            f"not run twice. If that worker is gone for sure, remove {path} and run again", view.owner)
