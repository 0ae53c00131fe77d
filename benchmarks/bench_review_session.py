"""The review's own monitoring, measured on a real session: `masklet review` served as a user starts it, driven
in Debian's Chromium by Playwright (tests/browser.py), over a run this script makes with RANDOM WEIGHTS
(configs/random-demo.yaml: the real SAM 2.1 tiny architecture, seeded random weights, 256 px). Then the
figures the app's sidebar and `masklet report` show are read back from disk (OUT/review events,
pipeline/review/monitor.py) and printed; nothing here times anything itself.

    python benchmarks/bench_review_session.py [--dir DIR] [--keep]

The session (a fixed script, so two runs of it are comparable):
  item 1, masklet 1: one positive click, use the candidate; again on the same frame with a positive and a
                     negative click (a retry); propagate now
  N A                next masklet, accept
  N                  next masklet: positive, positive, negative click, use the candidate; A accept
  I                  next item: one positive click, use the candidate; propagate now; X reject
  I, I               next item twice (the second has nowhere to go when the current item's masklets are
                     last in the queue)
Abandons are item visits that ended without a decision on that item (the first item's, here: corrected and
propagated, nothing decided); the last visit is still open when the session ends and counts as neither.
Latency figures are CPU figures with random weights: what the plumbing costs here, not what a GPU
reviewer would see, and never results about masks.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/bench_review_session.py` finds pipeline.* and tests.*


def make_run(root: Path) -> str:
    """Two short videos and an image, run with configs/random-demo.yaml (random weights)."""
    from pipeline.cli import main
    from pipeline.samples import make_image, make_video

    media = root / "media"
    make_video(media / "clip-a.mp4", frames=6, width=160, height=120, seed=1)
    make_video(media / "clip-b.mp4", frames=6, width=160, height=120, seed=2)
    make_image(media / "photo.jpg", width=200, height=150, seed=4)
    manifest = root / "manifest.parquet"
    if main(["manifest", "build", str(media), "-o", str(manifest)]) != 0:
        raise RuntimeError(f"masklet manifest build {media} failed")
    out = root / "run"
    if main(["run", "--manifest", str(manifest), "--out", str(out), "--config",
             str(ROOT / "configs" / "random-demo.yaml")]) != 0:
        raise RuntimeError(f"masklet run into {out} failed; see `masklet status {out} --failed`")
    return str(out)


class Session:
    """The reviewer's moves on the page (each waits for the rerun it starts to finish)."""

    def __init__(self, page):
        self.page = page

    def click_frame(self, fx: float, fy: float) -> None:
        from tests.browser import settle

        image = self.page.frame_locator("iframe[data-testid='stCustomComponentV1']").locator("#image")
        image.wait_for(timeout=60_000)
        box = image.bounding_box()
        image.click(position={"x": box["width"] * fx, "y": box["height"] * fy})
        self.page.get_by_text("SAM 2's answer").wait_for(timeout=120_000)
        settle(self.page)

    def mode(self, name: str) -> None:
        from tests.browser import settle

        self.page.get_by_test_id("stRadio").filter(has_text="click adds").get_by_text(name).click()
        settle(self.page)

    def correct(self, clicks: list[tuple[float, float, int]]) -> None:
        """Clicks (fx, fy, label) on the current frame, then 'Use this candidate'."""
        from tests.browser import settle

        for fx, fy, label in clicks:
            self.mode("positive point" if label else "negative point")
            self.click_frame(fx, fy)
        self.mode("positive point")
        self.page.get_by_role("button", name="Use this candidate").click()
        settle(self.page)

    def propagate(self) -> None:
        from tests.browser import settle

        self.page.get_by_role("button", name="Propagate now").click()
        self.page.get_by_text("written").first.wait_for(timeout=300_000)
        settle(self.page)

    def key(self, name: str) -> None:
        from pipeline.review.view import KEYS
        from tests.browser import press

        press(self.page, KEYS[name].lower())


def drive(url: str, shots: Path) -> None:
    from tests.browser import open_page, settle

    with open_page(url, width=1400, height=1000, timeout_ms=60_000) as bp:
        s = Session(bp.page)
        settle(bp.page)
        bp.page.get_by_text("RANDOM WEIGHTS").first.wait_for(timeout=60_000)
        try:
            _script(s)
        except Exception:
            bp.screenshot(shots / "review-session-failed.png", full_page=True)
            raise
        bp.screenshot(shots / "review-session.png", full_page=True)
        if bp.page_errors:
            raise RuntimeError(f"the page reported errors: {bp.page_errors}")


def _script(s: Session) -> None:
    s.correct([(0.5, 0.5, 1)])
    s.correct([(0.4, 0.45, 1), (0.1, 0.1, 0)])  # same masklet, same frame: a retry
    s.propagate()
    s.key("next_masklet")
    s.key("accept")
    s.key("next_masklet")
    s.correct([(0.3, 0.6, 1), (0.35, 0.55, 1), (0.9, 0.9, 0)])
    s.key("accept")
    s.key("next_item")
    s.correct([(0.5, 0.4, 1)])
    s.propagate()
    s.key("reject")
    s.key("next_item")  # opened and left without a decision: an abandon
    s.key("next_item")


def report(out: str) -> list[str]:
    from pipeline.review import monitor, store

    m = monitor.monitor(store.events(out))
    lines = [f"review session on {out} ({dt.date.today().isoformat()}, {os.cpu_count()}-core CPU "
             f"{platform.processor() or platform.machine()}, RANDOM WEIGHTS: plumbing figures, not results)"]
    for lat in m.latency:
        if lat.count:
            lines.append(f"  {lat.kind:<17} n={lat.count:<3} p50 {lat.p50:8.0f} ms  p95 {lat.p95:8.0f} ms  "
                         f"p99 {lat.p99:8.0f} ms")
        else:
            lines.append(f"  {lat.kind:<17} n=0")
    share = "-" if m.bg_share_median is None else f"{m.bg_share_median:.0%}"
    lines.append(f"  corrections       {m.corrections}; clicks per correction, median {m.clicks_median}; "
                 f"BG share, median {share}")
    rate = "-" if m.retry_rate is None else f"{m.retry_rate:.0%}"
    lines.append(f"  retries           {m.retries} ({rate} of corrections)")
    rate = "-" if m.abandon_rate is None else f"{m.abandon_rate:.0%}"
    lines.append(f"  abandons          {m.abandons} of {m.visits} finished visits ({rate})")
    lines.append(f"  decisions         {m.decisions}")
    lines += [f"  ALERT {a}" for a in m.alerts] or ["  alerts            none"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the run, screenshots)")
    parser.add_argument("--run", help="review a copy of this run instead of making one (it must be unreviewed)")
    args = parser.parse_args(argv)
    from tests.browser import require_chromium, review_app

    require_chromium()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-review-session-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if args.run:
            out = str(root / "run")
            shutil.copytree(args.run, out)
        else:
            out = make_run(root)
        with review_app(out, "bench") as url:
            drive(url, root)
        print("\n".join(report(out)))
        if args.keep:
            print(f"kept {root} (screenshot: {root / 'review-session.png'})")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
