"""Environment faults are not item faults (pipeline/faults.py).

Faults are injected where they arise: out of memory in the tracker's step for one frame (`_Engine._frame`),
a full output file system in the mask writer, a CUDA error mid-item, a model that does not load. Then:
out of memory goes down the ladder (the tracker's own object batch halved, then the state offloaded) and
ends done at a smaller batch, or failed with the memory it needed and a profile that fits; an environment
fault stops the shard with nothing committed, the checkpoint kept and a fault record written, the CLI exits
3, status shows it, and resume finishes the shard and removes the record.

Media are tiny (2- and 4-frame 64x48 videos, one object where one is enough) and faults strike on the first
frames: random-weight tracking costs about a second of CPU per frame here, and each rung of the ladder
prompts again."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from pipeline import faults, open_run
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.device import GiB, RESERVE_BYTES
from pipeline.manifest import read_manifest
from pipeline.paths import RunPaths
from pipeline.plan import prepare_run
from pipeline.samples import make_image, make_video
from pipeline.stages import track as track_module
from pipeline.status import run_status
from pipeline.store.commit import committed_items
from pipeline.store.masks import MaskWriter
from pipeline.worker import run_shard

OOM_TEXT = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 9.50 GiB of which "
            "1.00 GiB is free. Including non-PyTorch memory, this process has 8.00 GiB memory in use.")


# --- classification (pure) -----------------------------------------------------------------------------------

def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    """`exc` as raised (with `cause` as its __cause__), so that its chain is what a real raise gives."""
    try:
        if cause is not None:
            raise exc from cause
        raise exc
    except BaseException as e:  # noqa: BLE001
        return e


@pytest.mark.parametrize("exc, kind", [
    (torch.OutOfMemoryError(OOM_TEXT), "oom"),
    (MemoryError("Unable to allocate 256. TiB for an array with shape (3,) and data type float64"), "oom"),
    (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), "oom"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "environment"),
    (torch.AcceleratorError("CUDA error: unspecified launch failure"), "environment"),
    (OSError(errno.ENOSPC, "No space left on device"), "environment"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "environment"),
    (OSError(errno.EROFS, "Read-only file system", "/anywhere/x"), "environment"),
    (OSError(errno.EIO, "Input/output error"), "environment"),
    (OSError(errno.EIO, "Input/output error", "/media/elsewhere/v.mp4"), "item"),  # the input's disk: that item
    (PermissionError(errno.EACCES, "Permission denied", "/media/elsewhere/v.mp4"), "item"),
    (OSError("disk full (injected)"), "item"),  # no errno: nothing says it is the file system's
    (ValueError("frame folder with mixed sizes"), "item"),
    (RuntimeError("Expected all tensors to be on the same device"), "item"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_classify(exc, kind, tmp_path):
    assert faults.classify(exc, tmp_path).kind == kind


def test_classify_follows_causes_and_knows_out(tmp_path):
    wrapped = _raised(ValueError("could not write the masks"), OSError(errno.ENOSPC, "No space left on device"))
    fault = faults.classify(wrapped, tmp_path)
    assert fault.kind == "environment" and fault.error.startswith("OSError: [Errno 28]")
    assert "full" in fault.advice and "masklet resume" in fault.advice
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "masks" / "x"))
    assert faults.classify(denied, tmp_path).kind == "environment"  # under OUT: the output, not an input
    assert faults.classify(OSError(errno.EIO, "Input/output error", str(tmp_path / "meta")), tmp_path).kind \
        == "environment"


def test_the_ladder_halves_the_batch_the_tracker_used_then_offloads():
    start = faults.Rung(object_batch=64)  # configured 64, but the tracker used 5 (5 objects)
    steps, rung, batch, offloaded = [], start, 5, False
    while (rung := faults.next_rung(rung, batch, offloaded, offload_possible=True)) is not None:
        steps.append((rung.object_batch, rung.offload_state))
        batch, offloaded = rung.object_batch, bool(rung.offload_state)
    assert steps == [(2, None), (1, None), (1, True)]
    assert faults.next_rung(faults.Rung(), 1, False, offload_possible=False) is None  # CPU: offload frees nothing
    assert faults.next_rung(faults.Rung(), None, True, offload_possible=True) is None


def test_memory_need_and_the_profile_that_fits_it():
    need = faults.memory_need(torch.OutOfMemoryError(OOM_TEXT), torch.device("cpu"), None)
    assert need.device == "gpu" and need.needed_bytes == 28 * GiB and need.device_bytes == int(9.5 * GiB)
    profiles = {"small": 10, "middle": 40, "big": 80}
    assert faults.fitting_profile(need, profiles) == "middle"  # least memory >= 28 GiB + the reserve
    assert faults.fitting_profile(faults.MemoryNeed("gpu", 80 * GiB, 40 * GiB), profiles) is None
    unknown = faults.MemoryNeed("gpu", None, 10 * GiB)  # only "more than this device": the next larger one
    assert faults.fitting_profile(unknown, profiles) == "middle"
    text = faults.memory_advice(need, faults.Rung(1, True), profiles)
    assert "28.0 GiB" in text and "9.5 GiB" in text and "--profile middle" in text and "offloaded" in text
    # the real profiles: each that states its GPU memory is a candidate
    real = faults.gpu_profiles()
    assert real and all(gb > 0 for gb in real.values())
    assert faults.fitting_profile(faults.MemoryNeed("gpu", 1, 0), real) == min(real, key=real.get)
    cpu = faults.memory_need(MemoryError("Unable to allocate 3.00 GiB for an array"), torch.device("cpu"), None)
    assert cpu.device == "cpu" and cpu.needed_bytes == 3 * GiB
    assert f"slurm.mem_gb={-(-(max(3 * GiB, cpu.device_bytes) + RESERVE_BYTES) // GiB)}" in \
        faults.memory_advice(cpu, faults.Rung(1))


def test_a_fault_record_makes_status_show_the_shard_failed(tmp_path, demo_config, fast_overrides):
    make_image(tmp_path / "media" / "p.png", width=32, height=24, seed=1)
    assert main(["manifest", "build", str(tmp_path / "media"), "-o", str(tmp_path / "m.parquet")]) == 0
    cfg = load_config(demo_config, fast_overrides)
    plan = prepare_run(tmp_path / "run", read_manifest(str(tmp_path / "m.parquet")), cfg)
    _, (before,) = run_status(plan.paths.root)
    fault = faults.Fault("environment", "OSError: [Errno 28] No space left on device", "free space")
    assert faults.write_shard_fault(plan.paths, faults.ShardFault.now(0, fault, "p.png"))
    _, (after,) = run_status(plan.paths.root)
    assert before.fault is None and after.fault and "No space left on device" in after.fault
    from pipeline.status import format_status, shard_state

    assert shard_state(before, None) == "pending" and shard_state(after, None) == "failed"
    assert "stopped at item p.png" in format_status(plan, [after])
    faults.clear_shard_fault(plan.paths, 0)
    assert faults.read_shard_fault(plan.paths, 0) is None


# --- runs with injected faults --------------------------------------------------------------------------------

FAST = ["prompt.max_objects=4", "retries=0"]


@pytest.fixture(scope="module")
def video_manifest(tmp_path_factory):
    """One 2-frame 64x48 video (random weights prompt 4 objects on it): frame 0 is the prompt frame, frame 1
    the one tracked step."""
    root = tmp_path_factory.mktemp("faults")
    make_video(root / "media" / "v.mp4", frames=2, width=64, height=48, seed=21)
    path = root / "m.parquet"
    assert main(["manifest", "build", str(root / "media"), "-o", str(path)]) == 0
    return path


def _run(manifest, out, demo_config, fast_overrides, *extra) -> int:
    return main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides, *FAST, *extra])


def _inject_in_tracker(monkeypatch, fail) -> list[tuple[int, bool]]:
    """Record (object batch, offload) of every tracked frame; raise what `fail(t, batch, offload)` returns."""
    seen = []
    original = track_module._Engine._frame

    def frame(self, t, *args, **kwargs):
        batch, offload = self.stats.object_batch, self.options.offload_state
        seen.append((batch, offload))
        error = fail(t, batch, offload)
        if error is not None:
            raise error
        return original(self, t, *args, **kwargs)

    monkeypatch.setattr(track_module._Engine, "_frame", frame)
    return seen


def _said(capsys) -> str:
    """The line the CLI ended with on stderr (above it: the progress bar and the random-weights warning), after
    checking that no traceback reached the terminal."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _rows(out) -> dict[str, dict]:
    return {r["item_id"]: r for r in open_run(out).items.to_pylist()}


