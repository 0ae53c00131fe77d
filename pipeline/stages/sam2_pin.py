"""The one sam2 version masklet's tracker is written against, checked where sam2 is first imported.

pipeline/stages/track.py calls private SAM2VideoPredictor methods (`_run_single_frame_inference`,
`_run_memory_encoder`, `_get_orig_video_res_output`) and copies sam2's memory-window arithmetic
(`oldest_memory_frame`, `oldest_readable_frame`; tests/test_sam2_internals.py checks the copy against sam2's
own `_prepare_memory_conditioned_features`). None of that is public API, so another sam2 release may change
it without a word. pip checks the `sam2==...` pin of pyproject.toml only at install time; `require_sam2()`
checks it every time a model is built, and refuses another version unless MASKLET_ALLOW_SAM2_VERSION names it
exactly (an override for someone who has checked the new release, e.g. by running
tests/test_sam2_internals.py and tests/test_equivalence.py under it).
"""
from __future__ import annotations

import logging
import os
from importlib import metadata

log = logging.getLogger(__name__)

SAM2_VERSION = "1.1.0"  # keep equal to the pin in pyproject.toml (tests/test_sam2_internals.py checks)
ALLOW_ENV = "MASKLET_ALLOW_SAM2_VERSION"


class Sam2VersionError(RuntimeError):
    """The installed sam2 is not the version masklet's tracker was written and tested against."""


def installed_sam2_version() -> str | None:
    """The installed sam2 distribution's version (None when sam2 is not installed)."""
    try:
        return metadata.version("sam2")
    except metadata.PackageNotFoundError:
        return None


def require_sam2(installed: str | None = None, env: dict[str, str] | None = None) -> str:
    """The installed sam2 version, if masklet may use it: SAM2_VERSION, or the version MASKLET_ALLOW_SAM2_VERSION
    names. Raises Sam2VersionError otherwise, saying both ways out. Call it before the first `import sam2...`."""
    version = installed_sam2_version() if installed is None else installed
    allowed = (os.environ if env is None else env).get(ALLOW_ENV)
    if version is None:
        raise Sam2VersionError(f"sam2 is not installed; masklet needs sam2=={SAM2_VERSION} "
                               f"(`bash jobs/install.sh` installs it)")
    if version == SAM2_VERSION:
        return version
    if allowed == version:
        log.warning("sam2 %s, not %s: allowed by %s=%s; the tracker relies on sam2 internals that this version "
                    "may have changed", version, SAM2_VERSION, ALLOW_ENV, allowed)
        return version
    raise Sam2VersionError(
        f"sam2 {version} is installed, masklet's tracker is written against sam2 {SAM2_VERSION} (it calls "
        f"private SAM2VideoPredictor methods and copies sam2's memory-window rule). Install sam2=={SAM2_VERSION} "
        f"(`bash jobs/install.sh`), or, after checking this version (tests/test_sam2_internals.py and "
        f"tests/test_equivalence.py pass under it), set {ALLOW_ENV}={version}"
        + (f" ({ALLOW_ENV}={allowed} names another version)" if allowed else ""))
