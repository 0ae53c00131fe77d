"""One owner per shard (pipeline/store/lease.py), staging its owner clears, and fsync before publishing."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cli import EX_TEMPFAIL, main
from pipeline.paths import RunPaths
from pipeline.plan import load_run
from pipeline.samples import make_frame_folder, make_image, make_video
from pipeline.status import shard_status
from pipeline.store import atomic, lease
from pipeline.store.commit import clear_staging
from pipeline.store.lease import LeaseHeld, LeaseLost, LeaseOwner, SchedulerTask, acquire, read_lease
from tests.runcompare import assert_same_outputs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def paths(tmp_path):
    return RunPaths.of(tmp_path / "run").ensure()


def _holder(paths: RunPaths, shard_id: int) -> subprocess.Popen:
    """Another process that takes the shard's lease and holds it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.paths import RunPaths
        from pipeline.store.lease import acquire
        held = acquire(RunPaths.of({str(paths.root)!r}), {shard_id}, heartbeat_s=0.2)
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_worker_is_refused_with_the_owner_named(paths):
    proc = _holder(paths, 3)
    try:
        with pytest.raises(LeaseHeld) as refused:
            acquire(paths, 3)
        message = str(refused.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and "not run twice" in message
        assert "\n" not in message and str(paths.shard_lease(3)) in message
        # A live owner whose heartbeat looks old (hung, or a clock ahead) is still refused on its own host.
        os.utime(paths.shard_lease(3), (time.time() - 3600, time.time() - 3600))
        with pytest.raises(LeaseHeld):
            acquire(paths, 3)
        with acquire(paths, 4):  # other shards are free
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_kill_minus_nine_holders_lease_is_taken_over(paths, caplog):
    proc = _holder(paths, 0)
    beat = paths.shard_lease(0).stat().st_mtime
    time.sleep(0.5)
    assert paths.shard_lease(0).stat().st_mtime > beat, "the holder's heartbeat renews the lease"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="masklet.lease"):
        with acquire(paths, 0) as mine:
            assert read_lease(paths, 0).owner.token == mine.owner.token
    assert f"breaking the lease of pid {proc.pid}" in caplog.text and "is dead" in caplog.text
    assert not paths.shard_lease(0).exists(), "released on exit"
    assert [p.name for p in paths.leases.iterdir()] == [], "no temporary or broken lease files are left"


def _plant(paths: RunPaths, shard_id: int, age_s: float, **changes) -> LeaseOwner:
    """A lease file as another worker would have left it, with its heartbeat `age_s` seconds old."""
    owner = dataclasses.replace(lease.this_owner(shard_id), **changes)
    atomic.write_text_atomic(paths.shard_lease(shard_id), owner.to_json() + "\n")
    os.utime(paths.shard_lease(shard_id), (time.time() - age_s, time.time() - age_s))
    return owner


def test_a_reused_pid_or_a_reboot_means_the_owner_is_gone(paths):
    _plant(paths, 0, 0, pid=os.getpid(), pid_start=1)  # this pid, but the process started at another time
    acquire(paths, 0).release()
    _plant(paths, 0, 0, boot_id="another-boot")
    acquire(paths, 0).release()


def test_another_hosts_lease_needs_the_task_ended_and_a_stale_heartbeat(paths, monkeypatch, caplog):
    task = SchedulerTask("slurm", "77_1", "78", "77", "1")
    monkeypatch.setattr(lease, "STALE_AFTER_S", 2.0)
    _plant(paths, 0, 10, host="node-elsewhere", task=task)
    with pytest.raises(LeaseHeld, match="no scheduler can say"):
        acquire(paths, 0)  # nobody can tell whether it ended: never broken, however stale
    with pytest.raises(LeaseHeld, match="has not ended"):
        acquire(paths, 0, owner_ended=lambda owner: False)
    asked = []
    _plant(paths, 0, 0, host="node-elsewhere", task=task)  # ended, but its heartbeat is fresh: wait
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="masklet.lease"):
        with acquire(paths, 0, owner_ended=lambda owner: asked.append(owner.task) or True, heartbeat_s=0.2):
            waited = time.monotonic() - t0
    assert asked[0] == task and 1.5 < waited < 10, waited
    assert "waiting for the lease" in caplog.text and "breaking the lease" in caplog.text
    # An owner that goes on renewing its heartbeat is alive after all, whatever the scheduler says.
    _plant(paths, 1, 0, host="node-elsewhere", task=task)

    def renewing(owner):
        os.utime(paths.shard_lease(1))
        return True
    with pytest.raises(LeaseHeld, match="still renewed"):
        acquire(paths, 1, owner_ended=renewing, heartbeat_s=0.2)


def test_a_lost_lease_is_noticed_and_never_released_for_the_new_owner(paths):
    held = acquire(paths, 0, heartbeat_s=0.05)
    held.check(0)
    other = _plant(paths, 0, 0, host="node-elsewhere")  # broken and retaken by another worker
    time.sleep(0.3)
    with pytest.raises(LeaseLost, match="node-elsewhere"):
        held.check(0)
    held.release()
    assert read_lease(paths, 0).owner.token == other.token, "release leaves the new owner's lease alone"


