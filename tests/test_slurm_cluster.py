"""Checks that the single-node SLURM cluster from jobs/slurm/cluster.sh does what the SLURM executor relies on:
job arrays, fake MIG/whole-GPU gres types, accounting through sacct, refusal of unsatisfiable requests at submit
time, `scontrol requeue`, and a submitit round trip.

Runs only where the cluster is up: CI runs `jobs/slurm/cluster.sh up` and sets MASKLET_SLURM=1.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import NEEDS_SLURM_CLUSTER

pytestmark = NEEDS_SLURM_CLUSTER

# Seconds; the cluster schedules within about a second, a requeued job restarts after about 7 s.
JOB_TIMEOUT = 30


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=JOB_TIMEOUT, check=check)


def sbatch(*args: str) -> str:
    """Submit a batch job and return its id."""
    return run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def job_state(job_id: str) -> str:
    """The controller's view (immediate, unlike sacct): e.g. RUNNING, PENDING, COMPLETED."""
    out = run("scontrol", "show", "job", "-o", job_id).stdout
    fields = dict(field.split("=", 1) for field in out.split() if "=" in field)
    return fields["JobState"]


def sacct_states(job_id: str) -> dict[str, str]:
    """JobID -> State of a job's allocations (array tasks are JobID_INDEX), from the accounting database."""
    out = run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State").stdout
    return dict(line.split("|", 1) for line in out.splitlines() if line)


@pytest.fixture(scope="module")
def gpu_array_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A 3-task array, each task asking for one 1g.10gb MIG-like slice (only two exist), run to completion."""
    out_dir = tmp_path_factory.mktemp("array")
    job_id = sbatch(
        "--wait",
        "--array=0-2",
        "--partition=gpu",
        "--gres=gpu:1g.10gb:1",
        f"--output={out_dir}/task-%a.out",
        "--wrap",
        'echo "$SLURM_ARRAY_TASK_ID $CUDA_VISIBLE_DEVICES"',
    )
    return job_id, out_dir


def test_array_tasks_each_see_their_index_and_a_gpu(gpu_array_job: tuple[str, Path]) -> None:
    _, out_dir = gpu_array_job
    seen = {}
    for index in range(3):
        task_id, _, gpus = (out_dir / f"task-{index}.out").read_text().strip().partition(" ")
        seen[index] = task_id
        assert gpus, f"array task {index} was given no GPU (CUDA_VISIBLE_DEVICES is empty)"
    assert seen == {0: "0", 1: "1", 2: "2"}


def test_sacct_reports_the_array_job(gpu_array_job: tuple[str, Path]) -> None:
    job_id, _ = gpu_array_job
    expected = {f"{job_id}_{index}": "COMPLETED" for index in range(3)}
    # slurmctld hands records to slurmdbd asynchronously, so sacct may lag the job by a moment.
    wait_until(lambda: sacct_states(job_id) == expected, f"sacct to show {expected}, last {sacct_states(job_id)}")


@pytest.mark.parametrize("gres", ["gpu:a100:3", "gpu:b200:1"], ids=["more-than-exist", "unknown-type"])
def test_unsatisfiable_gres_is_refused_at_submit(gres: str) -> None:
    result = run("sbatch", "--partition=gpu", f"--gres={gres}", "--output=/dev/null", "--wrap", "true", check=False)
    assert result.returncode != 0, f"sbatch accepted --gres={gres}: {result.stdout}"
    assert "Submitted batch job" not in result.stdout


def test_requeued_job_runs_again_with_restart_count_1(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    script = tmp_path / "job.sh"
    # The first run blocks until requeued; the rerun records its restart count and exits.
    script.write_text(
        "#!/bin/bash\n"
        f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {starts}\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 120; fi\n'
    )
    job_id = sbatch("--requeue", "--output=/dev/null", str(script))
    try:
        wait_until(lambda: starts.exists() and starts.read_text().split() == ["0"], "the job's first start")
        run("scontrol", "requeue", job_id)
        wait_until(lambda: job_state(job_id) == "COMPLETED", f"requeued job {job_id} to complete", timeout=45)
        assert starts.read_text().split() == ["0", "1"]
    finally:
        run("scancel", job_id, check=False)


def test_submitit_round_trip(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")

    # Defined here so cloudpickle sends it by value: the job's Python cannot import this test module.
    def add_in_job(a: int, b: int) -> tuple[int, str]:
        return a + b, os.environ["SLURM_JOB_ID"]

    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1)
    job = executor.submit(add_in_job, 2, 3)
    assert job.result() == (5, job.job_id)
    wait_until(lambda: job.state == "COMPLETED", f"submitit to see job {job.job_id} COMPLETED, last {job.state}")
