"""Run configuration: frozen dataclasses, loaded from YAML plus `key.sub=value` overrides.

One definition (the dataclasses below) gives the defaults, the valid keys and their types; unknown keys are
rejected with the list of valid ones. The embedded default (no file) runs locally with the SA-V automatic
prompting recipe on SAM 2.1 tiny.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

MODEL_NAMES = ("sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large")
SAM1_NAMES = ("vit_b", "vit_l", "vit_h")  # segment-anything's model registry names


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: finite, lo <= v <= hi (None: unbounded on that side); with `open_lo`,
    lo itself is excluded (lo < v). Declared beside the field (`ranged`), checked generically at load, so a
    value that would fail every item (or stall it) is refused before it enters a run's fingerprint."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def describe(self) -> str:
        lo = None if self.lo is None else f"{'>' if self.open_lo else '>='} {_number(self.lo)}"
        hi = None if self.hi is None else f"<= {_number(self.hi)}"
        if lo and hi:
            return f"{lo} and {hi}"
        return lo or hi or "any finite number"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def ranged(default: Any, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False) -> Any:
    """A numeric field with its valid range (see Range); every int/float key of the config declares one."""
    return field(default=default, metadata={"range": Range(lo, hi, open_lo)})


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "sam2.1_hiera_tiny"  # one of MODEL_NAMES
    checkpoint: str | None = None  # explicit path; else the cache folder, else the official download
    cache_dir: str = "~/.cache/masklet/checkpoints"
    allow_download: bool = True  # False: never touch the network, fail with instructions instead
    random_weights: bool = False  # real architecture, seeded random weights: plumbing tests/demos only
    seed: int = ranged(0, 0, 2**63 - 1)  # torch.manual_seed's range
    image_size: int | None = ranged(None, 64, 4096)  # None: the model's own (1024); else a multiple of 32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = ranged(None, 1)  # torch CPU threads; pin it to get bit-identical results across runs


@dataclass(frozen=True)
class DecodeConfig:
    stride: int = ranged(1, 1)  # keep every k-th frame (SA-V annotates 24 fps video at 6 fps: stride 4)
    target_fps: float | None = ranged(None, 0, open_lo=True)  # if set, stride = round(fps / target_fps) per video (overrides stride)
    max_frames: int | None = ranged(None, 1)  # cap on decoded frames per item
    # Frames whose longer side exceeds this are downscaled (area interpolation) to it before anything else;
    # masks are then stored at the downscaled size and items.parquet records the scale.
    max_side: int = ranged(4096, 64)


@dataclass(frozen=True)
class PromptConfig:
    """SAM2AutomaticMaskGenerator settings. Defaults: the SA-V recipe (32x32 grid, IoU and stability
    filtering, regions under 100 px cleaned) plus our object cap and minimum area."""

    points_per_side: int = ranged(32, 1)
    points_per_batch: int = ranged(64, 1)
    pred_iou_thresh: float = ranged(0.8, 0, 1)  # scores are in [0, 1]: outside it keeps all or nothing
    stability_score_thresh: float = ranged(0.95, 0, 1)
    stability_score_offset: float = ranged(1.0, 0)
    mask_threshold: float = ranged(0.0)  # a logit: any finite number
    box_nms_thresh: float = ranged(0.7, 0, 1)
    crop_n_layers: int = ranged(0, 0)
    crop_nms_thresh: float = ranged(0.7, 0, 1)
    crop_overlap_ratio: float = ranged(512 / 1500, 0, 1)
    crop_n_points_downscale_factor: int = ranged(1, 1)
    min_mask_region_area: int = ranged(100, 0)  # AMG post-processing: remove islands/holes below this (pixels)
    use_m2m: bool = False
    multimask_output: bool = True
    min_area: int = ranged(1, 0)  # drop prompts whose mask has fewer pixels (empty masks can survive NMS)
    max_objects: int = ranged(64, 1)  # keep the best-scoring masks (predicted IoU x stability) up to this many
    # The AMG reads the keyframe preprocessed as sam2's video predictor preprocesses frames (PIL resize), and
    # tracking reuses the image features it computed there instead of encoding the frame again. False: the AMG
    # preprocesses as SAM2ImagePredictor does (torchvision resize; stock AMG masks), and the frame is encoded
    # twice.
    share_features: bool = True
    # Which automatic mask generator seeds masklets: SAM 2's (phase 3, the default) or SAM 1's
    # (segment-anything's SamAutomaticMaskGenerator with the `sam1` section's model: phases 1 and 2).
    generator: Literal["sam2", "sam1"] = "sam2"
    # Phase 1: run the generator on every decoded frame, no propagation; per-frame masks are linked into
    # masklets by one-to-one IoU matching of consecutive frames (Hungarian), a pair kept at IoU >= link_iou.
    every_frame: bool = False
    link_iou: float = ranged(0.5, 0, 1, open_lo=True)
    # Re-seeding (objects that appear after the first frame): every `reseed_every` decoded frames (null: off)
    # and, with `reseed_adaptive`, on any frame whose uncovered share grew by more than that since the last
    # seed, run the generator on the frame; a candidate becomes a new masklet when at least `reseed_uncovered`
    # of its area lies outside every current mask and its area is at least `reseed_min_area` pixels and
    # `reseed_min_area_share` of the frame; candidates are deduplicated among themselves first (mask IoU
    # above `reseed_nms_iou`: the better-scored one is kept).
    reseed_every: int | None = ranged(None, 1)
    reseed_adaptive: float | None = ranged(None, 0, 1, open_lo=True)
    reseed_uncovered: float = ranged(0.8, 0, 1)
    reseed_min_area: int = ranged(200, 0)
    reseed_min_area_share: float = ranged(0.0005, 0, 1)
    reseed_nms_iou: float = ranged(0.8, 0, 1)
    # Duplicates (SAM 3's hotstart rule): within a re-seeded masklet's first `hotstart_frames` frames, if on
    # `hotstart_min` of them its mask is empty or has IoU >= `dup_iou` with an older masklet, it is dropped
    # (no longer tracked; its row records dropped_reason and merged_into).
    hotstart_frames: int = ranged(15, 1)
    hotstart_min: int = ranged(8, 1)
    dup_iou: float = ranged(0.8, 0, 1, open_lo=True)


@dataclass(frozen=True)
class Sam1Config:
    """segment-anything (SAM 1) for phases 1 and 2 (`prompt.generator: sam1`). Checkpoints resolve like SAM 2's:
    `checkpoint`, else `model.cache_dir`/<official file>, else the official download (when
    `model.allow_download`), sha256-verified; the device and threads are the `model` section's."""

    name: str = "vit_b"  # one of SAM1_NAMES
    checkpoint: str | None = None
    random_weights: bool = False  # real architecture, seeded random weights: plumbing tests/demos only
    seed: int = ranged(0, 0, 2**63 - 1)
    image_size: int | None = ranged(None, 64, 1024)  # None: SAM's own 1024; smaller (multiple of 16) for tests


