"""The local executor: shards run in this process, or in one worker process per visible GPU.

Worker processes take shard ids from a shared queue (plain ints), call `run_shard(run_dir, shard_id)`,
and see exactly one GPU each through CUDA_VISIBLE_DEVICES, set before torch is imported in the child.
A shard stopped by an environment fault (pipeline/faults.py) stops what runs it: in this process the launch
raises at once; a worker process takes no further shard (its GPU may be gone) and the launch raises
EnvironmentFault once the others have finished. A shard another worker owns (its lease,
pipeline/store/lease.py) is refused and reported, not failed: the other shards go on, and `launch` returns the
refusals.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from typing import Sequence

from pipeline.faults import EnvironmentFault, ShardFault
from pipeline.store.lease import LeaseHeld, OwnerEnded
from pipeline.worker import run_shard

log = logging.getLogger("masklet.local")


def visible_gpus() -> list[str]:
    """GPU ids/UUIDs this process may use (MIG UUIDs too), without initialising CUDA in the parent."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch/CUDA means no GPUs
        return []


def _gpu_worker(run_dir: str, gpu: str, redo_failed: bool, owner_ended: OwnerEnded | None, shard_queue, errors,
                refused) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    while True:
        try:
            shard_id = shard_queue.get_nowait()
        except queue.Empty:
            return
        try:
            run_shard(run_dir, shard_id, redo_failed=redo_failed, owner_ended=owner_ended)
        except LeaseHeld as e:
            refused.put(str(e))
        except EnvironmentFault as e:
            errors.put(e.fault)  # this GPU or the output is failing: take no further shard here
            return
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the run with it
            errors.put(f"shard {shard_id} on GPU {gpu}: {type(e).__name__}: {e}")


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def launch(self, run_dir: str, shard_ids: Sequence[int], redo_failed: bool = False,
               owner_ended: OwnerEnded | None = None) -> list[str]:
        """Run the shards; returns one line per shard refused because another worker owns it. `owner_ended`:
        how to tell that another host's owner has ended (from the scheduler that ran it, if any)."""
        gpus = visible_gpus()
        n = self.workers if self.workers is not None else len(gpus)
        refusals: list[str] = []
        if n <= 1 or not shard_ids:
            for shard_id in shard_ids:
                try:
                    run_shard(run_dir, shard_id, redo_failed=redo_failed, owner_ended=owner_ended)
                except LeaseHeld as e:
                    refusals.append(str(e))
            return refusals
        ctx = mp.get_context("spawn")  # fresh interpreters: CUDA state never crosses a fork
        shard_queue, errors, refused = ctx.Queue(), ctx.Queue(), ctx.Queue()
        for s in shard_ids:
            shard_queue.put(s)
        slots = gpus if gpus else ["" for _ in range(n)]
        procs = [ctx.Process(target=_gpu_worker, args=(run_dir, slots[i % len(slots)], redo_failed, owner_ended,
                                                        shard_queue, errors, refused))
                 for i in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failures, stopped = [], []
        while not errors.empty():
            error = errors.get()
            (stopped if isinstance(error, ShardFault) else failures).append(error)
        dead = [p.exitcode for p in procs if p.exitcode]
        if failures or dead:
            failures += [f.line for f in stopped]
            raise RuntimeError(f"local workers failed: {failures or dead}; rerun `masklet run` to resume")
        if stopped:  # every fault is recorded under OUT/faults/ (`masklet status` lists them); report the first
            raise EnvironmentFault(stopped[0])
        while not refused.empty():
            refusals.append(refused.get())
        return refusals
