"""What the review app shows, as pure functions of tables and arrays (the app, pipeline/review/app.py, is the
only Streamlit user and only lays these out): the queue, the latest decision per masklet, the frame with every
masklet overlaid, the per-masklet timeline, and the conversion of a click from displayed to mask pixels.

The queue reads only the masklets' ranking columns (QUEUE_COLUMNS, pushed down to the Parquet reader), never a
whole table: a 100,000-item run opens in seconds (README-review.md has the figure).
"""
from __future__ import annotations

import colorsys

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

QUEUE_COLUMNS = ["item_id", "object_id", "masklet_id", "flags", "review_priority", "predicted_iou",
                 "frames_visible"]
TODO = "to do"
NOT_REJECTED = "not rejected"
REJECTED = ("reject", "duplicate")  # what exports and open_run leave out (pipeline/export/filters.py)
DECISION_FILTERS = ("", TODO, NOT_REJECTED, "accept", "reject", "duplicate")
# The app's keyboard shortcuts, button key -> key (Streamlit's own `shortcut=` on st.button, which shows the
# key on the button). "C" and "R" are Streamlit's (clear cache, rerun), so reject is X.
KEYS = {"accept": "A", "reject": "X", "next_masklet": "N", "next_item": "I"}


def queue_table(run) -> pa.Table:
    """Every masklet's QUEUE_COLUMNS plus `version`, ranked as the reviewer will see it now: a masklet that
    `masklet refine` re-tracked is ranked by its newest version's row (its own flags and review priority),
    and a new masklet refine created from a correction is in the queue too (a run opened with
    versions="original": the run's own rows only). Highest review_priority first (nulls last), ties by
    masklet_id. Only the ranking columns of the run are read; versions cost one stat
    when there are none."""
    from pipeline.review.versions import latest_versions

    table = run.scan("masklets", columns=QUEUE_COLUMNS)
    table = table.append_column("version", pa.array(np.zeros(len(table), np.int32)))
    reviewed = run.versions != "original" and run.paths.versions.exists()  # open_run(versions=...) decides
    newest = latest_versions(run.paths.root) if reviewed else None
    if newest is not None and newest.num_rows:
        newest = newest.select([*QUEUE_COLUMNS, "version"]).cast(table.schema)
        table = table.filter(pc.invert(pc.is_in(table["masklet_id"], value_set=newest["masklet_id"])))
        table = pa.concat_tables([table, newest])
    order = pc.sort_indices(table, sort_keys=[("review_priority", "descending"), ("masklet_id", "ascending")])
    return table.take(order)


def todo_first(queue: pa.Table, latest: dict[str, dict]) -> pa.Table:
    """The queue with every masklet that has no decision yet before the decided ones, each part in its own
    order (review priority): what the reviewer has left comes first."""
    decided = pa.array([m for m, row in latest.items() if row["decision"]], type=pa.string())
    done = pc.is_in(queue["masklet_id"], value_set=decided).to_numpy(zero_copy_only=False)
    order = np.argsort(done, kind="stable")
    return queue.take(pa.array(order, pa.int64()))


def next_masklet(ids: list[str], current: str | None, skip: frozenset | set = frozenset()) -> str | None:
    """The masklet after `current` in the queue order `ids`, the first one not in `skip` (the decided ones,
    so that "next" after a decision goes on down the to-do list) or, when every later one is in `skip`, the
    one right after. The first not skipped when `current` is not in `ids`; None at the end."""
    return _after(ids, current, skip, lambda m: True)


def next_item(ids: list[str], current: str | None, skip: frozenset | set = frozenset()) -> str | None:
    """As next_masklet, the first later masklet that is on another item than `current`'s."""
    item = current.rsplit("/", 1)[0] if current else None
    return _after(ids, current, skip, lambda m: m.rsplit("/", 1)[0] != item)


def _after(ids: list[str], current: str | None, skip, wanted) -> str | None:
    later = ids[ids.index(current) + 1:] if current in ids else list(ids)
    later = [m for m in later if wanted(m)]
    return next((m for m in later if m not in skip), later[0] if later else None)


def latest_decisions(decisions: pa.Table) -> dict[str, dict]:
    """masklet_id -> its merged decision row (pipeline/review/store.decisions: `decision` is the status,
    accept | reject | duplicate or None, `label` the latest label)."""
    return {row["masklet_id"]: row for row in decisions.to_pylist()}