@dataclass(frozen=True)
class PropagateConfig:
    enabled: bool = True  # False: masks on the keyframe only (phase-1 style)
    mask_threshold: float = ranged(0.0)  # logits above this are foreground in the written masks
    object_batch: int | None = ranged(None, 1)  # objects per batched step; null: chosen per device (1 on CPU)
    prefetch: int = ranged(2, 1)  # frames decoded and preprocessed ahead of the model
    autocast: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA GPUs with bf16, else off
    tf32: bool = True  # TF32 matmuls on CUDA GPUs that have them
    compile: bool = False  # torch.compile the model's parts (as sam2's vos_optimized); slow first frames
    # memories and stored masks in host memory (sam2's offload_state_to_cpu); null: when the device sizing
    # says the state would not fit (pipeline/device.py); never changes the masks
    offload_state: bool | None = None
    # Re-seeded masklets are also tracked backwards from their seed frame, over at most `reverse_frames`
    # frames before it, so a masklet covers frames where its object was visible before it was found.
    reverse: bool = False
    reverse_frames: int = ranged(32, 1)


@dataclass(frozen=True)
class StoreConfig:
    compressor: Literal["zstd", "blosc-zstd", "none"] = "blosc-zstd"
    level: int = ranged(5, 0, 22)  # zstd: 0-22; blosc-zstd: 0-9 (checked in validate)
    # Zarr chunk = one masklet-frame (1, 1, H, W); chunks are packed into shard files of
    # (all objects, frames_per_file frames): one file per frames_per_file frames of an item.
    frames_per_file: int = ranged(8, 1)
    # Long items are checkpointed at the first frames_per_file boundary after this many seconds since the last
    # checkpoint (tracker state, masks and rows so far), so a killed or requeued job goes on inside the video.
    # 0: at every boundary; null: never (an interrupted item starts again from frame 0).
    checkpoint_seconds: float | None = ranged(60.0, 0)


