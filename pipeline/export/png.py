"""Palette PNGs as DAVIS and SAM 2's tools/vos_inference.py write them: single-channel uint8 indices (0 is
background), the DAVIS palette attached, read back with `np.array(Image.open(path))` as the indices.

The palette is the PASCAL VOC bit-interleaved colour map that davis2017-evaluation's `color_map()` builds and
vos_inference's DAVIS_PALETTE literal holds (the same 768 bytes): 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...,
255 (224, 224, 192). A random-weight run's PNGs carry its label in a tEXt chunk (key "masklet"), so the files
say what they are even apart from export.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def voc_palette() -> bytes:
    """The 256-colour DAVIS / PASCAL VOC palette, 768 bytes (r, g, b per index)."""
    out = bytearray()
    for index in range(256):
        rgb = [0, 0, 0]
        bits = index
        for shift in range(7, -1, -1):  # each 3 bits of the index fill the next-lower bit of r, g, b
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        out.extend(rgb)
    return bytes(out)


DAVIS_PALETTE = voc_palette()
PNG_TEXT_KEY = "masklet"


def write_palette_png(path: Path, indices: np.ndarray, label: str | None = None) -> None:
    """Write (H, W) uint8 indices as a palette PNG (as vos_inference's save_ann_png: mode L, then the palette)."""
    if indices.dtype != np.uint8 or indices.ndim != 2:
        raise ValueError(f"{path}: a palette PNG takes 2-D uint8 indices, not {indices.dtype} {indices.shape}")
    image = Image.fromarray(indices)
    image.putpalette(DAVIS_PALETTE)
    info = None
    if label:
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_TEXT_KEY, label)
    image.save(path, pnginfo=info)
