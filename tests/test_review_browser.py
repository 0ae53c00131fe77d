"""`masklet review` in a real browser: the CLI starts the app on a small random-weight run (a copy), Debian's
Chromium (tests/browser.py) opens it, clicks on the frame inside the image component's iframe (a positive
point), picks SAM 2's candidate, propagates it (refine), accepts another masklet; then the run folder must
hold the review's rows and the masklet's new version. Screenshots are kept as artifacts; with
MASKLET_UPDATE_DOCS=1 one replaces docs/review-screenshot.png (the README's picture)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser import artifact_path, open_page, require_chromium

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT_LIMIT = 400_000  # bytes: docs/review-screenshot.png is committed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_health(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"masklet review exited {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"masklet review did not answer /_stcore/health on port {port} in {timeout} s")


def settle(page, timeout_ms: int = 120_000) -> None:
    """Wait for the rerun a click started to finish (Streamlit's own e2e tests wait on these attributes)."""
    page.wait_for_timeout(400)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=timeout_ms)


@pytest.fixture
def review_run(small_run, tmp_path) -> str:
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    return str(out)


def test_review_in_chromium(review_run, tmp_path):
    require_chromium()
    from pipeline import open_run
    from pipeline.review import store, view

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "review", review_run, "--port", str(port),
                             "--reviewer", "browser"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_health(port, proc)
        with open_page(f"http://localhost:{port}", width=1400, height=1000, timeout_ms=60_000) as bp:
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
            # Accept another masklet: the queue's second.
            page.get_by_test_id("stSelectbox").filter(has_text="review masklet").locator("input").click()
            page.keyboard.press("ArrowDown")
            page.keyboard.press("Enter")
            settle(page)
            page.get_by_role("button", name="Accept", exact=True).click()
            settle(page)
            bp.screenshot(artifact_path("review-accepted.png", tmp_path), full_page=True)
            assert not bp.page_errors, bp.page_errors
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

    decisions = store.decisions(review_run).to_pylist()
    accepted = [r for r in decisions if r["decision"] == "accept"]
    assert len(accepted) == 1 and accepted[0]["reviewer"] == "browser"
    corrections = store.corrections(review_run).to_pylist()
    assert len(corrections) == 1 and corrections[0]["point_labels"] == [1]
    corrected = corrections[0]
    queue = view.queue_table(open_run(review_run, versions="original"))["masklet_id"].to_pylist()
    assert (corrected["masklet_id"], accepted[0]["masklet_id"]) == (queue[0], queue[1])
    assert store.corrections(review_run, pending_only=True).num_rows == 0  # replayed into a version
    versions = list(Path(review_run, "versions", corrected["item_id"], str(corrected["object_id"])).glob("v*"))
    assert [v.name for v in versions] == ["v001"], versions
    kinds = set(store.events(review_run)["kind"].to_pylist())
    assert {"open_item", "frame_prediction", "correction", "propagation", "decision"} <= kinds
    assert shot.stat().st_size < SCREENSHOT_LIMIT, f"{shot}: {shot.stat().st_size:,} bytes, too big for docs/"
    print(f"\nreview screenshots: {shot.parent}")
    if os.environ.get("MASKLET_UPDATE_DOCS") == "1":  # refresh the README's picture on purpose, not every run
        shutil.copyfile(shot, ROOT / "docs" / "review-screenshot.png")
