"""Automatic grid-point prompting on a keyframe with SAM 2's automatic mask generator (AMG).

Turns the AMG's records into `Prompt`s: filtered by minimum area, capped at `max_objects` (best first by
predicted IoU x stability; ties keep AMG order), numbered 0..n-1 in that order (the masklets' stable ids).

Shared features (`PromptConfig.share_features`, the default): the AMG reads the keyframe preprocessed exactly
as tracking preprocesses frames (sam2's video loader: PIL resize), and the image encoder's output on it is
kept (`KeyframeFeatures`) for tracking, which then does not encode that frame again. sam2's image predictor
would resize with torchvision instead, a slightly different image, so its features could not be reused
without changing the tracked masks. Off, the AMG is sam2's stock one, bit for bit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.config import PromptConfig
from pipeline.records import Prompt
from pipeline.stages.models import LoadedModel, patched_method
from pipeline.stages.sam2_pin import require_sam2

# Our own keys; every other PromptConfig field is a SAM2AutomaticMaskGenerator argument of the same name.
_OWN_KEYS = {"min_area", "max_objects", "share_features", "generator", "every_frame", "link_iou", "reseed_every",
             "reseed_adaptive", "reseed_uncovered", "reseed_min_area", "reseed_min_area_share", "reseed_nms_iou",
             "hotstart_frames", "hotstart_min", "dup_iou"}


def amg_kwargs(cfg: PromptConfig) -> dict:
    """The SAM2AutomaticMaskGenerator arguments among `cfg`'s fields."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OWN_KEYS}


@dataclass
class KeyframeFeatures:
    """A keyframe as tracking preprocesses it and the image encoder's output on it, computed once by the AMG
    and handed to `track(..., keyframe=...)` (sam2's `cached_features` entry for that frame)."""

    frame: int
    image: torch.Tensor  # (1, 3, S, S) on the model's device, normalised
    backbone_out: dict  # SAM2Base.forward_image's output


class _VideoTransforms:
    """SAM2ImagePredictor's transforms with the image's own preprocessing replaced by the video loader's
    (pipeline.stages.track.preprocess_frame_numpy); coordinates and mask post-processing are unchanged."""

    def __init__(self, transforms, image_size: int):
        self._transforms = transforms
        self._image_size = image_size

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        from pipeline.stages.track import preprocess_frame_numpy

        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
            raise TypeError(f"shared features need an RGB uint8 (H, W, 3) array, got "
                            f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
        return preprocess_frame_numpy(np.ascontiguousarray(image), self._image_size)

    def __getattr__(self, name: str):
        return getattr(self._transforms, name)


def make_generator(model: LoadedModel, cfg: PromptConfig):
    require_sam2()
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    generator = SAM2AutomaticMaskGenerator(model.predictor, **amg_kwargs(cfg))
    # SAM2ImagePredictor hard-codes the backbone feature sizes of a 1024 model; derive them from the
    # model's image size so reduced-size models (tests, demos) work.
    s = model.image_size
    generator.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    if cfg.share_features:
        generator.predictor._transforms = _VideoTransforms(generator.predictor._transforms, s)
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


def prompt_and_encode_keyframe(generator, rgb: np.ndarray, cfg: PromptConfig,
                               frame: int = 0) -> tuple[list[Prompt], KeyframeFeatures | None]:
    """Run the AMG on one RGB uint8 frame; returns the selected prompts and, with `cfg.share_features`, the
    keyframe's features for tracking (None without). The AMG encodes the whole frame first (its first crop
    box is the full image), so that is the call kept; later calls (crop layers) are crops."""
    if not cfg.share_features:
        return prompts_from_records(select_records(generator.generate(rgb), cfg), frame), None
    kept: list[tuple[torch.Tensor, dict]] = []

    def keeping_the_first(encode: Callable) -> Callable:
        def encode_and_keep(image: torch.Tensor) -> dict:
            out = encode(image)
            if not kept:
                kept.append((image, out))
            return out
        return encode_and_keep

    with patched_method(generator.predictor.model, "forward_image", keeping_the_first):
        records = generator.generate(rgb)
    prompts = prompts_from_records(select_records(records, cfg), frame)
    if not kept:  # the AMG never encoded the frame (it does for any non-empty image)
        return prompts, None
    image, backbone_out = kept[0]
    return prompts, KeyframeFeatures(frame, image, backbone_out)
