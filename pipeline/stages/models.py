"""Building SAM 2 models: checkpoint resolution (path -> cache -> official download), verification, and
seeded random-weight models of the real architecture for tests and offline demos.

The only module that calls sam2's builders. Everything it returns is a `LoadedModel` record.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from pipeline.config import ModelConfig
from pipeline.stages.sam2_pin import require_sam2

log = logging.getLogger(__name__)

_OFFICIAL_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_file: str  # the sam2 package's own hydra config
    checkpoint_file: str

    @property
    def url(self) -> str:
        return f"{_OFFICIAL_BASE}/{self.checkpoint_file}"


MODEL_SPECS = {
    "sam2.1_hiera_tiny": ModelSpec("sam2.1_hiera_tiny", "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_small": ModelSpec("sam2.1_hiera_small", "configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_base_plus": ModelSpec(
        "sam2.1_hiera_base_plus", "configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"
    ),
    "sam2.1_hiera_large": ModelSpec("sam2.1_hiera_large", "configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}


# The key `random_checkpoint` saves beside "model": the file itself says its weights are random, so the label
# follows the weights whatever the config says. sam2's loader reads only "model"; the value is plain data
# ({"seed", "image_size", "name"}), so torch.load(weights_only=True) still reads the file.
RANDOM_WEIGHTS_KEY = "masklet_random_weights"
# What a model loaded with random weights adds to its label (SAM 2's here, SAM 1's in pipeline/stages/sam1.py).
RANDOM_WEIGHTS_TAG = " [RANDOM WEIGHTS: plumbing only, not real masks]"


class CheckpointError(RuntimeError):
    """The checkpoint cannot be found, fetched or verified; the message says how to get it."""


@dataclass
class LoadedModel:
    """A SAM 2 video predictor (it is also a SAM2Base, so the automatic mask generator shares it)."""

    predictor: "torch.nn.Module"
    name: str
    checkpoint: str | None  # resolved path; None for random weights
    checkpoint_sha256: str | None
    random_weights: bool
    image_size: int
    device: torch.device

    @property
    def label(self) -> str:
        tag = RANDOM_WEIGHTS_TAG if self.random_weights else ""
        return f"{self.name}@{self.image_size}{tag}"


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={requested!r} but CUDA is not available here; use model.device=cpu or auto")
    return dev


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hydra_overrides(image_size: int | None) -> list[str]:
    return [f"++model.image_size={image_size}"] if image_size else []


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            expected = int(resp.headers.get("Content-Length") or 0)
            shutil.copyfileobj(resp, out, length=1 << 20)
        got = os.path.getsize(tmp_name)
        if expected and got != expected:
            raise CheckpointError(f"download of {url} was cut short ({got} of {expected} bytes); run again")
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


@dataclass(frozen=True)
class CheckpointSource:
    """Where one checkpoint file comes from, and the config key that names an explicit file (for messages).
    Shared by SAM 2 (`MODEL_SPECS`) and SAM 1 (pipeline/stages/sam1.py), so both resolve and fail alike."""

    model: str  # the model's name, for messages
    file: str  # the official file name, also its name in the cache folder
    url: str
    checkpoint_key: str = "model.checkpoint"
    sha256: str | None = None  # the official digest, where one is published: downloads and cached files must match


def resolve_checkpoint(cfg: ModelConfig) -> tuple[Path, str]:
    """SAM 2's checkpoint for `cfg`: see `resolve_file`."""
    spec = MODEL_SPECS[cfg.name]
    source = CheckpointSource(cfg.name, spec.checkpoint_file, spec.url)
    return resolve_file(source, cfg.checkpoint, cfg.cache_dir, cfg.allow_download)


def resolve_file(source: CheckpointSource, explicit: str | None, cache_dir: str,
                 allow_download: bool) -> tuple[Path, str]:
    """Explicit path, else `<cache_dir>/<file>`, else download (when allowed). Returns (path, sha256).

    The sha256 of a downloaded file is recorded beside it; a cached file whose sha256 no longer matches
    its record is refused (a truncated or replaced file), so a corrupt cache never reaches a run. Where the
    official digest is known (`source.sha256`), a download or cached file that differs from it is refused
    too; an explicit path is taken as given (a fine-tuned checkpoint is a legitimate choice).
    """
    cached = Path(cache_dir).expanduser() / source.file
    how_to_get = (
        f"download it on a machine with internet access:\n"
        f"    curl -L -o {source.file} {source.url}\n"
        f"then copy it to {cached} "
        f"or pass {source.checkpoint_key}=/path/to/{source.file}"
    )
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{source.checkpoint_key}={explicit} does not exist; {how_to_get}")
        return path, sha256_of(path)
    if not cached.is_file():
        if not allow_download:
            raise CheckpointError(
                f"checkpoint {source.file} for model {source.model} is not in {cached.parent} and "
                f"model.allow_download=false; {how_to_get}"
            )
        log.info("downloading %s to %s", source.url, cached)
        try:
            _download(source.url, cached)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise CheckpointError(
                f"could not download {source.url} ({e}); this machine looks offline. {how_to_get}"
            ) from e
        digest = sha256_of(cached)
        if source.sha256 and digest != source.sha256:
            cached.unlink(missing_ok=True)
            raise CheckpointError(
                f"the download of {source.url} has sha256 {digest}, not the official {source.sha256}; it was "
                f"deleted. Run again, or {how_to_get}"
            )
        _sidecar(cached).write_text(digest + "\n")
        return cached, digest
    digest = sha256_of(cached)
    side = _sidecar(cached)
    if side.exists() and side.read_text().strip() != digest:
        raise CheckpointError(
            f"cached checkpoint {cached} does not match its recorded sha256 ({side}); it was truncated or "
            f"replaced. Delete both files and run again, or {how_to_get}"
        )
    if source.sha256 and digest != source.sha256:
        raise CheckpointError(
            f"cached checkpoint {cached} has sha256 {digest}, not the official {source.sha256} of {source.file}; "
            f"it is truncated or another file. Delete it and run again, or {how_to_get} "
            f"(a fine-tuned checkpoint goes in {source.checkpoint_key}, not under the official name)"
        )
    return cached, digest


