"""The pipeline's masklets equal the plain sam2 flow's on a JPEG frame folder.

Plain flow (as sam2's README/notebooks do it): SAM2AutomaticMaskGenerator on frame 0 read with PIL, then
SAM2VideoPredictor.init_state on the folder, add_new_mask per mask, propagate_in_video. Same checkpoint
(a seeded random-weight file loaded by both through sam2's loader), same seed, same thread count, same AMG
settings. The pipeline decodes frames itself and feeds them lazily, preprocessing exactly as sam2's JPEG
loader does, so the masks must be identical, not merely close.

With `prompt.share_features=false` the AMG is sam2's stock one. With the default (true) the pipeline's AMG
reads frame 0 as sam2's video loader preprocesses it, so that tracking can reuse its features; the plain flow
then gives sam2's AMG that same frame, taken from sam2's own video loader.

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
from pipeline.stages.prompt import amg_kwargs, select_records
from tests.conftest import IMAGE_SIZE, THREADS


class _VideoLoaderFrame:
    """SAM2ImagePredictor's transforms, except that the image itself is replaced by frame 0 as sam2's own
    video loader preprocesses it (coordinates and mask post-processing stay sam2's)."""

    def __init__(self, transforms, frame: torch.Tensor):
        self.transforms, self.frame = transforms, frame

    def __call__(self, image):
        return self.frame

    def __getattr__(self, name):
        return getattr(self.transforms, name)


_CONFIG_FILE = MODEL_SPECS["sam2.1_hiera_tiny"].config_file
# Past sam2's memory window (num_maskmem=7: the prompt frame and the 6 latest), so that the frames where old
# memories are dropped and object pointers age are compared too. Only the default flow runs that long:
# share_features changes frame 0's AMG alone, so 6 frames compare the stock AMG's prompts (CI time).
LONG_FRAMES, SHORT_FRAMES = 16, 6
# Fewer objects than the demo's 8 keep this CI test's time modest (it tracks frames x objects twice: pipeline and plain flow).
MAX_OBJECTS = 4
_OVERRIDES = [f"++model.image_size={IMAGE_SIZE}"]


def _plain_amg(folder, checkpoint, prompt_cfg, video_loader_frame: bool) -> list[dict]:
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2
    from sam2.utils.misc import load_video_frames_from_jpg_images

    torch.set_num_threads(THREADS)
    image_model = build_sam2(_CONFIG_FILE, checkpoint, device="cpu", hydra_overrides_extra=_OVERRIDES)
    amg = SAM2AutomaticMaskGenerator(image_model, **amg_kwargs(prompt_cfg))
    s = IMAGE_SIZE
    amg.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    if video_loader_frame:
        frames, _, _ = load_video_frames_from_jpg_images(str(folder), s, offload_video_to_cpu=True,
                                                         compute_device=torch.device("cpu"))
        amg.predictor._transforms = _VideoLoaderFrame(amg.predictor._transforms, frames[0])
    frame0 = np.array(Image.open(folder / "00000.jpg").convert("RGB"))
    return select_records(amg.generate(frame0), prompt_cfg)


def _plain_sam2_flow(folder, checkpoint, prompt_cfg):
    from sam2.build_sam import build_sam2_video_predictor

    records = _plain_amg(folder, checkpoint, prompt_cfg, video_loader_frame=prompt_cfg.share_features)
    predictor = build_sam2_video_predictor(_CONFIG_FILE, checkpoint, device="cpu", hydra_overrides_extra=_OVERRIDES)
    predictor.fill_hole_area = 0  # needs sam2's CUDA extension; without it sam2 skips it (and warns per frame)
    state = predictor.init_state(video_path=str(folder))
    for obj_id, r in enumerate(records):
        predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=r["segmentation"])
    out = {}
    with torch.inference_mode():
        for t, obj_ids, masks in predictor.propagate_in_video(state):
            out[t] = (list(obj_ids), (masks[:, 0] > 0.0).numpy())
    return records, out