@dataclass(frozen=True)
class PlanConfig:
    max_items_per_shard: int = ranged(32, 1)
    num_shards: int | None = ranged(None, 1)  # fixed shard count; default: ceil(items / max_items_per_shard)


@dataclass(frozen=True)
class LocalExecutorConfig:
    workers: int | None = ranged(None, 0)  # 0 or 1: in-process; None: one process per visible GPU, or in-process when there is none


@dataclass(frozen=True)
class SlurmConfig:
    """Scheduler settings for `executor: slurm`; cluster profiles under configs/clusters/ fill these."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = "gpu:1"  # whole GPU (gpu:a100:1) or MIG slice (gpu:1g.10gb:1): site-specific names
    gpu_memory_gb: float | None = ranged(None, 0, open_lo=True)  # memory of the GPU/slice the gres gives (sizes the work; null: ask the device)
    time_min: int = ranged(240, 1)
    cpus_per_task: int = ranged(8, 1)
    mem_gb: float = ranged(32.0, 0, open_lo=True)
    array_parallelism: int = ranged(64, 1)  # array tasks running at once
    shards_per_task: int = ranged(1, 1)  # shards run by one array task, in order
    signal_delay_s: int = ranged(120, 0)  # SLURM sends USR2 this long before the time limit: checkpoint and requeue
    max_requeues: int = ranged(20, 0)  # preemptions/timeouts survived per task (submitit's max_num_timeout)
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load ..., source env)
    job_name: str = "masklet"


@dataclass(frozen=True)
class QAConfig:
    """`qa.*`: flag thresholds (pipeline/quality/flags.py) and run-health budgets (pipeline/quality/health.py).

    Read after the model, from the stored signals: never part of a run's fingerprint, and `masklet qa OUT --set
    qa.KEY=VALUE` changes them on a finished run (re-flagging it without the model). Checked on construction,
    so a bad value fails where it is given, naming the key, the value and the valid range.
    """

    tiny_area: float = ranged(0.01, 0, 1)  # tiny: mean area share of the frame below this
    huge_area: float = ranged(0.80, 0, 1)  # huge: mean area share above this (not below tiny_area)
    fragmented_components: float = ranged(5.0, 1)  # fragmented: mean connected components at or above this
    unstable_iou: float = ranged(0.6, 0, 1)  # unstable: mean frame-to-frame IoU below this
    flicker_gaps: int = ranged(2, 1)  # flicker: this many disappear-and-reappear gaps ...
    flicker_jumps: int = ranged(3, 1)  # ... or this many IoU jumps (frame-to-frame IoU < 0.5)
    lost: bool = True  # flag masklets never visible after their prompt frame
    duplicate_iou: float = ranged(0.9, 0, 1)  # duplicate: IoU with another masklet over shared frames >= this
    low_score: float = ranged(0.7, 0, 1)  # low_score: the prompt's predicted IoU below this
    # run health (alerts in `masklet report`)
    frame_budget_ms: float = ranged(3000.0, 0, open_lo=True)  # alert: p95 ms per frame over this, per size bucket
    score_median_min: float = ranged(0.85, 0, 1)  # alert: a score's median under this
    score_low_share_max: float = ranged(0.15, 0, 1)  # alert: share of scores below qa.low_score over this
    drift_max: float = ranged(0.2, 0, 1)  # alert: KS statistic between early and late items' scores over this

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            ok = isinstance(value, bool) if tp is bool else (
                not isinstance(value, bool) and isinstance(value, int if tp is int else (int, float)))
            if not ok:
                kind = {bool: "true or false", int: "an integer"}.get(tp, "a number")
                raise ConfigError(f"qa.{f.name}={value!r} is out of range: expected {kind}")
        check_ranges(self, "qa.")
        if self.tiny_area > self.huge_area:
            raise ConfigError(f"qa.tiny_area={self.tiny_area!r} is out of range: must not exceed "
                              f"qa.huge_area={self.huge_area!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "QAConfig":
        """From a mapping of qa keys; unknown keys are rejected and the valid ones listed."""
        return _build(cls, values, prefix="qa.")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sam1: Sam1Config = field(default_factory=Sam1Config)
    propagate: PropagateConfig = field(default_factory=PropagateConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    executor: str = "local"
    local: LocalExecutorConfig = field(default_factory=LocalExecutorConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    retries: int = ranged(1, 0)  # extra attempts for a failed item before it is recorded as failed

    def validate(self) -> "RunConfig":
        """Every numeric key within its declared Range, then the rules that are not ranges."""
        check_ranges(self)
        if self.model.name not in MODEL_NAMES:
            raise ConfigError(f"model.name={self.model.name!r} is not a known model; use one of {MODEL_NAMES}")
        if self.model.image_size is not None and self.model.image_size % 32:
            raise ConfigError(f"model.image_size={self.model.image_size} must be a multiple of 32 (64 to 4096), "
                              f"or null for the model's own 1024")
        if self.sam1.name not in SAM1_NAMES:
            raise ConfigError(f"sam1.name={self.sam1.name!r} is not a segment-anything model; use one of {SAM1_NAMES}")
        if self.sam1.image_size is not None and self.sam1.image_size % 16:
            raise ConfigError(f"sam1.image_size={self.sam1.image_size} must be a multiple of 16 (64 to 1024), "
                              f"or null for SAM's own 1024")
        if self.prompt.every_frame and self.propagate.enabled:
            raise ConfigError("prompt.every_frame=true (phase 1: masks on every frame, linked by IoU) needs "
                              "propagate.enabled=false; or use configs/phases/phase1.yaml")
        if (self.prompt.reseed_every or self.prompt.reseed_adaptive) and not self.propagate.enabled:
            raise ConfigError("prompt.reseed_every / prompt.reseed_adaptive add masklets during tracking and need "
                              "propagate.enabled=true; set them to null for masks without propagation")
        if self.prompt.hotstart_min > self.prompt.hotstart_frames:
            raise ConfigError(f"prompt.hotstart_min={self.prompt.hotstart_min} must not exceed "
                              f"prompt.hotstart_frames={self.prompt.hotstart_frames}")
        if self.executor not in ("local", "slurm"):
            raise ConfigError(f"executor={self.executor!r}: use 'local' or 'slurm'")
        if self.store.compressor == "blosc-zstd" and self.store.level > 9:
            raise ConfigError(f"store.level={self.store.level} is out of range for store.compressor=blosc-zstd: "
                              f"valid range is >= 0 and <= 9 (zstd alone takes up to 22)")
        return self


def numeric_fields(cls: type | None = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every int or float key of the config, nested sections included."""
    cls = RunConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if any(a in (int, float) for a in args):
            yield prefix + f.name, f, tp


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """ConfigError for the first numeric key outside its Range, naming the key, the value and the range."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
            continue
        valid = field_range(f)
        if valid is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not valid.contains(value):
            optional = f.default is None
            raise ConfigError(f"{prefix}{f.name}={value!r} is out of range: valid range is {valid.describe()}"
                              f"{' (or null)' if optional else ''}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a field's annotation (enough for the types used above)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}={value!r}: use one of {typing.get_args(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        (inner, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {[prefix + k for k in types_]}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["prompt.points_per_side=16", "model.checkpoint=null"]` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. prompt.points_per_side=16)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def merge_dicts(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PROFILES_DIR = Path(__file__).resolve().parent.parent / "configs" / "clusters"


def _read_yaml(path: str | Path) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist; see configs/ for examples") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def profile_path(profile: str) -> Path:
    """A cluster profile by name (configs/clusters/NAME.yaml) or by path."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.exists():
        known = sorted(q.stem for q in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"cluster profile {profile!r} not found; known profiles: {known} (or give a YAML path)")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                profile: str | None = None) -> RunConfig:
    """Defaults <- cluster profile <- YAML file <- overrides. Raises ConfigError naming the bad key and the
    valid ones."""
    data: dict = _read_yaml(profile_path(profile)) if profile else {}
    if path is not None:
        data = merge_dicts(data, _read_yaml(path))
    data = merge_dicts(data, parse_overrides(overrides or []))
    try:
        return _build(RunConfig, data).validate()
    except ConfigError as e:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{e}{where}") from None


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data).validate()
