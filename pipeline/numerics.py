"""The numerics a run's masks are computed with, recorded per item and kept the same across a run.

Two devices, dtypes or library versions give different masks for the same item and config: bfloat16 autocast
and TF32 round differently from float32, a batched tracking step sums in another order than a per-object
one, another torch or sam2 may change kernels or the model's code. None of that is in the run's config
fingerprint (model.device and model.threads are launch settings, and what they resolve to depends on the
machine), so this module owns it:

- `Numerics`: what one worker actually computes with, resolved from the config, the loaded model and the
  device sizing (`of_worker`): device class (`cpu`, `cuda-sm90`: the compute capability decides the kernels),
  device name, autocast dtype, object batch, TF32, torch.compile, torch and sam2 versions, checkpoint sha256.
  Every item row records it (items.parquet).
- The run's reference: OUT/numerics.json, created exclusively by the first worker that commits an item
  (`claim_reference`); a worker whose numerics differ refuses before its first item (`check_worker`) and,
  if it lost the race to create the file, before its first commit.
- `check_launch`: `masklet run`/`resume` refuse a relaunch whose numerics differ from the reference before
  launching, as far as the launching machine can tell (`of_launch`: fully for the local executor; for SLURM
  what does not depend on the node: versions, checkpoint, compile, CPU vs GPU from the profile).
- `--allow-mixed-numerics` on run/resume writes `allow_mixed_numerics` to run.json for good (the dataset may
  then hold items of other numerics, each row says which); `masklet status` shows it.

What must match (`COMPARED`): every field that changes masks. Object batch too: on a CPU it is always 1
(tracking is per object there), on a GPU another batch sums in another order (masks agree to within float
rounding, not bit for bit), and a slice with less memory gets a smaller batch. Not compared: the device's name
(the same compute capability runs the same kernels) and CPU threads (recorded in run.json's config).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.paths import RunPaths
from pipeline.store.atomic import fsync_dir, fsync_file

if TYPE_CHECKING:
    import torch

    from pipeline.config import RunConfig
    from pipeline.plan import RunPlan
    from pipeline.stages.models import LoadedModel
    from pipeline.stages.track import TrackOptions

NUMERICS_VERSION = 1
ALLOW_KEY = "allow_mixed_numerics"  # in run.json: {"at": ..., "command": ...} once a launch allowed it
COMPARED = ("device_class", "autocast", "object_batch", "tf32", "compile", "torch", "sam2", "checkpoint_sha256")
CUDA_UNKNOWN = "cuda"  # a launch that knows the job gets a GPU, not which one


@dataclass(frozen=True)
class Numerics:
    """What a worker computes masks with. At launch a field the launching machine cannot know is None."""

    device_class: str | None  # cpu | cuda-sm<major><minor> (| "cuda": some GPU, at launch)
    device_name: str | None  # e.g. "NVIDIA H100 80GB HBM3"; informational
    autocast: str | None  # bf16 | fp16 | off (resolved)
    object_batch: int | None  # objects per batched tracking step (resolved)
    tf32: bool | None  # TF32 matmuls/convolutions on (resolved: a CUDA device of compute capability >= 8)
    compile: bool
    torch: str
    sam2: str | None
    checkpoint_sha256: str | None  # None: random weights built from the seed (the seed is in the config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Numerics":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def key(self) -> dict:
        """The compared fields: equal keys give the same masks (tmp/partial checkpoints are keyed by it)."""
        return {k: getattr(self, k) for k in COMPARED}

    def describe(self) -> str:
        dtype = "float32" if self.autocast == "off" else f"{self.autocast} autocast"
        return (f"{self.device_class} ({self.device_name}), {dtype}, object batch {self.object_batch}, "
                f"TF32 {'on' if self.tf32 else 'off'}, compile {'on' if self.compile else 'off'}, "
                f"torch {self.torch}, sam2 {self.sam2}, checkpoint {(self.checkpoint_sha256 or 'seeded')[:12]}")


class _Unknown(str):
    """A checkpoint whose sha256 the launching machine cannot compute (it would have to download it)."""


_UNKNOWN = _Unknown("unknown")


def differences(reference: Numerics, new: Numerics) -> list[str]:
    """'field: reference -> new' for each compared field that differs. A field the new side does not know is
    skipped (None at launch; for the checkpoint, whose None means seeded weights, `_UNKNOWN`), and a launch's
    "cuda" matches any cuda-smXY."""
    out = []
    for name in COMPARED:
        old, value = getattr(reference, name), getattr(new, name)
        unknown = value is _UNKNOWN if name == "checkpoint_sha256" else value is None
        if unknown:
            continue
        if name == "device_class" and value == CUDA_UNKNOWN and str(old).startswith("cuda-"):
            continue
        if old != value:
            out.append(f"{name}: {old} -> {value}")
    return out


class NumericsMismatchError(RuntimeError):
    """A launch or worker would add masks of other numerics to a run; the message says the ways out."""


# --- resolving ---------------------------------------------------------------------------------------------

def device_class(device: "torch.device") -> str:
    import torch

    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm{major}{minor}"


def device_name(device: "torch.device") -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _versions() -> tuple[str, str | None]:
    import torch

    from pipeline.stages.sam2_pin import installed_sam2_version

    return str(torch.__version__), installed_sam2_version()


def of_worker(model: "LoadedModel", options: "TrackOptions") -> Numerics:
    """The numerics a worker computes with: its loaded model and the track options it passes to `track`."""
    from pipeline.stages.track import default_object_batch, free_memory_bytes, resolve_autocast, resolve_tf32

    device = model.device
    torch_version, sam2_version = _versions()
    batch = options.object_batch or default_object_batch(device, free_memory_bytes(device), model.image_size)
    return Numerics(device_class=device_class(device), device_name=device_name(device),
                    autocast=resolve_autocast(options.autocast, device), object_batch=int(batch),
                    tf32=resolve_tf32(options.tf32, device), compile=bool(options.compile), torch=torch_version,
                    sam2=sam2_version, checkpoint_sha256=model.checkpoint_sha256)


def _launch_checkpoint_sha(cfg: "RunConfig") -> str | None:
    from pipeline.stages.models import MODEL_SPECS, CheckpointError, resolve_checkpoint

    if cfg.model.random_weights and not cfg.model.checkpoint:
        return None
    cached = Path(cfg.model.cache_dir).expanduser() / MODEL_SPECS[cfg.model.name].checkpoint_file
    if not cfg.model.checkpoint and not cached.is_file():
        return _UNKNOWN  # the worker would download it; nothing to hash here
    try:
        return resolve_checkpoint(cfg.model)[1]
    except CheckpointError:
        return _UNKNOWN  # the worker will say what is wrong with it


def of_launch(cfg: "RunConfig") -> Numerics:
    """What the workers of a launch with `cfg` will compute with, as far as this machine can tell. The local
    executor runs here: everything is known (the device as `load_model` picks it). SLURM jobs run elsewhere: CPU
    when the config says model.device=cpu, "cuda" (unknown card) when it requests a GPU, else unknown."""
    import torch

    from pipeline.device import detect_device, size_for_device
    from pipeline.stages.models import pick_device
    from pipeline.stages.track import resolve_autocast, resolve_tf32

    p = cfg.propagate
    torch_version, sam2_version = _versions()
    sha = _launch_checkpoint_sha(cfg)
    known: "torch.device | None" = None
    if cfg.model.device == "cpu":
        known = torch.device("cpu")
    elif cfg.executor == "local":
        known = pick_device(cfg.model.device)
    if known is None:
        gpu = bool(cfg.slurm.gres) and "gpu" in str(cfg.slurm.gres)
        return Numerics(device_class=CUDA_UNKNOWN if gpu else None, device_name=None, autocast=None,
                        object_batch=p.object_batch, tf32=None, compile=p.compile, torch=torch_version,
                        sam2=sam2_version, checkpoint_sha256=sha)
    if known.type == "cuda":
        info = detect_device()
        batch = p.object_batch or size_for_device(info, cfg.model.name, cfg.model.image_size,
                                                  cfg.prompt.max_objects).object_batch
    else:
        batch = p.object_batch or 1
    return Numerics(device_class=device_class(known), device_name=device_name(known),
                    autocast=resolve_autocast(p.autocast, known), object_batch=batch, tf32=resolve_tf32(p.tf32, known),
                    compile=p.compile, torch=torch_version, sam2=sam2_version, checkpoint_sha256=sha)


# --- the run's reference and the checks ------------------------------------------------------------------

def read_reference(paths: RunPaths) -> Numerics | None:
    if not paths.numerics.exists():
        return None
    return Numerics.from_dict(json.loads(paths.numerics.read_text())["numerics"])


def mixed_allowed(snapshot: dict) -> bool:
    return bool(snapshot.get(ALLOW_KEY))


def _refusal(paths: RunPaths, reference: Numerics, new: Numerics, diffs: list[str], where: str) -> str:
    return (f"{paths.root}: {where} would compute masks with other numerics than the run's ({'; '.join(diffs)}). "
            f"The run's items were made on {reference.describe()} ({paths.numerics}). Mixing them would make one "
            f"dataset of masks computed two ways. Either run on the same device class with the same torch, sam2 "
            f"and checkpoint (e.g. the cluster profile the run began with), or, if mixing is acceptable, relaunch "
            f"with --allow-mixed-numerics (`masklet resume {paths.root} --allow-mixed-numerics`; it is recorded "
            f"in run.json for good, and each item's numerics are in items.parquet)")


def check_worker(plan: "RunPlan", numerics: Numerics) -> None:
    """Before a worker's first item: refuse when the run's reference numerics differ and mixing is not allowed."""
    reference = read_reference(plan.paths)
    if reference is None or mixed_allowed(_snapshot(plan.paths)):
        return
    diffs = differences(reference, numerics)
    if diffs:
        raise NumericsMismatchError(_refusal(plan.paths, reference, numerics, diffs, "this worker"))


def claim_reference(plan: "RunPlan", numerics: Numerics) -> None:
    """Before each commit: create OUT/numerics.json with these numerics if no worker has (exclusively: of two
    racing workers one wins), else check them against it as `check_worker` does (the loser of a race that
    passed `check_worker` before the file existed is stopped here, before it commits anything)."""
    path = plan.paths.numerics
    if not path.exists():
        record = {"version": NUMERICS_VERSION, "numerics": numerics.to_dict(),
                  "created_at": datetime.now(timezone.utc).isoformat()}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        fsync_file(tmp)  # on the disk before its name, like every file a commit publishes
        try:
            os.link(tmp, path)  # fails if it exists: the file appears whole, and only once
            fsync_dir(path.parent)
            return
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    check_worker(plan, numerics)


def check_launch(paths: RunPaths, cfg: "RunConfig", allow_mixed: bool, command: str) -> Numerics | None:
    """At `masklet run`/`resume`, before launching: with `allow_mixed`, record it in run.json for good;
    otherwise refuse when this launch's numerics (as far as `of_launch` can tell) differ from the run's
    reference. Returns the launch's numerics (None when there is no reference yet to compare with)."""
    if allow_mixed:
        record_allow_mixed(paths, command)
    reference = read_reference(paths)
    if reference is None:
        return None
    new = of_launch(cfg)
    diffs = differences(reference, new)
    if diffs and not mixed_allowed(_snapshot(paths)):
        raise NumericsMismatchError(_refusal(paths, reference, new, diffs, f"this {command}"))
    return new


def record_allow_mixed(paths: RunPaths, command: str) -> None:
    """Mark the run as allowed to hold items of other numerics (kept for good: the dataset may now be mixed)."""
    from pipeline.store.atomic import write_text_atomic  # the run.json writer (fsynced, renamed)

    snapshot = _snapshot(paths)
    if mixed_allowed(snapshot):
        return
    snapshot[ALLOW_KEY] = {"at": datetime.now(timezone.utc).isoformat(), "command": command}
    write_text_atomic(paths.snapshot, json.dumps(snapshot, indent=1))


def _snapshot(paths: RunPaths) -> dict:
    return json.loads(paths.snapshot.read_text())


def status_lines(paths: RunPaths, snapshot: dict) -> list[str]:
    """What `masklet status` says about numerics: the reference, and whether mixing was allowed."""
    lines = []
    reference = read_reference(paths)
    if reference is not None:
        lines.append(f"  numerics: {reference.describe()}")
    allowed = snapshot.get(ALLOW_KEY)
    if allowed:
        lines.append(f"  MIXED NUMERICS ALLOWED ({allowed.get('command')} --allow-mixed-numerics at "
                     f"{allowed.get('at')}): items may differ in device, dtype or versions; see items.parquet")
    return lines
