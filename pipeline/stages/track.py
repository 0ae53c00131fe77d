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

Threads. The model runs in the caller's thread. Torch's OpenMP runtime (libgomp) gives every thread that runs
a parallel op its own worker pool and stops spinning between parallel regions once there are more pool threads
than cores: measured on a 2-core CPU, sam2's per-object propagation ran 1.7x slower in a second thread than
in the main thread, so the helper threads here do no torch arithmetic (decoding is PIL and numpy). And
2-thread torch on 2 cores collapses when anything else takes a core (measured: 1.84 -> 0.18 fps at 512
while another process used one core), so decoding ahead and writing behind (`write_behind`) run in helper
threads only where a core is free for them (`spare_core`: always beside a GPU); else they run between the
model's frames, in its thread, which costs the same CPU time without stalling it (measured on a quiet
2-core CPU: fps within 1% either way).

The per-frame math is sam2's own (`_run_single_frame_inference`, `_run_memory_encoder`,
`_get_orig_video_res_output` of SAM2VideoPredictor); this module owns only the state around it, built fresh
per call, never leaving it.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.records import FrameMasks, Prompt
from pipeline.stages.models import LoadedModel, patched_method

if TYPE_CHECKING:
    from pipeline.stages.prompt import KeyframeFeatures

__all__ = ["TrackOptions", "TrackStats", "TrackerState", "Tracking", "track", "write_behind", "default_object_batch",
           "oldest_readable_frame", "oldest_memory_frame", "memory_window", "preprocess_frame_numpy", "MediaEnded"]

AUTOCAST_MODES = ("auto", "bf16", "fp16", "off")
_NO_OBJECT_LOGIT = -1024.0  # sam2's NO_OBJ_SCORE: the mask logit of an object that is not there

# --- the object-batch rule -------------------------------------------------------------------------------
# Memory per object of one batched tracking step, in bytes per model-input pixel (image_size ** 2). Measured
# on CPU in float32 with random SAM 2.1 tiny (2026-11-22, torch 2.14.1, sam2 1.1.0): the peak of the tensors
# one step creates (memory attention, mask decoder, memory encoder and the upsampling of the masks to a 640x480
# video), at 1, 2 and 4 objects on the 9th frame (memory bank full), slope per object: 133 bytes at image size
# 256, 131 at 512 (`python benchmarks/bench_propagation.py --measure-object-memory` repeats it). Add the
# object's retained state, 16 frames of outputs at 0.75 bytes per pixel (12), and about 10% margin: 160.
# Float32 on CPU bounds a GPU step from above: bf16 halves most activations.
BYTES_PER_OBJECT_PIXEL = 160
# Share of the free device memory the object batch may take; the rest is left for the frame's backbone
# activations, the cached features, the frame's masks at video resolution and the allocator's slack.
CUDA_MEMORY_SHARE = 0.5
# Cap: past a few dozen objects a GPU step is compute-bound already and a bigger batch adds only memory.
# Not measured (there was no GPU where this was written): a conservative guess, to be replaced by a measurement.
MAX_CUDA_OBJECT_BATCH = 64


