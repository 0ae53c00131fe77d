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
