"""Which failures belong to an item and which to the machine it ran on, and what the worker does with each.

`classify(exc, out)` sorts an exception raised while processing an item into one of three kinds:

- item: the media or its content (unreadable, truncated, mixed sizes, bad prompts, ...). The worker retries it
  `retries` times and then commits a failed row; the shard goes on. Anything not recognised below is an item
  fault: that is what a failure was before this module, and a failed row is visible and redoable
  (`masklet resume --retry-failed`).
- oom: out of memory. torch.OutOfMemoryError (CUDA), torch's CPU allocator failing ("DefaultCPUAllocator:
  can't allocate memory", a RuntimeError) and Python's MemoryError (numpy's "Unable to allocate ..."). A
  MemoryError is host memory running out: on a CPU run that is the device's memory, on a GPU run it is mostly
  the masks at video resolution, which also shrink with the object batch, so it takes the same ladder. The
  worker retries the item down the ladder (`next_rung`): the object batch the tracker used, halved down to 1,
  then the tracking state offloaded to host memory (GPU only: on a CPU it is host memory already); only then
  is the item committed as failed, with the memory it needed and a cluster profile that would fit it
  (`memory_advice`). Each rung starts the item again at frame 0: a checkpoint's tracker state is laid out in
  the old rung's object batches, and masks of two batch sizes differ by float rounding, so they are not mixed.
- environment: the machine, not the item: a CUDA error other than out of memory (a lost or failed GPU, an
  illegal access or device-side assert, after which the CUDA context is unusable for every later item),
  and the output file system refusing writes: ENOSPC (full), EDQUOT (over quota), EROFS (read-only) anywhere
  (the worker writes only under OUT and the system's temporary folder), EIO unless it names a file outside OUT
  (a bad sector under an input file is that item's fault), EACCES/EPERM when they name a file under OUT (an
  unreadable input is an item fault). The run_shard hook also treats a model that cannot load as one. The
  worker stops the shard without committing the item, keeps the item's checkpoint, writes a `ShardFault`
  record to OUT/faults/shard-NNNNN.json and raises `EnvironmentFault` (the CLI exits 3; a SLURM task fails).
  `masklet status` shows the shard as failed with the record's line; `masklet resume` reruns it, going on
  from the checkpoint; the record is removed when the shard next finishes cleanly.

The exception is examined with its causes and contexts (`raise ... from e`, or an error raised while handling
another): a decoder that wraps an OSError in a ValueError keeps the OSError's kind.
"""
from __future__ import annotations

import dataclasses
import errno
import gc
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

from pipeline.config import PROFILES_DIR
from pipeline.device import GiB, RESERVE_BYTES
from pipeline.paths import RunPaths
from pipeline.store.atomic import write_text_atomic

if TYPE_CHECKING:
    import torch

    from pipeline.stages.track import TrackOptions

log = logging.getLogger("masklet.faults")

FaultKind = Literal["item", "oom", "environment"]

# errno of a failed write and what it means for the file system it names (or OUT's, when it names none)
_FULL = {errno.ENOSPC: "the file system is full", errno.EDQUOT: "the disk quota is exceeded",
         errno.EROFS: "the file system is read-only"}
_IO = {errno.EIO: "an I/O error (the disk or network file system failed)"}
_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
_CUDA_TEXT = re.compile(r"CUDA error|CUDA driver|CUDA-capable device|no CUDA GPUs|CUBLAS_STATUS|CUDNN_STATUS|"
                        r"cuDNN error|NCCL error|device-side assert|NVML")
_CPU_ALLOC_TEXT = "DefaultCPUAllocator: can't allocate memory"
_MAX_LINE = 600


