"""benchmarks/measure_memory.py: the per-pixel costs pipeline/device.py budgets are at least what the script
measures. The default run measures at small frames (seconds); the slow one at the README's sizes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline import device as dev
from tests.conftest import THREADS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "measure_memory.py"


def _script():
    spec = importlib.util.spec_from_file_location("measure_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_budgets_cover_what_is_measured_on_small_frames():
    got = _script().main(["--quick", "--threads", str(THREADS)])
    assert 4.0 <= round(got["upsample_bytes_per_object_pixel"], 6) <= dev.UPSAMPLE_BYTES_PER_OBJECT_PIXEL
    assert 10.0 <= got["amg_bytes_per_point_pixel"] <= dev.AMG_BYTES_PER_POINT_PIXEL


@pytest.mark.slow
def test_the_budgets_cover_what_is_measured_at_720p():
    got = _script().main(["--threads", str(THREADS), "--sizes", "640x480", "1280x720"])
    assert 4.0 <= round(got["upsample_bytes_per_object_pixel"], 6) <= dev.UPSAMPLE_BYTES_PER_OBJECT_PIXEL
    assert 12.0 <= got["amg_bytes_per_point_pixel"] <= dev.AMG_BYTES_PER_POINT_PIXEL
