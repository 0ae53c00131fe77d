"""The SLURM executor's pure parts, without a cluster: cluster profiles, the sbatch script of each (golden files
made by submitit's own `_make_sbatch_string`), the job callable and its plain arguments, the jobs record, and
the parsing of what squeue/sacct print (text captured on the local cluster of jobs/slurm/cluster.sh).

Regenerate the golden scripts after an intended change: MASKLET_UPDATE_GOLDEN=1 pytest tests/test_slurm_executor.py
"""
from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path

import cloudpickle
import pytest

from pipeline.config import PROFILES_DIR, ConfigError, SlurmConfig, load_config
from pipeline.executors import slurm
from pipeline.paths import RunPaths

GOLDEN = Path(__file__).parent / "golden" / "sbatch"
PROFILES = {  # profile -> the GPU request it must make
    "a100": "gpu:a100:1",
    "h100": "gpu:h100:1",
    "mig-1g.10gb": "gpu:1g.10gb:1",
    "mig-1g.12gb": "gpu:1g.12gb:1",
    "mig-3g.40gb": "gpu:3g.40gb:1",
    "cpu-debug": None,
    "local-test": "gpu:1g.10gb:1",
}
FOLDER = "/runs/demo/slurm/%j"
PYTHON = "/opt/masklet/.venv/bin/python"


