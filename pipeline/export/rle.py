"""Mask encodings the formats use: COCO's compressed RLE (pycocotools) and CVAT's box-cropped RLE.

COCO: pycocotools.mask.encode wants a Fortran-ordered uint8 array of 0/1 (a C-ordered or bool array fails
in some builds); counts come back as bytes, stored as str (JSON cannot hold bytes; every pycocotools
function takes str counts back). Column-major runs, starting with zeros.

CVAT: a `mask` shape is the mask cropped to a box [left, top, left + width - 1, top + height - 1] and the
row-major run lengths of that crop, starting with a background run (0 when the crop's first pixel is set):
what CVAT's XML importer reads (cvat/apps/dataset_manager/formats/cvat.py, `load_anno`: points = rle + the
box's corners) and what cvat_sdk.masks.encode_mask produces.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def coco_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def coco_area_bbox(rle: dict) -> tuple[int, list[float]]:
    """Area and XYWH box as pycocotools computes them (what a COCO reader recomputes)."""
    return int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, width, height) of the set pixels; None when the mask is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def cvat_rle(mask: np.ndarray, box: tuple[int, int, int, int]) -> list[int]:
    """Row-major run lengths of `mask` cropped to `box` (left, top, width, height), background run first."""
    left, top, width, height = box
    flat = mask[top:top + height, left:left + width].ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs
