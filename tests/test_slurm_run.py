"""Runs through real sbatch job arrays on the local SLURM cluster (jobs/slurm/cluster.sh), with the random-weight
model on the CPU under the `local-test` profile (each task asks for a fake 1g.10gb MIG slice).

One run is interrupted on purpose, in the middle of its long video, every way a cluster interrupts a task:
USR2 (what SLURM sends before the time limit or on preemption: submitit checkpoints and requeues), then a
plain `scontrol requeue` (SIGTERM, which submitit ignores, then SIGKILL after KillWait: as after a node
failure), then `masklet cancel`; `masklet resume --wait` then resubmits exactly the unfinished shard. The
video is checkpointed at every shard file (store.frames_per_file=8, store.checkpoint_seconds=0), so each
restart must go on inside the video from its last checkpoint, not from frame 0. The outputs must equal an
uninterrupted local run's, bit for bit, with nothing duplicated.

The video is long (200 frames, ~0.2 s each on a 2-core machine) because SLURM grants KillWait (5 s here,
30 s by default) after SIGTERM, and the worker keeps going meanwhile: the video must outlast two graces.

Needs the cluster: `sudo jobs/slurm/cluster.sh up`, then MASKLET_SLURM=1.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pyarrow.compute as pc
import pytest

from tests.conftest import NEEDS_SLURM_CLUSTER

from pipeline import open_run
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.executors import slurm
from pipeline.paths import RunPaths
from pipeline.plan import load_run
from pipeline.samples import make_frame_folder, make_image, make_video
from pipeline.status import shard_status

pytestmark = NEEDS_SLURM_CLUSTER

# Seconds for any one wait. Generous: the machine has 2 cores shared with other work, a job spends ~15 s
# importing torch and sam2, and a requeued task starts again after ~7 s.
WAIT = 240
LONG = "long.mp4"
LONG_FRAMES = 200
VOLATILE_COLUMNS = {"seconds_decode", "seconds_prompt", "seconds_propagate", "seconds_write", "seconds_signals",
                    "seconds_total", "finished_at"}


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_run")
    media = root / "media"
    make_video(media / LONG, frames=LONG_FRAMES, width=96, height=72, seed=11)
    make_frame_folder(media / "frames", frames=4, width=128, height=96, ext="png", seed=13)
    make_image(media / "photo.jpg", width=120, height=90, seed=12)
    path = root / "manifest.parquet"
    assert main(["manifest", "build", str(media), "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def run_args(manifest, demo_config, fast_overrides):
    # One object per item keeps items short on a busy 2-core machine; both runs use the same settings.
    return ["--manifest", str(manifest), "--config", demo_config, *fast_overrides, "prompt.max_objects=1",
            "store.frames_per_file=8", "store.checkpoint_seconds=0"]


@pytest.fixture(scope="module")
def local_reference(manifest, run_args):
    out = manifest.parent / "local"
    assert main(["run", *run_args, "--out", str(out), "--executor", "local"]) == 0
    return out


def _checkpoint(paths: RunPaths, item_id: str) -> int:
    """The frame the item's last checkpoint goes on from (0: none yet)."""
    try:
        return json.loads((paths.partial(item_id) / "progress.json").read_text())["next_frame"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _continued(paths: RunPaths, shard_id: int) -> list[int]:
    """Frames the shard's worker went on from, one per restart that used a checkpoint."""
    log = paths.shard_log(shard_id)
    text = log.read_text() if log.exists() else ""
    return [int(line.split(" at frame ")[1].split()[0]) for line in text.splitlines()
            if "continuing from its checkpoint" in line]


def _committed(paths: RunPaths, shard_id: int, item_id: str) -> bool:
    return item_id in open_run(paths.root).items["item_id"].to_pylist()


def _state(task_id: str) -> str:
    return slurm.scheduler_states([task_id]).get(task_id, "UNKNOWN")


@pytest.fixture(scope="module")
def interrupted_run(manifest, run_args, local_reference):
    out = manifest.parent / "slurm"
    paths = RunPaths.of(out)
    events: dict = {}
    assert main(["run", *run_args, "--out", str(out), "--profile", "local-test"]) == 0
    plan = load_run(out)
    assert [s.item_ids for s in plan.shards] == [(LONG,), ("frames", "photo.jpg")]
    (first,) = slurm.read_records(paths)
    assert len(first.tasks) == 2, "two shards, one array task each"
    task = next(t for t, shards in first.tasks.items() if shards == (0,))
    try:
        # 1. USR2 in the middle of the long video, once it has a checkpoint: submitit checkpoints (same plain
        # arguments) and requeues.
        events["checkpoint_at_usr2"] = wait_for(lambda: _checkpoint(paths, LONG), f"{LONG} to checkpoint in {task}")
        events["committed_at_usr2"] = _committed(paths, 0, LONG)
        subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)
        wait_for(lambda: "Requeued job" in slurm.task_output(paths, task), "submitit to requeue on USR2")
        # 2. Restarted and going on from the checkpoint: a plain requeue (SIGTERM, then SIGKILL after KillWait).
        wait_for(lambda: len(_continued(paths, 0)) == 1, f"{LONG} to go on from its checkpoint after the USR2")
        events["committed_at_requeue"] = _committed(paths, 0, LONG)
        subprocess.run(["scontrol", "requeue", task], check=True, timeout=30)
        # 3. Going on a second time (shard 1 is long done by then): cancel the run, then resume it.
        wait_for(lambda: shard_status(plan, 1).pending == 0, "shard 1 to finish")
        wait_for(lambda: len(_continued(paths, 0)) == 2, f"{LONG} to go on again after the plain requeue")
        events["committed_at_cancel"] = _committed(paths, 0, LONG)
        assert main(["cancel", str(out)]) == 0
        wait_for(lambda: _state(task) not in slurm.ACTIVE_STATES, f"task {task} to end after the cancel")
        events["state_after_cancel"] = _state(task)
        events["pending_after_cancel"] = shard_status(plan, 0).pending
        assert main(["resume", str(out), "--wait"]) == 0
    finally:
        slurm.cancel(paths)  # nothing is left behind on the shared cluster, whatever failed above
    events["log"] = slurm.task_output(paths, task)
    events["continued"] = _continued(paths, 0)
    return out, events


