"""The random-weights label follows the weights that were loaded, not the config flag: a checkpoint saved by
`random_checkpoint` carries a marker, and whatever loads it says "random" in item rows, mask attributes,
`masklet status` and `open_run(...).random_weights`, even under the default config."""
from __future__ import annotations

import pytest
import torch

from pipeline import open_run
from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.samples import make_image
from pipeline.stages.models import RANDOM_WEIGHTS_KEY, load_model
from tests.conftest import IMAGE_SIZE, THREADS

# The default config (model.random_weights=false), made quick: a small model input, a coarse grid, and the
# AMG filters opened so that random weights keep some masks (their attributes are checked).
_QUICK = [f"model.image_size={IMAGE_SIZE}", f"model.threads={THREADS}", "model.device=cpu",
          "prompt.points_per_side=4", "prompt.pred_iou_thresh=0", "prompt.stability_score_thresh=0",
          "prompt.min_mask_region_area=0", "prompt.max_objects=2"]


@pytest.fixture(scope="module")
def unmarked_checkpoint(random_checkpoint, tmp_path_factory) -> str:
    """The same weights saved without the marker: what a real checkpoint looks like to the loader."""
    saved = torch.load(random_checkpoint, map_location="cpu", weights_only=True)
    assert RANDOM_WEIGHTS_KEY in saved
    path = tmp_path_factory.mktemp("real") / "looks_real.pt"
    torch.save({"model": saved["model"]}, path)
    return str(path)


def test_marker_decides_the_label_and_the_file_loads_weights_only(random_checkpoint, unmarked_checkpoint):
    saved = torch.load(random_checkpoint, map_location="cpu", weights_only=True)
    assert saved[RANDOM_WEIGHTS_KEY]["seed"] == 0 and saved[RANDOM_WEIGHTS_KEY]["image_size"] == IMAGE_SIZE
    marked = load_model(ModelConfig(checkpoint=random_checkpoint, image_size=IMAGE_SIZE, device="cpu"))
    assert marked.random_weights and "RANDOM WEIGHTS" in marked.label
    unmarked = load_model(ModelConfig(checkpoint=unmarked_checkpoint, image_size=IMAGE_SIZE, device="cpu"))
    assert not unmarked.random_weights and "RANDOM" not in unmarked.label
    # A config that says random is still believed for an unmarked file (an older random file): the safe side.
    older = load_model(ModelConfig(checkpoint=unmarked_checkpoint, random_weights=True, image_size=IMAGE_SIZE,
                                   device="cpu"))
    assert older.random_weights


def _run_default_config(tmp_path, checkpoint: str):
    make_image(tmp_path / "media" / "photo.jpg", width=96, height=72, seed=5)
    manifest = tmp_path / "m.parquet"
    assert main(["manifest", "build", str(tmp_path / "media"), "-o", str(manifest)]) == 0
    out = tmp_path / "run"
    assert main(["run", "--manifest", str(manifest), "--out", str(out), f"model.checkpoint={checkpoint}",
                 *_QUICK]) == 0
    res = open_run(out)
    assert res.plan.config.model.random_weights is False  # the default config: the flag says real weights
    (row,) = res.items.to_pylist()
    assert row["status"] == "done", row["error"]
    assert row["num_objects"] >= 1, "the opened filters should keep a mask, so that its attributes exist"
    return out, res, row


@pytest.mark.parametrize("marked", [True, False], ids=["random-checkpoint", "unmarked-checkpoint"])
def test_label_follows_the_loaded_checkpoint_under_the_default_config(tmp_path, capsys, random_checkpoint,
                                                                      unmarked_checkpoint, marked):
    out, res, row = _run_default_config(tmp_path, random_checkpoint if marked else unmarked_checkpoint)
    assert row["random_weights"] is marked
    attrs = res.masks(row["item_id"]).attrs
    assert attrs["random_weights"] is marked
    assert ("RANDOM WEIGHTS" in attrs["model"]) is marked
    assert res.random_weights is marked
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert ("RANDOM WEIGHTS" in capsys.readouterr().out) is marked
