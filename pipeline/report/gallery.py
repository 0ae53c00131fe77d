"""The gallery: for each of the highest-priority masklets, a strip of frames with the mask outlined.

Frames shown (decoded indices, the Zarr time axis): the first, middle and last visible frame, and the worst
transition, the frame with the lowest `iou_prev` in the frames table and the frame before it. Frames are
decoded again from the media with the run's own stride, max_frames and max_side (so they line up with the
masks); a masklet never visible shows its prompt frame. When the media cannot be decoded any more (moved,
deleted, damaged) the outline is drawn on a grey frame and the entry says so.
"""
from __future__ import annotations

import cv2
import numpy as np
import pyarrow.compute as pc

THUMB_HEIGHT = 180
OUTLINE_RGB = (255, 0, 255)  # magenta over a dark edge: visible on light and dark frames alike


def pick_frames(row: dict, frames) -> list[tuple[int, str]]:
    """(t, role) of the frames to show, in time order, each once (roles joined when they coincide)."""
    first, last = row.get("first_frame"), row.get("last_frame")
    roles: dict[int, list[str]] = {}
    if first is None or first < 0:
        return [(0, "prompt frame (never visible)")]
    for t, role in ((first, "first"), ((first + last) // 2, "middle"), (last, "last")):
        roles.setdefault(int(t), []).append(role)
    if frames is not None and len(frames):
        iou = np.asarray(frames.column("iou_prev").to_numpy(zero_copy_only=False), dtype=np.float64)
        if np.isfinite(iou).any():
            k = int(np.nanargmin(iou))
            t = int(frames.column("frame")[k].as_py())
            roles.setdefault(t - 1, []).append("before worst")
            roles.setdefault(t, []).append(f"worst IoU {iou[k]:.2f}")
    return [(t, ", ".join(r)) for t, r in sorted(roles.items()) if t >= 0]


def outline(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`rgb` with the mask's contours drawn (cv2.findContours / drawContours), scaled to THUMB_HEIGHT."""
    img = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8).copy()
    m = np.asarray(mask, dtype=np.uint8)
    if m.shape != img.shape[:2]:
        m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(img.shape[0] / THUMB_HEIGHT * 2))
    cv2.drawContours(img, contours, -1, (0, 0, 0), thick + 2)
    cv2.drawContours(img, contours, -1, OUTLINE_RGB, thick)
    if img.shape[0] != THUMB_HEIGHT:
        w = max(1, round(img.shape[1] * THUMB_HEIGHT / img.shape[0]))
        img = cv2.resize(img, (w, THUMB_HEIGHT), interpolation=cv2.INTER_AREA)
    return img


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cv2 could not encode a {rgb.shape} image as PNG")
    return buf.tobytes()


def _decode(run, item_id: str, wanted: list[int]) -> dict[int, np.ndarray]:
    """Decoded frames `wanted` (Zarr time indices) of the item, as the run decoded them."""
    from pipeline.stages.decode import FrameSource, open_frames
    from pipeline.worker import _stride

    cfg = run.plan.config
    item = run.plan.items[item_id]
    rows = run.item_rows("items", item_id).select(["stride"]).to_pylist()
    stride = rows[0]["stride"] if rows and rows[0]["stride"] else _stride(item, cfg)
    source = open_frames(item, stride=stride, max_frames=cfg.decode.max_frames, max_side=cfg.decode.max_side)
    picked = [t for t in wanted if 0 <= t < len(source.source_frames)]
    frames = FrameSource(item, [source.source_frames[t] for t in picked], cfg.decode.max_side)
    return {t: rgb for t, (_, rgb) in zip(picked, frames)}


def gallery_entry(run, row: dict) -> tuple[dict, list[bytes]]:
    """The report.json entry of one top masklet and its frames' PNGs (same order as entry["frames"])."""
    item_id, obj = row["item_id"], int(row["object_id"])
    entry = dict(row)
    try:
        masks = run.masks(item_id)
    except (KeyError, FileNotFoundError) as e:  # not committed as done, or its array was removed since
        entry.update(frames=[], media="none", note=f"no masks to show: {e}")
        return entry, []
    frames = run.frames_for(item_id)
    frames = frames.filter(pc.equal(frames["object_id"], obj)).select(["frame", "iou_prev"])
    picks = [(t, role) for t, role in pick_frames(row, frames) if t < masks.shape[1]]
    try:
        decoded = _decode(run, item_id, [t for t, _ in picks])
        entry["media"], entry["note"] = "decoded", ""
    except Exception as e:  # the media moved or broke since the run: the report still shows the outline
        decoded = {}
        entry["media"] = "grey"
        entry["note"] = f"the media could not be decoded ({type(e).__name__}: {e}); outline drawn on grey"
    images, shown = [], []
    for t, role in picks:
        mask = np.asarray(masks[obj, t]) if obj < masks.shape[0] else np.zeros(masks.shape[2:], dtype=bool)
        rgb = decoded.get(t)
        if rgb is None:
            rgb = np.full((*mask.shape, 3), 128, dtype=np.uint8)
            if entry["media"] == "decoded":
                entry["media"], entry["note"] = "grey", f"frame {t} could not be decoded; outline drawn on grey"
        images.append(png(outline(rgb, mask)))
        shown.append({"t": t, "role": role})
    entry["frames"] = shown
    return entry, images