def filter_queue(queue: pa.Table, latest: dict[str, dict], flags: list[str] | None = None,
                 decision: str | None = None, item: str | None = None) -> pa.Table:
    """The queue rows with any of `flags`, whose latest decision is `decision` (TODO: none yet;
    NOT_REJECTED: no reject or duplicate), on items whose id contains `item`; order kept."""
    keep = pa.array(np.ones(len(queue), dtype=bool))
    if flags:
        flat = pc.list_flatten(queue["flags"])
        parents = pc.list_parent_indices(queue["flags"]).to_numpy()
        hit = np.zeros(len(queue), dtype=bool)
        hit[parents[pc.is_in(flat, value_set=pa.array(flags)).to_numpy(zero_copy_only=False)]] = True
        keep = pc.and_(keep, pa.array(hit))
    if item:
        keep = pc.and_(keep, pc.fill_null(pc.match_substring(queue["item_id"], item), False))
    if decision:
        decided = pa.array([m for m, row in latest.items() if row["decision"]], type=pa.string())
        rejected = pa.array([m for m, row in latest.items() if row["decision"] in REJECTED], type=pa.string())
        if decision == TODO:
            keep = pc.and_(keep, pc.invert(pc.is_in(queue["masklet_id"], value_set=decided)))
        elif decision == NOT_REJECTED:
            keep = pc.and_(keep, pc.invert(pc.is_in(queue["masklet_id"], value_set=rejected)))
        else:
            ids = pa.array([m for m, row in latest.items() if row["decision"] == decision], type=pa.string())
            keep = pc.and_(keep, pc.is_in(queue["masklet_id"], value_set=ids))
    return queue.filter(keep)


def colour(object_id: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour per object id (golden-ratio hues)."""
    h = (object_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay(rgb: np.ndarray, masks: dict[int, np.ndarray], *, opacity: float = 0.45, fill: bool = True,
            outline: bool = True, highlight: int | None = None, points: list[tuple[float, float, int]] = (),
            box: tuple[float, float, float, float] | None = None, extra: np.ndarray | None = None) -> np.ndarray:
    """`rgb` with each mask filled (alpha `opacity`) and outlined in its object's colour; `highlight` drawn
    thicker; `extra` (a candidate's mask) in white; click points (x, y, label: green positive, red negative)
    and a box on top. All in the frame's own pixels (= the stored masks')."""
    img = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8).copy()
    thick = max(1, round(max(img.shape[:2]) / 320))
    layers = [(obj, m, colour(obj)) for obj, m in sorted(masks.items())]
    if extra is not None:
        layers.append((-1, extra, (255, 255, 255)))
    if fill:
        out = img.astype(np.float32)
        for _, m, c in layers:
            m = np.asarray(m, dtype=bool)
            if m.shape == img.shape[:2] and m.any():
                out[m] = out[m] * (1 - opacity) + np.asarray(c, dtype=np.float32) * opacity
        img = out.round().astype(np.uint8)
    if outline:
        for obj, m, c in layers:
            m8 = np.asarray(m, dtype=np.uint8)
            if m8.shape != img.shape[:2] or not m8.any():
                continue
            contours, _ = cv2.findContours(m8, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
            t = thick * 2 if obj in (highlight, -1) else thick
            cv2.drawContours(img, contours, -1, c, t)
    r = max(3, thick * 3)
    for x, y, label in points:
        centre = (round(x), round(y))
        cv2.circle(img, centre, r + 1, (0, 0, 0), -1)
        cv2.circle(img, centre, r, (0, 220, 0) if label else (230, 0, 0), -1)
    if box is not None:
        x0, y0, x1, y1 = (round(v) for v in box)
        cv2.rectangle(img, (x0, y0), (x1, y1), (255, 255, 0), thick)
    return img


def timeline(object_ids: list[int], num_frames: int, visible: dict[int, set[int]],
             corrected: dict[int, set[int]], current: int, cell: int = 12) -> np.ndarray:
    """An RGB strip per masklet (rows in `object_ids` order), one cell per frame: the masklet's colour where
    it is visible, dark grey where not, a white bar under frames with a correction, the current frame framed."""
    rows, cols = max(1, len(object_ids)), max(1, num_frames)
    img = np.full((rows * cell, cols * cell, 3), 40, dtype=np.uint8)
    for r, obj in enumerate(object_ids):
        c = colour(obj)
        for t in visible.get(obj, ()):
            if 0 <= t < cols:
                img[r * cell + 1:(r + 1) * cell - 1, t * cell + 1:(t + 1) * cell - 1] = c
        for t in corrected.get(obj, ()):
            if 0 <= t < cols:
                img[(r + 1) * cell - 3:(r + 1) * cell, t * cell:(t + 1) * cell] = 255
    if 0 <= current < cols:
        img[:, current * cell:current * cell + 1] = 255
        img[:, (current + 1) * cell - 1:(current + 1) * cell] = 255
    return img


def to_mask_pixels(value: dict, width: int, height: int) -> dict:
    """A streamlit-image-coordinates value (displayed pixels: x, y or x1..y2, with the displayed width and
    height) in the frame's own pixels, clipped to the frame."""
    sx = width / float(value.get("width") or width)
    sy = height / float(value.get("height") or height)
    out = {}
    for k in ("x", "x1", "x2"):
        if value.get(k) is not None:
            out[k] = float(np.clip(value[k] * sx, 0, width - 1))
    for k in ("y", "y1", "y2"):
        if value.get(k) is not None:
            out[k] = float(np.clip(value[k] * sy, 0, height - 1))
    return out
