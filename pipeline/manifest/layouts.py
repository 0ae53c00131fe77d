"""Dataset layouts a user evaluates on: where a frame folder's ground truth is, and which folders are ground
truth rather than media.

- DAVIS: <root>/JPEGImages/<res>/<seq>/00000.jpg ... with <root>/Annotations/<res>/<seq>/00000.png ...
  (palette PNGs, one per frame; `gt_layout` "davis").
- SA-V val/test: <root>/JPEGImages_24fps/<vid>/00000.jpg ... with <root>/Annotations_6fps/<vid>/<obj>/00000.png
  (one binary PNG per object, every 4th frame; `gt_layout` "sav").

A frame folder in such a place gets `gt_path` (the annotation folder of the same name, when it exists) and
`gt_layout`, and its item id is the sequence name (it is rooted at its parent folder), so exports are named
as the GT videos are and `masklet evaluate OUT` finds the GT from the run's own manifest copy. The annotation
folders themselves are PNG frame folders by the generic rule; discovery skips them (`is_annotation_folder`).
"""
from __future__ import annotations

import os

# media folder name -> (annotation folder name, layout, levels between the media folder and a sequence)
LAYOUTS = {"JPEGImages": ("Annotations", "davis", 2), "JPEGImages_24fps": ("Annotations_6fps", "sav", 1)}
ANNOTATION_FOLDERS = {ann: media for media, (ann, _, _) in LAYOUTS.items()}


def ground_truth_of(frame_folder: str) -> tuple[str, str] | None:
    """(gt_path, gt_layout) of a frame folder in a DAVIS or SA-V layout whose annotations exist; else None."""
    path = os.path.normpath(os.path.abspath(frame_folder))
    parts = path.split(os.sep)
    for media, (ann, layout, depth) in LAYOUTS.items():
        if len(parts) > depth and parts[-1 - depth] == media:
            gt = os.sep.join(parts[:-1 - depth] + [ann] + parts[-depth:])
            if os.path.isdir(gt):
                return gt, layout
    return None


def is_annotation_folder(folder: str) -> bool:
    """An `Annotations` / `Annotations_6fps` folder beside its media folder (`JPEGImages` / `JPEGImages_24fps`)."""
    name = os.path.basename(os.path.normpath(folder))
    media = ANNOTATION_FOLDERS.get(name)
    return media is not None and os.path.isdir(os.path.join(os.path.dirname(os.path.normpath(folder)), media))


def sequence_root(frame_folder: str) -> str | None:
    """The folder a layout's frame folder is rooted at (its parent, so that its id is the sequence name)."""
    return os.path.dirname(os.path.normpath(frame_folder)) if ground_truth_of(frame_folder) else None
