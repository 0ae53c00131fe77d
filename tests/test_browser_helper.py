"""tests/browser.py without a browser: a missing chromium skips naming the Debian package, and fails under CI."""
from __future__ import annotations

import pytest

from tests import browser


@pytest.fixture
def no_chromium(monkeypatch):
    monkeypatch.setattr(browser, "_CANDIDATES", ("/nonexistent/chromium", "no-such-chromium-binary"))


def test_missing_chromium_skips_naming_the_package(no_chromium, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Debian package `chromium` is not installed"):
        browser.require_chromium()


def test_missing_chromium_fails_under_ci(no_chromium, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the browser test must run"):
        browser.require_chromium()


def test_artifacts_go_to_masklet_artifacts_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKLET_ARTIFACTS", str(tmp_path / "art"))
    assert browser.artifact_path("report.png", tmp_path / "tmp") == tmp_path / "art" / "report.png"
    monkeypatch.delenv("MASKLET_ARTIFACTS")
    assert browser.artifact_path("report.png", tmp_path / "tmp") == tmp_path / "tmp" / "report.png"
