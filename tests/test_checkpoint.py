"""Checkpoints inside long items (pipeline/store/partial.py): a run stopped mid-video goes on from the last
checkpoint, not from frame 0, and ends with exactly the outputs of an uninterrupted run.

The interruptions here are in-process (SystemExit, as submitit raises on preemption, right after a
checkpoint or between two); tests/test_crash_resume.py kills the process with SIGKILL at random instants,
and tests/test_slurm_run.py requeues real SLURM tasks."""
from __future__ import annotations

import json

import pytest

from pipeline import open_run
from pipeline.cli import main
from pipeline.paths import RunPaths
from pipeline.samples import make_image, make_video
from pipeline.store.partial import PartialItem
from tests.runcompare import assert_same_outputs

FRAMES, PER_FILE = 24, 4
SETTINGS = [f"store.frames_per_file={PER_FILE}", "store.checkpoint_seconds=0", "prompt.max_objects=2"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    make_video(root / "media" / "long.mp4", frames=FRAMES, width=128, height=96, seed=21)
    make_image(root / "media" / "photo.jpg", width=96, height=72, seed=22)
    path = root / "m.parquet"
    assert main(["manifest", "build", str(root / "media"), "-o", str(path)]) == 0
    return path


def _run(manifest, out, demo_config, fast_overrides, *extra):
    return main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides, *SETTINGS, *extra])


@pytest.fixture(scope="module")
def reference(manifest, demo_config, fast_overrides):
    out = manifest.parent / "reference"
    assert _run(manifest, out, demo_config, fast_overrides) == 0
    return out


def _stop_at_save(monkeypatch, number: int, before: bool = False):
    """Raise SystemExit at the `number`-th checkpoint of the process (after saving it, or just before)."""
    saves = []
    original = PartialItem.save

    def save(self, next_frame, *args, **kwargs):
        saves.append(next_frame)
        if before and len(saves) == number:
            raise SystemExit("preempted before the checkpoint")
        original(self, next_frame, *args, **kwargs)
        if len(saves) == number:
            raise SystemExit("preempted after the checkpoint")

    monkeypatch.setattr(PartialItem, "save", save)
    return saves


def _continued(out) -> list[str]:
    text = "".join(p.read_text() for p in (RunPaths.of(out).logs).glob("*.log"))
    return [line for line in text.splitlines() if "continuing from its checkpoint" in line]


@pytest.mark.parametrize("stop", [(1, False), (3, False), (4, True)], ids=["after-1st", "after-3rd", "before-4th"])
def test_a_stopped_item_goes_on_from_its_last_checkpoint(manifest, reference, demo_config, fast_overrides,
                                                         tmp_path, monkeypatch, stop):
    number, before = stop
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        saves = _stop_at_save(m, number, before)
        with pytest.raises(SystemExit):
            _run(manifest, out, demo_config, fast_overrides)
    assert saves == [PER_FILE * k for k in range(1, number + 1)]
    committed = PER_FILE * (number - 1 if before else number)
    progress = json.loads((RunPaths.of(out).partial("long.mp4") / "progress.json").read_text())
    assert progress["next_frame"] == committed
    assert _run(manifest, out, demo_config, fast_overrides) == 0
    lines = _continued(out)
    assert len(lines) == 1 and f"at frame {committed} of {FRAMES}" in lines[0], lines
    assert_same_outputs(reference, out)
    assert not RunPaths.of(out).partial("long.mp4").exists(), "the checkpoint outlived its committed item"


def test_an_unusable_checkpoint_is_discarded_and_the_item_starts_again(manifest, reference, demo_config,
                                                                        fast_overrides, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_at_save(m, 2)
        with pytest.raises(SystemExit):
            _run(manifest, out, demo_config, fast_overrides)
    progress_file = RunPaths.of(out).partial("long.mp4") / "progress.json"
    progress = json.loads(progress_file.read_text())
    (progress_file.parent / progress["state"]).write_bytes(b"not a torch file")
    assert _run(manifest, out, demo_config, fast_overrides) == 0
    assert _continued(out) == []
    log = "".join(p.read_text() for p in RunPaths.of(out).logs.glob("*.log"))
    assert "discarding its checkpoint" in log and "starting from frame 0" in log
    assert_same_outputs(reference, out)


def test_a_failed_attempt_leaves_no_checkpoint_behind(manifest, reference, demo_config, fast_overrides, tmp_path,
                                                      monkeypatch):
    """An error (not a kill) fails the attempt; the retry starts from frame 0, so a checkpoint can never make
    an item fail twice."""
    out = tmp_path / "run"
    calls = []
    original = PartialItem.save

    def flaky(self, next_frame, *args, **kwargs):
        original(self, next_frame, *args, **kwargs)
        calls.append(next_frame)
        if len(calls) == 2:
            raise OSError("disk full (injected)")

    monkeypatch.setattr(PartialItem, "save", flaky)
    assert _run(manifest, out, demo_config, fast_overrides, "retries=1") == 0
    assert calls[:3] == [PER_FILE, 2 * PER_FILE, PER_FILE], "the retry did not start from frame 0"
    assert _continued(out) == []
    rows = {r["item_id"]: r for r in open_run(out).items.to_pylist()}
    assert rows["long.mp4"]["status"] == "done" and rows["long.mp4"]["attempts"] == 2
    assert_same_outputs(reference, out)


def test_no_checkpoints_when_turned_off_or_for_short_items(manifest, demo_config, fast_overrides, tmp_path,
                                                            monkeypatch):
    saves = []
    monkeypatch.setattr(PartialItem, "save", lambda self, n, *a, **k: saves.append(n))
    assert _run(manifest, tmp_path / "off", demo_config, fast_overrides, "store.checkpoint_seconds=null") == 0
    assert _run(manifest, tmp_path / "short", demo_config, fast_overrides, f"store.frames_per_file={FRAMES}") == 0
    assert saves == []
