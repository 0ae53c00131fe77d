"""The tracking engine's settings, statistics and saved state, and the rules it sizes itself by: objects per
batched step (`default_object_batch`), which earlier frames the model can still read (`oldest_readable_frame`,
`oldest_memory_frame`, `memory_window`), autocast and TF32 per device. pipeline/stages/track.py re-exports
every public name here."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

AUTOCAST_MODES = ("auto", "bf16", "fp16", "off")

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
    with their conditioning and still-readable outputs, sam2's cached constants, the objects per batched step
    and the dropped objects. Made by `Tracking.snapshot()` between frames; `track(..., resume=state)`
    continues from it. `payload()` is plain dicts, lists, ints and CPU tensors, so torch.save /
    torch.load(weights_only=True) round-trip it exactly."""

    next_frame: int
    object_ids: list[int]  # every object so far, those added during tracking (`reseed`) included, in order
    batches: list[dict]  # {"objects": [positions], "first_frame": int, "output_dict": sam2's output dict}
    constants: dict
    # objects per batched step: later additions are batched as before the snapshot (0: states saved before
    # additions existed; their largest batch stands in)
    object_batch: int = 0
    dropped: dict[int, int] = field(default_factory=dict)  # object id -> first frame it was no longer tracked

    def payload(self) -> dict:
        return {"next_frame": self.next_frame, "object_ids": list(self.object_ids), "batches": self.batches,
                "constants": self.constants, "object_batch": self.object_batch, "dropped": dict(self.dropped)}

    @classmethod
    def from_payload(cls, payload: dict) -> "TrackerState":
        # states saved before objects could be added or dropped have neither key (and a now unused "order")
        return cls(int(payload["next_frame"]), [int(o) for o in payload["object_ids"]], payload["batches"],
                   payload["constants"], int(payload.get("object_batch", 0)),
                   {int(k): int(v) for k, v in payload.get("dropped", {}).items()})


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

