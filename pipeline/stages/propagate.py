"""SAM 2 video propagation of prompted masks through an item's frames.

The only user of SAM2VideoPredictor's inference state (an untyped dict of sam2's): it is built here, fresh
per item, and never leaves this module; callers get `FrameMasks` records.

Frames are fed lazily: sam2's `init_state` would read the whole video into memory up front (about 12 MiB
per frame at 1024), so we build the state around a lazy image sequence that preprocesses each frame
exactly as sam2's frame loader does (PIL resize to the model size, /255, ImageNet mean/std) when the model
first asks for it, and keeps only the last few.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline.records import FrameMasks, Prompt
from pipeline.stages.models import LoadedModel

_IMG_MEAN = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
_IMG_STD = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]


def preprocess_frame(rgb: np.ndarray, image_size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> normalised float32 (3, S, S), bit-identical to sam2's JPEG-folder loader."""
    resized = np.array(Image.fromarray(rgb).resize((image_size, image_size)))
    img = torch.empty((3, image_size, image_size), dtype=torch.float32)
    img[:] = torch.from_numpy(resized / 255.0).permute(2, 0, 1)  # float64 -> float32, as sam2 does
    img -= _IMG_MEAN
    img /= _IMG_STD
    return img


class MediaEnded(IndexError):
    """The media yielded fewer frames than probed (headers can overstate frame counts)."""


class LazyFrames:
    """A sequence sam2 can index (`images[t]`) that pulls frames from an iterator on demand.

    sam2 asks for frames in order (the prompt frame, then each next frame); we keep a small window of
    preprocessed frames so repeated requests for the current frame are free, and fail loudly if asked to go
    back further than that (it would mean the access pattern changed under us)."""

    def __init__(self, frames: Iterable[np.ndarray], num_frames: int, image_size: int, keep: int = 2):
        self._it = iter(frames)
        self._n = num_frames
        self._size = image_size
        self._keep = keep
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, t: int) -> torch.Tensor:
        if t in self._cache:
            return self._cache[t]
        if t < self._next:
            raise IndexError(f"frame {t} was already released (frames are streamed in order)")
        while self._next <= t:
            try:
                rgb = next(self._it)
            except StopIteration:
                raise MediaEnded(f"the media ended at frame {self._next}, expected {self._n} frames") from None
            self._cache[self._next] = preprocess_frame(rgb, self._size)
            self._next += 1
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return self._cache[t]


def _quiet_sam2_progress() -> None:
    """sam2 wraps propagation in its own tqdm bar (one per item, per worker); our run shows one bar for
    the whole run instead."""
    import sam2.sam2_video_predictor as svp

    svp.tqdm = lambda iterable, *args, **kwargs: iterable


def _new_state(predictor, images: LazyFrames, height: int, width: int) -> dict:
    """The inference state sam2's `init_state` makes, around our lazy frames instead of a loaded video."""
    device = predictor.device
    return {
        "images": images,
        "num_frames": len(images),
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": height,
        "video_width": width,
        "device": device,
        "storage_device": device,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }


def _object_scores(state: dict, frame: int) -> np.ndarray:
    scores = []
    for obj_idx in range(len(state["obj_ids"])):
        outputs = state["output_dict_per_obj"][obj_idx]
        out = outputs["cond_frame_outputs"].get(frame) or outputs["non_cond_frame_outputs"].get(frame)
        scores.append(float(out["object_score_logits"].flatten()[0]) if out is not None else float("nan"))
    return np.asarray(scores, dtype=np.float32)


@torch.inference_mode()
def propagate(
    model: LoadedModel,
    frames: Iterable[np.ndarray],
    num_frames: int,
    height: int,
    width: int,
    prompts: list[Prompt],
    source_frames: list[int],
    mask_threshold: float = 0.0,
) -> Iterator[FrameMasks]:
    """Track every prompt's mask from its frame to the end; yields one FrameMasks per frame, in order.

    `frames` yields RGB uint8 arrays of the item's decoded frames (starting at frame 0); all objects share
    one inference state."""
    if not prompts:
        return
    _quiet_sam2_progress()
    predictor = model.predictor
    state = _new_state(predictor, LazyFrames(frames, num_frames, model.image_size), height, width)
    for p in prompts:
        predictor.add_new_mask(state, frame_idx=p.frame, obj_id=p.object_id, mask=p.mask)
    for t, obj_ids, video_res_masks in predictor.propagate_in_video(state):
        masks = (video_res_masks[:, 0] > mask_threshold).cpu().numpy()
        yield FrameMasks(
            frame=t,
            source_frame=source_frames[t],
            object_ids=tuple(int(o) for o in obj_ids),
            masks=masks,
            object_scores=_object_scores(state, t),
        )
