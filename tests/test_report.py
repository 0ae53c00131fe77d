"""`masklet report` (pipeline/report/): the page is self-contained and keeps its data-key contract, report.json
holds the health numbers, the banner shows iff the run used random weights, the gallery outlines masks over
decoded frames (grey when the media is gone), the CLI's errors, and the benchmark's quick size."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from benchmarks.fabricate_run import Spec, fabricate_run
from pipeline import open_run
from pipeline.cli import main
from pipeline.quality.health import run_health
from pipeline.records import FrameMasks, MediaItem
from pipeline.report import write_report
from pipeline.report.html import format_number, lookup


class _Page(HTMLParser):
    """Every element with data-key and its text; every img src; every src/href; scripts; the title."""

    def __init__(self):
        super().__init__()
        self.keys: list[tuple[str, str]] = []
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.title = ""
        self._open: list[list] = []  # [tag, key or None, text parts]
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        self.scripts += tag == "script"
        self._in_title = tag == "title"
        if tag not in ("img", "meta", "br", "link"):
            self._open.append([tag, a.get("data-key"), []])

    def handle_endtag(self, tag):
        self._in_title = False
        while self._open:
            t, key, text = self._open.pop()
            if key is not None:
                self.keys.append((key, "".join(text)))
            if self._open:
                self._open[-1][2].extend(text)
            if t == tag:
                break

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        if self._open:
            self._open[-1][2].append(data)


def _parse(path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    fabricate_run(out, Spec(items=120, masklets=2400, shards=4, drift=0.3), random_weights=True)
    html, js = write_report(out, top=5)
    return out, html, js


def test_page_is_self_contained_and_keeps_the_data_key_contract(fabricated):
    out, html, js = fabricated
    report = json.loads(js.read_text())
    page = _parse(html)
    assert "masklet report" in page.title
    assert page.scripts == 0
    assert not [u for u in page.links if re.match(r"(?i)\s*(https?:)?//", u)]
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert len(page.keys) > 100
    for key, text in page.keys:
        assert text == format_number(lookup(report, key)), key
    shown = {k for k, _ in page.keys}
    for must in ("scores.predicted_iou.median", "run.items_done", "latency.per_frame_ms.total.all.p95",
                 "failures.failure_rate", "flags.counts.tiny", "scores.predicted_iou.drift_early_late"):
        assert must in shown


def test_report_json_holds_the_health_numbers(fabricated):
    out, html, js = fabricated
    report = json.loads(js.read_text())
    health = json.loads(json.dumps(run_health(open_run(out), top_n=5)))
    for d in (report, health):
        d["run"].pop("generated_at")
    report.pop("gallery")
    assert report == health


def test_banner_iff_random_weights_and_nothing_called_results(fabricated, tmp_path):
    _, html, _ = fabricated
    text = html.read_text()
    assert '<div id="random-weights-banner">' in text
    banner = re.search(r'<div id="random-weights-banner">.*?</div>', text, re.S).group(0)
    assert "not results" in banner
    rest = re.sub(r"data:image/png;base64,[^\"]+", "", text.replace(banner, ""))
    assert "result" not in rest.lower()
    out = tmp_path / "real"
    fabricate_run(out, Spec(items=20, masklets=200, shards=1), random_weights=False)
    real, _ = write_report(out, tmp_path / "page.html", gallery=False)
    assert 'id="random-weights-banner"' not in real.read_text() and "RANDOM WEIGHTS" not in real.read_text()


def format_cases():
    return [(None, "n/a"), (True, "yes"), (12345, "12,345"), (0.0, "0"), (12345.6, "12,346"), (3.14159, "3.14"),
            (0.76049, "0.76"), (0.012345, "0.0123"), (float("nan"), "n/a")]


@pytest.mark.parametrize("value, text", format_cases())
def test_format_number(value, text):
    assert format_number(value) == text


def _media_run(tmp_path):
    """Two tiny clips, every item done, masks in Zarr (one disc per object, moving), through the store."""
    from pipeline.samples import make_video
    from pipeline.store.masks import MaskWriter

    items = []
    for k in range(2):
        path = make_video(tmp_path / f"clip{k}.mp4", frames=8, width=96, height=64, seed=k)
        items.append(MediaItem(f"clip{k}", str(path), "video", 8, 24.0, 96, 64, "h264", 1000))
    out = tmp_path / "run"
    plan = fabricate_run(out, Spec(items=2, masklets=6, shards=1, fail_share=0.0), items=items)
    run = open_run(out)
    yy, xx = np.mgrid[0:64, 0:96]
    for row in run.items.to_pylist():
        o, t = row["num_objects"], row["num_frames"]
        writer = MaskWriter(run.paths, row["item_id"], o, t, 64, 96, plan.config.store, {"item_id": row["item_id"]})
        for f in range(t):
            masks = np.stack([(yy - 20 - 3 * j) ** 2 + (xx - 20 - 5 * f - 10 * j) ** 2 < 100 for j in range(o)])
            writer.write(FrameMasks(f, f, tuple(range(o)), masks.reshape(o, 64, 96), np.ones(o, np.float32)))
        writer.finish()
        writer.publish()
    return out


def test_gallery_outlines_masks_over_decoded_frames_and_grey_when_media_is_gone(tmp_path):
    out = _media_run(tmp_path)
    html, js = write_report(out, top=6)
    report = json.loads(js.read_text())
    gallery = report["gallery"]
    assert gallery and all(g["media"] == "decoded" for g in gallery if g["first_frame"] >= 0)
    shown = [g for g in gallery if g["frames"]]
    page = _parse(html)
    gallery_imgs = [s for s in page.imgs if s.startswith("data:image/png")]
    assert len(gallery_imgs) >= sum(len(g["frames"]) for g in shown) > 0
    for g in shown:
        roles = " ".join(f["role"] for f in g["frames"])
        if g["first_frame"] >= 0:
            assert "first" in roles and "last" in roles
    (tmp_path / "clip0.mp4").unlink()
    _, js = write_report(out, tmp_path / "again.html", top=6)
    gone = [g for g in json.loads(js.read_text())["gallery"] if g["item_id"] == "clip0" and g["frames"]]
    assert gone and all(g["media"] == "grey" and "could not be decoded" in g["note"] for g in gone)


def test_cli_report_and_its_errors(tmp_path, capsys):
    out = tmp_path / "run"
    fabricate_run(out, Spec(items=10, masklets=50, shards=2), commit=[0])  # in flight
    assert main(["report", str(out), "--no-gallery"]) == 0
    assert (out / "report" / "report.html").exists() and (out / "report" / "report.json").exists()
    assert json.loads((out / "report" / "report.json").read_text())["run"]["in_flight"] is True
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a masklet run folder" in err[0] and "masklet run" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "x.html")]) == 2


def test_bench_report_quick(capsys):
    from benchmarks.bench_report import main as bench

    assert bench(["--quick"]) == 0
    text = capsys.readouterr().out
    assert "peak RSS" in text and "masklet report" in text


@pytest.mark.slow
def test_report_of_a_real_random_weight_run(tmp_path, demo_config, fast_overrides):
    """The real pipeline (random weights, ~30-60 s on a CPU), then the report: banner, gallery frames decoded
    from the media, every data-key resolving. Signal columns may be null (until the worker writes them)."""
    from pipeline.samples import make_frame_folder, make_video

    media = tmp_path / "media"
    make_video(media / "a_clip.mp4", frames=8, width=160, height=120, seed=1)
    make_frame_folder(media / "c_frames", frames=5, width=144, height=112, ext="png", seed=3)
    manifest = tmp_path / "manifest.parquet"
    assert main(["manifest", "build", str(media), "-o", str(manifest)]) == 0
    out = tmp_path / "run"
    assert main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config,
                 *fast_overrides]) == 0
    assert main(["report", str(out), "--top", "4"]) == 0
    html, js = out / "report" / "report.html", out / "report" / "report.json"
    report = json.loads(js.read_text())
    assert 'id="random-weights-banner"' in html.read_text()
    page = _parse(html)
    for key, text in page.keys:
        assert text == format_number(lookup(report, key)), key
    shown = [g for g in report["gallery"] if g["frames"]]
    assert shown and all(g["media"] == "decoded" for g in shown)
