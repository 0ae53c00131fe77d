"""summary.json: a small mergeable summary of the items in one committed folder (an item folder or a shard's
compacted folder), so that `masklet status` over 10,000 shards reads 10,000 small files instead of parsing
every shard's Parquet (116 s -> a few seconds for a million items on a loaded 2-core machine).

The summary is written into the staging folder beside the three tables (pipeline/store/commit.py), so the
rename that publishes the tables publishes it too: it can never disagree with them. Folders written before
it existed have none; `shard_summary` then reads the Parquet, as before. So does a shard holding both a
compacted folder and item folders that override some of its rows (a redo of failed items, or a compaction
cut short), where the compacted summary alone cannot say what the overridden rows counted.

Summaries add up (`a + b`, as datatrove's stats do): a shard's is the sum of its folders', a run's the sum of
its shards'.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.paths import RunPaths

SUMMARY_FILE = "summary.json"
SUMMARY_VERSION = 1


@dataclass
class Summary:
    """Counts over committed item rows, and each row's commit time (for the rate) and frames."""

    done: int = 0
    failed: int = 0
    frames_done: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # failed item id -> its error
    finished_s: list[float] = field(default_factory=list)  # commit times, seconds since the epoch (UTC)
    finished_frames: list[int] = field(default_factory=list)  # frames of each (0 for a failed item)
    rows: dict[str, int] = field(default_factory=dict)  # rows per table (items, masklets, frames)

    def __add__(self, other: "Summary") -> "Summary":
        rows = {k: self.rows.get(k, 0) + other.rows.get(k, 0) for k in {*self.rows, *other.rows}}
        return Summary(self.done + other.done, self.failed + other.failed, self.frames_done + other.frames_done,
                       {**self.errors, **other.errors}, self.finished_s + other.finished_s,
                       self.finished_frames + other.finished_frames, rows)

    def to_json(self) -> str:
        return json.dumps({"version": SUMMARY_VERSION, "done": self.done, "failed": self.failed,
                           "frames_done": self.frames_done, "errors": self.errors, "finished_s": self.finished_s,
                           "finished_frames": self.finished_frames, "rows": self.rows}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Summary":
        d = json.loads(text)
        if d.get("version") != SUMMARY_VERSION:
            raise ValueError(f"summary version {d.get('version')} (this masklet reads {SUMMARY_VERSION})")
        return cls(d["done"], d["failed"], d["frames_done"], d["errors"], d["finished_s"], d["finished_frames"],
                   d["rows"])


def summarize(tables: dict[str, pa.Table]) -> Summary:
    """The summary of a folder's tables (by columns: a compacted shard of a thousand items takes a millisecond)."""
    items = tables["items"]
    done_mask = pc.fill_null(pc.equal(items["status"], "done"), False)
    frames = pc.if_else(done_mask, pc.fill_null(items["num_frames"], 0), 0).cast(pa.int64())
    failed = items.filter(pc.invert(done_mask))
    timed = pc.is_valid(items["finished_at"])
    seconds = pc.divide(items["finished_at"].filter(timed).cast(pa.int64()), 1000.0)  # timestamp[ms] -> s
    return Summary(
        done=int(pc.sum(done_mask.cast(pa.int64())).as_py() or 0),
        failed=failed.num_rows,
        frames_done=int(pc.sum(frames).as_py() or 0),
        errors={i: e or "" for i, e in zip(failed["item_id"].to_pylist(), failed["error"].to_pylist())},
        finished_s=seconds.to_pylist(),
        finished_frames=frames.filter(timed).to_pylist(),
        rows={name: t.num_rows for name, t in tables.items()},
    )


def write_summary(folder: Path, tables: dict[str, pa.Table]) -> None:
    """Called on a staging folder before it is renamed into the store (it is atomic with it)."""
    (folder / SUMMARY_FILE).write_text(summarize(tables).to_json())


def read_summary(folder: Path) -> Summary | None:
    """The folder's summary; None when it has none (written before summaries) or it cannot be read."""
    try:
        return Summary.from_json((folder / SUMMARY_FILE).read_text())
    except (OSError, ValueError, KeyError):
        return None


def shard_summary(paths: RunPaths, shard_id: int) -> Summary:
    """A shard's summary under the store's resolution rule (newest compacted folder, overridden per item by
    item folders), from summary.json files where they suffice and from the Parquet where they do not."""
    # At call time: commit.py writes summaries, so it imports this module.
    from pipeline.store.commit import _shard_layout, read_shard_table
    from pipeline.store.metadata import ITEMS_SCHEMA

    compacted, _, items = _shard_layout(paths, shard_id)
    if compacted is None or not items:
        folders = ([compacted] if compacted is not None else []) + [items[k] for k in sorted(items)]
        parts = [read_summary(f) for f in folders]
        if all(p is not None for p in parts):
            return merge(parts)
    table = read_shard_table(paths, shard_id, "items", ITEMS_SCHEMA)
    return summarize({"items": table})


def merge(parts: list[Summary]) -> Summary:
    """`sum(parts)` in one pass (repeated `+` would copy the growing lists once per part)."""
    out = Summary()
    for p in parts:
        out.done += p.done
        out.failed += p.failed
        out.frames_done += p.frames_done
        out.errors.update(p.errors)
        out.finished_s.extend(p.finished_s)
        out.finished_frames.extend(p.finished_frames)
        for k, v in p.rows.items():
            out.rows[k] = out.rows.get(k, 0) + v
    return out


def folder_mtime_ns(paths: RunPaths, shard_id: int) -> int | None:
    """The shard folder's mtime: a commit or a compaction renames into it, which changes it."""
    try:
        return os.stat(paths.shard_meta(shard_id)).st_mtime_ns
    except FileNotFoundError:
        return None
