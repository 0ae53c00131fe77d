"""J (region similarity) and F (boundary F-measure) per frame: the one definition every evaluation uses.

The arithmetic is the one davis2017-evaluation defines and sam2's SA-V evaluator and vos-benchmark copy
(docs: /work/shared/notes/formats-and-metrics.md sections 3 and 4), written here from that description:

- J = |P & G| / |P | G|, and 1 when both masks are empty.
- Boundaries are the one-pixel maps of Martin et al.: a pixel is on the boundary when it differs from its right,
  lower or lower-right neighbour; on the last row only the right neighbour counts, on the last column only the
  lower one, and the bottom-right pixel never is.
- Each boundary is dilated by a disk of radius bound_pix = ceil(0.008 * sqrt(H^2 + W^2)) (the pixels with
  x^2 + y^2 <= r^2, as skimage.morphology.disk builds it); precision = share of predicted boundary pixels
  within the dilated GT boundary, recall the converse; F = 2PR / (P + R), 0 when P + R = 0. With no predicted
  boundary P = 1 (and R = 0 unless GT has none either); with no GT boundary R = 1 (P = 0 unless the
  prediction has none).

F is computed on a crop around both masks (one pixel of margin, clamped to the image): boundary pixels and
their matches all lie inside it, and the references' border rule is kept because a crop edge that is not the
image edge has a row or column of background beyond the masks. tests/test_evaluate.py checks it against a
straightforward full-frame computation.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

BOUND_TH = 0.008


def boundary_radius(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """The dilation radius in pixels: bound_th itself when >= 1 (pixels), else a fraction of the diagonal."""
    if bound_th >= 1:
        return int(bound_th)
    return math.ceil(bound_th * math.hypot(height, width))


def disk(radius: int) -> np.ndarray:
    """uint8 (2r+1, 2r+1) structuring element: 1 where x^2 + y^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.uint8)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """bool (H, W): the mask's one-pixel boundary (see the module docstring for the rule)."""
    seg = mask.astype(bool, copy=False)
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    diag = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    diag[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ right) | (seg ^ below) | (seg ^ diag)
    b[-1, :] = seg[-1, :] ^ right[-1, :]
    b[:, -1] = seg[:, -1] ^ below[:, -1]
    b[-1, -1] = False
    return b


def jaccard(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """J per frame for bool (T, H, W) stacks (or one (H, W) frame): float64 (T,) (or a scalar)."""
    axes = (-2, -1)
    inter = np.logical_and(pred, gt).sum(axis=axes, dtype=np.int64)
    union = np.logical_or(pred, gt).sum(axis=axes, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        j = inter / union
    return np.where(union == 0, 1.0, j)


def _crop(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(pred.any(axis=1) | gt.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(pred.any(axis=0) | gt.any(axis=0))
    h, w = pred.shape
    return (slice(max(rows[0] - 1, 0), min(rows[-1] + 2, h)), slice(max(cols[0] - 1, 0), min(cols[-1] + 2, w)))


def f_measure_frame(pred: np.ndarray, gt: np.ndarray, structure: np.ndarray) -> float:
    """F for one (H, W) frame, `structure` = disk(boundary_radius(H, W))."""
    window = _crop(pred, gt)
    if window is None:
        return 1.0  # no boundary on either side
    pb = boundary_map(pred[window])
    gb = boundary_map(gt[window])
    n_pred = int(pb.sum())
    n_gt = int(gb.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0  # P = 1, R = 0 (or the converse): F = 0
    pred_near = cv2.dilate(pb.view(np.uint8), structure).view(bool)
    gt_near = cv2.dilate(gb.view(np.uint8), structure).view(bool)
    precision = np.count_nonzero(pb & gt_near) / float(n_pred)
    recall = np.count_nonzero(gb & pred_near) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> np.ndarray:
    """F per frame for bool (T, H, W) stacks: float64 (T,)."""
    structure = disk(boundary_radius(gt.shape[-2], gt.shape[-1], bound_th))
    return np.array([f_measure_frame(p, g, structure) for p, g in zip(pred, gt)], dtype=np.float64)
