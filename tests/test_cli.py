"""The command line around runs: status (disk + scheduler), resume (same plan and config, refusal of a changed
one, --retry-failed), cancel, and argument parsing. Local runs are real (random-weight model on CPU); the
scheduler's answers are captured text fed to the real parsers (the SLURM tests run them for real)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow.compute as pc
import pytest

from pipeline import open_run
from pipeline.cli import build_parser, main
from pipeline.config import load_config
from pipeline.executors import slurm
from pipeline.manifest import read_manifest
from pipeline.paths import RunPaths
from pipeline.plan import prepare_run
from pipeline.samples import make_image
from pipeline.status import measure_rate


@pytest.fixture(scope="module")
def media_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    media = root / "media"
    make_image(media / "good.png", width=96, height=64, seed=5)
    (media / "fake.mp4").write_text("this is not a video")
    manifest = root / "m.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    return manifest


@pytest.fixture(scope="module")
def local_run(media_manifest, demo_config, fast_overrides):
    out = media_manifest.parent / "run"
    assert main(["run", "--manifest", str(media_manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides, "plan.max_items_per_shard=1"]) == 0
    return out


@pytest.fixture
def planned_run(tmp_path, media_manifest, demo_config, fast_overrides):
    """A planned run with nothing committed (no model needed): two shards of one item each."""
    cfg = load_config(demo_config, [*fast_overrides, "plan.max_items_per_shard=1"])
    return prepare_run(tmp_path / "run", read_manifest(str(media_manifest)), cfg)


def _record(plan, job_id: str, tasks: dict[str, tuple[int, ...]]) -> None:
    sub = slurm.Submission(job_id, "2026-11-22T10:00:00+00:00", tasks)
    slurm.append_record(plan.paths.slurm_jobs, plan.paths.slurm_jobs_lock, sub.to_json())


def _fake_scheduler(monkeypatch, squeue_text: str) -> None:
    monkeypatch.setattr(slurm, "_query", lambda cmd: squeue_text if cmd[0] == "squeue" else "")
    monkeypatch.setattr(slurm, "scheduler_reachable", lambda: True)


def test_overrides_may_follow_options():
    args, extra = build_parser().parse_known_args(["resume", "OUT", "--retry-failed", "slurm.time_min=5"])
    assert extra == ["slurm.time_min=5"]
    with pytest.raises(SystemExit):
        main(["resume", "OUT", "--no-such-flag"])


def test_status_of_a_local_run(local_run, capsys):
    capsys.readouterr()
    assert main(["status", str(local_run)]) == 0
    text = capsys.readouterr().out
    assert "1 done, 1 failed, 0 pending of 2" in text and "RANDOM WEIGHTS" in text
    assert "shards: 2 done, 0 running, 0 queued, 0 failed, 0 pending of 2" in text
    assert "slurm:" not in text and "fake.mp4:" in text


def test_status_combines_disk_and_scheduler(planned_run, capsys, monkeypatch):
    _record(planned_run, "5", {"5_0": (0,), "5_1": (1,)})
    _fake_scheduler(monkeypatch, "5_0|RUNNING\n5_1|FAILED\n")
    capsys.readouterr()
    assert main(["status", str(planned_run.paths.root)]) == 0
    text = capsys.readouterr().out
    assert "0 done, 0 failed, 2 pending of 2" in text
    assert "shards: 0 done, 1 running, 0 queued, 1 failed, 0 pending of 2" in text
    assert "slurm: 1 submission(s); latest job 5 (2 task(s)): 1 FAILED, 1 RUNNING" in text
    assert f"5_1 FAILED: log {planned_run.paths.slurm / '5_1' / '5_1_0_log.err'}" in text


def test_status_when_the_scheduler_cannot_be_asked(planned_run, capsys, monkeypatch):
    _record(planned_run, "8", {"8_0": (0,), "8_1": (1,)})
    monkeypatch.setattr(slurm, "scheduler_reachable", lambda: False)
    capsys.readouterr()
    assert main(["status", str(planned_run.paths.root)]) == 0
    text = capsys.readouterr().out
    assert "shards: 0 done, 0 running, 0 queued, 0 failed, 0 pending, 2 unknown of 2" in text
    assert "2 UNKNOWN (squeue/sacct not found on this machine: states unknown)" in text


def test_rate_and_eta():
    t0 = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
    done = [(t0 + timedelta(seconds=s), 10) for s in (60, 120, 180)]
    rate = measure_rate(done, since=t0, now=t0 + timedelta(seconds=300), running=True)
    assert rate.items_per_s == pytest.approx(3 / 300) and rate.frames_per_s == pytest.approx(30 / 300)
    assert rate.eta_s(6) == pytest.approx(600)
    # Nothing running: up to the last commit. No launch time: from the first commit, which is not counted.
    assert measure_rate(done, since=t0, now=t0 + timedelta(hours=5), running=False).window_s == 180
    assert measure_rate(done, since=None, now=t0, running=False).items_per_s == pytest.approx(2 / 120)
    assert measure_rate(done[:1], since=None, now=t0, running=False) is None


def test_run_never_starts_a_shard_that_slurm_still_runs(planned_run, demo_config, fast_overrides, capsys, monkeypatch):
    _record(planned_run, "6", {"6_0": (0,), "6_1": (1,)})
    _fake_scheduler(monkeypatch, "6_0|RUNNING\n6_1|PENDING\n")
    capsys.readouterr()
    assert main(["run", "--manifest", str(planned_run.paths.manifest), "--out", str(planned_run.paths.root),
                 "--config", demo_config, *fast_overrides, "plan.max_items_per_shard=1", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "are still queued or running as SLURM task(s) ['6_0', '6_1']" in out
    assert open_run(planned_run.paths.root).items.num_rows == 0


def test_a_task_slurm_cannot_place_counts_as_running_while_its_lease_is_fresh(planned_run, demo_config, fast_overrides,
                                                                           capsys, monkeypatch):
    from pipeline.store.lease import acquire

    _record(planned_run, "8", {"8_0": (0,), "8_1": (1,)})
    _fake_scheduler(monkeypatch, "")  # squeue and sacct know nothing: UNKNOWN
    capsys.readouterr()
    with acquire(planned_run.paths, 0), acquire(planned_run.paths, 1):
        assert main(["run", "--manifest", str(planned_run.paths.manifest), "--out", str(planned_run.paths.root),
                     "--config", demo_config, *fast_overrides, "plan.max_items_per_shard=1", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "shard 0: SLURM cannot say whether task 8_0 runs (UNKNOWN), but its lease is held by pid" in out
    assert "shard 1: SLURM cannot say whether task 8_1 runs" in out
    assert open_run(planned_run.paths.root).items.num_rows == 0


def test_cancel_without_slurm_jobs(local_run, capsys):
    capsys.readouterr()
    assert main(["cancel", str(local_run)]) == 0
    assert "has no SLURM jobs" in capsys.readouterr().out


def test_cancel_scancels_the_active_jobs(planned_run, capsys, monkeypatch):
    _record(planned_run, "7", {"7_0": (0,), "7_1": (1,)})
    _fake_scheduler(monkeypatch, "7_0|COMPLETED\n7_1|RUNNING\n")
    cancelled = []
    monkeypatch.setattr(slurm, "_scancel", cancelled.extend)
    capsys.readouterr()
    assert main(["cancel", str(planned_run.paths.root)]) == 0
    assert cancelled == ["7"] and "cancelled SLURM job(s) 7" in capsys.readouterr().out


def test_slurm_without_sbatch_is_one_clear_error(planned_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    capsys.readouterr()
    assert main(["resume", str(planned_run.paths.root), "--executor", "slurm"]) == 2
    assert "not a SLURM login node" in capsys.readouterr().err


def test_resume_refuses_a_config_that_changes_the_masks(local_run, capsys):
    capsys.readouterr()
    assert main(["resume", str(local_run), "prompt.points_per_side=4", "slurm.time_min=5"]) == 2
    err = capsys.readouterr().err
    assert "prompt.points_per_side: 8 -> 4" in err and "slurm.time_min" not in err
    assert f"masklet run --manifest {RunPaths.of(local_run).manifest} --out NEW_OUT" in err


def test_resume_refuses_an_edited_manifest_copy(planned_run, media_manifest, capsys, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(planned_run.paths.manifest)
    pq.write_table(table.slice(0, 1), planned_run.paths.manifest)  # one item dropped by hand
    capsys.readouterr()
    assert main(["resume", str(planned_run.paths.root)]) == 2
    assert "different manifest" in capsys.readouterr().err


def test_resume_with_executor_settings_only_has_nothing_to_do(local_run, capsys):
    capsys.readouterr()
    assert main(["resume", str(local_run), "slurm.time_min=5", "local.workers=1"]) == 0
    assert "every item is committed (1 failed: --retry-failed runs them again)" in capsys.readouterr().out


def test_resume_retry_failed_redoes_only_the_failed_item(local_run, capsys):
    before = {r["item_id"]: r for r in open_run(local_run).items.to_pylist()}
    capsys.readouterr()
    assert main(["resume", str(local_run), "--retry-failed"]) == 0
    assert "0 pending item(s) and 1 failed item(s) in 1 shard(s)" in capsys.readouterr().out
    items = open_run(local_run).items
    after = {r["item_id"]: r for r in items.to_pylist()}
    assert items.num_rows == 2 and pc.count_distinct(items["item_id"]).as_py() == 2
    assert after["fake.mp4"]["status"] == "failed" and after["fake.mp4"]["finished_at"] > before["fake.mp4"]["finished_at"]
    assert after["good.png"]["finished_at"] == before["good.png"]["finished_at"]  # done items are never redone
