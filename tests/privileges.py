"""Running test code the way an ordinary user meets file permissions, also when the tests run as root.

Root reads a file whatever its mode: the kernel lets it through because of two capabilities,
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. `run_python` runs code in a fresh Python process that drops
exactly those two before anything else, so every thread it starts lacks them too. It stays uid 0, so it
still owns and reaches the test's folders (pytest makes them mode 700), but a mode-000 file is refused to it
with EACCES, as to anyone else: nothing is faked, open() really fails. Not root: there is nothing to drop,
and file modes apply anyway.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CAPABILITY_VERSION_3 = 0x20080522  # linux/capability.h: two 32-bit words per set
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_permission_override() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this thread for good (effective, permitted and
    inheritable sets). Call it before any other thread starts: capabilities are per thread, inherited at
    creation."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    for name in ("effective", "permitted", "inheritable"):
        setattr(data[0], name, getattr(data[0], name) & keep)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter (this one's, from the repository root) without the override.
    Returns the finished process with its stdout and stderr as text."""
    prelude = "from tests.privileges import drop_permission_override\ndrop_permission_override()\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def unreadable_without_override(path: str) -> bool:
    """Whether `path` really cannot be opened for reading once the override is dropped."""
    done = run_python(f"""
        try:
            open({path!r}, "rb").close()
        except PermissionError:
            print("refused")
    """, timeout=60)
    return done.returncode == 0 and done.stdout.strip() == "refused"