def test_outputs_equal_an_uninterrupted_local_run(interrupted_run, local_reference):
    out, _ = interrupted_run
    got, want = open_run(out), open_run(local_reference)
    assert sorted(got.item_ids()) == sorted(want.item_ids()) == ["frames", LONG, "photo.jpg"]
    for item_id in want.item_ids():
        a, b = got.masks(item_id), want.masks(item_id)
        assert a.shape == b.shape and np.array_equal(a[:], b[:]), item_id
        assert a.attrs.asdict() == b.attrs.asdict()
    rows = {r["item_id"]: r for r in got.items.to_pylist()}
    for row in want.items.to_pylist():
        other = rows[row["item_id"]]
        assert {k: v for k, v in other.items() if k not in VOLATILE_COLUMNS} == \
               {k: v for k, v in row.items() if k not in VOLATILE_COLUMNS}
    keys = [("item_id", "ascending"), ("object_id", "ascending")]
    assert got.masklets.sort_by(keys).equals(want.masklets.sort_by(keys))
    keys.append(("frame", "ascending"))
    assert got.frames.sort_by(keys).equals(want.frames.sort_by(keys))


def test_each_interruption_hit_the_long_item_in_flight(interrupted_run):
    _, events = interrupted_run
    assert events["committed_at_usr2"] is False and events["committed_at_requeue"] is False
    assert events["committed_at_cancel"] is False
    log = events["log"]
    assert "Caught signal SIGUSR2" in log and "Calling checkpoint method" in log and "Requeued job" in log
    assert log.count("Starting with JobEnvironment") >= 3  # first start, after USR2, after scontrol requeue
    assert events["state_after_cancel"] == "CANCELLED" and events["pending_after_cancel"] == 1


def test_every_restart_went_on_inside_the_video(interrupted_run):
    _, events = interrupted_run
    continued = events["continued"]  # after the USR2, after the requeue, in the resumed job
    print(f"\nrestarts went on from frames {continued} of {LONG_FRAMES}")
    assert len(continued) == 3, continued
    assert continued[0] >= events["checkpoint_at_usr2"] > 0
    assert continued == sorted(continued) and continued[-1] < LONG_FRAMES
    assert all(frame % 8 == 0 for frame in continued), "checkpoints are taken at shard-file boundaries"


def test_nothing_is_duplicated(interrupted_run):
    out, _ = interrupted_run
    res = open_run(out)
    items = res.items
    assert items.num_rows == 3 and pc.count_distinct(items["item_id"]).as_py() == 3
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in items.to_pylist())
    assert sorted(p.name for p in RunPaths.of(out).masks.iterdir() if not p.name.startswith(".")
                  and p.name != "zarr.json") == ["frames", LONG, "photo.jpg"]
    for row in items.to_pylist():
        assert row["num_objects"] >= 1, f"{row['item_id']}: no object, so the comparison of masks proves little"
        n = res.frames.filter(pc.equal(res.frames["item_id"], row["item_id"])).num_rows
        assert n == row["num_objects"] * row["num_frames"], row["item_id"]
    assert res.masklets.num_rows == sum(r["num_objects"] for r in items.to_pylist())


def test_resume_resubmitted_exactly_the_unfinished_shard(interrupted_run, capsys):
    out, _ = interrupted_run
    paths = RunPaths.of(out)
    first, second = slurm.read_records(paths)
    assert sorted(first.tasks.values()) == [(0,), (1,)]
    assert list(second.tasks.values()) == [(0,)] and second.command == "resume"
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 done, 0 failed, 0 pending of 3" in text and "RANDOM WEIGHTS" in text
    assert "shards: 2 done, 0 running, 0 queued, 0 failed, 0 pending of 2" in text
    assert f"latest job {second.job_id} (1 task(s)): 1 COMPLETED" in text


def test_the_submitted_script_is_the_one_the_profile_makes(interrupted_run):
    out, _ = interrupted_run
    paths = RunPaths.of(out)
    first = slurm.read_records(paths)[0]
    submitted = (paths.slurm / first.job_id / f"{first.job_id}_submission.sh").read_text()
    expected = slurm.sbatch_script(load_config(profile="local-test").slurm, paths.submitit_folder, num_tasks=2,
                                   python=sys.executable)
    assert submitted == expected


def test_an_unsatisfiable_gpu_request_is_refused_at_submit(run_args, manifest, capsys):
    out = manifest.parent / "refused"
    capsys.readouterr()
    assert main(["run", *run_args, "--out", str(out), "--profile", "local-test", "slurm.gres=gpu:b200:1"]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the job" in err and "slurm.gres" in err
    assert not RunPaths.of(out).slurm_jobs.exists()