def default_object_batch(device: torch.device | str, free_memory_bytes: int, image_size: int) -> int:
    """Objects per batched step, per device (the rule `TrackOptions.object_batch=None` uses).

    - CPU (anything that is not CUDA): 1. Measured on a 2-core CPU with random SAM 2.1 tiny at 512: sam2's
      per-object predictor ran 0.44 fps at 8 objects and 0.12 at 32, its batched predictor 0.39 and 0.09.
      CPU work is bound by arithmetic, so batching buys nothing, and per-object keeps masks bit-identical to
      sam2's predictor.
    - CUDA: as many objects as fit in CUDA_MEMORY_SHARE of the free memory at BYTES_PER_OBJECT_PIXEL *
      image_size**2 bytes each; at least 1, at most MAX_CUDA_OBJECT_BATCH. One object leaves most of a GPU
      idle, so batching is the main lever there, and memory is what bounds it.
      E.g. image size 1024 with 20 GiB free: 20 GiB * 0.5 / (160 * 1024**2) = 64.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    per_object = BYTES_PER_OBJECT_PIXEL * image_size * image_size
    fit = int(max(0, free_memory_bytes) * CUDA_MEMORY_SHARE // per_object)
    return max(1, min(MAX_CUDA_OBJECT_BATCH, fit))


@dataclass(frozen=True)
class TrackOptions:
    """How the engine runs; the defaults are right for the device the model is on."""

    object_batch: int | None = None  # objects per batched step; None: default_object_batch (1 on CPU)
    prefetch: int = 2  # frames decoded and preprocessed ahead of the model
    autocast: str = "auto"  # auto (bf16 on CUDA GPUs that support it, else off) | bf16 | fp16 | off
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA GPUs that have them (compute capability >= 8)
    compile: bool = False  # torch.compile the model's parts as sam2's vos_optimized predictor does
    mask_threshold: float = 0.0  # logits above this are foreground in the yielded masks
    # decode and preprocess in a helper thread; None: when the model leaves a CPU core free (`spare_core`)
    decode_thread: bool | None = None
    # keep the memories (maskmem_features) and stored masks in host memory, copied to the device when a frame
    # reads them, as sam2's offload_state_to_cpu does; for many objects on a small GPU or MIG slice
    offload_state: bool = False

    def __post_init__(self) -> None:
        if self.object_batch is not None and self.object_batch < 1:
            raise ValueError(f"object_batch={self.object_batch} must be >= 1, or None to choose per device")
        if self.prefetch < 1:
            raise ValueError(f"prefetch={self.prefetch} must be >= 1")
        if self.autocast not in AUTOCAST_MODES:
            raise ValueError(f"autocast={self.autocast!r}: use one of {AUTOCAST_MODES}")


@dataclass
class TrackStats:
    """What a run did, updated while it runs (the `stats` of the iterator `track` returns)."""

    frames: int = 0  # frames yielded
    objects: int = 0
    object_batch: int = 0  # objects per batched step used
    batches: int = 0  # object batches per frame
    autocast: str = "off"  # resolved: bf16 | fp16 | off
    tf32: bool = False  # whether TF32 was on for the run
    compiled: bool = False
    memory_window: int = 0  # most non-conditioning outputs per object the next frame can read
    max_non_cond_retained: int = 0  # most non-conditioning outputs held by any object batch between frames
    frames_pulled: int = 0  # frames taken from the caller's iterator
    max_frames_alive: int = 0  # most preprocessed frames in memory at once (queue, model, sam2's feature cache)
    max_frames_ahead: int = 0  # most frames pulled beyond those yielded
    decode_thread: bool = False  # whether frames were decoded in a helper thread
    storage_device: str = ""  # where memories and stored masks were kept (cpu when offloaded)
    # runs of memory attention's first self-attention, once per tracked frame when shared across objects
    # (`_SharedFirstSelfAttention`); 0 when not shared (torch.compile), where sam2 runs it once per object
    self_attention_runs: int = 0
    keyframe_reused: bool = False  # the prompt stage's encoding of the first prompt frame was reused
    upsample_batch: int = 0  # objects upsampled to video resolution together (the object batch)


@dataclass
class TrackerState:
    """Everything the engine needs to go on at `next_frame` as if it had never stopped: the object batches
    with their conditioning and still-readable outputs, sam2's cached constants and the object order. Made by
    `Tracking.snapshot()` between frames; `track(..., resume=state)` continues from it. `payload()` is plain
    dicts, lists, ints and CPU tensors, so torch.save / torch.load(weights_only=True) round-trip it exactly."""

    next_frame: int
    object_ids: list[int]
    batches: list[dict]  # {"objects": [positions], "first_frame": int, "output_dict": sam2's output dict}
    constants: dict
    order: torch.Tensor | None

    def payload(self) -> dict:
        return {"next_frame": self.next_frame, "object_ids": list(self.object_ids), "batches": self.batches,
                "constants": self.constants, "order": self.order}

    @classmethod
    def from_payload(cls, payload: dict) -> "TrackerState":
        return cls(int(payload["next_frame"]), [int(o) for o in payload["object_ids"]], payload["batches"],
                   payload["constants"], payload["order"])


def _map_tensors(obj, fn):
    """A copy of nested dicts/lists/tuples with `fn` applied to every tensor (containers are new, so later
    changes to the engine's dicts do not reach the copy)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def oldest_memory_frame(model, frame: int) -> int:
    """The oldest earlier frame whose spatial memory (maskmem_features) tracking `frame` can read: frame - 1
    and every r-th frame before it for t_rel = 2 .. num_maskmem - 1 (sam2's
    SAM2Base._prepare_memory_conditioned_features); `frame` itself when it reads none. Non-decreasing in
    `frame`. tests/test_sam2_internals.py checks it against sam2's own method."""
    if model.num_maskmem <= 1:
        # 0: no memory (sam2 skips the fusion altogether); 1: the one slot is the prompt frames' (t_pos 0), and
        # sam2's loop over earlier frames, t_pos = 1 .. num_maskmem - 1, is empty
        return frame
    oldest = frame - 1
    if model.num_maskmem >= 3:
        r = model.memory_temporal_stride_for_eval
        oldest = min(oldest, ((frame - 2) // r) * r - (model.num_maskmem - 3) * r)
    return oldest


def oldest_readable_frame(model, frame: int, num_frames: int) -> int:
    """The oldest earlier frame whose non-conditioning output tracking `frame` (forward in time) can read.

    Spatial memories as `oldest_memory_frame`; object pointers from the last min(num_frames,
    max_obj_ptrs_in_encoder) - 1 frames. Conditioning outputs are read from their own dict and are never
    pruned. Non-decreasing in `frame`: what frame t+1 cannot read, no later frame can.
    """
    if model.num_maskmem == 0:
        return frame
    oldest = oldest_memory_frame(model, frame)
    if model.use_obj_ptrs_in_encoder:
        max_ptrs = min(num_frames, model.max_obj_ptrs_in_encoder)
        if max_ptrs > 1:
            oldest = min(oldest, frame - (max_ptrs - 1))
    return oldest


def memory_window(model, num_frames: int) -> int:
    """Most non-conditioning outputs per object the engine holds between frames (what the next can read)."""
    r = max(1, model.memory_temporal_stride_for_eval)
    base = 4 * r * max(3, model.num_maskmem) + model.max_obj_ptrs_in_encoder  # clear of the video's start
    return max(f - oldest_readable_frame(model, f, num_frames) for f in range(base, base + r))


def resolve_autocast(mode: str, device: torch.device) -> str:
    """'bf16' | 'fp16' | 'off' for this device ('auto': bf16 on CUDA GPUs that support it, else off)."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast={mode!r}: use one of {AUTOCAST_MODES}")
    if mode == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"autocast='fp16' needs a CUDA device, the model is on {device}; use 'bf16' or 'off'")
    return mode


def resolve_tf32(requested: bool, device: torch.device) -> bool:
    """Whether TF32 is on for a run with `propagate.tf32=requested`: on CUDA devices of compute capability >= 8."""
    return bool(requested and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8)


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


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device the model runs on (available host memory for CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 0


def compile_model_parts(predictor) -> None:
    """torch.compile the parts sam2's SAM2VideoPredictorVOS compiles, once per model. Like VOS, it changes
    the model for every later user (the automatic mask generator shares it). CUDA graphs are left out: with
    them sam2 has to clone every output of the compiled parts; without them no clone is needed."""
    if getattr(predictor, "_masklet_compiled", False):
        return
    mode = "max-autotune-no-cudagraphs" if predictor.device.type == "cuda" else "default"
    predictor.memory_encoder.forward = torch.compile(
        predictor.memory_encoder.forward, mode=mode, fullgraph=True, dynamic=False)
    predictor.memory_attention.forward = torch.compile(  # the number of memories grows over the first frames
        predictor.memory_attention.forward, mode=mode, fullgraph=True, dynamic=True)
    predictor.sam_prompt_encoder.forward = torch.compile(
        predictor.sam_prompt_encoder.forward, mode=mode, fullgraph=True, dynamic=False)
    predictor.sam_mask_decoder.forward = torch.compile(
        predictor.sam_mask_decoder.forward, mode=mode, fullgraph=True, dynamic=False)
    predictor._masklet_compiled = True


# --- frames: decoded and preprocessed ahead, in a thread that does no torch arithmetic ----------------------

_IMG_MEAN = np.asarray((0.485, 0.456, 0.406), dtype=np.float32)[:, None, None]
_IMG_STD = np.asarray((0.229, 0.224, 0.225), dtype=np.float32)[:, None, None]


# sam2's loader maps each uint8 value v of channel c to float32(v / 255.0 in float64), then subtracts the mean
# and divides by the std in float32. Every step is correctly rounded elementwise IEEE arithmetic that depends
# on (c, v) alone, so a table of the 3 x 256 results gives the same bits with one gather per pixel.
_NORMALIZED = ((np.arange(256) / 255.0).astype(np.float32)[None, :] - _IMG_MEAN[:, 0]) / _IMG_STD[:, 0]


def preprocess_frame_numpy(rgb: np.ndarray, image_size: int, pin_memory: bool = False) -> torch.Tensor:
    """sam2's JPEG-folder loader bit for bit (the same PIL resize, float64 /255, float32 mean/std; the last
    three as a table, `_NORMALIZED`), computed with numpy so that the prefetch thread starts no OpenMP pool of
    torch's (see the module's docstring). With `pin_memory` the result is written straight into page-locked
    memory for an asynchronous GPU copy."""
    resized = np.asarray(Image.fromarray(rgb).resize((image_size, image_size)))
    image = torch.empty((3, image_size, image_size), dtype=torch.float32, pin_memory=pin_memory)
    out = image.numpy()
    for c in range(3):
        np.take(_NORMALIZED[c], resized[..., c], out=out[c], mode="clip")  # uint8 indices: clip never clips
    return image


class MediaEnded(IndexError):
    """The media yielded fewer frames than probed (headers can overstate frame counts)."""


class _Ended:
    """The caller's iterator ran out after `count` frames."""

    def __init__(self, count: int):
        self.count = count


class _Failure:
    """An exception raised in a helper thread, carried to the thread that reports it."""

    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class _AliveCounter:
    """Counts preprocessed frames whose memory is still held anywhere (the queue, the model, sam2's feature
    cache): a finalizer on the tensor's storage fires only when the last view of it is gone."""

    def __init__(self, stats: TrackStats):
        self._lock = threading.Lock()
        self._alive = 0
        self._stats = stats

    def track(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._alive += 1
            self._stats.max_frames_alive = max(self._stats.max_frames_alive, self._alive)
        weakref.finalize(tensor.untyped_storage(), self._release)

    def _release(self) -> None:
        with self._lock:
            self._alive -= 1


def _produce(frames: Iterable[np.ndarray], start: int, num_frames: int, image_size: int, pin: bool,
             stats: TrackStats, alive: _AliveCounter) -> Iterator:
    """(t, preprocessed frame) for t = start..num_frames-1, pulling frames 0..num_frames-1 from the caller's
    iterator (never more); ends with _Ended(t) if the iterator runs out first."""
    it = iter(frames)
    for t in range(num_frames):
        try:
            rgb = next(it)
        except StopIteration:
            yield _Ended(t)
            return
        stats.frames_pulled = t + 1
        stats.max_frames_ahead = max(stats.max_frames_ahead, t + 1 - stats.frames)
        if t < start:
            continue  # before the first prompt: never tracked, so never preprocessed
        image = preprocess_frame_numpy(rgb, image_size, pin_memory=pin)
        del rgb
        alive.track(image)
        yield t, image
        del image


def _prefetch(produce: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Run the producer in the helper thread, at most the queue's size ahead of the model."""
    try:
        for item in produce:
            if not _put(out, item, stop):
                return
    except BaseException as e:  # noqa: BLE001 - carried to the caller's thread and raised there
        _put(out, _Failure(e), stop)


class _FrameFeed:
    """sam2's `images[t]`: frames taken in order from the prefetch queue (or, without a decode thread, from
    the producer directly); `release_before` drops old ones."""

    def __init__(self, source: queue.Queue | Iterator, num_frames: int, device: torch.device):
        self._next_item = source.get if isinstance(source, queue.Queue) else source.__next__
        self._n = num_frames
        self._device = device
        self._held: dict[int, torch.Tensor] = {}
        self._next = 0  # every frame before this one was received (and maybe released)
        self._ended: _Ended | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, t: int) -> torch.Tensor:
        while t not in self._held:
            if t < self._next:
                raise IndexError(f"frame {t} was already released (frames are streamed in order)")
            if self._ended is not None:
                raise MediaEnded(f"the media ended at frame {self._ended.count}, expected {self._n} frames")
            item = self._next_item()
            if isinstance(item, _Failure):
                raise item.error
            if isinstance(item, _Ended):
                self._ended = item
                continue
            index, image = item
            self._held[index] = image
            self._next = index + 1
        image = self._held[t]
        if image.device != self._device:
            return image.to(self._device, non_blocking=True)  # from pinned memory: asynchronous
        return image

    def release_before(self, t: int) -> None:
        for index in [i for i in self._held if i < t]:
            del self._held[index]


# --- the engine --------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Objects tracked together: their positions in object order, and their stacked sam2 output dict."""

    objects: list[int]
    first_frame: int  # the batch's first prompt frame: before it its objects are not tracked yet
    output_dict: dict = field(default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}})