@pytest.mark.parametrize("share_features", [True, False])
def test_pipeline_equals_plain_sam2_on_jpeg_folder(tmp_path, demo_config, fast_overrides, random_checkpoint,
                                                   share_features):
    frames = LONG_FRAMES if share_features else SHORT_FRAMES
    folder = Path(make_frame_folder(tmp_path / "media" / "clip", frames=frames, width=160, height=120, ext="jpg", seed=3))
    assert main(["manifest", "build", str(tmp_path / "media"), "-o", str(tmp_path / "m.parquet")]) == 0
    out = tmp_path / "run"
    overrides = [*fast_overrides, f"prompt.share_features={str(share_features).lower()}",
                 f"prompt.max_objects={MAX_OBJECTS}"]
    assert main(["run", "--manifest", str(tmp_path / "m.parquet"), "--out", str(out), "--config", demo_config,
                 *overrides]) == 0
    cfg = load_config(demo_config, overrides)
    assert cfg.prompt.share_features is share_features
    records, plain = _plain_sam2_flow(folder, random_checkpoint, cfg.prompt)
    assert len(records) >= 3, "the test needs several objects to mean anything"

    res = open_run(out)
    (item_id,) = res.item_ids()
    masks = res.masks(item_id)[:]
    assert masks.shape == (len(records), frames, 120, 160)
    assert sorted(plain) == list(range(frames))
    for t, (obj_ids, plain_masks) in plain.items():
        assert obj_ids == list(range(len(records)))
        np.testing.assert_array_equal(masks[:, t], plain_masks, err_msg=f"frame {t} differs from plain sam2")
    # Equal empty masks would prove nothing: most masklet-frames hold pixels, also past the memory window.
    filled = masks.any(axis=(2, 3))  # (objects, frames)
    assert filled.mean() >= 0.75, f"only {filled.mean():.0%} of masklet-frames are non-empty: {filled.sum(0)}"
    assert filled[:, 7:].any(axis=0).all(), f"frames past the memory window with no mask: {filled.sum(0)}"
    # The prompts themselves are the AMG's masks on frame 0.
    ml = res.masklets.sort_by("object_id").to_pylist()
    for row, r in zip(ml, records):
        assert row["prompt_area"] == int(np.asarray(r["segmentation"]).sum())
        assert row["predicted_iou"] == pytest.approx(r["predicted_iou"], rel=1e-6)
    if share_features:  # else this test could not tell the two preprocessings apart
        stock = _plain_amg(folder, random_checkpoint, cfg.prompt, video_loader_frame=False)
        assert [r["predicted_iou"] for r in stock] != [r["predicted_iou"] for r in records]


def test_phase_two_propagation_equals_plain_sam2_given_sam1_masks(tmp_path, demo_config, fast_overrides,
                                                                  random_checkpoint):
    """Phase 2 (configs/phases/phase2.yaml: SAM 1's automatic masks on frame 0 as SAM 2's mask prompts): the
    pipeline's masklets equal sam2's plain flow given the same SAM 1 masks (SAM 1's generator is itself
    bit-identical to segment-anything's own: tests/test_sam1.py). Both random-weight models, labelled so."""
    from pipeline.stages.sam1 import load_sam1, make_sam1_generator
    from sam2.build_sam import build_sam2_video_predictor

    frames = SHORT_FRAMES
    folder = Path(make_frame_folder(tmp_path / "media" / "clip", frames=frames, width=160, height=120, ext="jpg", seed=3))
    assert main(["manifest", "build", str(tmp_path / "media"), "-o", str(tmp_path / "m.parquet")]) == 0
    out = tmp_path / "run"
    # Random SAM 1 weights give near-whole-frame masks that box NMS collapses into one: NMS off keeps several.
    overrides = [*fast_overrides, "prompt.generator=sam1", "sam1.random_weights=true", "sam1.image_size=64",
                 "prompt.mask_threshold=0.0", "prompt.box_nms_thresh=1.0", f"prompt.max_objects={MAX_OBJECTS}"]
    assert main(["run", "--manifest", str(tmp_path / "m.parquet"), "--out", str(out), "--config", demo_config,
                 *overrides]) == 0
    cfg = load_config(demo_config, overrides)
    torch.set_num_threads(THREADS)
    frame0 = np.array(Image.open(folder / "00000.jpg").convert("RGB"))
    records = select_records(make_sam1_generator(load_sam1(cfg.sam1, cfg.model), cfg.prompt).generate(frame0),
                             cfg.prompt)
    assert len(records) >= 2, "the test needs several objects to mean anything"
    predictor = build_sam2_video_predictor(_CONFIG_FILE, random_checkpoint, device="cpu",
                                           hydra_overrides_extra=_OVERRIDES)
    predictor.fill_hole_area = 0
    state = predictor.init_state(video_path=str(folder))
    for obj_id, r in enumerate(records):
        predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=r["segmentation"])
    res = open_run(out)
    assert res.random_weights
    (item_id,) = res.item_ids()
    masks = res.masks(item_id)[:]
    assert masks.shape == (len(records), frames, 120, 160)
    assert [r["prompt_source"] for r in res.masklets.to_pylist()] == ["sam1"] * len(records)
    with torch.inference_mode():
        for t, obj_ids, plain in predictor.propagate_in_video(state):
            np.testing.assert_array_equal(masks[:, t], (plain[:, 0] > 0.0).numpy(), err_msg=f"frame {t}")
    assert masks.any(axis=(2, 3)).mean() >= 0.5
