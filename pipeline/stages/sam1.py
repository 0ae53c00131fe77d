"""SAM 1 (segment-anything) for the data engine's phases 1 and 2: checkpoints, models and the automatic mask
generator, the only module that imports `segment_anything`.

Checkpoints resolve, verify and fail offline exactly like SAM 2's (pipeline/stages/models.py `resolve_file`):
`sam1.checkpoint`, else `<model.cache_dir>/<official file>`, else the official download when
`model.allow_download`, checked against the official sha256 and recorded in a sidecar. Files are read once with
`torch.load(weights_only=True)` (no code in them can run) and the state dict goes straight into the model, so a
2.5 GB vit_h is not read twice.

segment-anything's `build_sam_vit_*` hard-code a 1024 input; `_build_sam` below constructs the same modules
(its `_build_sam`, argument for argument) at any multiple of 16, so tests run a real vit_b at 64-256 px.
The input size is a property of the weights (the image encoder's position embedding is one vector per 16 px
patch), so it is read from the checkpoint; `sam1.image_size` must agree with it or is refused.

Random weights: `random_sam1_checkpoint` saves the seeded architecture in the official layout (a flat state
dict) plus one entry, `RANDOM_WEIGHTS_KEY` (shared with SAM 2), that the loader removes and records, so
whatever loads the file is labelled RANDOM WEIGHTS whatever the config says.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError, ModelConfig, PromptConfig, Sam1Config
from pipeline.records import Prompt
from pipeline.stages.models import (RANDOM_WEIGHTS_KEY, RANDOM_WEIGHTS_TAG, CheckpointError, CheckpointSource,
                                    pick_device, resolve_file)
from pipeline.stages.prompt import amg_kwargs, prompts_from_records, select_records

_OFFICIAL_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
_PATCH = 16  # ViT patch size of every SAM 1 model
_DEFAULT_SIZE = 1024


@dataclass(frozen=True)
class Sam1Spec:
    """One segment-anything model: its official file and the encoder arguments of its `build_sam_<name>`."""

    name: str
    checkpoint_file: str
    sha256: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]

    @property
    def url(self) -> str:
        return f"{_OFFICIAL_BASE}/{self.checkpoint_file}"


# The official sha256 of the three files, as pinned (and verified on every download, through pooch) by
# micro-sam: github.com/computational-cell-analytics/micro-sam, micro_sam/util.py, `_CHECKSUMS` / the
# models registry ("the default segment anything models"); the same three values are pinned independently by
# other public projects' download scripts (e.g. sha256sum -c lines in Dockerfiles for sam_vit_h_4b8939.pth).
SAM1_SPECS = {
    "vit_b": Sam1Spec("vit_b", "sam_vit_b_01ec64.pth",
                      "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": Sam1Spec("vit_l", "sam_vit_l_0b3195.pth",
                      "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1024, 24, 16,
                      (5, 11, 17, 23)),
    "vit_h": Sam1Spec("vit_h", "sam_vit_h_4b8939.pth",
                      "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 1280, 32, 16,
                      (7, 15, 23, 31)),
}

# PromptConfig keys of SAM 2's generator that SAM 1's lacks, and the value SAM 1 behaves as: it thresholds
# logits at `Sam.mask_threshold` (0.0), always asks for three masks per point, and has no mask-to-mask
# refinement. Any other value is refused (not silently ignored).
SAM1_FIXED = {"mask_threshold": 0.0, "multimask_output": True, "use_m2m": False}


@dataclass
class LoadedSam1:
    """A segment-anything `Sam` on its device, in eval mode, and where its weights came from."""

    sam: "torch.nn.Module"
    name: str
    checkpoint: str | None  # resolved path; None for random weights built from the seed
    checkpoint_sha256: str | None
    random_weights: bool
    image_size: int
    device: torch.device

    @property
    def label(self) -> str:
        tag = RANDOM_WEIGHTS_TAG if self.random_weights else ""
        return f"sam1_{self.name}@{self.image_size}{tag}"


def _spec(sam1: Sam1Config) -> Sam1Spec:
    if sam1.name not in SAM1_SPECS:
        raise CheckpointError(f"unknown SAM 1 model sam1.name={sam1.name!r}; use one of {sorted(SAM1_SPECS)}")
    return SAM1_SPECS[sam1.name]


def _check_size(image_size: int) -> int:
    if image_size % _PATCH or image_size < _PATCH:
        raise ConfigError(f"sam1.image_size={image_size} must be a positive multiple of {_PATCH} (SAM's patch size)")
    return image_size


def _build_sam(spec: Sam1Spec, image_size: int):
    """segment_anything.build_sam._build_sam with the input size as an argument (it hard-codes 1024)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    prompt_embed_dim = 256
    embedding_size = image_size // _PATCH
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth, embed_dim=spec.embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads, patch_size=_PATCH,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(spec.global_attn_indexes), window_size=14,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim, image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    return sam


