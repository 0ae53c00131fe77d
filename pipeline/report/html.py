"""The report page: one self-contained HTML file rendered from report.json's dict with jinja2.

The template is page.html.j2 beside this module.

CONTRACT (a browser test relies on it; keep it when editing the template):
- Every number the page shows that comes from report.json sits in an element with the attribute
  `data-key="<dotted path into report.json>"` (list indices as numbers, e.g. `scores.predicted_iou.median`,
  `gallery.0.review_priority`), whose text content is exactly `format_number(value)` of the value at that path.
  The template can only show such numbers through `num(path)`, which looks the value up and writes both.
- Every image is an <img> whose src is a `data:image/png;base64,...` URI; nothing is loaded from elsewhere
  (no http(s) src or href, no scripts, no stylesheets but the inline one), so the file opens offline.
- No JavaScript at all (so no console errors).
- The page title contains "masklet report".
- On a run made with random weights the page starts with `<div id="random-weights-banner">`, and nowhere calls
  its masks results.
"""
from __future__ import annotations

import base64
import math

import jinja2
from markupsafe import Markup, escape

__all__ = ["format_number", "lookup", "render"]


def format_number(value) -> str:
    """How the page writes a number from report.json (the contract's one definition):
    None -> "n/a"; bool -> "yes"/"no"; int -> thousands separated ("12,345"); float: 0 -> "0",
    |x| >= 1000 -> no decimals, thousands separated ("12,346"); |x| >= 1 -> two decimals ("3.14");
    |x| < 1 -> three significant digits ("0.761", "0.0123"); NaN/inf (never in report.json) -> "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    x = float(value)
    if not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def lookup(data, path: str):
    """The value at a dotted path (list indices as numbers) of report.json's dict."""
    node = data
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


TEMPLATE = "page.html.j2"  # beside this module; package data (pyproject.toml)


def render(report: dict, charts: dict[str, bytes | None], images: list[list[bytes]], gallery_note: str = "",
           slow_shards: int = 20) -> str:
    """The page for `report` (report.json's dict), with `charts` (name -> PNG or None) and the gallery's PNGs
    (`images[i][k]`: masklet i, frame k)."""
    def num(path: str) -> Markup:
        return Markup(f'<span data-key="{escape(path)}">{escape(format_number(lookup(report, path)))}</span>')

    def chart(name: str) -> Markup:
        data = charts.get(name)
        if not data:
            return Markup("")
        return Markup(f'<p><img alt="{escape(name)}" src="{data_uri(data)}"></p>')

    shards = report["by_shard"]
    order = sorted(range(len(shards)), key=lambda i: -(shards[i]["frame_ms"]["p95"] or -1))[:slow_shards]
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.report", "."), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    from pipeline.quality.health import SCORES, STAGES

    return env.get_template(TEMPLATE).render(
        report=report, num=num, chart=chart, stages=STAGES, scores=SCORES, slow_shards=order,
        images=[[data_uri(b) for b in imgs] for imgs in images], gallery_note=gallery_note)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
