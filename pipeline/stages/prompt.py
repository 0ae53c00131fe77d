"""Automatic grid-point prompting on a keyframe with SAM 2's automatic mask generator (AMG).

Turns the AMG's records into `Prompt`s: filtered by minimum area, capped at `max_objects` (best first by
predicted IoU x stability; ties keep AMG order), numbered 0..n-1 in that order (the masklets' stable ids).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.config import PromptConfig
from pipeline.records import Prompt
from pipeline.stages.models import LoadedModel

# Our own keys; every other PromptConfig field is a SAM2AutomaticMaskGenerator argument of the same name.
_OWN_KEYS = {"min_area", "max_objects"}


def make_generator(model: LoadedModel, cfg: PromptConfig):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    kwargs = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OWN_KEYS}
    generator = SAM2AutomaticMaskGenerator(model.predictor, **kwargs)
    # SAM2ImagePredictor hard-codes the backbone feature sizes of a 1024 model; derive them from the
    # model's image size so reduced-size models (tests, demos) work.
    s = model.image_size
    generator.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return generator


def select_records(records: list[dict], cfg: PromptConfig) -> list[dict]:
    """The rule that turns AMG output into masklet seeds (shared with the equivalence test's plain flow)."""
    kept = [r for r in records if int(r["area"]) >= cfg.min_area]
    order = sorted(range(len(kept)), key=lambda i: -(kept[i]["predicted_iou"] * kept[i]["stability_score"]))
    return [kept[i] for i in order[: cfg.max_objects]]


def prompts_from_records(records: list[dict], frame: int) -> list[Prompt]:
    prompts = []
    for object_id, r in enumerate(records):
        mask = np.asarray(r["segmentation"], dtype=bool)
        x, y, w, h = (int(round(v)) for v in r["bbox"])
        px, py = r["point_coords"][0]
        prompts.append(
            Prompt(
                object_id=object_id,
                frame=frame,
                mask=mask,
                point=(float(px), float(py)),
                predicted_iou=float(r["predicted_iou"]),
                stability_score=float(r["stability_score"]),
                area=int(mask.sum()),
                bbox=(x, y, w, h),
            )
        )
    return prompts


def prompt_keyframe(generator, rgb: np.ndarray, cfg: PromptConfig, frame: int = 0) -> list[Prompt]:
    """Run the AMG on one RGB uint8 frame and return the selected prompts."""
    records = generator.generate(rgb)
    return prompts_from_records(select_records(records, cfg), frame)