def test_the_owner_clears_what_earlier_workers_left_but_keeps_live_checkpoints(paths):
    leftovers = [paths.shard_tmp(0) / "commit.a.12345678" / "items.parquet",
                 paths.shard_tmp(0) / "trash.compacted-0001.12345678" / "frames.parquet",
                 paths.item_tmp("a") / "masks.12345678.zarr" / "zarr.json",
                 paths.item_tmp("b") / "partial.12345678" / "progress.json",
                 paths.partial("done") / "progress.json",  # its item is committed since
                 paths.partial("b") / ".progress.json.12345678.tmp"]
    live = [paths.partial("b") / "progress.json", paths.partial("b") / "masks.zarr" / "zarr.json"]
    others = [paths.shard_tmp(1) / "commit.c.12345678" / "items.parquet", paths.item_tmp("c") / "x"]
    for f in leftovers + live + others:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    with acquire(paths, 0) as held:
        removed = clear_staging(paths, 0, ["a", "b", "done"], {"done": "done"}, held)
    assert all(not f.exists() for f in leftovers) and removed
    assert all(f.exists() for f in live + others), "live checkpoints and other shards' staging stay"


def test_publishing_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append(("rename", str(a), str(b)))
                        or real_replace(a, b))
    stage = tmp_path / "stage"
    (stage / "sub").mkdir(parents=True)
    (stage / "a.parquet").write_text("a")
    (stage / "sub" / "b").write_text("b")
    final = tmp_path / "store" / "item"
    final.parent.mkdir()
    atomic.publish(stage, final)
    rename = events.index(("rename", str(stage), str(final)))
    synced_before = {e[1] for e in events[:rename]}
    assert {str(stage / "a.parquet"), str(stage / "sub" / "b"), str(stage / "sub"), str(stage)} <= synced_before
    assert ("fsync", str(final.parent)) in events[rename:]


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("lease_run")
    media = root / "media"
    make_video(media / "v.mp4", frames=12, width=96, height=72, seed=21)
    make_frame_folder(media / "f", frames=4, width=80, height=64, ext="png", seed=22)
    make_image(media / "i.png", width=90, height=70, seed=23)
    make_image(media / "j.png", width=70, height=90, seed=24)
    manifest = root / "m.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    return manifest


def _run_cmd(manifest, out, demo_config, overrides):
    return [sys.executable, "-m", "pipeline.cli", "run", "--manifest", str(manifest), "--out", str(out),
            "--config", demo_config, *overrides, "prompt.max_objects=2", "plan.max_items_per_shard=2"]


def test_a_run_refuses_the_shard_a_live_worker_owns_and_exits_75(tmp_path, demo_config, fast_overrides, capsys):
    """The fast representative of the test below: one shard's lease held by another live process."""
    media = tmp_path / "media"
    for i in range(2):  # two images, one per shard (a folder of images alone would be one frame folder)
        make_image(media / f"d{i}" / f"im{i}.png", width=64, height=48, seed=30 + i)
    manifest = tmp_path / "m.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    out = tmp_path / "out"
    paths = RunPaths.of(out).ensure()
    args = [*_run_cmd(manifest, out, demo_config, fast_overrides)[3:], "plan.max_items_per_shard=1"]
    proc = _holder(paths, 0)
    try:
        capsys.readouterr()
        assert main(args) == EX_TEMPFAIL
        err = capsys.readouterr().err
        assert f"masklet: refused: shard 0 is already owned by pid {proc.pid}" in err
        plan = load_run(out)
        assert [shard_status(plan, s.shard_id).pending for s in plan.shards] == [1, 0]
    finally:
        proc.kill()
        proc.wait()
    assert main(args) == 0  # the holder is dead: its lease is broken at once
    assert all(shard_status(plan, s.shard_id).pending == 0 for s in plan.shards)
    logs = "".join(p.read_text() for p in paths.logs.glob("*.log"))
    assert sorted(line.split()[-3] for line in logs.splitlines() if "committed (done)" in line) == \
        ["d0__im0.png", "d1__im1.png"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_runs_on_one_out_at_once_process_every_item_once(tmp_path, small_manifest, demo_config, fast_overrides):
    reference = tmp_path / "reference"
    subprocess.run(_run_cmd(small_manifest, reference, demo_config, fast_overrides), check=True, env=ENV,
                   capture_output=True)
    out = tmp_path / "out"
    runs = [subprocess.Popen(_run_cmd(small_manifest, out, demo_config, fast_overrides), env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert set(codes) <= {0, EX_TEMPFAIL}, results
    refusals = [line for _, _, err in results for line in err.splitlines() if line.startswith("masklet: refused:")]
    assert len(refusals) == codes.count(EX_TEMPFAIL) and refusals, "the runs overlapped: one refused a shard"
    assert all("is already owned by pid" in line for line in refusals)
    assert_same_outputs(reference, out)
    paths = RunPaths.of(out)
    logs = "".join(p.read_text() for p in paths.logs.glob("*.log"))
    for item_id in ("v.mp4", "f", "i.png", "j.png"):
        assert logs.count(f"item {item_id} committed") == 1, f"{item_id} was processed more than once"
    assert not list(paths.leases.iterdir()), "every lease was released"
    assert not [p for p in paths.tmp.rglob("*") if p.is_file()], "nothing is left in tmp/"
