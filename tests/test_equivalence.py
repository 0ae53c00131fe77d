"""The pipeline's masklets equal the plain sam2 flow's on a JPEG frame folder.

Plain flow (as sam2's README/notebooks do it): SAM2AutomaticMaskGenerator on frame 0 read with PIL, then
SAM2VideoPredictor.init_state on the folder, add_new_mask per mask, propagate_in_video. Same checkpoint
(a seeded random-weight file loaded by both through sam2's loader), same seed, same thread count, same AMG
settings. The pipeline decodes frames itself and feeds them lazily, preprocessing exactly as sam2's JPEG
loader does, so the masks must be identical, not merely close.

The one shared piece is `select_records` (our rule for which AMG masks seed masklets: minimum area, best
first, at most max_objects); it picks among sam2's outputs and runs no model code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import load_config, open_run
from pipeline.cli import main
from pipeline.samples import make_frame_folder
from pipeline.stages.models import MODEL_SPECS
from pipeline.stages.prompt import select_records
from tests.conftest import IMAGE_SIZE, THREADS


def _plain_sam2_flow(folder, checkpoint, prompt_cfg):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    torch.set_num_threads(THREADS)
    config_file = MODEL_SPECS["sam2.1_hiera_tiny"].config_file
    overrides = [f"++model.image_size={IMAGE_SIZE}"]
    image_model = build_sam2(config_file, checkpoint, device="cpu", hydra_overrides_extra=overrides)
    kwargs = {k: v for k, v in prompt_cfg.__dict__.items() if k not in ("min_area", "max_objects")}
    amg = SAM2AutomaticMaskGenerator(image_model, **kwargs)
    s = IMAGE_SIZE
    amg.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    frame0 = np.array(Image.open(folder / "00000.jpg").convert("RGB"))
    records = select_records(amg.generate(frame0), prompt_cfg)

    predictor = build_sam2_video_predictor(config_file, checkpoint, device="cpu", hydra_overrides_extra=overrides)
    predictor.fill_hole_area = 0  # needs sam2's CUDA extension; without it sam2 skips it (and warns per frame)
    state = predictor.init_state(video_path=str(folder))
    for obj_id, r in enumerate(records):
        predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=r["segmentation"])
    out = {}
    with torch.inference_mode():
        for t, obj_ids, masks in predictor.propagate_in_video(state):
            out[t] = (list(obj_ids), (masks[:, 0] > 0.0).numpy())
    return records, out


def test_pipeline_equals_plain_sam2_on_jpeg_folder(tmp_path, demo_config, fast_overrides, random_checkpoint):
    folder = Path(make_frame_folder(tmp_path / "media" / "clip", frames=6, width=160, height=120, ext="jpg", seed=3))
    assert main(["manifest", "build", str(tmp_path / "media"), "-o", str(tmp_path / "m.parquet")]) == 0
    out = tmp_path / "run"
    assert main(["run", "--manifest", str(tmp_path / "m.parquet"), "--out", str(out), "--config", demo_config,
                 *fast_overrides]) == 0
    cfg = load_config(demo_config, fast_overrides)
    records, plain = _plain_sam2_flow(folder, random_checkpoint, cfg.prompt)
    assert len(records) >= 3, "the test needs several objects to mean anything"

    res = open_run(out)
    (item_id,) = res.item_ids()
    masks = res.masks(item_id)[:]
    assert masks.shape == (len(records), 6, 120, 160)
    for t, (obj_ids, plain_masks) in plain.items():
        assert obj_ids == list(range(len(records)))
        np.testing.assert_array_equal(masks[:, t], plain_masks, err_msg=f"frame {t} differs from plain sam2")
    # The prompts themselves are the AMG's masks on frame 0.
    ml = res.masklets.sort_by("object_id").to_pylist()
    for row, r in zip(ml, records):
        assert row["prompt_area"] == int(np.asarray(r["segmentation"]).sum())
        assert row["predicted_iou"] == pytest.approx(r["predicted_iou"], rel=1e-6)