def verify_checkpoint(path: Path) -> bool:
    """Open the file the way sam2 will (weights_only, so no code in it can run) and check its shape of
    contents, so a truncated download or a wrong file is named as such instead of failing deep in sam2.
    Returns whether the file is marked as random weights (`RANDOM_WEIGHTS_KEY`)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for unreadable archives
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); it is truncated "
            f"or not a checkpoint: delete it and download it again"
        ) from e
    if not isinstance(sd, dict) or not isinstance(sd.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no 'model' state dict; is it a SAM 2 checkpoint?")
    return RANDOM_WEIGHTS_KEY in sd


def _build_predictor(cfg: ModelConfig, ckpt_path: Path | None, device: torch.device):
    require_sam2()
    from sam2.build_sam import build_sam2_video_predictor

    spec = MODEL_SPECS[cfg.name]
    try:
        predictor = build_sam2_video_predictor(
            spec.config_file,
            ckpt_path=str(ckpt_path) if ckpt_path else None,
            device=str(device),
            hydra_overrides_extra=_hydra_overrides(cfg.image_size),
        )
    except RuntimeError as e:  # sam2 raises a bare RuntimeError() on missing/unexpected keys
        raise CheckpointError(
            f"checkpoint {ckpt_path} does not fit model {cfg.name} (missing or unexpected weights); "
            f"check model.name matches the file (see the log above for the keys)"
        ) from e
    except (KeyError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_path} could not be read ({e}); download it again") from e
    # Hole filling needs sam2's CUDA extension; without it sam2 warns on every frame and skips it.
    # Keep sam2's behaviour on GPUs where the extension is built, and turn it off (quietly) elsewhere.
    if device.type != "cuda":
        predictor.fill_hole_area = 0
    return predictor


def random_checkpoint(cfg: ModelConfig, dest: Path) -> Path:
    """Save a seeded random-weight model of the real architecture as a checkpoint file (`{"model": sd}` plus
    the `RANDOM_WEIGHTS_KEY` marker), so tests and demos go through the same loading code as real checkpoints
    and whatever loads it is labelled random."""
    require_sam2()
    from sam2.build_sam import build_sam2

    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_sam2(MODEL_SPECS[cfg.name].config_file, ckpt_path=None, device="cpu",
                       hydra_overrides_extra=_hydra_overrides(cfg.image_size))
    tmp = dest.with_name(dest.name + ".tmp")
    marker = {"seed": int(cfg.seed), "image_size": int(model.image_size), "name": cfg.name}
    torch.save({"model": model.state_dict(), RANDOM_WEIGHTS_KEY: marker}, tmp)
    os.replace(tmp, dest)
    return dest


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Resolve, verify and build. Random weights: built from the seed (or from model.checkpoint if given,
    so a test can save one random checkpoint and load it through the same path as a real one).

    `random_weights` on the result says what was loaded: a file marked by `random_checkpoint` is random
    under any config; an unmarked file is random only when the config says so (an older random file saved
    before the marker existed), since calling real weights random is the safe mistake."""
    if cfg.name not in MODEL_SPECS:
        raise CheckpointError(f"unknown model {cfg.name!r}; use one of {sorted(MODEL_SPECS)}")
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.random_weights and not cfg.checkpoint:
        torch.manual_seed(cfg.seed)
        predictor = _build_predictor(cfg, None, device)
        ckpt, digest, random_weights = None, None, True
    else:
        ckpt, digest = resolve_checkpoint(cfg)
        random_weights = verify_checkpoint(ckpt) or cfg.random_weights
        predictor = _build_predictor(cfg, ckpt, device)
    return LoadedModel(
        predictor=predictor,
        name=cfg.name,
        checkpoint=str(ckpt) if ckpt else None,
        checkpoint_sha256=digest,
        random_weights=random_weights,
        image_size=int(predictor.image_size),
        device=device,
    )


@contextlib.contextmanager
def patched_method(obj, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """`obj.<name>` replaced on the instance by `wrap(current)` for the block, then put back as it was: the
    class's method again, or the wrapper the instance held before (a profiler's, another patch). How masklet
    reaches inside sam2's model for one call without changing the model for anyone else."""
    before = vars(obj).get(name)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if before is None:
            delattr(obj, name)
        else:
            setattr(obj, name, before)
