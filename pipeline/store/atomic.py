"""Durable publishing: fsync what was written, then rename it into place, then fsync the folder it went into.

A rename alone is atomic against a process kill (the kernel has the data in its page cache and writes it
later), but not against a node crash or power loss: the rename can reach the disk before the data it names,
and a reader after the reboot sees an empty or truncated file under the final name. POSIX gives the order
only through fsync: the file's data first, then the rename, then the folder that holds the new name.
Every publishing step of the store goes through here (commits, compactions, mask arrays, checkpoints,
plan and run snapshot, leases).

On NFS, fsync sends a COMMIT to the server, and close-to-open consistency makes the data visible to other
clients; a server exporting with `async` may still lose acknowledged writes in its own crash.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the names in a folder (new, renamed, removed) durable. Some file systems refuse fsync on a folder
    (EINVAL/EBADF): their folder updates are synchronous or cannot be forced; nothing more can be done."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (files first, then folders from the deepest up)."""
    folders = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        folders.append(Path(dirpath))
    for folder in reversed(folders):
        fsync_dir(folder)


def publish(stage: Path, final: Path) -> Path:
    """Rename a fully written file or folder `stage` to `final` durably: everything under it reaches the disk
    before the name that publishes it, and the name before this returns. `final` must not exist as a folder."""
    if stage.is_dir():
        fsync_tree(stage)
    else:
        fsync_file(stage)
    os.replace(stage, final)
    fsync_dir(final.parent)
    return final


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary name beside `path`, then publish it as `path` (see `publish`). A
    reader sees the old file or the new one whole; after a crash, too. The temporary name starts with '.'."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))
