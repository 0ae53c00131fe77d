"""What device a worker runs on, and how much work it may hold at once.

Owns two things:
- `detect_device()`: the device this process will compute on, as a `DeviceInfo` record: a CPU, a whole
  GPU or a MIG slice (a MIG slice shows up as a `MIG-...` UUID in CUDA_VISIBLE_DEVICES and as
  "... MIG 1g.10gb" in the device name), with its name and memory. It works without a GPU and without CUDA.
- `size_work(memory_bytes, model_name, image_size)`: a pure function from memory to a `WorkSizing` (largest
  model allowed, objects per batched tracking step, frames kept ahead on the device, whether the tracking
  state goes to host memory). The rule is written in its docstring; every number it uses is below, each
  marked as a fact (read from sam2's source or its published figures), a measurement (how to repeat it),
  or an estimate (a policy choice or a guess no machine here could check).
- `size_item(sizing, item_id, height, width, points_per_batch)`: the same rule for one item, whose video
  resolution adds two costs that the model's input size does not show: the AMG's masks at the frame's full
  resolution (points_per_batch of them at once) and every tracked frame's upsampling of the objects' masks to
  video resolution. It lowers the object batch to what fits, or raises `ItemTooLargeError` (a ValueError:
  the worker records it as that item's failure) naming what would fit.
- `memory_for(device, gpu_memory_gb)`: the memory to size for; `slurm.gpu_memory_gb` when the device cannot
  be asked, the smaller of the two when both are known.
- `python -m pipeline.device` prints the sizing table of the README (tests/test_device.py checks they agree).

It never changes what a run computes: the model is the run's (frozen in run.json); sizing only says whether
it fits and how to lay the work out on the memory there is.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from typing import Literal, Mapping

from pipeline.config import MODEL_NAMES, StoreConfig

GiB = 1024**3

# --- facts and measurements ----------------------------------------------------------------------------------
# Parameters of the SAM 2.1 architectures, counted on the models sam2's own configs build (published: tiny
# 38.9M, small 46M, base+ 80.8M, large 224.4M). Weights stay float32 (4 bytes) on every device; autocast
# lowers the precision of activations only.
MODEL_PARAMS = {
    "sam2.1_hiera_tiny": 38_962_498,
    "sam2.1_hiera_small": 46_060_354,
    "sam2.1_hiera_base_plus": 80_850_178,
    "sam2.1_hiera_large": 224_446_642,
}
BYTES_PER_WEIGHT = 4
# Measured: peak bytes of live tensors created by one `forward_image` of a 1024x1024 frame (float32, CPU,
# inference mode, weights excluded), tracked tensor by tensor with a TorchDispatchMode on random-weight models
# (2026-11, torch 2.14.1, sam2 1.1.0). It includes the frame's features that sam2 then keeps (below). Float32
# bounds a CUDA bf16 run from above (autocast halves most activations).
ENCODER_PEAK_BYTES_1024 = {
    "sam2.1_hiera_tiny": 297_271_808,
    "sam2.1_hiera_small": 297_271_808,
    "sam2.1_hiera_base_plus": 322_961_408,
    "sam2.1_hiera_large": 415_236_096,
}
# Fact (sam2's source, checked by measurement): the features sam2 keeps for the frame being tracked, float32 at
# 1024: FPN levels of 32x256x256, 64x128x128 and 256x64x64, the 256x64x64 vision features, and a 256-channel
# position encoding per level: 27,262,976 values = 109,051,904 bytes, the same for all four models (the
# neck is 256 wide). Scales with image_size**2.
FEATURE_BYTES_1024 = 109_051_904
# Fact (sam2's source): what the tracker keeps per object per remembered frame: the memory features in bfloat16
# (64 x S/16 x S/16 x 2 bytes), the low-resolution mask logits in float32 (S/4 x S/4 x 4) and the object pointer
# (256 x 4). 787,456 bytes at 1024.
def state_bytes_per_object_frame(image_size: int) -> int:
    return 64 * (image_size // 16) ** 2 * 2 + (image_size // 4) ** 2 * 4 + 256 * 4


# Fact (sam2.1 configs: num_maskmem=7, max_obj_ptrs_in_encoder=16, memory stride 1): the tracking engine
# (pipeline/stages/track.py) keeps the 15 latest frame outputs each next frame can read, plus the prompt frame.
REMEMBERED_FRAMES = 16


def frame_bytes(image_size: int) -> int:
    """Fact: one preprocessed frame is float32 (3, S, S): 12 MiB at 1024."""
    return 3 * image_size * image_size * 4


# Measured (`python benchmarks/measure_memory.py`, CPU, float32, torch 2.14.1, sam2 1.1.0, 2026-12-05): the AMG
# upsamples each batch of points' masks (3 per point, multimask) to the frame's full resolution in float32 and
# thresholds, scores and encodes them there: its peak grows by 14.95 bytes per point per frame pixel (slope
# over 640x480 and 1280x720 at 16, 32 and 64 points per batch; 15.1 per point-pixel at 1280x720 with the
# fixed part included). Budget 16 (7% margin).
AMG_BYTES_PER_POINT_PIXEL = 16
# Measured the same way: the tracker's upsampling of an object batch's masks to video resolution (float32
# logits, then the bool mask) peaks at 5.0 bytes per object per video pixel. Budget 5 (4 + 1 exactly: nothing
# else is made at that size). Per object of a tracking step, beside the step's own BYTES_PER_OBJECT_PIXEL x S^2.
UPSAMPLE_BYTES_PER_OBJECT_PIXEL = 5


# --- estimates (policy choices; no GPU was available to measure them where this was written) -----------------
# Memory the device reports but the worker cannot use: the CUDA context (a few hundred MiB on current drivers)
# and the caching allocator's fragmentation. On a CPU: the interpreter, torch, sam2 and the decoders (measured
# here: 0.67 GB of RSS after importing everything and building the tiny model, weights excluded).
RESERVE_BYTES = 1 * GiB
# The model's fixed cost (weights, one frame's encoder peak) may take at most this share of the usable memory;
# the rest is for the objects tracked together and their state.
MODEL_SHARE = 0.5
# Share of the memory left after the model that frames decoded ahead may take, and the most frames worth
# holding: the decoder keeps pace within a few frames, more buy nothing.
FRAME_SHARE = 0.05
MAX_FRAMES_AHEAD = 8
CPU_FRAMES_AHEAD = 2  # the tracking engine's default prefetch on CPU
# The tracking state of up to `max_objects` objects may take at most this share of the memory left after the
# model; beyond it, state is kept in host memory (sam2's offload_state_to_cpu) and copied in per frame.
STATE_SHARE = 0.25


DeviceKind = Literal["cpu", "gpu", "mig"]


class ItemTooLargeError(ValueError):
    """One item needs more device memory than there is, even one object at a time. A ValueError, so the worker
    records it as that item's failure and goes on; the message names the item, the memory it needs and the
    settings or cluster profiles with which it would fit."""


@dataclass(frozen=True)
class DeviceInfo:
    """The device a worker computes on. `uuid` is the MIG UUID for a slice (as CUDA_VISIBLE_DEVICES names
    it), the GPU's UUID for a whole GPU when torch reports it; `index` is the torch device index."""

    kind: DeviceKind
    name: str
    memory_bytes: int
    uuid: str | None = None
    index: int | None = None

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index or 0}"

    def describe(self) -> str:
        ident = f" {self.uuid}" if self.uuid else (f" #{self.index}" if self.index is not None else "")
        return f"{self.kind} {self.name}{ident}, {self.memory_bytes / GiB:.1f} GiB"


