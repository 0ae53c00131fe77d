"""`masklet report` on a real random-weight run, opened in headless Chromium (tests/browser.py) over file://.

The page is checked as a reader meets it, against the report's contract: every <img> is a data: URI that
decoded (naturalWidth > 0); no console error and no uncaught page error; the random-weights banner is
visible; and every element carrying data-key="<dotted path into report.json>" shows exactly
pipeline.report.html.format_number(value at that path), so a number on the page cannot drift from the JSON
beside it. A full-page screenshot is kept, report.png, and the first screenful, report-viewport.png: in
$MASKLET_ARTIFACTS when set, else in the test's tmp dir.

`check_report_page` returns the problems it found rather than asserting, so a second test can show it
catches each kind of problem on a deliberately broken page (otherwise a checker that sees nothing passes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.browser import artifact_path, open_page

MIN_DATA_KEYS = 5  # a report showing fewer numbers than this has lost its tables


def resolve(doc: Any, dotted: str) -> Any:
    """The value at a dotted path ("items.0.seconds_total"; list indices as numbers). Keys may hold dots
    themselves (item ids such as "clip.mp4"), so at each dict every way of grouping the remaining parts is
    tried; the path must resolve exactly one way."""
    found: list[Any] = []

    def walk(node: Any, parts: list[str]) -> None:
        if not parts:
            found.append(node)
            return
        if isinstance(node, list):
            if parts[0].isdigit() and int(parts[0]) < len(node):
                walk(node[int(parts[0])], parts[1:])
        elif isinstance(node, dict):
            for n in range(1, len(parts) + 1):
                key = ".".join(parts[:n])
                if key in node:
                    walk(node[key], parts[n:])

    walk(doc, dotted.split("."))
    if len(found) != 1:
        raise KeyError(f"data-key {dotted!r} resolves {len(found)} ways in report.json (expected exactly one)")
    return found[0]


def check_report_page(html: Path, report: dict, format_number: Callable[[Any], str],
                      screenshot: Path | None = None) -> tuple[list[str], int]:
    """Open `html` in Chromium and return (problems, number of data-key elements checked)."""
    problems: list[str] = []
    with open_page(html.resolve().as_uri()) as bp:
        page = bp.page
        title = page.title()
        if "masklet report" not in title:
            problems.append(f"title {title!r} lacks 'masklet report'")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => ({src: e.getAttribute('src') || '', complete: e.complete,"
                   " w: e.naturalWidth, alt: e.getAttribute('alt')}))")
        if not images:
            problems.append("no <img> on the page")
        for i, img in enumerate(images):
            name = f"<img> #{i} (alt={img['alt']!r}, src={img['src'][:40]!r})"
            if not img["src"].startswith("data:"):
                problems.append(f"{name}: not a data: URI")
            if not (img["complete"] and img["w"] > 0):
                problems.append(f"{name}: did not load (naturalWidth {img['w']})")
        banner = page.locator("#random-weights-banner")
        if banner.count() != 1 or not banner.is_visible():
            problems.append(f"random-weights banner: {banner.count()} found, visible: "
                            f"{banner.count() == 1 and banner.is_visible()}")
        elif "random weights" not in banner.inner_text().lower():
            problems.append(f"random-weights banner text {banner.inner_text()!r} does not say 'random weights'")
        keyed = page.eval_on_selector_all(
            "[data-key]", "els => els.map(e => [e.getAttribute('data-key'), e.textContent])")
        for key, text in keyed:
            try:
                want = format_number(resolve(report, key))
            except KeyError as e:
                problems.append(str(e))
                continue
            if text.strip() != want:
                problems.append(f"data-key {key!r}: page shows {text.strip()!r}, report.json gives {want!r}")
        problems += [f"console error: {m}" for m in bp.console_errors]
        problems += [f"page error: {m}" for m in bp.page_errors]
        if screenshot is not None:
            bp.screenshot(screenshot, full_page=True)
            # The first screenful too: small enough for the README (docs/report-screenshot.png is one).
            bp.screenshot(screenshot.with_name(f"{screenshot.stem}-viewport{screenshot.suffix}"), full_page=False)
    return problems, len(keyed)


def test_report_renders_in_chromium(small_run, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.report.html import format_number

    html = tmp_path / "report.html"
    assert main(["report", small_run, "-o", str(html)]) == 0
    report = json.loads((html.parent / "report.json").read_text())
    shot = artifact_path("report.png", tmp_path)
    problems, checked = check_report_page(html, report, format_number, screenshot=shot)
    with capsys.disabled():
        print(f"\nreport screenshot: {shot} and {shot.stem}-viewport.png beside it "
              f"({checked} data-key numbers checked against report.json)")
    assert not problems, "\n".join(problems)
    assert checked >= MIN_DATA_KEYS, f"only {checked} data-key elements on the page"


BROKEN_PAGE = """<!doctype html><html><head><title>not it</title></head><body>
<img alt="broken" src="data:image/png;base64,AAAA">
<img alt="file" src="missing.png">
<span data-key="items.0.frames">8</span>
<span data-key="total">3.50</span>
<span data-key="missing.path">1</span>
<script>console.error("logged error"); notDefined();</script>
</body></html>"""


def test_the_checker_catches_each_kind_of_problem(tmp_path):
    """Without this, a checker that looked at nothing would pass the real report too."""
    page = tmp_path / "broken.html"
    page.write_text(BROKEN_PAGE)
    problems, checked = check_report_page(page, {"items": [{"frames": 7}], "total": 3.5}, lambda v: f"{v:g}")
    text = "\n".join(problems)
    assert checked == 3
    for expected in ("lacks 'masklet report'", "'broken'", "did not load", "not a data: URI",
                     "random-weights banner: 0 found", "'items.0.frames': page shows '8', report.json gives '7'",
                     "'total': page shows '3.50', report.json gives '3.5'", "'missing.path' resolves 0 ways",
                     "console error: logged error", "page error:", "notDefined"):
        assert expected in text, f"{expected!r} not reported; problems were:\n{text}"


def test_resolve_keys_that_hold_dots():
    doc = {"items": {"clip.mp4": {"frames": 5}, "clip": {"mp4": {"frames": 6}}, "a.b": [1, {"c": 2}]}}
    assert resolve(doc, "items.a.b.1.c") == 2
    with pytest.raises(KeyError, match="2 ways"):
        resolve(doc, "items.clip.mp4.frames")
