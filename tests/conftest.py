"""Shared fixtures: a seeded random-weight SAM 2.1 tiny checkpoint (real architecture, saved to disk and
loaded back through the real loading code) and the overrides that make runs fast on a CPU.

Masks from random weights prove plumbing, not quality."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

IMAGE_SIZE = 256
THREADS = 2

# Every test process pins the thread count: SAM 2 outputs are bit-identical across runs only then.
torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> str:
    from pipeline.config import ModelConfig
    from pipeline.stages.models import random_checkpoint as make

    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny_random_seed0_256.pt"
    make(ModelConfig(image_size=IMAGE_SIZE, seed=0), path)
    return str(path)


@pytest.fixture(scope="session")
def fast_overrides(random_checkpoint) -> list[str]:
    """Config overrides on top of configs/random-demo.yaml: load the random checkpoint from disk."""
    return [f"model.checkpoint={random_checkpoint}", f"model.image_size={IMAGE_SIZE}", f"model.threads={THREADS}"]


@pytest.fixture(scope="session")
def demo_config() -> str:
    return os.path.join(os.path.dirname(__file__), "..", "configs", "random-demo.yaml")


# Tests against the real single-node SLURM cluster (jobs/slurm/cluster.sh up; CI starts it).
NEEDS_SLURM_CLUSTER = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch is not on PATH (no SLURM client installed)"),
    pytest.mark.skipif(
        os.environ.get("MASKLET_SLURM") != "1",
        reason="set MASKLET_SLURM=1 after `jobs/slurm/cluster.sh up` to run tests against the local SLURM cluster",
    ),
]


def needs_slurm_cluster(test):
    """NEEDS_SLURM_CLUSTER for one test of a module whose other tests run without the cluster."""
    for mark in NEEDS_SLURM_CLUSTER:
        test = mark(test)
    return test


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, demo_config, fast_overrides) -> str:
    """A real random-weight run folder, small enough for the tests that read a whole run (the report in a
    browser, the notebooks): a 5-frame video and an image, up to 8 masklets each."""
    from pipeline.cli import main
    from pipeline.samples import make_image, make_video

    root = tmp_path_factory.mktemp("small_run")
    make_video(root / "media" / "clip.mp4", frames=5, width=160, height=120, seed=1)
    make_image(root / "media" / "photo.jpg", width=200, height=150, seed=4)
    manifest = root / "manifest.parquet"
    assert main(["manifest", "build", str(root / "media"), "-o", str(manifest)]) == 0
    out = root / "run"
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides]) == 0
    return str(out)



@pytest.fixture
def small_run_copy(small_run, tmp_path) -> str:
    """A private copy of `small_run` for a test that writes into its run folder (a review): the other tests
    read small_run as it was made."""
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    return str(out)

# The data engine's three presets (configs/phases/), on tiny random-weight models: SAM 2.1 tiny at IMAGE_SIZE,
# SAM 1 vit_b at 64 px; the generators' filters opened as in random-demo.yaml (SAM 1's has no mask_threshold).
PHASE_OVERRIDES = ["prompt.pred_iou_thresh=0.0", "prompt.stability_score_thresh=0.0", "prompt.min_mask_region_area=0",
                   "prompt.min_area=16", "prompt.points_per_side=4", "prompt.max_objects=6", "decode.target_fps=null",
                   "sam1.random_weights=true", "sam1.image_size=64", "prompt.reseed_every=4",
                   "prompt.reseed_min_area=16", "propagate.reverse_frames=3", "store.frames_per_file=4",
                   "local.workers=0"]


@pytest.fixture(scope="session")
def phase_runs(tmp_path_factory, fast_overrides) -> str:
    """A folder with one run per preset (phase1, phase2, phase3) on the same 10-frame clip, random weights;
    re-seeding every 4 frames in phases 2 and 3 (phase 3's preset tracks re-seeded masklets backwards)."""
    from pipeline.cli import main
    from pipeline.samples import make_video

    root = tmp_path_factory.mktemp("phase_runs")
    make_video(root / "media" / "clip.mp4", frames=10, width=128, height=96, seed=5)
    manifest = root / "manifest.parquet"
    assert main(["manifest", "build", str(root / "media"), "-o", str(manifest)]) == 0
    configs = os.path.join(os.path.dirname(__file__), "..", "configs", "phases")
    for phase in (1, 2, 3):
        extra = ["prompt.reseed_every=null"] if phase == 1 else []
        assert main(["run", "--manifest", str(manifest), "--out", str(root / "runs" / f"phase{phase}"), "--config",
                     os.path.join(configs, f"phase{phase}.yaml"), *fast_overrides, *PHASE_OVERRIDES, *extra]) == 0
    return str(root / "runs")


DAVIS_SEQUENCES = ("blobs", "boxes")
DAVIS_FRAMES, DAVIS_W, DAVIS_H = 6, 96, 64
DAVIS_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)


def davis_gt_ids(seq: int, frame: int):
    """The GT of sequence `seq` on `frame`: uint8 (H, W) palette ids, 0 background, 1 a disc moving right,
    2 a box moving right and down (they never overlap)."""
    import numpy as np

    y, x = np.mgrid[0:DAVIS_H, 0:DAVIS_W]
    ids = np.zeros((DAVIS_H, DAVIS_W), np.uint8)
    ids[(x - (18 + 4 * frame + 6 * seq)) ** 2 + (y - 20) ** 2 <= 100] = 1
    ids[(x >= 48 + 3 * frame) & (x < 68 + 3 * frame) & (y >= 30 + seq + frame) & (y < 50 + seq + frame)] = 2
    return ids


def make_davis_dataset(root) -> str:
    """A tiny DAVIS-layout dataset: JPEGImages/480p/<seq>/00000.jpg ... (the sample scene) and
    Annotations/480p/<seq>/00000.png ... (palette PNGs of `davis_gt_ids`), two sequences of 6 frames."""
    from pathlib import Path

    from PIL import Image

    from pipeline.samples import draw_frame

    root = Path(root)
    for s, seq in enumerate(DAVIS_SEQUENCES):
        media, ann = root / "JPEGImages" / "480p" / seq, root / "Annotations" / "480p" / seq
        media.mkdir(parents=True)
        ann.mkdir(parents=True)
        for i in range(DAVIS_FRAMES):
            Image.fromarray(draw_frame(i, DAVIS_W, DAVIS_H, seed=s, frames=DAVIS_FRAMES)).save(
                media / f"{i:05d}.jpg", quality=95)
            im = Image.fromarray(davis_gt_ids(s, i), mode="P")
            im.putpalette(DAVIS_PALETTE)
            im.save(ann / f"{i:05d}.png")
    return str(root)


@pytest.fixture(scope="session")
def davis_run(tmp_path_factory, demo_config, fast_overrides) -> tuple[str, str]:
    """(dataset root, run folder): a random-weight run on a tiny DAVIS-layout dataset whose manifest was built
    on the dataset root (so the run's manifest copy names each sequence's GT). Shared by the evaluate tests
    and the export-and-evaluate notebook; its scores are plumbing checks, not results."""
    from pipeline.cli import main

    base = tmp_path_factory.mktemp("davis_run")
    root = make_davis_dataset(base / "DAVIS")
    manifest = base / "manifest.parquet"
    assert main(["manifest", "build", root, "-o", str(manifest)]) == 0
    out = base / "run"
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides]) == 0
    return root, str(out)