@dataclass(frozen=True)
class WorkSizing:
    """How much work one worker holds at once on a device (see `size_work` for the rule)."""

    memory_bytes: int
    model_name: str
    image_size: int
    model_bytes: int  # weights + one frame's encoder peak + kept features, for model_name at image_size
    model_fits: bool  # model_name fits in MODEL_SHARE of the usable memory
    largest_model: str | None  # the largest SAM 2.1 model that fits; None: not even tiny
    object_batch: int  # objects per batched tracking step
    frames_ahead: int  # preprocessed frames decoded ahead and held for the model
    offload_state: bool  # keep the tracking state in host memory (sam2's offload_state_to_cpu)
    kind: DeviceKind = "gpu"
    max_objects: int = 64
    free_bytes: int = 0  # usable memory left after the model's fixed cost (what objects and the AMG share)

    def refusal(self) -> str | None:
        """Why the model cannot run here (None when it fits), with the way out."""
        if self.model_fits:
            return None
        need = self.model_bytes / MODEL_SHARE + RESERVE_BYTES
        other = (f"the largest that fits is {self.largest_model}" if self.largest_model
                 else "no SAM 2.1 model fits")
        return (f"{self.model_name} at image size {self.image_size} needs about {need / GiB:.1f} GiB of device "
                f"memory, this device has {self.memory_bytes / GiB:.1f} GiB ({other}); run on a bigger GPU or "
                f"MIG slice (another cluster profile), or start a new run with a smaller model.name")