def random_sam1_checkpoint(sam1: Sam1Config, dest: Path) -> Path:
    """Save the seeded random-weight model of `sam1.name` at `sam1.image_size` (None: 1024) as a checkpoint in
    the official layout plus the `RANDOM_WEIGHTS_KEY` marker ({"seed", "image_size", "name"}); written to a
    temporary name and renamed, so a half-written file never has the final name."""
    spec = _spec(sam1)
    size = _check_size(sam1.image_size or _DEFAULT_SIZE)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(sam1.seed)
    sd = dict(_build_sam(spec, size).state_dict())
    sd[RANDOM_WEIGHTS_KEY] = {"seed": int(sam1.seed), "image_size": int(size), "name": f"sam1_{spec.name}"}
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        torch.save(sd, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def read_sam1_checkpoint(path: Path, spec: Sam1Spec) -> tuple[dict, bool, int]:
    """The file's state dict, whether it is marked random, and its input size, read once (weights_only) and
    checked against `spec`, so a truncated or wrong file is named as such instead of failing inside torch."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - torch raises several types for unreadable archives
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); it is truncated "
            f"or not a checkpoint: delete it and download it again ({spec.url})"
        ) from e
    pos = sd.get("image_encoder.pos_embed") if isinstance(sd, dict) else None
    if not isinstance(pos, torch.Tensor) or pos.ndim != 4:
        raise CheckpointError(f"checkpoint {path} has no SAM 1 image encoder (image_encoder.pos_embed); is it a "
                              f"segment-anything checkpoint? (SAM 2 checkpoints go in model.checkpoint)")
    random_weights = sd.pop(RANDOM_WEIGHTS_KEY, None) is not None
    dim = int(pos.shape[-1])
    if dim != spec.embed_dim:
        other = [s.name for s in SAM1_SPECS.values() if s.embed_dim == dim]
        raise CheckpointError(f"checkpoint {path} does not fit sam1.name={spec.name} (its encoder width is {dim}: "
                              f"{other or 'no SAM 1 model'}); set sam1.name to match the file")
    return sd, random_weights, int(pos.shape[1]) * _PATCH


def load_sam1(sam1: Sam1Config, model: ModelConfig) -> LoadedSam1:
    """Resolve, verify and build SAM 1 on `model.device` (threads: `model.threads`). Random weights without a
    file are built from `sam1.seed` (the same weights `random_sam1_checkpoint` saves). A file marked random is
    random under any config; an unmarked file only when `sam1.random_weights` says so."""
    spec = _spec(sam1)
    device = pick_device(model.device)
    if model.threads:
        torch.set_num_threads(model.threads)
    if sam1.random_weights and not sam1.checkpoint:
        size = _check_size(sam1.image_size or _DEFAULT_SIZE)
        torch.manual_seed(sam1.seed)
        sam, ckpt, digest, random_weights = _build_sam(spec, size), None, None, True
    else:
        source = CheckpointSource(f"sam1 {spec.name}", spec.checkpoint_file, spec.url, "sam1.checkpoint", spec.sha256)
        ckpt, digest = resolve_file(source, sam1.checkpoint, model.cache_dir, model.allow_download)
        sd, marked, size = read_sam1_checkpoint(ckpt, spec)
        if sam1.image_size is not None and sam1.image_size != size:
            raise CheckpointError(f"checkpoint {ckpt} is a {size} px model but sam1.image_size={sam1.image_size}; "
                                  f"SAM 1's input size is fixed by its weights: set sam1.image_size to null or {size}")
        sam = _build_sam(spec, _check_size(size))
        try:
            sam.load_state_dict(sd)
        except RuntimeError as e:  # missing/unexpected keys or shapes: torch lists them
            raise CheckpointError(f"checkpoint {ckpt} does not fit SAM 1 {spec.name} at {size} px ({e}); check "
                                  f"sam1.name matches the file") from e
        random_weights = marked or sam1.random_weights
    return LoadedSam1(sam=sam.to(device), name=spec.name, checkpoint=str(ckpt) if ckpt else None,
                      checkpoint_sha256=digest, random_weights=random_weights, image_size=size, device=device)


def sam1_amg_kwargs(prompt: PromptConfig) -> dict:
    """SamAutomaticMaskGenerator's arguments among `prompt`'s generator settings (those of SAM 2's generator:
    prompt.amg_kwargs). A setting SAM 1's generator lacks is refused unless it has the value SAM 1 behaves as
    (`SAM1_FIXED`), so a config never asks for something that silently does not happen."""
    from segment_anything import SamAutomaticMaskGenerator

    accepted = set(inspect.signature(SamAutomaticMaskGenerator.__init__).parameters)
    kwargs = {}
    for key, value in amg_kwargs(prompt).items():
        if key in accepted:
            kwargs[key] = value
        elif key not in SAM1_FIXED or SAM1_FIXED[key] != value:
            fixed = f"SAM 1 behaves as prompt.{key}={SAM1_FIXED[key]}" if key in SAM1_FIXED else "it has no such setting"
            raise ConfigError(f"prompt.{key}={value!r} is not available with prompt.generator=sam1 "
                              f"(segment-anything's SamAutomaticMaskGenerator: {fixed}); remove the override "
                              f"or use prompt.generator=sam2")
    return kwargs


def make_sam1_generator(loaded: LoadedSam1, prompt: PromptConfig):
    """segment-anything's own SamAutomaticMaskGenerator on the loaded model, with `prompt`'s settings.
    `prompt.share_features` does not apply: SAM 1's encoder is not SAM 2's, so nothing is shared with tracking."""
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(loaded.sam, **sam1_amg_kwargs(prompt))


def sam1_records(generator, rgb: np.ndarray, prompt: PromptConfig) -> list[dict]:
    """The generator's records on one RGB uint8 (H, W, 3) frame after the seed rule (prompt.select_records):
    what phase 1's Linker (pipeline/stages/link.py) takes per frame."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise TypeError(f"SAM 1's generator needs an RGB uint8 (H, W, 3) array, got {type(rgb).__name__} "
                        f"{getattr(rgb, 'dtype', '')} {getattr(rgb, 'shape', '')}")
    return select_records(generator.generate(rgb), prompt)


def sam1_prompts(generator, rgb: np.ndarray, prompt: PromptConfig, frame: int = 0) -> list[Prompt]:
    """Masklet seeds from SAM 1's generator on one frame (phase 2's keyframe), numbered 0..n-1 as SAM 2's are."""
    return [dataclasses.replace(p, source="sam1")
            for p in prompts_from_records(sam1_records(generator, rgb, prompt), frame)]
