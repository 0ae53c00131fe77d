"""Reading ground truth and predictions from the layouts they come in, one frame at a time.

Ground truth (what `find_gt_videos` recognises under --gt, and what a manifest's gt_path/gt_layout name):
- `davis`: {video}/{frame:05d}.png, one palette PNG per annotated frame, pixel = object id (0 background,
  255 void: ignored, as davis2017 does). Found as GT_ROOT/Annotations/480p (or the only resolution there),
  GT_ROOT/Annotations/<res>, or GT_ROOT itself when its video folders hold PNGs only.
- `sav`: {video}/{obj:03d}/{frame:05d}.png, one binary PNG per object per annotated frame (objects may
  overlap). Found as GT_ROOT/Annotations_6fps or GT_ROOT itself when its video folders hold object folders.
Frame file stem = media frame index (SA-V annotates every 4th frame of the 24 fps video: 00000, 00004, ...).

Object keys are 0-based everywhere: SA-V object folder 003 is key 3, DAVIS palette id 1 is key 0; a run's
masklet key is its object_id, an sav-png export's its folder number, a davis-png export's its id - 1.

Predictions: a run folder (masks of `open_run(OUT)`, decoded frame t <-> media frame `source_frames[t]`), or an
export folder in sav-png ({video}/{obj:03d}/{frame:05d}.png) or davis-png ({video}/{frame:05d}.png) layout.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

VOID_ID = 255
GT_LAYOUTS = ("davis", "sav")


class EvaluateInputError(ValueError):
    """Bad input for evaluate: the message names the item and the fix (the CLI prints it, exit status 2)."""


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise EvaluateInputError(f"{path}: a {arr.ndim}-D image (mode {Image.open(path).mode}); masks must be "
                                 f"single-channel PNGs (palette or grey), as the DAVIS and SA-V evaluators read them")
    return arr


def _frame_number(name: str, where: str) -> int:
    stem = os.path.splitext(name)[0]
    if not stem.isdigit():
        raise EvaluateInputError(f"{where}/{name}: frame file names must be the frame index (00000.png ...)")
    return int(stem)


def _pngs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".png") and not n.startswith("."))


def _layout_of_video_folder(folder: str) -> str | None:
    """`davis` when the folder holds PNGs only, `sav` when it holds object folders (the references' rule)."""
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    except OSError:
        return None
    if entries and all(e.is_file() and e.name.endswith(".png") for e in entries):
        return "davis"
    if entries and any(e.is_dir() for e in entries):
        return "sav"
    return None


def annotations_root(gt_root: str) -> tuple[str, str]:
    """(folder of video folders, layout) under a dataset root or an annotations folder; EvaluateInputError
    when no layout is recognised."""
    root = os.path.abspath(gt_root)
    if not os.path.isdir(root):
        raise EvaluateInputError(f"GT root {gt_root!r} is not a folder; pass the DAVIS or SA-V dataset root")
    candidates = [os.path.join(root, "Annotations_6fps")]
    ann = os.path.join(root, "Annotations")
    if os.path.isdir(ann):
        resolutions = sorted(d for d in os.listdir(ann) if os.path.isdir(os.path.join(ann, d)))
        candidates += [os.path.join(ann, "480p")] + [os.path.join(ann, r) for r in resolutions] + [ann]
    candidates.append(root)
    for folder in candidates:
        if not os.path.isdir(folder):
            continue
        videos = [e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
        layouts = {_layout_of_video_folder(v) for v in videos[:20]}
        if len(layouts) == 1 and None not in layouts:
            return folder, layouts.pop()
    raise EvaluateInputError(
        f"GT root {gt_root!r}: no recognised ground-truth layout; expected DAVIS "
        f"(Annotations/480p/<seq>/00000.png ...) or SA-V (Annotations_6fps/<video>/000/00000.png ...) under it, "
        f"or a folder of such video folders; pass the dataset root")


def find_gt_videos(gt_root: str) -> dict[str, tuple[str, str]]:
    """{video name: (folder, layout)} of the GT root."""
    folder, layout = annotations_root(gt_root)
    return {e.name: (e.path, layout) for e in sorted(os.scandir(folder), key=lambda e: e.name)
            if e.is_dir() and not e.name.startswith(".")}


class GtVideo:
    """One video's annotations. `objects` maps key -> annotated frames (all of them, sorted)."""

    def __init__(self, path: str, layout: str):
        if layout not in GT_LAYOUTS:
            raise EvaluateInputError(f"{path}: unknown GT layout {layout!r}; expected one of {GT_LAYOUTS}")
        if not os.path.isdir(path):
            raise EvaluateInputError(f"GT folder {path!r} does not exist; check the dataset is where the manifest "
                                     f"says (column gt_path) or pass --gt DATASET_ROOT")
        self.path, self.layout = path, layout
        if layout == "davis":
            self.frames = [_frame_number(n, path) for n in _pngs(path)]
            self._names = {f: n for f, n in zip(self.frames, _pngs(path))}
            if not self.frames:
                raise EvaluateInputError(f"GT folder {path!r} holds no PNG annotations")
        else:
            self.object_frames: dict[int, list[int]] = {}
            self._obj_dirs: dict[int, str] = {}
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                if not entry.is_dir() or entry.name.startswith("."):
                    continue
                if not entry.name.isdigit():
                    raise EvaluateInputError(f"{entry.path}: SA-V object folders are numbers (000, 001, ...)")
                key = int(entry.name)
                self._obj_dirs[key] = entry.path
                self.object_frames[key] = [_frame_number(n, entry.path) for n in _pngs(entry.path)]
            if not self.object_frames:
                raise EvaluateInputError(f"GT folder {path!r} holds no object folders (000, 001, ...)")

    def read(self, frame: int) -> dict[int, np.ndarray]:
        """{key: bool (H, W)} of the objects annotated on `frame` (DAVIS: those present on it)."""
        if self.layout == "davis":
            ids = _read_png(os.path.join(self.path, self._names[frame]))
            return {int(i) - 1: ids == i for i in np.unique(ids) if i not in (0, VOID_ID)}
        return {k: _read_png(os.path.join(self._obj_dirs[k], f"{frame:05d}.png")) > 0
                for k, frames in self.object_frames.items() if frame in set(frames)}

    def first_frame_objects(self) -> list[int]:
        """davis2017's object list: ids 1 .. the largest id on the first annotated frame (keys 0 .. max-1)."""
        ids = _read_png(os.path.join(self.path, self._names[self.frames[0]]))
        ids = ids[ids != VOID_ID]
        return list(range(int(ids.max()) if ids.size else 0))


class Predictions:
    """One video's predicted masklets, read a frame at a time."""

    keys: list[int]

    def read(self, frame: int) -> dict[int, np.ndarray]:
        """{key: bool (H, W)} of every masklet on media frame `frame` (absent keys: empty)."""
        raise NotImplementedError

    def plane(self, key: int, frame: int) -> np.ndarray | None:
        raise NotImplementedError


class RunPredictions(Predictions):
    def __init__(self, out: str, item_id: str, frame_index: dict[int, int] | None = None):
        from pipeline.paths import RunPaths
        from pipeline.store.masks import open_masks  # zarr: imported in the worker only

        self.item_id = item_id
        try:
            self.array = open_masks(RunPaths.of(out), item_id)
        except Exception as e:
            raise EvaluateInputError(f"item {item_id!r} has no committed masks in {out} ({e}); finish the run "
                                     f"(`masklet resume {out}`) or evaluate the videos it has") from e
        source = [int(s) for s in self.array.attrs.get("source_frames", range(self.array.shape[1]))]
        self.t_of = {s: t for t, s in enumerate(source)}
        self.frame_index = frame_index  # GT frame number -> media frame index, when names and positions differ
        self.keys = list(range(self.array.shape[0]))

    def _t(self, frame: int) -> int:
        media = self.frame_index.get(frame, frame) if self.frame_index else frame
        try:
            return self.t_of[media]
        except KeyError:
            raise EvaluateInputError(
                f"item {self.item_id!r}: GT frame {frame:05d} was not decoded by the run (decoded media frames "
                f"{min(self.t_of, default=0)}..{max(self.t_of, default=-1)}, {len(self.t_of)} of them); run it "
                f"with every frame decoded (decode.stride=1, no decode.target_fps) to evaluate it") from None

    def read(self, frame: int) -> dict[int, np.ndarray]:
        planes = np.asarray(self.array[:, self._t(frame)])
        return {k: planes[k] for k in self.keys}

    def plane(self, key: int, frame: int) -> np.ndarray:
        return np.asarray(self.array[key, self._t(frame)])


class SavPngPredictions(Predictions):
    def __init__(self, folder: str):
        self.folder = folder
        dirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name.isdigit())
        self._dirs = {int(d): d for d in dirs}
        self.keys = list(self._dirs)

    def plane(self, key: int, frame: int) -> np.ndarray:
        path = os.path.join(self.folder, self._dirs[key], f"{frame:05d}.png")
        if not os.path.exists(path):
            raise EvaluateInputError(f"{path} not found: the export has no mask for GT frame {frame:05d}; export "
                                     f"every frame the GT annotates (the run must decode them)")
        return _read_png(path) > 0

    def read(self, frame: int) -> dict[int, np.ndarray]:
        return {k: self.plane(k, frame) for k in self.keys}


class DavisPngPredictions(Predictions):
    def __init__(self, folder: str):
        self.folder = folder
        self.keys = []  # grows as frames are read: ids are only known from the pixels
        self._cache: tuple[int, np.ndarray] | None = None

    def _ids(self, frame: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != frame:
            path = os.path.join(self.folder, f"{frame:05d}.png")
            if not os.path.exists(path):
                raise EvaluateInputError(f"{path} not found: the export has no mask for GT frame {frame:05d}; "
                                         f"export every frame the GT annotates (the run must decode them)")
            self._cache = (frame, _read_png(path))
        return self._cache[1]

    def read(self, frame: int) -> dict[int, np.ndarray]:
        ids = self._ids(frame)
        planes = {int(i) - 1: ids == i for i in np.unique(ids) if i != 0}
        self.keys.extend(k for k in planes if k not in self.keys)
        return planes

    def plane(self, key: int, frame: int) -> np.ndarray:
        return self._ids(frame) == key + 1


def export_layout(folder: str) -> str:
    """`sav-png` or `davis-png` for an export folder (from export.json's format when it names one)."""
    meta = export_metadata(folder)
    fmt = str(meta.get("format", ""))
    if fmt in ("sav-png", "davis-png"):
        return fmt
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            layout = _layout_of_video_folder(entry.path)
            if layout:
                return "davis-png" if layout == "davis" else "sav-png"
    raise EvaluateInputError(f"{folder}: neither a run folder (run.json) nor an export in sav-png "
                             f"({{video}}/{{obj:03d}}/{{frame:05d}}.png) or davis-png ({{video}}/{{frame:05d}}.png) "
                             f"layout; pass a run folder or a `masklet export` folder")


@lru_cache(maxsize=8)
def export_metadata(folder: str) -> dict:
    path = os.path.join(folder, "export.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass(frozen=True)
class PredictionSpec:
    """Where one video's predictions are: plain values, sent to a worker process."""

    kind: str  # run | sav-png | davis-png
    root: str  # run folder or export folder
    name: str  # item id (run) or video folder (export)
    frames_path: str | None = None  # the run item's frame folder: maps GT frame names to media positions

    def open(self) -> Predictions:
        if self.kind == "run":
            return RunPredictions(self.root, self.name, _frame_positions(self.frames_path))
        folder = os.path.join(self.root, self.name)
        return SavPngPredictions(folder) if self.kind == "sav-png" else DavisPngPredictions(folder)


def _frame_positions(frames_path: str | None) -> dict[int, int] | None:
    """{frame number in the file name: position in the sorted folder}, for a frame folder whose names are not
    0, 1, 2, ... (the decoder numbers frames by position)."""
    if not frames_path or not os.path.isdir(frames_path):
        return None
    from pipeline.stages.decode import (
        frame_files,  # the decoder's own order of a frame folder
    )

    names = [os.path.basename(p) for p in frame_files(frames_path)]
    positions = {}
    for i, n in enumerate(names):
        stem = os.path.splitext(n)[0]
        if stem.isdigit():
            positions[int(stem)] = i
    return positions if any(k != v for k, v in positions.items()) else None
