"""The propagation engine: SAM 2 tracking of prompted masks with memory bounded in video length, objects in
batches sized to the device, and decoding ahead of the model.

`track(...)` yields one `FrameMasks` per frame, in frame order, from the first prompt frame to the end, with the
masks sam2's SAM2VideoPredictor gives for the same prompts. What differs is how the work is laid out:

- Frames stream. RGB frames are pulled from the caller's iterator and preprocessed exactly as sam2's JPEG
  loader does, at most `prefetch` frames ahead of the model (in a helper thread when a core is free); the
  model reads them through sam2's own `images[t]` access, and a frame is released as soon as the model has
  moved past it. (sam2's `init_state` loads and preprocesses the whole video before tracking its first frame.)
- State is pruned. After each frame every non-conditioning output the model can no longer read is dropped:
  frame t+1 reads at most the last `num_maskmem - 1` memory frames (every r-th, r =
  `memory_temporal_stride_for_eval`) and the last `max_obj_ptrs_in_encoder - 1` object pointers, and what it
  cannot read no later frame can (`oldest_readable_frame`). What is kept is slimmed too: a frame's low-res
  masks are never read again, and past the memory window (`oldest_memory_frame`) only the object pointer is.
  Conditioning (prompt) outputs always stay. (sam2's predictor keeps every frame's outputs to the end.)
- State can be saved. Between frames `Tracking.snapshot()` gives the engine's whole state (a few frames'
  memories per object, see above) as plain tensors; `track(..., resume=state)` goes on from it with the same
  masks as an uninterrupted run. The worker saves it at chunk boundaries of long videos (pipeline/store/partial.py).
- Objects are batched. Objects with the same prompt frames go through memory attention, the mask decoder and
  the memory encoder together, `object_batch` at a time, their memories stacked along sam2's batch dimension
  (the layout of sam2's older batched predictor); they are upsampled to video resolution as many at a time
  (not all objects at once: at 4K that alone is 37 MB per object). With `object_batch=1` every model call is
  the one sam2's per-object predictor makes, so masks are bit-identical to it; larger batches sum matrix
  products in another order and agree to within float rounding (tests/test_track.py).
- Objects prompted on a later frame than others have no mask (and a NaN score) before their prompt frame.
  (sam2's predictor tracks them from the memory of their future prompt, and on CPU fails doing so: with no
  object pointer in the past its memory attention gets bfloat16 memories alone and raises a dtype error.)
- Nothing is done twice: sam2's `add_new_mask` consolidates every object's mask at video resolution after
  each prompt (quadratic in objects, and never read by tracking); here each prompt costs one decoder pass and
  one memory encoding, and each frame one upsampling of each object's mask to video resolution. And memory
  attention's first layer begins with self-attention over the frame's own features, the same input for every
  object: it runs once per frame and every object batch reuses it (`_SharedFirstSelfAttention`); sam2 runs it
  once per object. Unbatched, masks stay bit-identical (the same call on the same input).

- Objects can join and leave during tracking. `track(..., reseed=f)` calls f on every frame with the frame's
  masks; the prompts it returns (on that frame, new object ids) join from that frame exactly as if they had
  been given up front: their masks and scores on every frame are those of that run. `Tracking.drop(ids)`
  stops tracking objects from the next frame on (empty masks, NaN scores, same layout). Snapshots keep both.
- Tracking backwards (`track_backward`) is this forward engine run on the frames before a seed frame in
  reverse order: sam2's reverse propagation reads the same memories and pointers at the same distances.

Threads: decoding ahead and writing behind run in helper threads only where a core is free (`spare_core`);
why, and what was measured, is in pipeline/stages/track_feed.py. The engine's parts: track_options.py (the
options, stats, saved state and the rules the engine sizes itself by), track_feed.py (frames, threads, the
`Tracking` iterator), track_batches.py (object batches); this module re-exports their public names.

The per-frame math is sam2's own (`_run_single_frame_inference`, `_run_memory_encoder`,
`_get_orig_video_res_output` of SAM2VideoPredictor); this module owns only the state around it, built fresh
per call, never leaving it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.records import FrameMasks, Prompt
from pipeline.stages.models import LoadedModel
from pipeline.stages.track_batches import (  # noqa: F401 - re-exported: tests and callers reach them here
    _NO_OBJECT_LOGIT, _STORED, _Batch, _mask_to_model_input, _place, _SharedFirstSelfAttention, _stack_outputs,
)
from pipeline.stages.track_feed import (  # noqa: F401 - re-exported
    _IMG_MEAN, _IMG_STD, _NORMALIZED, MediaEnded, Tracking, _AliveCounter, _Ended, _Failure, _FrameFeed,
    _prefetch, _produce, _set_tf32, preprocess_frame_numpy,
)
from pipeline.stages.track_options import (  # noqa: F401 - re-exported
    AUTOCAST_MODES, BYTES_PER_OBJECT_PIXEL, CUDA_MEMORY_SHARE, MAX_CUDA_OBJECT_BATCH, TrackerState, TrackOptions,
    TrackStats, _map_tensors, compile_model_parts, default_object_batch, free_memory_bytes, memory_window,
    oldest_memory_frame, oldest_readable_frame, resolve_autocast, resolve_tf32,
)

if TYPE_CHECKING:
    from pipeline.stages.prompt import KeyframeFeatures

__all__ = ["TrackOptions", "TrackStats", "TrackerState", "Tracking", "track", "track_backward", "write_behind",
           "default_object_batch", "oldest_readable_frame", "oldest_memory_frame", "memory_window",
           "preprocess_frame_numpy", "MediaEnded", "Reseed"]

# Called on every frame with the masks of the objects tracked so far; returns prompts on that frame for new
# objects (an empty list most of the time).
Reseed = Callable[[FrameMasks], "list[Prompt]"]


def spare_core(device: torch.device) -> bool:
    """Whether helper threads (decoding ahead, writing behind) can run beside the model without taking its
    cores: beside a GPU, or when torch's threads leave a CPU core free. Measured on a 2-core CPU with torch on
    both cores: on a quiet machine fps was the same within 1% either way, and with one core taken by another
    process 2-thread propagation ran 10x slower, so threads that compete for the model's cores risk much
    and gain nothing."""
    return device.type == "cuda" or torch.get_num_threads() < usable_cores()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Engine:
    """One item's tracking: prompts checked up front, then `frames(feed)` yields FrameMasks."""

    def __init__(self, model: LoadedModel, num_frames: int, height: int, width: int, prompts: list[Prompt],
                 source_frames: list[int], options: TrackOptions, stats: TrackStats,
                 resume: TrackerState | None = None, keyframe: "KeyframeFeatures | None" = None,
                 reseed: Reseed | None = None, model_frames: int | None = None):
        self.model = model
        self.keyframe = keyframe
        self.predictor = model.predictor
        self.device = torch.device(self.predictor.device)
        self.num_frames = num_frames
        # the video's length as the model sees it: it caps the object pointers read (sam2's num_frames)
        self.model_frames = num_frames if model_frames is None else model_frames
        if self.model_frames < num_frames:
            raise ValueError(f"model_frames={model_frames} is less than the {num_frames} frames tracked")
        self.height, self.width = height, width
        self.source_frames = source_frames
        self.options = options
        self.stats = stats
        self.reseed = reseed
        if len(source_frames) < num_frames:
            raise ValueError(f"source_frames has {len(source_frames)} entries for {num_frames} frames")
        # objects in order of first appearance (sam2's obj_idx order), each with its prompts by frame
        self.object_ids: list[int] = []
        self.prompts: dict[int, dict[int, Prompt]] = {}
        for p in prompts:
            self._register(p)
        self.start = min((p.frame for p in prompts), default=0)  # no prompts: objects come from `reseed` only
        self.dropped: dict[int, int] = {}  # object id -> the first frame it was no longer tracked on
        self.batches: list[_Batch] = []
        self._size = 0  # objects per batched step (not capped by the number of objects: more may join)
        self.resume = resume
        if resume is not None:
            if resume.object_ids != self.object_ids:
                raise ValueError(f"the saved tracker state is for objects {resume.object_ids}, the prompts are "
                                 f"for {self.object_ids}: it belongs to another item or run (objects added "
                                 f"during tracking go after the others, in the order they were added)")
            if not self.start < resume.next_frame <= num_frames:
                raise ValueError(f"the saved tracker state goes on at frame {resume.next_frame}, outside "
                                 f"{self.start + 1}..{num_frames}")
            self.start = resume.next_frame
        self.next_frame = self.start
        self.storage_device = torch.device("cpu") if options.offload_state else self.device
        self._live: tuple | None = None
        self._shared_attention = (_SharedFirstSelfAttention(self.predictor, stats)
                                  if not options.compile and _SharedFirstSelfAttention.usable(self.predictor)
                                  else None)

    def _register(self, p: Prompt) -> None:
        if not 0 <= p.frame < self.num_frames:
            raise ValueError(f"the prompt of object {p.object_id} is on frame {p.frame}, outside the "
                             f"item's frames 0..{self.num_frames - 1}")
        per_frame = self.prompts.setdefault(p.object_id, {})
        if not per_frame:
            self.object_ids.append(p.object_id)
        if p.frame in per_frame:
            raise ValueError(f"object {p.object_id} has two prompts on frame {p.frame}; give each object at "
                             f"most one mask per frame")
        per_frame[p.frame] = p

    def _state(self, feed: _FrameFeed) -> dict:
        """sam2's inference state, reduced to the keys its per-frame methods read."""
        return {
            "images": feed,
            "num_frames": self.model_frames,
            "device": self.device,
            "storage_device": self.storage_device,
            "video_height": self.height,
            "video_width": self.width,
            "cached_features": {},
            "constants": {},
        }

    def _contexts(self) -> contextlib.ExitStack:
        """inference_mode and autocast, entered around each frame's compute only (never across a yield or a
        call of `reseed`, so the caller's code between frames runs with its own settings)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.stats.autocast != "off":
            dtype = torch.bfloat16 if self.stats.autocast == "bf16" else torch.float16
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=dtype))
        return stack

    def _object_batch(self) -> int:
        return self.options.object_batch or default_object_batch(
            self.device, free_memory_bytes(self.device), self.model.image_size)

    def _update_stats(self) -> None:
        self.stats.objects = len(self.object_ids)
        self.stats.batches = len(self.batches)
        self.stats.object_batch = max(1, min(self._size, len(self.object_ids)))

    def _conditioning_outputs(self, state: dict, objects: list[int]) -> dict[int, dict[int, dict]]:
        """Each object's output on each of its prompt frames as add_new_mask + propagate_in_video_preflight
        compute it (the mask as output, then the memory encoder on the upsampled low-res mask), without
        add_new_mask's consolidation of every object at video resolution, which tracking never reads."""
        pred = self.predictor
        size = self.model.image_size
        outputs: dict[int, dict[int, dict]] = {obj: {} for obj in objects}
        for frame in sorted({f for obj in objects for f in self.prompts[obj]}):
            for obj in objects:
                prompt = self.prompts[obj].get(frame)
                if prompt is None:
                    continue
                mask_inputs = _mask_to_model_input(prompt.mask, size, self.device)
                one_object = {"cond_frame_outputs": outputs[obj], "non_cond_frame_outputs": {}}
                out, _ = pred._run_single_frame_inference(
                    inference_state=state, output_dict=one_object, frame_idx=frame, batch_size=1,
                    is_init_cond_frame=True, point_inputs=None, mask_inputs=mask_inputs, reverse=False,
                    run_mem_encoder=False)
                high_res_masks = F.interpolate(out["pred_masks"].to(self.device), size=(size, size),
                                               mode="bilinear", align_corners=False)
                # sam2 keeps memories on state["storage_device"] (host memory when offloaded)
                out["maskmem_features"], out["maskmem_pos_enc"] = pred._run_memory_encoder(
                    inference_state=state, frame_idx=frame, batch_size=1, high_res_masks=high_res_masks,
                    object_score_logits=out["object_score_logits"], is_mask_from_pts=True)
                outputs[obj][frame] = out
        return outputs

    def _add_objects(self, state: dict, positions: list[int]) -> None:
        """Conditioning outputs of the objects at `positions`, batched (`_place`)."""
        cond = self._conditioning_outputs(state, [self.object_ids[p] for p in positions])
        _place(self.batches, positions, {p: tuple(sorted(self.prompts[self.object_ids[p]])) for p in positions},
               {p: cond[self.object_ids[p]] for p in positions}, self._size, state["constants"])

    def frames(self, feed: _FrameFeed) -> Iterator[FrameMasks]:
        """Conditioning outputs first (or the resumed state), then every frame to the end."""
        self.stats.storage_device = str(self.storage_device)
        self.stats.memory_window = memory_window(self.predictor, self.model_frames)
        state = self._state(feed)
        if self.resume is not None:
            self._restore(self.resume, state)
        else:
            self._reuse_keyframe(state, feed)
            self._size = self._object_batch()
            with self._contexts():
                self._add_objects(state, list(range(len(self.object_ids))))
        self._remove_dropped_batches()
        self._live = (state, self.batches, self.dropped)
        for t in range(self.start, self.num_frames):
            with self._contexts():
                fm = self._frame(t, state, feed)
            if self.reseed is not None:
                fm = self._reseeded(t, fm, state)
            feed.release_before(t + 1)
            self.next_frame = t + 1
            yield fm

    def _reseeded(self, t: int, fm: FrameMasks, state: dict) -> FrameMasks:
        """Frame t's masks with the objects `reseed` adds on it: conditioned on t and batched as if they had been
        prompted up front (new objects come last in object order), their masks upsampled as `_frame` does."""
        added = list(self.reseed(fm))  # the caller's code: outside inference_mode and autocast
        if not added:
            return fm
        ids = [p.object_id for p in added]
        wrong = [p.object_id for p in added if p.frame != t]
        if wrong:
            raise ValueError(f"reseed returned prompts for objects {wrong} on other frames than frame {t}, the "
                             f"frame it was called on; objects join tracking on the frame they were found on")
        used = sorted({o for o in ids if o in self.prompts or ids.count(o) > 1})
        if used:
            raise ValueError(f"reseed returned object ids {used} that are already tracked, were dropped, or "
                             f"appear twice; give each new object an id not used before in the item")
        first = len(self.object_ids)
        for p in added:
            self._register(p)
        positions = list(range(first, len(self.object_ids)))
        with self._contexts():
            self._add_objects(state, positions)
            low_res = torch.full((len(positions), *self._low_res_shape()), _NO_OBJECT_LOGIT, device=self.device)
            scores = torch.full((len(positions), 1), float("nan"), device=self.device)
            for b in self.batches:
                for i, p in enumerate(b.objects):
                    if p >= first:  # from its conditioning output, as `_frame` reads it on a prompt frame
                        out = b.output_dict["cond_frame_outputs"][t]
                        low_res[p - first] = out["pred_masks"][i].to(self.device)
                        scores[p - first] = out["object_score_logits"][i]
            if getattr(self.predictor, "non_overlap_masks", False):  # compares objects: all again, at once
                fm_masks = self._video_res_binary(state, torch.cat([self._low_res, low_res]))
            else:
                fm_masks = np.concatenate([fm.masks, self._video_res_binary(state, low_res)])
        self._update_stats()
        return FrameMasks(frame=t, source_frame=fm.source_frame, object_ids=tuple(self.object_ids),
                          masks=fm_masks,
                          object_scores=np.concatenate([fm.object_scores, scores.flatten().float().cpu().numpy()]))

    def drop(self, object_ids: Iterable[int]) -> None:
        """Stop tracking `object_ids` from the next frame on (see Tracking.drop). A batch whose objects are all
        dropped is removed; the dropped members of other batches are still computed (so the others keep their
        exact bits) and their outputs masked out."""
        ids = [int(o) for o in object_ids]
        unknown = [o for o in ids if o not in self.prompts]
        if unknown:
            raise ValueError(f"cannot drop objects {unknown}: they are not tracked (objects: {self.object_ids})")
        for o in ids:
            self.dropped.setdefault(o, self.next_frame)
        self._remove_dropped_batches()

    def _remove_dropped_batches(self) -> None:
        gone = {self.object_ids.index(o) for o in self.dropped}
        self.batches[:] = [b for b in self.batches if not gone.issuperset(b.objects)]
        self._update_stats()

    def _reuse_keyframe(self, state: dict, feed: _FrameFeed) -> None:
        """Seed sam2's feature cache with the prompt stage's encoding of the first prompt frame, after checking
        that it encoded the very tensor tracking would (same frame, same preprocessing); ValueError if not."""
        kf = self.keyframe
        if kf is None or kf.frame != self.start or not self.object_ids:
            return
        image, tracked = kf.image.to(self.device), feed[kf.frame]
        if image.shape[1:] != tracked.shape or not torch.equal(image[0], tracked):
            raise ValueError(f"the keyframe features given for frame {kf.frame} were computed on another image "
                             f"than tracking reads there; prompt with share_features on the same decoded frame "
                             f"(or pass keyframe=None)")
        state["cached_features"] = {kf.frame: (image, kf.backbone_out)}  # sam2 drops it at the next frame
        self.keyframe = None
        self.stats.keyframe_reused = True

    def snapshot(self) -> TrackerState:
        """The state after the last frame yielded; tensors are copied to the CPU (shared where already there)."""
        if self._live is None:
            raise RuntimeError("snapshot() is taken between frames, after the first one was yielded")
        state = self._live[0]
        cpu = lambda t: t.to("cpu")  # noqa: E731
        return TrackerState(
            next_frame=self.next_frame, object_ids=list(self.object_ids),
            batches=[{"objects": list(b.objects), "first_frame": b.first_frame,
                      "output_dict": _map_tensors(b.output_dict, cpu)} for b in self.batches],
            constants=_map_tensors(state["constants"], cpu), object_batch=self._size, dropped=dict(self.dropped))

    def _restore(self, resume: TrackerState, state: dict) -> None:
        to_device = lambda t: t.to(self.device)  # noqa: E731
        state["constants"].update(_map_tensors(resume.constants, to_device))
        self.batches[:] = [_Batch(list(b["objects"]), int(b["first_frame"]), self._placed(b["output_dict"]))
                           for b in resume.batches]
        self._size = resume.object_batch or max((len(b.objects) for b in self.batches), default=1)
        unknown = set(resume.dropped) - set(self.object_ids)
        if unknown:
            raise ValueError(f"the saved tracker state dropped objects {sorted(unknown)} it does not track")
        self.dropped.update(resume.dropped)

    def _placed(self, output_dict: dict) -> dict:
        """A restored output_dict where sam2 keeps it: memories and masks on the storage device, the rest
        (object pointers, scores, position encodings) on the compute device."""
        def place(out: dict) -> dict:
            return {k: _map_tensors(v, lambda t: t.to(self.storage_device if k in _STORED else self.device))
                    for k, v in out.items()}
        return {kind: {f: place(out) for f, out in per_frame.items()} for kind, per_frame in output_dict.items()}

    def _low_res_shape(self) -> tuple[int, int, int]:
        low_res = self.model.image_size // 4
        return (1, low_res, low_res)

    def _frame(self, t: int, state: dict, feed: _FrameFeed) -> FrameMasks:
        """Every object's mask on frame t: each batch's masks put at its objects' positions; objects not
        prompted yet (or dropped) keep sam2's no-object logit and a NaN score."""
        n = len(self.object_ids)
        all_masks = torch.full((n, *self._low_res_shape()), _NO_OBJECT_LOGIT, dtype=torch.float32,
                               device=self.device)
        all_scores = torch.full((n, 1), float("nan"), dtype=torch.float32, device=self.device)
        oldest = oldest_readable_frame(self.predictor, t + 1, self.model_frames)
        oldest_memory = oldest_memory_frame(self.predictor, t + 1)
        with self._shared_attention.frame() if self._shared_attention else contextlib.nullcontext():
            for batch in self.batches:
                if t < batch.first_frame:  # not prompted yet: no mask, no score
                    continue
                masks, scores = self._track_batch(t, batch, state, oldest, oldest_memory)
                positions = torch.as_tensor(batch.objects, device=self.device)
                all_masks[positions] = masks.to(all_masks.dtype)
                all_scores[positions] = scores.to(all_scores.dtype)
        if self.dropped:  # their batch may still compute them (with others): their output is not theirs to keep
            gone = torch.as_tensor([self.object_ids.index(o) for o in self.dropped], device=self.device)
            all_masks[gone] = _NO_OBJECT_LOGIT
            all_scores[gone] = float("nan")
        self._low_res = all_masks  # what `_reseeded` upsamples again where sam2 compares objects
        binary = self._video_res_binary(state, all_masks)
        return FrameMasks(frame=t, source_frame=self.source_frames[t],
                          object_ids=tuple(int(o) for o in self.object_ids), masks=binary,
                          object_scores=all_scores.flatten().float().cpu().numpy())

    def _track_batch(self, t: int, batch: _Batch, state: dict, oldest: int,
                     oldest_memory: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's low-res masks and scores on frame t (its conditioning output on a prompt frame), then its
        outputs pruned to what later frames can read."""
        od = batch.output_dict
        current = od["cond_frame_outputs"].get(t)
        if current is not None:
            masks = current["pred_masks"].to(self.device, non_blocking=True)
        else:
            current, masks = self.predictor._run_single_frame_inference(
                inference_state=state, output_dict=od, frame_idx=t, batch_size=len(batch.objects),
                is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=False,
                run_mem_encoder=True)
            current.pop("pred_masks", None)  # the frame's masks are `masks`; no later frame reads them
            od["non_cond_frame_outputs"][t] = current
        non_cond = od["non_cond_frame_outputs"]
        for old in [f for f in non_cond if f < oldest]:
            del non_cond[old]
        # What later frames read of a non-conditioning output: its spatial memory while it is within the
        # memory window, its object pointer while within the pointer window (longer), never its masks.
        for f in [f for f in non_cond if f < oldest_memory and len(non_cond[f]) > 1]:
            non_cond[f] = {"obj_ptr": non_cond[f]["obj_ptr"]}
        self.stats.max_non_cond_retained = max(self.stats.max_non_cond_retained, len(non_cond))
        return masks, current["object_score_logits"]

    def _video_res_binary(self, state: dict, low_res: torch.Tensor) -> np.ndarray:
        """Every object's mask at video resolution, thresholded, as propagate_in_video computes it
        (`_get_orig_video_res_output`), one object batch at a time: only `object_batch` objects' float32 logits
        at video resolution exist at once (all 64 at 4096 x 2304 would be 2.4 GB on the device). Bilinear
        upsampling treats each object alone, so the masks are the same bits. With sam2's non-overlap constraint
        (it compares objects) all objects go at once."""
        pred = self.predictor
        n = low_res.shape[0]
        step = n if getattr(pred, "non_overlap_masks", False) else max(1, self.stats.object_batch or n)
        out = np.empty((n, self.height, self.width), dtype=bool)
        for i in range(0, n, step):
            _, video_res_masks = pred._get_orig_video_res_output(state, low_res[i:i + step])
            out[i:i + step] = (video_res_masks[:, 0] > self.options.mask_threshold).cpu().numpy()
            del video_res_masks
        self.stats.upsample_batch = step
        return out


def track(
    model: LoadedModel,
    frames: Iterable[np.ndarray],
    num_frames: int,
    height: int,
    width: int,
    prompts: list[Prompt],
    source_frames: list[int],
    options: TrackOptions = TrackOptions(),
    resume: TrackerState | None = None,
    keyframe: "KeyframeFeatures | None" = None,
    reseed: Reseed | None = None,
    model_frames: int | None = None,
) -> Tracking:
    """Track every prompt's mask from its frame to the end; yields one FrameMasks per frame, in order.

    `frames` yields RGB uint8 (H, W, 3) arrays of the item's decoded frames, starting at frame 0. It is read
    from a helper thread, at most `options.prefetch` frames ahead of the model and never past frame
    `num_frames - 1`; if it ends early, MediaEnded is raised after every earlier frame was yielded.
    `object_scores` are SAM 2's object-presence logits. Bad prompts raise ValueError here, before any work.

    With `reseed`, objects join during tracking: it is called on every frame t, after the masks of the objects
    tracked so far were computed and before the frame is yielded, with that FrameMasks; the prompts it returns
    (each on frame t, each for a new object id; ValueError otherwise) are tracked from t exactly as if they
    had been in `prompts` (after the others, in the order returned): the same masks and scores on every frame,
    bit for bit, and frame t's FrameMasks already holds them. With no prompts, tracking starts at frame 0 and
    waits for `reseed`'s. `Tracking.drop(ids)` stops tracking objects from the next frame on.

    With `resume` (a `Tracking.snapshot()` of an earlier run over the same item, prompts and model), tracking
    goes on at `resume.next_frame` exactly as the interrupted run would have: `frames` still starts at frame 0
    (earlier frames are pulled and skipped, not preprocessed) and only later frames are yielded. `prompts` are
    then the first run's followed by those its `reseed` added, in the order added; dropped objects stay dropped.

    With `keyframe` (pipeline.stages.prompt.prompt_and_encode_keyframe's features of the first prompt frame),
    that frame is not encoded again; ValueError if they were computed on another image than tracking reads.
    Ignored when resuming, or when they are for another frame.

    `model_frames`: the video's length as the model sees it, when only some of its frames are tracked (sam2
    reads at most min(num_frames, max_obj_ptrs_in_encoder) object pointers); `track_backward` gives it."""
    stats = TrackStats(autocast=resolve_autocast(options.autocast, torch.device(model.predictor.device)))
    if not prompts and reseed is None:
        return Tracking(None, frames, stats, options)
    engine = _Engine(model, num_frames, height, width, prompts, source_frames, options, stats, resume, keyframe,
                     reseed, model_frames)
    if options.compile:
        compile_model_parts(engine.predictor)
        stats.compiled = True
    decode_thread = options.decode_thread if options.decode_thread is not None else spare_core(engine.device)
    return Tracking(engine, frames, stats, options, decode_thread)


def track_backward(model: LoadedModel, frames_reversed: Iterable[np.ndarray], seed_frame: int, height: int,
                   width: int, prompts: list[Prompt], source_frames: list[int], num_frames: int,
                   options: TrackOptions = TrackOptions(), first_frame: int = 0) -> Iterator[FrameMasks]:
    """Track `prompts` (all on `seed_frame`) backwards: FrameMasks of frames seed_frame - 1 down to
    `first_frame`, numbered as in the item (`frame`, `source_frame`), objects in prompt order.

    `frames_reversed` yields the item's decoded RGB frames seed_frame, seed_frame - 1, ..., first_frame (the
    seed frame first). It is the forward engine on that reversed sequence with the prompts on its first frame,
    and the model told the item's length (`num_frames`): sam2's reverse propagation
    (propagate_in_video(reverse=True) from a fresh state with these prompts) reads the memory of the frame
    after (t+1, t+2, ...) and the object pointers of the frames after at the same distances and with the same
    signed temporal positions as forward tracking reads those before, so the masks are the same bits when its
    memory stride (`memory_temporal_stride_for_eval`) is 1, as in every shipped config, or divides
    `seed_frame` (sam2 aligns strided memories to absolute frame numbers; tests/test_track_reseed.py).
    The seed frame's own masks (the prompts' conditioning outputs, as forward tracking yields them) are not
    yielded again."""
    wrong = [p.object_id for p in prompts if p.frame != seed_frame]
    if wrong:
        raise ValueError(f"objects {wrong} are not prompted on the seed frame {seed_frame}; track_backward "
                         f"tracks prompts on one frame back from it")
    if not 0 <= first_frame <= seed_frame < num_frames:
        raise ValueError(f"tracking back from frame {seed_frame} to {first_frame} needs "
                         f"0 <= first_frame <= seed_frame < num_frames={num_frames}")
    n = seed_frame - first_frame + 1
    stream = track(model, frames_reversed, n, height, width, [dataclasses.replace(p, frame=0) for p in prompts],
                   [source_frames[seed_frame - u] for u in range(n)], options, model_frames=num_frames)
    try:
        for fm in stream:
            if fm.frame > 0:
                yield dataclasses.replace(fm, frame=seed_frame - fm.frame)
    finally:
        stream.close()


_DONE = object()


def write_behind(stream: Iterable[FrameMasks], write: Callable[[FrameMasks], None], depth: int = 2,
                 thread: bool | None = None) -> int:
    """Iterate `stream` here (the model runs in this thread) and call `write` on each FrameMasks in a writer
    thread, at most `depth` frames behind, so that frame t is written while frame t+1 is computed. Returns
    the number of frames written. `thread=None`: a writer thread when the model leaves a core free
    (`spare_core` of the stream's device), else the writes run here, between frames.

    A write error stops the stream and is raised here; an error from the stream (e.g. MediaEnded) is raised
    after every earlier frame was written. `write` should do no torch arithmetic (see the module's
    docstring): numpy, Zarr and Parquet are fine."""
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    if thread is None:
        device = getattr(stream, "device", None)
        thread = spare_core(device if device is not None else torch.device("cpu"))
    if not thread:
        written = 0
        for fm in stream:
            write(fm)
            written += 1
        return written
    q: queue.Queue = queue.Queue(maxsize=depth)
    failed: list[BaseException] = []
    written = 0

    def writer() -> None:
        nonlocal written
        while True:
            fm = q.get()
            if fm is _DONE:
                return
            if failed:
                continue  # drain, so the producer never blocks on a full queue
            try:
                write(fm)
                written += 1
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
                failed.append(e)

    worker = threading.Thread(target=writer, name="masklet-writer", daemon=True)
    worker.start()
    try:
        for fm in stream:
            if failed:
                break
            q.put(fm)
    except BaseException as stream_error:
        q.put(_DONE)
        worker.join()
        if failed:
            raise failed[0] from stream_error
        raise
    q.put(_DONE)
    worker.join()
    if failed:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        raise failed[0]
    return written