def test_out_of_memory_retries_at_half_the_tracked_batch(video_manifest, demo_config, fast_overrides, tmp_path,
                                                         monkeypatch):
    """Configured object batch 8, the tracker used 4 (4 objects): out of memory above 2 objects at frame 1
    -> the next try runs 2 (half of what the tracker used, not of the config) and the item is done."""
    seen = _inject_in_tracker(monkeypatch, lambda t, batch, offload:
                              torch.OutOfMemoryError(OOM_TEXT) if t == 1 and batch > 2 else None)
    assert _run(video_manifest, tmp_path / "run", demo_config, fast_overrides, "propagate.object_batch=8") == 0
    row = _rows(tmp_path / "run")["v.mp4"]
    assert row["status"] == "done", row["error"]
    assert row["num_objects"] == 4, "the test needs 4 objects to see the batch halve"
    assert row["attempts"] == 2 and row["num_frames"] == 2
    assert sorted(set(seen)) == [(2, False), (4, False)] and seen[-1] == (2, False)
    log = (RunPaths.of(tmp_path / "run").shard_log(0)).read_text()
    assert "out of memory at object batch 4; trying again from frame 0 at object batch 2" in log


def test_out_of_memory_at_every_rung_is_a_failed_row_with_the_memory_needed(video_manifest, demo_config,
                                                                           fast_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "can_offload", lambda device: True)  # as on a GPU (here the CPU is the device)
    seen = _inject_in_tracker(monkeypatch, lambda t, batch, offload: torch.OutOfMemoryError(OOM_TEXT) if t == 0
                              else None)
    # fewer prompt points than elsewhere: each rung prompts again, and 3 objects show the ladder as well as 4
    assert _run(video_manifest, tmp_path / "run", demo_config, fast_overrides, "propagate.object_batch=4",
                "prompt.points_per_side=4") == 0
    row = _rows(tmp_path / "run")["v.mp4"]
    tracked = seen[0][0]
    assert tracked >= 2, "the test needs more than one object to see the batch halve"
    ladder = [(tracked, False)]
    while ladder[-1][0] > 1:
        ladder.append((ladder[-1][0] // 2, False))
    assert seen == [*ladder, (1, True)]  # one frame per rung, then given up
    assert row["status"] == "failed" and row["attempts"] == len(seen)
    # 8 GiB in use + 20 GiB asked on a 9.5 GiB GPU: 28 GiB; the smallest profile holding it beside the reserve
    want = min((gb, name) for name, gb in faults.gpu_profiles().items() if gb * GiB >= 28 * GiB + RESERVE_BYTES)
    assert "OutOfMemoryError" in row["error"] and "object batch 1, state offloaded" in row["error"]
    assert "needed about 28.0 GiB" in row["error"] and f"--profile {want[1]}" in row["error"]


@pytest.fixture(scope="module")
def two_item_manifest(tmp_path_factory):
    """A 4-frame video (a.mp4, first in its shard) and an image (b.png) after it."""
    root = tmp_path_factory.mktemp("faults2")
    make_video(root / "media" / "a.mp4", frames=4, width=64, height=48, seed=31)
    make_image(root / "media" / "b.png", width=32, height=24, seed=32)
    path = root / "m.parquet"
    assert main(["manifest", "build", str(root / "media"), "-o", str(path)]) == 0
    return path


def test_a_full_output_file_system_stops_the_shard_and_resume_finishes_it(two_item_manifest, demo_config,
                                                                         fast_overrides, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "run"
    paths = RunPaths.of(out)
    checkpointing = ["prompt.max_objects=1", "store.frames_per_file=2", "store.checkpoint_seconds=0"]
    original = MaskWriter._flush

    def full_disk(self):
        if self._start == 2 and self._held:  # frames 2-3: after the checkpoint at frame 2
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self)

    with monkeypatch.context() as m:
        m.setattr(MaskWriter, "_flush", full_disk)
        capsys.readouterr()
        assert _run(two_item_manifest, out, demo_config, fast_overrides, *checkpointing) == 3
    err = _said(capsys)
    assert err.startswith("masklet: shard 0 stopped at item a.mp4") and "No space left on device" in err and "masklet resume" in err
    assert committed_items(paths, 0) == {}, "nothing of the shard may be committed: not the item, nor those after"
    progress = json.loads((paths.partial("a.mp4") / "progress.json").read_text())
    assert progress["next_frame"] == 2, "the checkpoint must be kept"
    record = json.loads(paths.shard_fault(0).read_text())
    assert record["item_id"] == "a.mp4" and "Errno 28" in record["error"]
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 failed, 2 pending" in text and "1 failed, 0 pending of 1" in text and "No space left" in text

    assert main(["resume", str(out), *fast_overrides]) == 0
    rows = _rows(out)
    assert rows["a.mp4"]["status"] == "done" and rows["b.png"]["status"] == "done"
    assert "continuing from its checkpoint at frame 2 of 4" in paths.shard_log(0).read_text()
    assert not paths.shard_fault(0).exists(), "the record outlived the fault"


def test_a_cuda_error_mid_item_stops_the_shard_without_a_failed_row(video_manifest, demo_config, fast_overrides,
                                                                   tmp_path, monkeypatch):
    cfg = load_config(demo_config, [*fast_overrides, *FAST])
    plan = prepare_run(tmp_path / "run", read_manifest(str(video_manifest)), cfg)
    _inject_in_tracker(monkeypatch, lambda t, batch, offload:
                       RuntimeError("CUDA error: an illegal memory access was encountered") if t == 0 else None)
    with pytest.raises(faults.EnvironmentFault, match="illegal memory access") as caught:
        run_shard(str(plan.paths.root), 0)
    assert caught.value.fault.item_id == "v.mp4"
    assert committed_items(plan.paths, 0) == {}
    assert "illegal memory access" in faults.read_shard_fault(plan.paths, 0).error


def test_a_model_that_does_not_load_is_a_shard_fault_with_exit_status_3(tmp_path, demo_config, fast_overrides,
                                                                        monkeypatch, capsys):
    make_image(tmp_path / "media" / "p.png", width=48, height=32, seed=41)
    manifest = tmp_path / "m.parquet"
    assert main(["manifest", "build", str(tmp_path / "media"), "-o", str(manifest)]) == 0
    out = tmp_path / "run"
    from pipeline import worker
    from pipeline.stages.models import CheckpointError

    def broken(cfg):
        raise CheckpointError("checkpoint /models/sam2.pt could not be read (unexpected EOF); download it again")

    with monkeypatch.context() as m:
        m.setattr(worker, "load_model", broken)
        capsys.readouterr()
        assert _run(manifest, out, demo_config, fast_overrides) == 3
    err = _said(capsys)
    assert err.startswith("masklet: shard 0 stopped") and "could not be loaded" in err and "unexpected EOF" in err
    assert committed_items(RunPaths.of(out), 0) == {}, "a model fault must not fail the items"
    _, (shard,) = run_status(out)
    assert shard.failed == 0 and shard.pending == 1 and "unexpected EOF" in shard.fault
    assert main(["resume", str(out), *fast_overrides]) == 0
    assert _rows(out)["p.png"]["status"] == "done" and not RunPaths.of(out).shard_fault(0).exists()
