"""pyproject.toml says what the code needs: PyAV new enough for the APIs the package calls, files declared as
package data present, and the license in the SPDX form that setuptools builds without a deprecation warning."""
from __future__ import annotations

import tomllib
from pathlib import Path

import av
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The PyAV APIs masklet calls that older releases lack, with the release that added each (PyAV's
# CHANGELOG.rst: v14.1.0 "Add VideoFrame.rotation" (#1675), v17.1.0 "Add Stream.set_display_matrix() and
# Stream.set_display_rotation()" (#2287)).
PYAV_APIS = {
    ("video.frame.VideoFrame", "rotation"): "14.1",  # stages/decode.py: phone videos shown upright
    ("video.stream.VideoStream", "set_display_rotation"): "17.1",  # samples.py: rotated sample clips
}


def _requirement(name: str) -> Requirement:
    (req,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == name]
    return req


def test_pyav_minimum_covers_the_apis_the_package_calls():
    lowest = min((s for s in _requirement("av").specifier if s.operator in (">=", "==", "~=")),
                 key=lambda s: Version(s.version))
    for (where, attr), added_in in PYAV_APIS.items():
        obj = av
        for part in where.split("."):
            obj = getattr(obj, part)
        assert hasattr(obj, attr), f"av.{where}.{attr} is gone from the installed PyAV {av.__version__}"
        assert Version(lowest.version) >= Version(added_in), (
            f"pyproject allows av {lowest}, but av.{where}.{attr} needs {added_in}")


def test_declared_package_data_exists():
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        folder = ROOT / package.replace(".", "/")
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"package data {package}:{pattern} is declared but absent"


def test_license_is_an_spdx_string_and_the_build_backend_reads_it():
    assert isinstance(PYPROJECT["project"]["license"], str), "the table form warns at every install"
    (backend,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert backend.specifier.contains("77") and not backend.specifier.contains("76"), (
        "setuptools reads an SPDX license string from 77 on")
