"""`masklet review` in a real browser: the CLI starts the app on a small random-weight run (a copy), Debian's
Chromium (tests/browser.py) opens it, clicks on the frame inside the image component's iframe (a positive
point), picks SAM 2's candidate, propagates it (refine), then with the keyboard only (the app's shortcuts)
goes to the next masklet and accepts it, and to the next and rejects it; then the run folder must hold the
review's rows and the masklet's new version. Screenshots are kept as artifacts; with
MASKLET_UPDATE_DOCS=1 one replaces docs/review-screenshot.png (the README's picture)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


from tests.browser import artifact_path, open_page, press, require_chromium, review_app, settle

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_LIMIT = 400_000  # bytes: docs/review-screenshot.png is committed


def test_review_in_chromium(small_run_copy, tmp_path):
    require_chromium()
    from pipeline import open_run
    from pipeline.review import store, view

    keys = {k: v.lower() for k, v in view.KEYS.items()}
    with review_app(small_run_copy, "browser") as url:
        with open_page(url, width=1400, height=1000, timeout_ms=60_000) as bp:
            page = bp.page
            settle(page)
            page.get_by_text("RANDOM WEIGHTS").first.wait_for(timeout=60_000)
            image = page.frame_locator("iframe[data-testid='stCustomComponentV1']").locator("#image")
            image.wait_for(timeout=60_000)
            box = image.bounding_box()
            image.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
            page.get_by_text("SAM 2's answer").wait_for(timeout=120_000)
            settle(page)
            page.get_by_text("RANDOM WEIGHTS").first.scroll_into_view_if_needed()
            shot = bp.screenshot(artifact_path("review-candidates.png", tmp_path), full_page=False)
            page.get_by_role("button", name="Use this candidate").click()
            settle(page)
            page.get_by_role("button", name="Propagate now").click()
            page.get_by_text("version 1 written").wait_for(timeout=180_000)
            settle(page)
            bp.screenshot(artifact_path("review-propagated.png", tmp_path), full_page=False)
            # The keyboard only: next masklet, accept; next masklet, reject. Each must reach the disk.
            press(page, keys["next_masklet"])
            press(page, keys["accept"])
            page.wait_for_timeout(500)
            assert [r["decision"] for r in store.decisions(small_run_copy).to_pylist()] == ["accept"]
            press(page, keys["next_masklet"])
            press(page, keys["reject"])
            bp.screenshot(artifact_path("review-accepted.png", tmp_path), full_page=True)
            assert not bp.page_errors, bp.page_errors

    decisions = store.decisions(small_run_copy).to_pylist()
    accepted = [r for r in decisions if r["decision"] == "accept"]
    assert len(accepted) == 1 and accepted[0]["reviewer"] == "browser"
    corrections = store.corrections(small_run_copy).to_pylist()
    assert len(corrections) == 1 and corrections[0]["point_labels"] == [1]
    corrected = corrections[0]
    # "next" after the propagation run: that run ranked the queue before the new version existed.
    queue = view.queue_table(open_run(small_run_copy, versions="original"))["masklet_id"].to_pylist()
    assert (corrected["masklet_id"], accepted[0]["masklet_id"]) == (queue[0], queue[1])
    # then the queue ranks the new version, and "next" skips the decided masklet
    now = view.queue_table(open_run(small_run_copy))["masklet_id"].to_pylist()
    rejected = [r["masklet_id"] for r in decisions if r["decision"] == "reject"]
    assert rejected == [view.next_masklet(now, queue[1], {queue[1]})]
    assert store.corrections(small_run_copy, pending_only=True).num_rows == 0  # replayed into a version
    versions = list(Path(small_run_copy, "versions", corrected["item_id"], str(corrected["object_id"])).glob("v*"))
    assert [v.name for v in versions] == ["v001"], versions
    kinds = set(store.events(small_run_copy)["kind"].to_pylist())
    assert {"open_item", "frame_prediction", "correction", "propagation", "decision"} <= kinds
    assert shot.stat().st_size < SCREENSHOT_LIMIT, f"{shot}: {shot.stat().st_size:,} bytes, too big for docs/"
    print(f"\nreview screenshots: {shot.parent}")
    if os.environ.get("MASKLET_UPDATE_DOCS") == "1":  # refresh the README's picture on purpose, not every run
        shutil.copyfile(shot, ROOT / "docs" / "review-screenshot.png")
