"""Object batches of the tracking engine: objects with the same prompt frames tracked together, their sam2
outputs stacked along sam2's batch dimension; prompt masks as sam2 takes them; memory attention's first
self-attention shared by every batch of a frame."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.stages.models import patched_method

if TYPE_CHECKING:
    from pipeline.stages.track_options import TrackStats

_NO_OBJECT_LOGIT = -1024.0  # sam2's NO_OBJ_SCORE: the mask logit of an object that is not there


@dataclass
class _Batch:
    """Objects tracked together: their positions in object order, and their stacked sam2 output dict."""

    objects: list[int]
    first_frame: int  # the batch's first prompt frame: before it its objects are not tracked yet
    output_dict: dict = field(default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}})

    @property
    def prompt_frames(self) -> tuple[int, ...]:
        return tuple(sorted(self.output_dict["cond_frame_outputs"]))


def _stack_outputs(outs: list[dict], constants: dict) -> dict:
    """Outputs of one frame (of single objects, or of a batch and the objects that join it) -> one output of
    the batch, objects along sam2's batch dim (concatenation: the same bits as stacking them all at once)."""
    if len(outs) == 1:
        return outs[0]
    b = sum(o["obj_ptr"].shape[0] for o in outs)
    return {
        "maskmem_features": torch.cat([o["maskmem_features"] for o in outs]),
        # the same for every frame and object: sam2 keeps one copy and expands it to the batch
        "maskmem_pos_enc": [x.expand(b, -1, -1, -1) for x in constants["maskmem_pos_enc"]],
        "pred_masks": torch.cat([o["pred_masks"] for o in outs]),
        "obj_ptr": torch.cat([o["obj_ptr"] for o in outs]),
        "object_score_logits": torch.cat([o["object_score_logits"] for o in outs]),
    }


def _place(batches: list[_Batch], positions: list[int], prompt_frames: dict[int, tuple[int, ...]],
           cond: dict[int, dict[int, dict]], size: int, constants: dict) -> None:
    """Put new objects (`positions` in object order, each with its prompt frames and its conditioning outputs
    by frame, popped from `cond`) into `batches`: objects with the same prompt frames together, `size` at a
    time. A group's last batch that is not full yet takes the first newcomers, so objects added later are
    batched exactly as if they had been there from the start (they come last in object order), provided that
    batch has tracked nothing past its prompt frames yet (objects are added on their prompt frame)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position in positions:
        groups.setdefault(prompt_frames[position], []).append(position)
    for frames, members in groups.items():
        last = next((b for b in reversed(batches) if b.prompt_frames == frames), None)
        if last is not None and len(last.objects) < size:
            if last.output_dict["non_cond_frame_outputs"]:
                raise RuntimeError(f"objects joined a batch on frames {frames} that tracked past them already")
            joining, members = members[:size - len(last.objects)], members[size - len(last.objects):]
            for f in frames:
                last.output_dict["cond_frame_outputs"][f] = _stack_outputs(
                    [last.output_dict["cond_frame_outputs"][f], *(cond[m].pop(f) for m in joining)], constants)
            last.objects.extend(joining)
        for i in range(0, len(members), size):
            batch = _Batch(members[i:i + size], first_frame=frames[0])
            for f in frames:
                batch.output_dict["cond_frame_outputs"][f] = _stack_outputs(
                    [cond[m].pop(f) for m in batch.objects], constants)
            batches.append(batch)


def _mask_to_model_input(mask: np.ndarray, image_size: int, device: torch.device) -> torch.Tensor:
    """A prompt mask as SAM2VideoPredictor.add_new_mask turns it into model input (same ops, same order)."""
    m = torch.as_tensor(np.asarray(mask, dtype=bool))
    if m.dim() != 2:
        raise ValueError(f"a prompt mask must be 2-D (H, W), got shape {tuple(m.shape)}")
    mask_inputs = m[None, None].float().to(device)
    if m.shape[0] != image_size or m.shape[1] != image_size:
        mask_inputs = F.interpolate(mask_inputs, size=(image_size, image_size), align_corners=False,
                                    mode="bilinear", antialias=True)
        mask_inputs = (mask_inputs >= 0.5).float()
    return mask_inputs


# the parts of a frame's output that sam2 keeps on inference_state["storage_device"]
_STORED = ("maskmem_features", "pred_masks")


class _SharedFirstSelfAttention:
    """Per frame (`frame()`): the first memory-attention layer's self-attention (`_forward_sa`, over the frame's
    own features plus their position encoding, before any object's memory is read) computed once, on one row,
    and reused by every object batch of the frame. sam2 computes it per object on the same input, so the
    reused result is the one each object's own call would give (bit for bit at one object per batch).

    Installed on the layer instance for the frame's compute only (`patched_method`); not used when the
    memory attention is torch.compiled (`usable`), where the patch would break the compiled graph."""

    def __init__(self, predictor, stats: "TrackStats"):
        self.layer = predictor.memory_attention.layers[0]
        self.stats = stats  # counts the runs in stats.self_attention_runs

    @staticmethod
    def usable(predictor) -> bool:
        attention = getattr(predictor, "memory_attention", None)
        layers = getattr(attention, "layers", None)
        return (layers is not None and len(layers) > 0 and getattr(attention, "batch_first", False)
                and hasattr(layers[0], "_forward_sa")
                and "forward" not in vars(attention))  # torch.compile (compile_model_parts) replaces it there

    @contextlib.contextmanager
    def frame(self) -> Iterator[None]:
        result: torch.Tensor | None = None

        def sharing(own: Callable) -> Callable:
            def shared(tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
                # batch-first: (objects, tokens, channels); every row is the same frame's features
                nonlocal result
                if result is None:
                    result = own(tgt[:1], query_pos[:1])
                    self.stats.self_attention_runs += 1
                if result.shape[1:] != tgt.shape[1:]:
                    raise RuntimeError(f"memory attention got inputs of shapes {tuple(result.shape[1:])} and "
                                       f"{tuple(tgt.shape[1:])} within one frame: this sam2's memory attention is "
                                       f"not the one masklet shares per frame; please report it with sam2's "
                                       f"version")
                return result if tgt.shape[0] == 1 else result.expand(tgt.shape[0], -1, -1)
            return shared

        with patched_method(self.layer, "_forward_sa", sharing):
            yield