@dataclass(frozen=True)
class Fault:
    """What kind of failure an exception is, its one-line text and, for an environment fault, what to fix."""

    kind: FaultKind
    error: str  # "Type: message" on one line, of the exception that decided the kind
    advice: str = ""  # environment: what to fix before `masklet resume`

    @property
    def line(self) -> str:
        return f"{self.error} ({self.advice})" if self.advice else self.error


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line, valid UTF-8 (paths may not be), at most _MAX_LINE characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= _MAX_LINE else text[:_MAX_LINE - 3] + "..."


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _under(path: object, out: Path | None) -> bool | None:
    """Whether an OSError's file is under OUT (None: it names no file, or OUT is not known)."""
    if out is None or path is None:
        return None
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(out.resolve())
    except (TypeError, ValueError, OSError):
        return None


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - the worker always has torch
        return False
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and _CPU_ALLOC_TEXT in str(e))


def _is_cuda_error(e: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    accelerator = getattr(torch, "AcceleratorError", ())  # torch >= 2.8 raises CUDA errors as this type
    return (isinstance(e, (torch.cuda.CudaError, *((accelerator,) if accelerator else ())))
            or (isinstance(e, RuntimeError) and bool(_CUDA_TEXT.search(str(e)))))


def _os_fault(e: OSError, out: Path | None) -> str | None:
    """The advice for an OSError that is the output file system's fault, else None."""
    files = [f for f in (e.filename, e.filename2) if f is not None]
    under = [_under(f, out) for f in files]
    where = f"the file system of {os.fsdecode(files[0])}" if files else "the output file system"
    if e.errno in _FULL:
        return f"{_FULL[e.errno]} on {where}: free space there (or raise the quota), then `masklet resume OUT`"
    if e.errno in _IO and (not files or any(u is not False for u in under)):
        return f"{_IO[e.errno]} on {where}: check it, then `masklet resume OUT`"
    if e.errno in _DENIED and any(under):
        return (f"{_DENIED[e.errno]} on {where}: make OUT writable for the user running the pipeline, then "
                f"`masklet resume OUT`")
    return None


def classify(exc: BaseException, out: Path | str | None = None) -> Fault:
    """Item, oom or environment (see the module's docstring); `out` is the run folder."""
    root = Path(out) if out is not None else None
    for e in _chain(exc):
        if _is_oom(e):
            return Fault("oom", one_line(e))
    for e in _chain(exc):
        if _is_cuda_error(e):
            return Fault("environment", one_line(e),
                         "the GPU failed and its CUDA context is unusable: `masklet resume OUT` (on another node "
                         "if it fails again)")
        if isinstance(e, OSError) and e.errno is not None:
            advice = _os_fault(e, root)
            if advice:
                return Fault("environment", one_line(e), advice)
    return Fault("item", one_line(exc))


def model_load_fault(exc: BaseException, model_name: str) -> Fault:
    """A model that cannot load (checkpoint unreadable, device missing, too small for the model) fails every
    item alike: it is the shard's environment, not an item."""
    return Fault("environment", one_line(exc),
                 f"model {model_name} could not be loaded: fix what the error says, then `masklet resume OUT`")


# --- the out-of-memory ladder --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rung:
    """What one try of an item changes in the tracking options: the object batch and the state offload
    (None: as the run's config and the device sizing say)."""

    object_batch: int | None = None
    offload_state: bool | None = None

    def apply(self, options: "TrackOptions") -> "TrackOptions":
        changes = {k: v for k, v in (("object_batch", self.object_batch), ("offload_state", self.offload_state))
                   if v is not None}
        return dataclasses.replace(options, **changes) if changes else options

    def describe(self) -> str:
        return (f"object batch {self.object_batch or 'as sized'}"
                + (", state offloaded" if self.offload_state else ""))


def can_offload(device: "torch.device") -> bool:
    """Offloading moves the tracking state to host memory: only a GPU frees memory by it."""
    return device.type == "cuda"


def next_rung(rung: Rung, tracked_batch: int | None, offloaded: bool, offload_possible: bool) -> Rung | None:
    """The rung after an out-of-memory failure, or None when none is left. `tracked_batch`: the object batch
    the tracker really used (None: it failed before choosing one); `offloaded`: whether the state was already
    in host memory. Halve the batch down to 1, then offload the state, then give up."""
    if tracked_batch is not None and tracked_batch > 1:
        return Rung(tracked_batch // 2, rung.offload_state)
    if offload_possible and not offloaded:
        return Rung(tracked_batch or rung.object_batch, True)
    return None


_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": GiB, "TiB": 1024**4}
_SIZE = r"([\d.]+) ?(B|KiB|MiB|GiB|TiB)"
_TRIED = [re.compile(r"Tried to allocate " + _SIZE), re.compile(r"Unable to allocate " + _SIZE),
          re.compile(r"you tried to allocate (\d+)( )?bytes")]
_IN_USE = re.compile(r"this process has " + _SIZE + r" memory in use")
_CAPACITY = re.compile(r"total capacity of " + _SIZE)


def _size(pattern: re.Pattern, text: str) -> int | None:
    m = pattern.search(text)
    if not m:
        return None
    unit = m.group(2).strip() or "B"
    return int(float(m.group(1).rstrip(".")) * _UNITS[unit])


@dataclass(frozen=True)
class MemoryNeed:
    """What an out-of-memory failure says about the memory an item needs."""

    device: Literal["gpu", "cpu"]
    needed_bytes: int | None  # in use when it failed + the allocation that failed (None: unknown)
    device_bytes: int | None  # memory of the device it failed on (None: unknown)


def memory_need(exc: BaseException, device: "torch.device", device_bytes: int | None) -> MemoryNeed:
    """From the error's own figures (torch: "Tried to allocate X. ... total capacity of Y ... this process has Z
    memory in use"; numpy: "Unable to allocate X"; torch's CPU allocator: "you tried to allocate N bytes"),
    else the device's peak reserved memory, plus the allocation that failed."""
    text = str(exc)
    gpu = device.type == "cuda" or "CUDA out of memory" in text
    tried = next((b for b in (_size(p, text) for p in _TRIED) if b is not None), None)
    in_use = _size(_IN_USE, text)
    if in_use is None and gpu and device.type == "cuda":
        import torch

        in_use = torch.cuda.max_memory_reserved(device) if torch.cuda.is_initialized() else None
    if device_bytes is None and gpu:
        device_bytes = _size(_CAPACITY, text)
    if device_bytes is None and not gpu:
        from pipeline.device import host_memory_bytes

        device_bytes = host_memory_bytes() or None
    needed = (in_use or 0) + tried if tried is not None else in_use
    return MemoryNeed("gpu" if gpu else "cpu", needed, device_bytes)


def gpu_profiles(folder: Path = PROFILES_DIR) -> dict[str, float]:
    """Cluster profiles (configs/clusters/*.yaml) that say their GPU memory: name -> slurm.gpu_memory_gb."""
    import yaml

    out = {}
    for path in sorted(folder.glob("*.yaml")):
        gb = ((yaml.safe_load(path.read_text()) or {}).get("slurm") or {}).get("gpu_memory_gb")
        if gb:
            out[path.stem] = float(gb)
    return out


def fitting_profile(need: MemoryNeed, profiles: dict[str, float] | None = None) -> str | None:
    """The cluster profile with the least GPU memory that holds what the item needed beside the reserve of
    pipeline/device.py, and more than the device it failed on. Profiles' "GB" are read as GiB (an "80GB" A100
    has 80 GiB); the reserve covers the difference where a slice has a little less."""
    profiles = gpu_profiles() if profiles is None else profiles
    floor = max(need.needed_bytes or 0, 0) + RESERVE_BYTES
    fits = [(gb, name) for name, gb in profiles.items()
            if gb * GiB >= floor and gb * GiB > (need.device_bytes or 0) + RESERVE_BYTES]
    return min(fits)[1] if fits else None


def memory_advice(need: MemoryNeed, rung: Rung, profiles: dict[str, float] | None = None) -> str:
    """The sentence a failed row gets after the last rung: the memory needed, what there was, the way out."""
    def gib(b: int | None) -> str:
        return "?" if b is None else f"{b / GiB:.1f} GiB"

    at = rung.describe()
    needed = (f"needed about {gib(need.needed_bytes)}" if need.needed_bytes
              else f"needed more than {gib(need.device_bytes)}")
    have = f"the {'GPU' if need.device == 'gpu' else 'host'} has {gib(need.device_bytes)}"
    if need.device == "cpu":
        want = max(need.needed_bytes or 0, need.device_bytes or 0) + RESERVE_BYTES
        fix = (f"give the job more memory (slurm.mem_gb={-(-want // GiB)} or more), then "
               f"`masklet resume OUT --retry-failed`")
    else:
        profile = fitting_profile(need, profiles)
        fix = (f"profile {profile} would fit it: `masklet resume OUT --retry-failed --profile {profile}`"
               if profile else "no profile in configs/clusters has that much GPU memory: run it on a bigger "
                               "GPU, or in a new run with a smaller decode.max_side")
    return f"out of memory at every rung down to {at}: {needed}, {have}; {fix}"


def reset_peak_memory(device: "torch.device") -> None:
    """Start a try's peak-memory count afresh (CUDA only), so that `memory_need` sees this try's peak."""
    if device.type == "cuda":
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(device)


def release_memory(device: "torch.device") -> None:
    """After an out-of-memory failure: drop the failed try's tensors (held by reference cycles through its
    traceback) and hand the allocator's cached blocks back, so the next rung starts from the model alone."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# --- the shard's fault record ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardFault:
    """OUT/faults/shard-NNNNN.json: why a shard stopped on an environment fault."""

    shard_id: int
    error: str  # the fault's one line, with its advice
    item_id: str | None = None  # the item in flight (None: before any item, e.g. the model did not load)
    at: str = ""  # UTC, ISO 8601
    host: str = ""

    @property
    def line(self) -> str:
        where = f" at item {self.item_id}" if self.item_id else ""
        host = f" on {self.host}" if self.host else ""
        return f"shard {self.shard_id} stopped{where}{host} by an environment fault: {self.error}"

    @classmethod
    def now(cls, shard_id: int, fault: Fault, item_id: str | None) -> "ShardFault":
        return cls(shard_id, fault.line, item_id, datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   socket.gethostname())


class EnvironmentFault(RuntimeError):
    """A shard stopped because of its environment (see the module's docstring); `masklet resume` reruns it."""

    def __init__(self, fault: ShardFault):
        super().__init__(fault.line)
        self.fault = fault


def shard_stop(exc: BaseException, shard_id: int, out: Path | str) -> EnvironmentFault | None:
    """The EnvironmentFault that stops a shard for `exc` (raised outside any item: committing, compacting),
    or None when `exc` is no environment fault."""
    if isinstance(exc, EnvironmentFault):
        return exc
    fault = classify(exc, out)
    return EnvironmentFault(ShardFault.now(shard_id, fault, None)) if fault.kind == "environment" else None


def write_shard_fault(paths: RunPaths, fault: ShardFault) -> bool:
    """Write the record atomically. It may not fit on a full or read-only file system: then say so in the log
    and return False (the exit status and the log still say what failed)."""
    path = paths.shard_fault(fault.shard_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(dataclasses.asdict(fault)) + "\n")
        return True
    except OSError as e:
        log.error("could not write %s (%s); the fault was: %s", path, one_line(e), fault.line)
        return False


def read_shard_fault(paths: RunPaths, shard_id: int) -> ShardFault | None:
    try:
        data = json.loads(paths.shard_fault(shard_id).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return ShardFault(shard_id, f"unreadable fault record {paths.shard_fault(shard_id)}: {one_line(e)}")
    fields = {f.name for f in dataclasses.fields(ShardFault)}
    return ShardFault(**{k: v for k, v in data.items() if k in fields})


def clear_shard_fault(paths: RunPaths, shard_id: int) -> None:
    paths.shard_fault(shard_id).unlink(missing_ok=True)