def test_the_profiles_are_exactly_these():
    assert sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")) == sorted(PROFILES)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_loads_validates_and_requests_its_gpu(profile):
    cfg = load_config(profile=profile)
    assert cfg.executor == "slurm"
    assert slurm.check_slurm_config(cfg.slurm) is cfg.slurm
    assert cfg.slurm.gres == PROFILES[profile]
    assert cfg.slurm.signal_delay_s < cfg.slurm.time_min * 60
    # A profile never changes what a run computes: only executor settings (and the device, on CPU profiles).
    defaults = load_config()
    for section in ("decode", "prompt", "propagate", "store", "plan"):
        assert getattr(cfg, section) == getattr(defaults, section), (profile, section)
    assert (cfg.model.name, cfg.model.image_size, cfg.model.random_weights) == (
        defaults.model.name, defaults.model.image_size, defaults.model.random_weights)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_sbatch_script_matches_golden(profile):
    script = slurm.sbatch_script(load_config(profile=profile).slurm, FOLDER, num_tasks=4, python=PYTHON)
    golden = GOLDEN / f"{profile}.sh"
    if os.environ.get("MASKLET_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(script)
    assert golden.exists(), f"no golden file {golden}; run with MASKLET_UPDATE_GOLDEN=1 to write it"
    assert script == golden.read_text()


def test_golden_scripts_say_what_slurm_must_do():
    text = (GOLDEN / "mig-1g.10gb.sh").read_text()
    for line in ("#SBATCH --array=0-3%4", "#SBATCH --gres=gpu:1g.10gb:1", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue", "#SBATCH --time=240", "#SBATCH --mem=16GB", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --partition=gpu", "#SBATCH --open-mode=append",
                 f"{PYTHON} -u -m submitit.core._submit {FOLDER}"):
        assert line in text, line
    assert "--gres" not in (GOLDEN / "cpu-debug.sh").read_text()


def test_sbatch_parameters_equal():
    cfg = SlurmConfig(partition="gpu", account="proj", qos="high", constraint="a100_80", gres="gpu:a100:1",
                      time_min=60, cpus_per_task=6, mem_gb=30.5, array_parallelism=8, signal_delay_s=90,
                      setup=("module load cuda/12.4",), job_name="mk")
    assert slurm.sbatch_parameters(cfg) == {
        "job_name": "mk", "time": 60, "cpus_per_task": 6, "mem": "31232MB", "signal_delay_s": 90,
        "array_parallelism": 8, "additional_parameters": {"requeue": True}, "partition": "gpu", "account": "proj",
        "qos": "high", "constraint": "a100_80", "gres": "gpu:a100:1", "setup": ["module load cuda/12.4"],
    }


def test_a_single_task_is_a_plain_job():
    script = slurm.sbatch_script(load_config(profile="a100").slurm, FOLDER, num_tasks=1, python=PYTHON)
    assert "--array" not in script and "#SBATCH --output=/runs/demo/slurm/%j/%j_0_log.out" in script


@pytest.mark.parametrize("override, key", [
    ({"signal_delay_s": 600, "time_min": 10}, "slurm.signal_delay_s"),
    ({"shards_per_task": 0}, "slurm.shards_per_task"),
    ({"array_parallelism": 0}, "slurm.array_parallelism"),
    ({"gres": "gpu:a100:1; rm -rf /"}, "slurm.gres"),
    ({"mem_gb": 0}, "slurm.mem_gb"),
])
def test_bad_settings_are_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        slurm.sbatch_parameters(SlurmConfig(**override))


def test_group_shards():
    assert slurm.group_shards([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3), (4,)]
    assert slurm.group_shards([7, 3], 1) == [(7,), (3,)]


# --- the job callable ------------------------------------------------------------------------------------------

def test_shard_task_carries_plain_arguments_only():
    task = slurm.ShardTask("/runs/demo", (3, 4), redo_failed=True)
    back = pickle.loads(cloudpickle.dumps(task))
    assert vars(back) == {"run_dir": "/runs/demo", "shard_ids": (3, 4), "redo_failed": True}
    # Pickled by reference to the installed module, not by value: the job imports the same code.
    assert b"pipeline.executors.slurm" in cloudpickle.dumps(task) and len(cloudpickle.dumps(task)) < 300


def test_checkpoint_resubmits_the_same_arguments():
    task = slurm.ShardTask("/runs/demo", (5,))
    delayed = task.checkpoint()
    assert isinstance(delayed.function, slurm.ShardTask) and vars(delayed.function) == vars(task)
    assert delayed.args == () and delayed.kwargs == {}


def test_shard_task_runs_each_shard_in_order(monkeypatch):
    import pipeline.worker as worker

    calls = []

    def fake_run_shard(run_dir, shard_id, redo_failed=False, task=None, owner_ended=None):
        calls.append((run_dir, shard_id, redo_failed))
        return worker.ShardSummary(done=1, frames=shard_id)

    monkeypatch.setattr(worker, "run_shard", fake_run_shard)
    out = slurm.ShardTask("/runs/demo", (2, 0), redo_failed=True)()
    assert calls == [("/runs/demo", 2, True), ("/runs/demo", 0, True)]
    assert [(o["shard_id"], o["frames"]) for o in out] == [(2, 2), (0, 0)]


def test_a_shard_task_runs_its_other_shards_then_exits_75_for_a_refused_one(monkeypatch, capsys):
    import pipeline.worker as worker
    from pipeline.store.lease import LeaseHeld

    calls = []

    def fake_run_shard(run_dir, shard_id, redo_failed=False, task=None, owner_ended=None):
        calls.append((shard_id, task))
        if shard_id == 2:
            raise LeaseHeld("shard 2 is already owned by pid 1 on node9")
        return worker.ShardSummary(done=1)

    monkeypatch.setattr(worker, "run_shard", fake_run_shard)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(SystemExit) as exit_:
        slurm.ShardTask("/runs/demo", (2, 0))()
    assert exit_.value.code == slurm.EX_TEMPFAIL == 75
    assert [c[0] for c in calls] == [2, 0]
    assert calls[0][1] == slurm.SchedulerTask("slurm", "40_3", "41", "40", "3", 2)
    assert "masklet: refused: shard 2 is already owned by pid 1 on node9" in capsys.readouterr().out


def test_lease_owner_ended_asks_slurm_or_knows_its_own_earlier_incarnation(monkeypatch):
    from pipeline.store.lease import LeaseOwner

    def owner(task_id, restarts=0):
        return LeaseOwner(0, "t", "node9", None, 1, None, "2026-12-05T00:00:00+00:00",
                          slurm.SchedulerTask("slurm", task_id, task_id, None, None, restarts))
    monkeypatch.setattr(slurm, "scheduler_states", lambda ids: {"50": "CANCELLED", "51": "RUNNING"})
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm.lease_owner_ended(owner("50")) and not slurm.lease_owner_ended(owner("51"))
    assert not slurm.lease_owner_ended(owner("52")), "UNKNOWN is not ended"
    monkeypatch.setenv("SLURM_JOB_ID", "51")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm.lease_owner_ended(owner("51", restarts=0)), "SLURM requeued it and started this incarnation"
    assert not slurm.lease_owner_ended(owner("51", restarts=1))


# --- the jobs record -------------------------------------------------------------------------------------------

def _submission(job: str, tasks: dict[str, tuple[int, ...]], at: str = "2026-11-22T10:00:00+00:00"):
    return slurm.Submission(job_id=job, submitted_at=at, tasks=tasks)


def test_jobs_record_appends_and_reads_back(tmp_path):
    paths = RunPaths.of(tmp_path)
    a = _submission("41", {"41_0": (0,), "41_1": (1, 2)})
    b = slurm.Submission("57", "2026-11-22T11:00:00+00:00", {"57": (1,)}, redo_failed=True, command="resume")
    slurm.append_record(paths.slurm_jobs, paths.slurm_jobs_lock, a.to_json())
    slurm.append_record(paths.slurm_jobs, paths.slurm_jobs_lock, b.to_json())
    assert slurm.read_records(paths) == [a, b]
    assert [json.loads(line)["job_id"] for line in paths.slurm_jobs.read_text().splitlines()] == ["41", "57"]
    assert sorted(p.name for p in paths.slurm.iterdir()) == ["jobs.jsonl", "jobs.jsonl.lock"]  # no temp files


def test_concurrent_appends_lose_nothing(tmp_path):
    paths = RunPaths.of(tmp_path)
    threads = [threading.Thread(target=slurm.append_record,
                                args=(paths.slurm_jobs, paths.slurm_jobs_lock, _submission(str(i), {str(i): (i,)}).to_json()))
               for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(int(r.job_id) for r in slurm.read_records(paths)) == list(range(24))


# --- what squeue and sacct print (captured on the local cluster) ---------------------------------------------

SACCT_WITH_STEPS = """\
9_0|COMPLETED
9_0.batch|COMPLETED
9_0.0|COMPLETED
9_1|FAILED
9_1.batch|FAILED
11|COMPLETED
11.extern|COMPLETED
"""
SQUEUE_ARRAY_PENDING = "12_[0-3%2]|PENDING\n"  # squeue without -r folds pending tasks
SQUEUE_EXPANDED = "12_0|RUNNING\n12_1|RUNNING\n12_2|PENDING\n12_3|PENDING\n"
SACCT_CANCELLED = "12|CANCELLED by 0\n12_0|CANCELLED\n12_[1-2,5]|CANCELLED by 0\n"


def test_parse_job_states():
    assert slurm.parse_job_states(SACCT_WITH_STEPS) == {"9_0": "COMPLETED", "9_1": "FAILED", "11": "COMPLETED"}
    assert slurm.parse_job_states(SQUEUE_ARRAY_PENDING) == {f"12_{i}": "PENDING" for i in range(4)}
    assert slurm.parse_job_states(SQUEUE_EXPANDED)["12_1"] == "RUNNING"
    assert slurm.parse_job_states(SACCT_CANCELLED) == {"12": "CANCELLED", "12_0": "CANCELLED", "12_1": "CANCELLED",
                                                       "12_2": "CANCELLED", "12_5": "CANCELLED"}
    assert slurm.parse_job_states("slurm_load_jobs error: Invalid job id specified\n\n") == {}


def test_expand_task_ids():
    assert slurm.expand_task_ids("7_[0-2,5%2]") == ["7_0", "7_1", "7_2", "7_5"]
    assert slurm.expand_task_ids("7_3") == ["7_3"] and slurm.expand_task_ids("7") == ["7"]


def test_scheduler_states_prefer_squeue_over_sacct(monkeypatch):
    outputs = {"sacct": "12_0|RUNNING\n12_1|PENDING\n", "squeue": "12_0|COMPLETED\n12_1|RUNNING\n"}
    calls = []

    def fake_query(cmd):
        calls.append(cmd)
        return outputs[cmd[0]]

    monkeypatch.setattr(slurm, "_query", fake_query)
    assert slurm.scheduler_states(["12_0", "12_1"]) == {"12_0": "COMPLETED", "12_1": "RUNNING"}
    assert [c[0] for c in calls] == ["sacct", "squeue"] and all("12" in c for c in calls)


def test_latest_submission_of_a_shard_wins(tmp_path):
    paths = RunPaths.of(tmp_path)
    for sub in (_submission("20", {"20_0": (0,), "20_1": (1,)}), _submission("31", {"31": (1,)})):
        slurm.append_record(paths.slurm_jobs, paths.slurm_jobs_lock, sub.to_json())
    jobs = slurm.shard_jobs(paths, {"20_0": "COMPLETED", "20_1": "CANCELLED", "31": "PENDING"})
    assert (jobs[0].task_id, jobs[0].state, jobs[0].active) == ("20_0", "COMPLETED", False)
    assert (jobs[1].task_id, jobs[1].state, jobs[1].active) == ("31", "PENDING", True)
    assert jobs[1].log == str(paths.slurm / "31" / "31_0_log.err")


def test_an_earlier_task_still_running_wins_over_a_later_refused_one(tmp_path):
    paths = RunPaths.of(tmp_path)
    for sub in (_submission("20", {"20": (0,)}), _submission("31", {"31": (0,)})):
        slurm.append_record(paths.slurm_jobs, paths.slurm_jobs_lock, sub.to_json())
    assert slurm.shard_jobs(paths, {"20": "RUNNING", "31": "FAILED"})[0].task_id == "20"
    assert slurm.shard_jobs(paths, {"20": "COMPLETED", "31": "FAILED"})[0].task_id == "31"


def test_cancel_scancels_only_jobs_with_active_tasks(tmp_path, monkeypatch):
    paths = RunPaths.of(tmp_path)
    for sub in (_submission("20", {"20_0": (0,), "20_1": (1,)}), _submission("31", {"31_0": (2,), "31_1": (3,)})):
        slurm.append_record(paths.slurm_jobs, paths.slurm_jobs_lock, sub.to_json())
    monkeypatch.setattr(slurm, "_query", lambda cmd: "20_0|COMPLETED\n20_1|FAILED\n31_0|RUNNING\n31_1|PENDING\n"
                        if cmd[0] == "squeue" else "")
    cancelled = []
    monkeypatch.setattr(slurm, "_scancel", cancelled.extend)
    assert slurm.cancel(paths) == ["31"] and cancelled == ["31"]


def test_submit_without_slurm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.SlurmError, match="--executor local"):
        slurm.SlurmExecutor(SlurmConfig()).submit(str(tmp_path), [0])
