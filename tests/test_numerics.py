"""No mixed numerics in one dataset (pipeline/numerics.py).

On this CPU-only machine a real change of numerics between two launches of one run is a replaced checkpoint
file (same path, so the config fingerprint is the same, other weights): a relaunch is refused at the CLI and in
the worker, before any item, unless --allow-mixed-numerics, which run.json records and `status` shows. A run
begun on a GPU is simulated by its numerics.json (what a GPU worker writes), to check the device class.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import types

import pytest
import torch

from pipeline.cli import main
from pipeline.config import ModelConfig, load_config
from pipeline.manifest import read_manifest
from pipeline.numerics import (ALLOW_KEY, CUDA_UNKNOWN, Numerics, NumericsMismatchError, claim_reference,
                               differences, of_launch, read_reference)
from pipeline.paths import RunPaths
from pipeline.plan import prepare_run
from pipeline.samples import make_image
from pipeline.stages.models import random_checkpoint as make_random_checkpoint
from pipeline.stages.models import sha256_of
from pipeline.stages import sam2_pin
from pipeline.stages.sam2_pin import installed_sam2_version
from pipeline.store.commit import read_shard_table
from pipeline.store.metadata import ITEMS_SCHEMA
from pipeline.worker import _partial_item, run_shard
from tests.conftest import IMAGE_SIZE

CPU = Numerics(device_class="cpu", device_name="some cpu", autocast="off", object_batch=1, tf32=False,
               compile=False, torch=torch.__version__, sam2="1.1.0", checkpoint_sha256="a" * 64)
H100 = dataclasses.replace(CPU, device_class="cuda-sm90", device_name="NVIDIA H100 80GB HBM3", autocast="bf16",
                           object_batch=64, tf32=True)


def test_differences_name_what_changes_masks():
    assert differences(CPU, CPU) == []
    assert differences(CPU, dataclasses.replace(CPU, device_name="another cpu")) == []  # not compared
    assert differences(H100, CPU) == ["device_class: cuda-sm90 -> cpu", "autocast: bf16 -> off",
                                      "object_batch: 64 -> 1", "tf32: True -> False"]
    assert differences(CPU, dataclasses.replace(CPU, sam2="1.2.0", torch="9.9")) == ["torch: " + torch.__version__
                                                                                     + " -> 9.9", "sam2: 1.1.0 -> 1.2.0"]
    # at launch: a SLURM job that will get some GPU; unknown fields are not compared, a known kind is
    launch_gpu = dataclasses.replace(CPU, device_class=CUDA_UNKNOWN, device_name=None, autocast=None,
                                     object_batch=None, tf32=None)
    assert differences(H100, launch_gpu) == []
    assert differences(CPU, launch_gpu) == ["device_class: cpu -> cuda"]
    assert differences(CPU, dataclasses.replace(CPU, checkpoint_sha256=None)) == [f"checkpoint_sha256: {'a' * 64} -> None"]


def test_launch_numerics_from_the_config(demo_config, fast_overrides, random_checkpoint):
    local = of_launch(load_config(demo_config, fast_overrides))
    assert (local.device_class, local.autocast, local.object_batch, local.tf32, local.compile) == ("cpu", "off", 1,
                                                                                                  False, False)
    assert (local.torch, local.sam2, local.checkpoint_sha256) == (torch.__version__, installed_sam2_version(),
                                                                  sha256_of(random_checkpoint))
    gpu_job = of_launch(load_config(demo_config, [*fast_overrides, "model.device=auto"], profile="a100"))
    assert (gpu_job.device_class, gpu_job.autocast, gpu_job.object_batch) == (CUDA_UNKNOWN, None, None)
    cpu_job = of_launch(load_config(demo_config, fast_overrides, profile="cpu-debug"))
    assert (cpu_job.device_class, cpu_job.object_batch) == ("cpu", 1)


def test_first_commit_claims_the_reference_and_a_racing_worker_is_refused(tmp_path):
    paths = RunPaths.of(tmp_path).ensure()
    paths.snapshot.write_text("{}")
    plan = types.SimpleNamespace(paths=paths)
    claim_reference(plan, H100)
    claim_reference(plan, H100)  # the same numerics: nothing to say
    with pytest.raises(NumericsMismatchError, match=r"device_class: cuda-sm90 -> cpu.*--allow-mixed-numerics"):
        claim_reference(plan, CPU)  # passed its start check before the file existed, then lost the race
    assert read_reference(paths) == H100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".numerics")] == []


def _two_image_run(tmp_path, demo_config, fast_overrides, checkpoint):
    media = tmp_path / "media"
    media.mkdir()
    images = [make_image(media / f"im{i}.png", 96, 72, seed=i) for i in range(2)]  # two items, not a frame folder
    assert main(["manifest", "build", *map(str, images), "-o", str(tmp_path / "m.parquet")]) == 0
    cfg = load_config(demo_config, [*fast_overrides, f"model.checkpoint={checkpoint}", "plan.max_items_per_shard=1",
                                          "prompt.points_per_side=4"])
    out = tmp_path / "run"
    plan = prepare_run(out, read_manifest(str(tmp_path / "m.parquet")), cfg)
    assert len(plan.shards) == 2
    return out, plan


def _items(paths: RunPaths, shard_id: int) -> list[dict]:
    return read_shard_table(paths, shard_id, "items", ITEMS_SCHEMA).to_pylist()


def test_relaunch_with_other_numerics_is_refused_unless_allowed(tmp_path, demo_config, fast_overrides,
                                                                random_checkpoint, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(random_checkpoint, ckpt)
    out, plan = _two_image_run(tmp_path, demo_config, fast_overrides, ckpt)
    run_shard(str(out), 0)
    (row,) = _items(plan.paths, 0)
    first = read_reference(plan.paths)
    assert first is not None and first.checkpoint_sha256 == sha256_of(ckpt)
    # every item row says what it was computed with
    assert {k: row[k] for k in ("device_class", "autocast", "object_batch", "tf32", "compile", "torch_version",
                                "sam2_version", "checkpoint_sha256")} == {
        "device_class": "cpu", "autocast": "off", "object_batch": 1, "tf32": False, "compile": False,
        "torch_version": torch.__version__, "sam2_version": installed_sam2_version(),
        "checkpoint_sha256": sha256_of(ckpt)}
    assert row["device_name"] == first.device_name

    # The run was begun on an H100 (as its worker would have recorded): this CPU worker refuses before any item.
    reference = json.loads(plan.paths.numerics.read_text())
    plan.paths.numerics.write_text(json.dumps({**reference, "numerics": dataclasses.asdict(
        dataclasses.replace(first, device_class="cuda-sm90", autocast="bf16", tf32=True))}))
    with pytest.raises(NumericsMismatchError, match="device_class: cuda-sm90 -> cpu"):
        run_shard(str(out), 1)
    assert _items(plan.paths, 1) == []
    plan.paths.numerics.write_text(json.dumps(reference))

    # Another sam2 (allowed to load by its override): refused at the CLI before launching
    with monkeypatch.context() as m:
        m.setattr(sam2_pin, "installed_sam2_version", lambda: "1.2.0")
        m.setenv(sam2_pin.ALLOW_ENV, "1.2.0")
        capsys.readouterr()
        assert main(["resume", str(out)]) == 2
        assert f"sam2: {first.sam2} -> 1.2.0" in capsys.readouterr().err

    # Other weights under the same path (the config is the same): refused at the CLI before launching
    _replace_checkpoint(ckpt)
    capsys.readouterr()
    assert main(["resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint_sha256: {first.checkpoint_sha256} -> {sha256_of(ckpt)}" in err
    assert "--allow-mixed-numerics" in err and "same device class" in err
    assert _items(plan.paths, 1) == []

    # allowed: recorded in run.json for good, shown by status, each row says its own numerics
    assert main(["resume", str(out), "--allow-mixed-numerics"]) == 0
    assert json.loads(plan.paths.snapshot.read_text())[ALLOW_KEY]["command"] == "resume"
    assert [r["checkpoint_sha256"] for r in _items(plan.paths, 1)] == [sha256_of(ckpt)]
    assert read_reference(plan.paths) == first  # the reference stays the run's first numerics
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MIXED NUMERICS ALLOWED (resume --allow-mixed-numerics" in text and "numerics: cpu (" in text


def _replace_checkpoint(path):
    """Other random weights saved over the file (the same architecture, another seed)."""
    make_random_checkpoint(ModelConfig(image_size=IMAGE_SIZE, seed=1), path)


def test_a_checkpoint_is_not_continued_under_other_numerics(tmp_path, demo_config, fast_overrides):
    media = tmp_path / "media"
    media.mkdir()
    make_image(media / "im.png", 96, 72)
    main(["manifest", "build", str(media), "-o", str(tmp_path / "m.parquet")])
    cfg = load_config(demo_config, [*fast_overrides, "store.frames_per_file=1", "store.checkpoint_seconds=0"])
    plan = prepare_run(tmp_path / "run", read_manifest(str(tmp_path / "m.parquet")), cfg)
    item = next(iter(plan.items.values()))
    saved = _partial_item(plan, item, 8, 72, 96, CPU.key())
    saved.start()
    saved.progress.write_text(json.dumps({"key": saved.key, "next_frame": 4, "rows": [], "state": "state.pt"}))
    other = _partial_item(plan, item, 8, 72, 96, H100.key())
    assert other.key != saved.key
    assert other.start() is None  # discarded: starts again from frame 0
    assert not other.progress.exists()
