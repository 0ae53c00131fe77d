"""Headless Chromium for tests: Debian's `chromium` package driven by Playwright's sync API.

Playwright's own browser download (`playwright install`) fetches from its CDN, which CI and these machines
cannot reach, so the tests launch the distribution's build through `executable_path` instead (Playwright
supports that but does not vouch for other builds; what we use of it, page loading, console events and
screenshots, is the stable core). jobs/test.sh installs the package when it runs as root on Debian.

Where the browser or Playwright is missing the test is skipped with a reason naming the package to install,
never counted as passed; under CI (CI=true) it fails instead, so a broken install cannot hide as a skip.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_PACKAGE = "chromium"  # Debian's package; its binary is /usr/bin/chromium
_CANDIDATES = ("/usr/bin/chromium", "chromium")
# Root has no user namespace sandbox to drop into; Chromium refuses to start as root without this.
_LAUNCH_ARGS = ["--no-sandbox"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip the calling test with `reason`, or fail it under CI, where the browser must be there."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the browser test must run, not skip)", pytrace=False)
    pytest.skip(reason)


def find_chromium() -> str | None:
    """The path of Debian's chromium binary, or None."""
    for candidate in _CANDIDATES:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


def require_chromium() -> str:
    """The chromium binary and a working Playwright, else skip (fail under CI) naming what to install."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        unavailable(f"Python package `playwright` is not installed ({e}); `pip install -e '.[test]'`")
    path = find_chromium()
    if path is None:
        unavailable(f"Debian package `{CHROMIUM_PACKAGE}` is not installed (no /usr/bin/chromium); "
                    f"`apt-get install {CHROMIUM_PACKAGE}` as root, or run `bash jobs/test.sh` as root, which does")
    return path


@dataclass
class BrowserPage:
    """A page plus everything it reported: console messages of type error and uncaught page errors."""
    page: object  # playwright.sync_api.Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def screenshot(self, path: str | os.PathLike, full_page: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@contextlib.contextmanager
def open_page(url: str, width: int = 1280, height: int = 900, timeout_ms: int = 30_000) -> Iterator[BrowserPage]:
    """Launch headless Chromium, open `url` and wait until it has loaded (images included); yield the page
    with its console and page errors collected from before navigation on. Skips (fails under CI) without
    the browser."""
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=_LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            result = BrowserPage(page)
            page.on("console", lambda msg: result.console_errors.append(f"{msg.text} ({msg.location})")
                    if msg.type == "error" else None)
            page.on("pageerror", lambda err: result.page_errors.append(str(err)))
            page.goto(url, wait_until="load", timeout=timeout_ms)
            yield result
        finally:
            browser.close()


def artifact_path(name: str, fallback_dir: str | os.PathLike) -> Path:
    """Where a test artifact goes: $MASKLET_ARTIFACTS/<name> when that is set (CI collects it), else under
    the test's own tmp dir."""
    root = os.environ.get("MASKLET_ARTIFACTS")
    return Path(root) / name if root else Path(fallback_dir) / name


# --- `masklet review` served for a browser (the e2e test and benchmarks/bench_review_session.py) ---------

ROOT = Path(__file__).resolve().parents[1]


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


def press(page, key: str) -> None:
    """A keyboard shortcut of the app, with the focus taken off any widget first (a shortcut typed into a
    text field is text, and a key pressed over the image component goes to its iframe)."""
    page.evaluate("document.activeElement && document.activeElement.blur && document.activeElement.blur()")
    page.keyboard.press(key)
    settle(page)


@contextlib.contextmanager
def review_app(out: str, reviewer: str) -> Iterator[str]:
    """`masklet review OUT` started as a user starts it (the CLI, headless on localhost); yields its URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "review", out, "--port", str(port),
                             "--reviewer", reviewer], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_health(port, proc)
        yield f"http://localhost:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
