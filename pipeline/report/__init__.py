"""`masklet report OUT`: one self-contained HTML page of a run's health (pipeline/quality/health.py), with
report.json beside it holding every number the page shows.

    write_report(out, output=None, top=12, gallery=True) -> (html_path, json_path)

The page (pipeline/report/html.py, its contract in that module's docstring) embeds its charts
(pipeline/report/plots.py, matplotlib) and the gallery of the highest-priority masklets
(pipeline/report/gallery.py) as PNG data URIs: no server, no network, it opens offline. Works on a run in
flight: only committed items are read.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.paths import RunPaths

__all__ = ["build_report", "default_output", "write_report"]


def default_output(out: str | Path) -> Path:
    return RunPaths.of(out).root / "report" / "report.html"


def build_report(out: str | Path, top: int = 12, gallery: bool = True) -> tuple[dict, str]:
    """(report.json's dict, the HTML page) of the run in `out`."""
    from pipeline.quality.health import run_health
    from pipeline.report import plots
    from pipeline.report.gallery import gallery_entry
    from pipeline.report.html import render
    from pipeline.results import open_run

    run = open_run(out)
    report = run_health(run, top_n=top)
    entries, images = [], []
    note = ""
    if gallery:
        for row in report["top_masklets"]:
            entry, pngs = gallery_entry(run, row)
            entries.append(entry)
            images.append(pngs)
        if not entries:
            note = "No masklet is committed yet."
    else:
        note = "Gallery left out (--no-gallery); the top masklets are listed in report.json under top_masklets."
    report["gallery"] = entries
    from pipeline.review.monitor import review_summary

    review = review_summary(out)  # only once someone reviewed: report.json of an unreviewed run is unchanged
    if review is not None:
        report["review"] = review
    charts = {name: draw(report) for name, draw in plots.CHARTS.items()}
    return report, render(report, charts, images, gallery_note=note)


def write_report(out: str | Path, output: str | Path | None = None, top: int = 12,
                 gallery: bool = True) -> tuple[Path, Path]:
    """Write the page to `output` (default OUT/report/report.html) and report.json beside it."""
    from pipeline.store.atomic import write_text_atomic

    html_path = Path(output) if output else default_output(out)
    json_path = html_path.with_name("report.json")
    report, page = build_report(out, top=top, gallery=gallery)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, json.dumps(report, indent=1, allow_nan=False))
    write_text_atomic(html_path, page)
    return html_path, json_path
