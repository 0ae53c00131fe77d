"""What the single-file formats (YouTube-VIS, COCO) share: their per-item parts and the JSON they hold.

An item's part is a JSON-lines file `stage/.parts/<format>/<item_id>.jsonl` (item ids are safe as one file
name: pipeline.paths.check_component). Each line is one record tagged with
its kind ({"video": ...}, {"image": ...}, {"annotation": ...}), so `finish` can stream the parts kind by
kind into the final JSON's arrays, holding one line at a time, and assign the global ids there (ids cannot
be known per item: items are written in parallel and resumed one by one)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np

from pipeline.paths import check_component
from pipeline.store.atomic import write_atomic

PARTS = ".parts"


def part_path(fmt: str, item_id: str) -> str:
    """The part's path relative to the export's root (the same under `stage` and under DEST)."""
    return f"{PARTS}/{fmt}/{check_component(item_id)}.jsonl"


def plain(value: Any) -> Any:
    """A JSON-able copy of a table value: numpy scalars to Python, NaN and infinities to null (JSON has no
    NaN; json.dumps would write a token other readers reject)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(obj: Any) -> str:
    return json.dumps(plain(obj), separators=(",", ":"), allow_nan=False)


def write_part(stage: Path, rel: str, records: Iterable[dict]) -> None:
    path = stage / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(dumps(record))
            f.write("\n")


def read_part(dest: Path, rel: str, kind: str) -> Iterator[dict]:
    """The records of one kind in a part, one line at a time."""
    path = dest / rel
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: an item's export part is missing; the item was recorded as done "
                                f"but its files are gone: export that item again") from e
    with f:
        for line in f:
            record = json.loads(line)
            if kind in record:
                yield record[kind]


class JsonArrayWriter:
    """Writes `"key": [obj, obj, ...]` one object at a time into an open JSON object."""

    def __init__(self, f: IO[str]):
        self.f = f
        self.first_key = True

    def key(self, name: str, value: Any) -> None:
        self.f.write(("" if self.first_key else ",\n") + json.dumps(name) + ": " + dumps(value))
        self.first_key = False

    def array(self, name: str, values: Iterable[Any]) -> int:
        self.f.write(("" if self.first_key else ",\n") + json.dumps(name) + ": [")
        self.first_key = False
        n = 0
        for v in values:
            self.f.write(("\n" if n == 0 else ",\n") + dumps(v))
            n += 1
        self.f.write("]")
        return n


def already_merged(dest: Path, file: str, fmt: str, items: list[dict]) -> bool:
    """True when an earlier `finish` published `file` and then began removing the parts (killed in between):
    the file is whole (it was published in one rename before any part was removed), so there is nothing to
    redo. With every part present, `finish` merges again (the file is then rewritten identically)."""
    return (dest / file).exists() and any(not (dest / s["part"]).exists() for s in items)


def write_json(path: Path, write_body) -> None:
    """Write `{...}` through `write_body(JsonArrayWriter)` to a temporary beside `path`, published in one
    rename (pipeline/store/atomic.py: its temporaries are what the export runner clears after a kill)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("{")
            write_body(JsonArrayWriter(f))
            f.write("}\n")

    write_atomic(path, write)


def remove_parts(dest: Path, fmt: str) -> None:
    shutil.rmtree(dest / PARTS / fmt, ignore_errors=True)
    try:
        (dest / PARTS).rmdir()  # only when no other format's parts are left
    except OSError:
        pass