def model_bytes(model_name: str, image_size: int) -> int:
    """Weights plus the peak of one frame through the image encoder (which includes the kept features)."""
    if model_name not in MODEL_PARAMS:
        raise ValueError(f"model {model_name!r} is not a SAM 2.1 model; use one of {MODEL_NAMES}")
    scale = (image_size / 1024) ** 2
    return int(MODEL_PARAMS[model_name] * BYTES_PER_WEIGHT
               + max(ENCODER_PEAK_BYTES_1024[model_name], FEATURE_BYTES_1024) * scale)


def size_work(memory_bytes: int, model_name: str, image_size: int | None, *, kind: DeviceKind = "gpu",
              max_objects: int = 64) -> WorkSizing:
    """Size a worker's work to the memory of its device.

    The rule (S = image_size, 1024 when None; "usable" = memory_bytes - RESERVE_BYTES):
    1. A model's fixed cost is its float32 weights (4 x parameters) plus the peak of one frame through the
       image encoder, measured at 1024 and scaled by (S/1024)^2. A model fits when that is at most
       MODEL_SHARE (half) of the usable memory. `largest_model` is the largest of tiny < small < base+ <
       large that fits.
    2. What is left ("free" = usable - fixed cost of `model_name`) holds the objects tracked together:
       on a GPU or MIG slice the tracking engine's own rule (pipeline/stages/track.default_object_batch:
       half of free at 160 bytes per object per input pixel, at least 1, at most 64); on a CPU 1 (measured:
       batching buys nothing there, and 1 keeps masks bit-identical to sam2's predictor).
    3. Frames decoded ahead: on a GPU as many preprocessed frames (12 x S^2 bytes each) as fit in
       FRAME_SHARE of free, between 1 and MAX_FRAMES_AHEAD (8); on a CPU the engine's default, 2.
    4. State offload: the state of `max_objects` objects over REMEMBERED_FRAMES (16) frames, at
       `state_bytes_per_object_frame(S)` each (787,456 bytes at 1024), goes to host memory when it exceeds
       STATE_SHARE (a quarter) of free. Never on a CPU (it is host memory already).
    With the engine pruning what no later frame reads, state no longer grows with video length, so offload
    is only needed for many objects on a small slice.
    """
    size = image_size or 1024
    if size <= 0 or memory_bytes < 0:
        raise ValueError(f"size_work needs a positive image size and memory, got {size} and {memory_bytes}")
    usable = max(0, memory_bytes - RESERVE_BYTES)
    fixed = model_bytes(model_name, size)
    fitting = [m for m in MODEL_NAMES if model_bytes(m, size) <= MODEL_SHARE * usable]
    largest = max(fitting, key=MODEL_PARAMS.__getitem__) if fitting else None
    free = max(0, usable - fixed)
    if kind == "cpu":
        object_batch, frames_ahead, offload = 1, CPU_FRAMES_AHEAD, False
    else:
        from pipeline.stages.track import default_object_batch

        object_batch = default_object_batch("cuda", free, size)
        frames_ahead = max(1, min(MAX_FRAMES_AHEAD, int(FRAME_SHARE * free // frame_bytes(size))))
        state = max_objects * REMEMBERED_FRAMES * state_bytes_per_object_frame(size)
        offload = state > STATE_SHARE * free
    return WorkSizing(memory_bytes=memory_bytes, model_name=model_name, image_size=size, model_bytes=fixed,
                      model_fits=fixed <= MODEL_SHARE * usable, largest_model=largest, object_batch=object_batch,
                      frames_ahead=frames_ahead, offload_state=offload, kind=kind, max_objects=max_objects,
                      free_bytes=free)


def size_for_device(device: DeviceInfo | None, model_name: str, image_size: int | None, max_objects: int = 64,
                    gpu_memory_gb: float | None = None) -> WorkSizing:
    """size_work for a device (None: a GPU whose memory could not be read, sized by gpu_memory_gb)."""
    return size_work(memory_for(device, gpu_memory_gb), model_name, image_size,
                     kind=device.kind if device else "gpu", max_objects=max_objects)


def memory_for(device: DeviceInfo | None, gpu_memory_gb: float | None) -> int:
    """The memory to size for. A GPU or MIG slice: what it reports, or `slurm.gpu_memory_gb` (GB = 1e9 bytes)
    when that is smaller (a profile written for 40 GB cards on a partition that also has 80 GB ones) or when
    the device could not be asked (`device` None). A CPU: host memory (gpu_memory_gb is a GPU's)."""
    configured = None if gpu_memory_gb is None else int(gpu_memory_gb * 1e9)
    if device is None:
        if configured is None:
            raise ValueError("the device's memory could not be read and slurm.gpu_memory_gb is not set; set it to "
                             "the memory of the GPU or MIG slice the job gets (e.g. slurm.gpu_memory_gb=10)")
        return configured
    if device.kind == "cpu" or configured is None:
        return device.memory_bytes
    return min(device.memory_bytes, configured)


# --- one item: the costs that grow with the video's resolution ---------------------------------------------------

def amg_bytes(points_per_batch: int, height: int, width: int) -> int:
    """The AMG's peak beyond the model: points_per_batch points' masks at the frame's full resolution."""
    return AMG_BYTES_PER_POINT_PIXEL * points_per_batch * height * width


def object_bytes(image_size: int, height: int, width: int) -> int:
    """One object of a batched tracking step: the step at model resolution and its upsampling to video's."""
    from pipeline.stages.track import BYTES_PER_OBJECT_PIXEL

    return BYTES_PER_OBJECT_PIXEL * image_size**2 + UPSAMPLE_BYTES_PER_OBJECT_PIXEL * height * width


def item_fit(sizing: WorkSizing, height: int, width: int, points_per_batch: int) -> tuple[int, int]:
    """(object batch that fits, device bytes the item needs at object batch 1); batch 0: it does not fit.

    On a GPU or MIG slice the AMG's masks may take all of `free` (tracking has not started then), and an object
    batch CUDA_MEMORY_SHARE (half) of it, as in size_work. On a CPU the batch stays 1 (size_work's rule); both
    must fit in what the host has left."""
    from pipeline.stages.track import CUDA_MEMORY_SHARE, MAX_CUDA_OBJECT_BATCH

    amg = amg_bytes(points_per_batch, height, width)
    per_object = object_bytes(sizing.image_size, height, width)
    need = sizing.model_bytes + max(amg, int(per_object / CUDA_MEMORY_SHARE)) + RESERVE_BYTES
    if amg > sizing.free_bytes:
        return 0, need
    fit = int(sizing.free_bytes * CUDA_MEMORY_SHARE // per_object)
    if fit < 1:
        return 0, need
    if sizing.kind == "cpu":
        return 1, need
    return min(fit, MAX_CUDA_OBJECT_BATCH), need


def size_item(sizing: WorkSizing, item_id: str, height: int, width: int, points_per_batch: int) -> WorkSizing:
    """`sizing` for one item of height x width: the object batch lowered to what fits beside the item's
    upsampling (never raised); ItemTooLargeError when even one object at a time, or the AMG, does not fit."""
    batch, need = item_fit(sizing, height, width, points_per_batch)
    if batch < 1:
        raise ItemTooLargeError(_too_large(sizing, item_id, height, width, points_per_batch, need))
    return replace(sizing, object_batch=min(sizing.object_batch, batch))


def _too_large(sizing: WorkSizing, item_id: str, height: int, width: int, points_per_batch: int, need: int) -> str:
    ways = []
    ppb = next((p for p in range(points_per_batch - 1, 0, -1)
                if item_fit(sizing, height, width, p)[0]), None)
    if ppb:
        ways.append(f"prompt.points_per_batch={ppb} (a new run: the AMG's batch is part of the config)")
    longer = max(height, width)
    side = next((s for s in range(longer - 64, 63, -64)
                 if item_fit(sizing, *_scaled(height, width, s), points_per_batch)[0]), None)
    if side:
        ways.append(f"decode.max_side={side} (a new run; masks at the reduced size)")
    profiles = [name for name, gb in profile_memories().items()
                if item_fit(size_work(int(gb * 1e9), sizing.model_name, sizing.image_size,
                                      max_objects=sizing.max_objects), height, width, points_per_batch)[0]]
    if profiles:
        ways.append(f"a cluster profile with more memory: {', '.join(profiles)} (--profile NAME; the masks do not "
                    f"change)")
    return (f"item {item_id} ({width}x{height}) needs about {need / GiB:.1f} GiB of device memory even one object "
            f"at a time (the AMG's {points_per_batch} masks at full resolution: "
            f"{amg_bytes(points_per_batch, height, width) / GiB:.1f} GiB; one tracked object: "
            f"{object_bytes(sizing.image_size, height, width) / GiB:.2f} GiB), this device has "
            f"{sizing.memory_bytes / GiB:.1f} GiB; it fits with " + ("; or ".join(ways) or "no setting found"))


def _scaled(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The frame size decode.max_side gives (pipeline.stages.decode's rounding: half up, at least 1)."""
    longer = max(height, width)
    if longer <= max_side:
        return height, width
    scale = lambda v: max(1, int(v * max_side / longer + 0.5))  # noqa: E731
    return (max_side, scale(width)) if height >= width else (scale(height), max_side)


def profile_memories() -> dict[str, float]:
    """gpu_memory_gb of each cluster profile in configs/clusters/ that sets it, smallest first."""
    import yaml

    from pipeline.config import PROFILES_DIR

    found = {}
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        gb = (yaml.safe_load(path.read_text()) or {}).get("slurm", {}).get("gpu_memory_gb")
        if gb:
            found[path.stem] = float(gb)
    return dict(sorted(found.items(), key=lambda kv: (kv[1], kv[0])))


# --- the README's table ------------------------------------------------------------------------------------------

TABLE_VIDEOS = {"720p": (720, 1280), "1080p": (1080, 1920), "4K": (2304, 4096)}
TABLE_MEMORIES_GB = (10, 12, 40, 80)


def sizing_table(model_names: tuple[str, str] = ("sam2.1_hiera_tiny", "sam2.1_hiera_large"), image_size: int = 1024,
                 points_per_batch: int = 64, max_objects: int = 64) -> str:
    """Markdown: objects per tracking step (tiny / large) per video resolution and GPU memory, and the frames
    of masks the writer holds per write (pipeline.store.masks; host memory, so the same on every GPU)."""
    from pipeline.store.masks import MASK_BUFFER_BYTES

    head = " | ".join(f"{gb} GB" for gb in TABLE_MEMORIES_GB)
    lines = [f"| video (defaults: {max_objects} objects, points_per_batch {points_per_batch}) | frames per write | "
             f"{head} |", "|---|---|" + "---|" * len(TABLE_MEMORIES_GB)]
    for label, (height, width) in TABLE_VIDEOS.items():
        per_write = max(1, min(StoreConfig().frames_per_file, MASK_BUFFER_BYTES // (max_objects * height * width)))
        cells = []
        for gb in TABLE_MEMORIES_GB:
            batches = []
            for name in model_names:
                sizing = size_work(int(gb * 1e9), name, image_size, max_objects=max_objects)
                batch = item_fit(sizing, height, width, points_per_batch)[0]
                batches.append(str(min(batch, sizing.object_batch)) if batch else "too large")
            cells.append(" / ".join(batches))
        lines.append(f"| {label} ({width}x{height}) | {per_write} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(sizing_table())


# --- detection -----------------------------------------------------------------------------------------------

def visible_devices(env: Mapping[str, str] | None = None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list (indexes, GPU-... or MIG-... UUIDs); None when it is not set."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d.strip() for d in value.split(",") if d.strip() and d.strip() != "-1"]


def is_mig(visible_entry: str | None, device_name: str = "") -> bool:
    """A MIG slice: named by a MIG UUID (`MIG-<uuid>`, or the older `MIG-GPU-<uuid>/<gi>/<ci>`), or a device
    whose name carries the slice profile (`NVIDIA A100-SXM4-80GB MIG 1g.10gb`)."""
    return bool(visible_entry and visible_entry.startswith("MIG-")) or " MIG " in f" {device_name} "


def host_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when that is lower (a job's memory limit, where enforced)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or int(text) + 1):
            total = int(text)
    return total


def detect_device(env: Mapping[str, str] | None = None) -> DeviceInfo:
    """The device of torch's first visible CUDA device, else the CPU. A fake or absent GPU (no driver, or
    CUDA_VISIBLE_DEVICES naming devices that CUDA cannot open) is a CPU: what counts is what torch can use."""
    visible = visible_devices(env)
    try:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken or missing CUDA runtime means computing on the CPU
        cuda = False
    if cuda:
        props = torch.cuda.get_device_properties(0)
        entry = visible[0] if visible else None
        uuid = entry if entry and entry.startswith(("MIG-", "GPU-")) else None
        if uuid is None and getattr(props, "uuid", None):
            uuid = f"GPU-{props.uuid}"
        kind: DeviceKind = "mig" if is_mig(entry, props.name) else "gpu"
        return DeviceInfo(kind, props.name, int(props.total_memory), uuid=uuid, index=0)
    name = platform.processor() or platform.machine() or "cpu"
    return DeviceInfo("cpu", f"{name} ({os.cpu_count()} CPUs)", host_memory_bytes())