def _stack_outputs(outs: list[dict], constants: dict) -> dict:
    """Per-object sam2 outputs of one frame -> one output of the batch (objects along sam2's batch dim)."""
    if len(outs) == 1:
        return outs[0]
    b = len(outs)
    return {
        "maskmem_features": torch.cat([o["maskmem_features"] for o in outs]),
        # the same for every frame and object: sam2 keeps one copy and expands it to the batch
        "maskmem_pos_enc": [x.expand(b, -1, -1, -1) for x in constants["maskmem_pos_enc"]],
        "pred_masks": torch.cat([o["pred_masks"] for o in outs]),
        "obj_ptr": torch.cat([o["obj_ptr"] for o in outs]),
        "object_score_logits": torch.cat([o["object_score_logits"] for o in outs]),
    }


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


class _Engine:
    """One item's tracking: prompts checked up front, then `frames(feed)` yields FrameMasks."""

    def __init__(self, model: LoadedModel, num_frames: int, height: int, width: int, prompts: list[Prompt],
                 source_frames: list[int], options: TrackOptions, stats: TrackStats,
                 resume: TrackerState | None = None, keyframe: "KeyframeFeatures | None" = None):
        self.model = model
        self.keyframe = keyframe
        self.predictor = model.predictor
        self.device = torch.device(self.predictor.device)
        self.num_frames = num_frames
        self.height, self.width = height, width
        self.source_frames = source_frames
        self.options = options
        self.stats = stats
        if len(source_frames) < num_frames:
            raise ValueError(f"source_frames has {len(source_frames)} entries for {num_frames} frames")
        # objects in order of first appearance (sam2's obj_idx order), each with its prompts by frame
        self.object_ids: list[int] = []
        self.prompts: dict[int, dict[int, Prompt]] = {}
        for p in prompts:
            if not 0 <= p.frame < num_frames:
                raise ValueError(f"the prompt of object {p.object_id} is on frame {p.frame}, outside the "
                                 f"item's frames 0..{num_frames - 1}")
            per_frame = self.prompts.setdefault(p.object_id, {})
            if not per_frame:
                self.object_ids.append(p.object_id)
            if p.frame in per_frame:
                raise ValueError(f"object {p.object_id} has two prompts on frame {p.frame}; give each object at "
                                 f"most one mask per frame")
            per_frame[p.frame] = p
        self.start = min(p.frame for p in prompts)
        self.resume = resume
        if resume is not None:
            if resume.object_ids != self.object_ids:
                raise ValueError(f"the saved tracker state is for objects {resume.object_ids}, the prompts are "
                                 f"for {self.object_ids}: it belongs to another item or run")
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

    def _state(self, feed: _FrameFeed) -> dict:
        """sam2's inference state, reduced to the keys its per-frame methods read."""
        return {
            "images": feed,
            "num_frames": self.num_frames,
            "device": self.device,
            "storage_device": self.storage_device,
            "video_height": self.height,
            "video_width": self.width,
            "cached_features": {},
            "constants": {},
        }

    def _contexts(self) -> contextlib.ExitStack:
        """inference_mode and autocast, entered around each frame's compute only (never across a yield, so
        the caller's code between frames runs with its own settings)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.stats.autocast != "off":
            dtype = torch.bfloat16 if self.stats.autocast == "bf16" else torch.float16
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=dtype))
        return stack

    def _object_batch(self) -> int:
        n = self.options.object_batch or default_object_batch(
            self.device, free_memory_bytes(self.device), self.model.image_size)
        return max(1, min(n, len(self.object_ids)))

    def _conditioning_outputs(self, state: dict) -> dict[int, dict[int, dict]]:
        """Each object's output on each of its prompt frames as add_new_mask + propagate_in_video_preflight
        compute it (the mask as output, then the memory encoder on the upsampled low-res mask), without
        add_new_mask's consolidation of every object at video resolution, which tracking never reads."""
        pred = self.predictor
        size = self.model.image_size
        outputs: dict[int, dict[int, dict]] = {obj: {} for obj in self.object_ids}
        for frame in sorted({f for per in self.prompts.values() for f in per}):
            for obj in self.object_ids:
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

    def _batches(self, cond: dict[int, dict[int, dict]], state: dict) -> tuple[list[_Batch], torch.Tensor | None]:
        """Objects with the same prompt frames, `object_batch` at a time, their conditioning outputs stacked;
        plus the permutation back to object order (None when the batches are in object order already)."""
        size = self._object_batch()
        self.stats.object_batch = size
        groups: dict[tuple[int, ...], list[int]] = {}
        for position, obj in enumerate(self.object_ids):
            groups.setdefault(tuple(sorted(self.prompts[obj])), []).append(position)
        batches = []
        for prompt_frames, members in groups.items():
            for i in range(0, len(members), size):
                batch = _Batch(members[i:i + size], first_frame=prompt_frames[0])
                for f in prompt_frames:
                    per_object = [cond[self.object_ids[m]].pop(f) for m in batch.objects]
                    batch.output_dict["cond_frame_outputs"][f] = _stack_outputs(per_object, state["constants"])
                batches.append(batch)
        order = [m for b in batches for m in b.objects]
        if order == sorted(order):
            return batches, None
        return batches, torch.as_tensor(np.argsort(order), device=self.device)

    def frames(self, feed: _FrameFeed) -> Iterator[FrameMasks]:
        """Conditioning outputs first (or the resumed state), then every frame to the end."""
        self.stats.objects = len(self.object_ids)
        self.stats.storage_device = str(self.storage_device)
        self.stats.memory_window = memory_window(self.predictor, self.num_frames)
        state = self._state(feed)
        if self.resume is not None:
            batches, order = self._restore(self.resume, state)
        else:
            self._reuse_keyframe(state, feed)
            with self._contexts():
                batches, order = self._batches(self._conditioning_outputs(state), state)
        self.stats.batches = len(batches)
        self._live = (state, batches, order)
        for t in range(self.start, self.num_frames):
            with self._contexts():
                fm = self._frame(t, state, feed, batches, order)
            self.next_frame = t + 1
            yield fm

    def _reuse_keyframe(self, state: dict, feed: _FrameFeed) -> None:
        """Seed sam2's feature cache with the prompt stage's encoding of the first prompt frame, after checking
        that it encoded the very tensor tracking would (same frame, same preprocessing); ValueError if not."""
        kf = self.keyframe
        if kf is None or kf.frame != self.start:
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
        state, batches, order = self._live
        cpu = lambda t: t.to("cpu")  # noqa: E731
        return TrackerState(
            next_frame=self.next_frame, object_ids=list(self.object_ids),
            batches=[{"objects": list(b.objects), "first_frame": b.first_frame,
                      "output_dict": _map_tensors(b.output_dict, cpu)} for b in batches],
            constants=_map_tensors(state["constants"], cpu),
            order=None if order is None else order.to("cpu"))

    def _restore(self, resume: TrackerState, state: dict) -> tuple[list[_Batch], torch.Tensor | None]:
        to_device = lambda t: t.to(self.device)  # noqa: E731
        state["constants"].update(_map_tensors(resume.constants, to_device))
        batches = [_Batch(list(b["objects"]), int(b["first_frame"]), self._placed(b["output_dict"]))
                   for b in resume.batches]
        self.stats.object_batch = max(len(b.objects) for b in batches)
        return batches, None if resume.order is None else resume.order.to(self.device)

    def _placed(self, output_dict: dict) -> dict:
        """A restored output_dict where sam2 keeps it: memories and masks on the storage device, the rest
        (object pointers, scores, position encodings) on the compute device."""
        def place(out: dict) -> dict:
            return {k: _map_tensors(v, lambda t: t.to(self.storage_device if k in _STORED else self.device))
                    for k, v in out.items()}
        return {kind: {f: place(out) for f, out in per_frame.items()} for kind, per_frame in output_dict.items()}

    def _frame(self, t: int, state: dict, feed: _FrameFeed, batches: list[_Batch],
               order: torch.Tensor | None) -> FrameMasks:
        pred = self.predictor
        oldest = oldest_readable_frame(pred, t + 1, self.num_frames)
        oldest_memory = oldest_memory_frame(pred, t + 1)
        pred_masks, scores = [], []
        with self._shared_attention.frame() if self._shared_attention else contextlib.nullcontext():
            for batch in batches:
                od = batch.output_dict
                if t < batch.first_frame:  # not prompted yet: no mask, no score
                    low_res = self.model.image_size // 4
                    pred_masks.append(torch.full((len(batch.objects), 1, low_res, low_res), _NO_OBJECT_LOGIT,
                                                 dtype=torch.float32, device=self.device))
                    scores.append(torch.full((len(batch.objects), 1), float("nan"), device=self.device))
                    continue
                current = od["cond_frame_outputs"].get(t)
                if current is not None:
                    masks = current["pred_masks"].to(self.device, non_blocking=True)
                else:
                    current, masks = pred._run_single_frame_inference(
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
                pred_masks.append(masks)
                scores.append(current["object_score_logits"])
        all_masks = torch.cat(pred_masks) if len(pred_masks) > 1 else pred_masks[0]
        all_scores = torch.cat(scores) if len(scores) > 1 else scores[0]
        if order is not None:
            all_masks, all_scores = all_masks[order], all_scores[order]
        binary = self._video_res_binary(state, all_masks)
        feed.release_before(t + 1)
        return FrameMasks(frame=t, source_frame=self.source_frames[t],
                          object_ids=tuple(int(o) for o in self.object_ids), masks=binary,
                          object_scores=all_scores.flatten().float().cpu().numpy())


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


def _set_tf32(value: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = value


class Tracking(Iterator[FrameMasks]):
    """The iterator `track` returns: FrameMasks in frame order, with live `stats`.

    The model runs in the caller's thread, one frame per `next()`. Decoding runs ahead in a thread started
    by the first `next()` and joined after the last frame, on an error, or by `close()` (also called when
    the iterator is dropped); after that the caller's frame iterator is free again."""

    def __init__(self, engine: _Engine | None, frames: Iterable[np.ndarray], stats: TrackStats,
                 options: TrackOptions):
        self.stats = stats
        self.device = engine.device if engine is not None else None  # the model's device
        self._engine = engine
        self._restore: list = []  # (setter, old value) of global flags to put back when done
        self._gen = self._generate(engine, frames, options) if engine is not None else iter(())

    def __iter__(self) -> "Tracking":
        return self

    def __next__(self) -> FrameMasks:
        return next(self._gen)

    def snapshot(self) -> TrackerState:
        """The engine's state after the last frame yielded, for `track(..., resume=...)` (see TrackerState).
        Take it between frames, in the thread that iterates."""
        if self._engine is None:
            raise RuntimeError("nothing is tracked (no prompts): there is no state to save")
        return self._engine.snapshot()

    def close(self) -> None:
        """Stop decoding ahead and restore global flags; later `next()` calls raise StopIteration."""
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()
        self._restore_flags()

    def __del__(self) -> None:
        self.close()

    def _restore_flags(self) -> None:
        while self._restore:
            setter, value = self._restore.pop()
            setter(value)

    def _generate(self, engine: _Engine, frames: Iterable[np.ndarray], options: TrackOptions):
        device = engine.device
        if resolve_tf32(options.tf32, device):
            self._restore.append((_set_tf32, (torch.backends.cuda.matmul.allow_tf32,
                                              torch.backends.cudnn.allow_tf32)))
            _set_tf32((True, True))
            self.stats.tf32 = True
        produce = _produce(frames, engine.start, engine.num_frames, engine.model.image_size,
                           device.type == "cuda", self.stats, _AliveCounter(self.stats))
        stop = threading.Event()
        decode_thread = options.decode_thread if options.decode_thread is not None else spare_core(device)
        self.stats.decode_thread = decode_thread
        if decode_thread:
            frames_q: queue.Queue = queue.Queue(maxsize=options.prefetch)
            prefetch = threading.Thread(target=_prefetch, name="masklet-prefetch", daemon=True,
                                        args=(produce, frames_q, stop))
            prefetch.start()
            feed = _FrameFeed(frames_q, engine.num_frames, device)
        else:
            prefetch = None
            feed = _FrameFeed(produce, engine.num_frames, device)
        try:
            for fm in engine.frames(feed):
                self.stats.frames += 1
                yield fm
        finally:
            stop.set()
            if prefetch is not None:
                prefetch.join()
            produce.close()
            self._restore_flags()


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
) -> Tracking:
    """Track every prompt's mask from its frame to the end; yields one FrameMasks per frame, in order.

    `frames` yields RGB uint8 (H, W, 3) arrays of the item's decoded frames, starting at frame 0. It is read
    from a helper thread, at most `options.prefetch` frames ahead of the model and never past frame
    `num_frames - 1`; if it ends early, MediaEnded is raised after every earlier frame was yielded.
    `object_scores` are SAM 2's object-presence logits. Bad prompts raise ValueError here, before any work.

    With `resume` (a `Tracking.snapshot()` of an earlier run over the same item, prompts and model), tracking
    goes on at `resume.next_frame` exactly as the interrupted run would have: `frames` still starts at frame 0
    (earlier frames are pulled and skipped, not preprocessed) and only later frames are yielded.

    With `keyframe` (pipeline.stages.prompt.prompt_and_encode_keyframe's features of the first prompt frame),
    that frame is not encoded again; ValueError if they were computed on another image than tracking reads.
    Ignored when resuming, or when they are for another frame."""
    stats = TrackStats(autocast=resolve_autocast(options.autocast, torch.device(model.predictor.device)))
    if not prompts:
        return Tracking(None, frames, stats, options)
    engine = _Engine(model, num_frames, height, width, prompts, source_frames, options, stats, resume, keyframe)
    if options.compile:
        compile_model_parts(engine.predictor)
        stats.compiled = True
    return Tracking(engine, frames, stats, options)


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
