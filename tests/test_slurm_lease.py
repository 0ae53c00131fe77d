"""One owner per shard on the real SLURM cluster (jobs/slurm/cluster.sh): `masklet resume` while a task runs
starts no second owner, whether SLURM can say the task runs or answers UNKNOWN (accounting down); and a second
task submitted anyway refuses the shard (exit 75) while the first runs on undisturbed. (That a shard's owner
finishes it alone, with every item once, is shown locally: tests/test_lease.py.)

The lease the task writes names its SLURM ids, so its presence also shows the job imported this checkout's
`pipeline` (the job inherits PYTHONPATH from the submitting process: sbatch exports the environment).

Needs the cluster: `sudo jobs/slurm/cluster.sh up`, then MASKLET_SLURM=1.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.conftest import NEEDS_SLURM_CLUSTER

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.executors import slurm
from pipeline.paths import RunPaths
from pipeline.samples import make_video
from pipeline.store.lease import read_lease

pytestmark = NEEDS_SLURM_CLUSTER

WAIT = 300  # a job spends ~15 s (more on a loaded host) importing torch and sam2


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)
    return value


@pytest.mark.timeout(900)
def test_resume_while_a_task_runs_starts_no_second_owner(tmp_path, demo_config, fast_overrides, monkeypatch, capsys):
    media = tmp_path / "media"
    make_video(media / "long.mp4", frames=150, width=96, height=72, seed=41)
    manifest = tmp_path / "m.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    out = tmp_path / "run"
    paths = RunPaths.of(out)
    overrides = [*fast_overrides, "prompt.max_objects=1"]
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config, *overrides,
                 "--profile", "local-test"]) == 0
    try:
        (first,) = slurm.read_records(paths)
        (task,) = first.tasks
        view = wait_for(lambda: read_lease(paths, 0), f"task {task} to take the lease of shard 0")
        assert view.owner.task is not None and view.owner.task.task_id == task

        # 1. SLURM says the task runs: resume leaves the shard alone (as before).
        capsys.readouterr()
        assert main(["resume", str(out)]) == 0
        assert f"still queued or running as SLURM task(s) ['{task}']" in capsys.readouterr().out
        # 2. SLURM cannot say (squeue and sacct answer nothing): the fresh lease says it runs.
        with monkeypatch.context() as m:
            m.setattr(slurm, "scheduler_states", lambda job_ids: {})
            assert main(["resume", str(out)]) == 0
        text = capsys.readouterr().out
        assert f"SLURM cannot say whether task {task} runs (UNKNOWN), but its lease is held by" in text
        assert f"SLURM task {task}" in text and "not started again" in text
        assert len(slurm.read_records(paths)) == 1, "nothing was submitted"

        # 3. A second task submitted anyway (say, by a launch that raced the first) refuses the shard.
        cfg = load_config(demo_config, overrides, profile="local-test")
        second = slurm.SlurmExecutor(cfg.slurm).submit(str(out), [0])
        (task2,) = second.tasks
        wait_for(lambda: slurm.scheduler_states([task2]).get(task2, "UNKNOWN") not in slurm.ACTIVE_STATES,
                 f"the second task {task2} to end")
        output = slurm.task_output(paths, task2)
        assert f"masklet: refused: shard 0 is already owned by pid {view.owner.pid}" in output
        assert f"SLURM task {task}" in output and "exiting with 75" in output
        assert slurm.scheduler_states([task2])[task2] == "FAILED"
        assert read_lease(paths, 0).owner.token == view.owner.token, "the first task still owns the shard"
        assert slurm.scheduler_states([task])[task] == "RUNNING", "the first task ran on undisturbed"
        assert slurm.shard_jobs(paths)[0].task_id == task, "status and resume see the task that runs the shard"
        assert "committed" not in paths.shard_log(0).read_text(), "the refused task did no work"
    finally:
        slurm.cancel(paths)  # the long video has served its purpose; nothing is left on the shared cluster
