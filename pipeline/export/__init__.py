"""Exports of a run's masklets: one module per format behind the FORMATS registry (`masklet export --format`).
The runner (runner.py) streams items through a format's `write_item` and calls its `finish` (base.py)."""
from __future__ import annotations

from pipeline.export import coco, cvat, davis, sav, ytvis

FORMATS = {
    sav.SAV_JSON.name: sav.SAV_JSON,
    sav.SAV_PNG.name: sav.SAV_PNG,
    davis.FORMAT.name: davis.FORMAT,
    ytvis.FORMAT.name: ytvis.FORMAT,
    coco.FORMAT.name: coco.FORMAT,
    cvat.FORMAT.name: cvat.FORMAT,
}
