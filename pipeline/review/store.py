"""The review's writer and readers: one ReviewSession per reviewer (per app instance), one file per action.

A session owns its folder `OUT/review/sessions/<session_id>/` alone and numbers its actions 1, 2, ...
(`seq`, shared by decisions, corrections and events), so two reviewers never write the same name and no
lock is needed between them. Each action is one small Parquet file published by rename
(pipeline/store/atomic.py write_atomic): a kill leaves the file whole or absent (its temporary name starts
with '.', which the readers' patterns never match). A session id is new per ReviewSession unless one is
passed to go on with it (after an app restart); one session id must not be written by two processes at once.

Readers merge every session (records.py gives the order: `time`, then `session_id`, then `seq`):
- `decisions(out)`: one row per masklet. A decision has two independent parts that readers need: the
  status (the latest accept | reject | duplicate) and the label (the latest `label`). A `clear` withdraws the
  latest decision of its own session on that masklet (of either part), so what another reviewer decided
  before shows again. A masklet whose decisions are all withdrawn has no row.
- `corrections(out, pending_only)`: every correction; pending ones are those no version lists yet
  (`OUT/versions/.../masklet.parquet`, column `corrections`).
- `events(out)`: every event (the review's monitoring).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.paths import RunPaths
from pipeline.review.records import (
    CORRECTIONS_SCHEMA,
    DECISIONS,
    DECISIONS_SCHEMA,
    EVENTS_SCHEMA,
)
from pipeline.store.atomic import write_atomic, write_text_atomic

EVENT_KINDS = ("open_item", "frame_prediction", "propagation", "decision", "correction", "close_item")
STATUS_DECISIONS = ("accept", "reject", "duplicate")
_KINDS = {"decisions": DECISIONS_SCHEMA, "corrections": CORRECTIONS_SCHEMA, "events": EVENTS_SCHEMA}
_SEQ_FILE = re.compile(r"^(decisions|corrections|events)-(\d{6,})\.parquet$")


def masklet_id(item_id: str, object_id: int) -> str:
    return f"{item_id}/{int(object_id)}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_session_id() -> str:
    return f"{_now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


class ReviewSession:
    """Append-only writer of one reviewer's actions on the run folder `out`. Thread-safe (Streamlit reruns
    a script in threads); each call returns once its file is durable."""

    def __init__(self, out: str | Path, reviewer: str, session_id: str | None = None):
        if not reviewer:
            raise ValueError("a review session needs a reviewer name (who made the decisions)")
        self.paths = RunPaths.of(out)
        if not self.paths.snapshot.exists():
            raise FileNotFoundError(f"{self.paths.root} is not a run folder (no run.json); pass the --out of a run")
        self.reviewer = reviewer
        self.session_id = session_id or new_session_id()
        self.folder = self.paths.review_session(self.session_id)
        self._lock = threading.Lock()
        existed = self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seq = _last_seq(self.folder) if existed else 0
        if not (self.folder / "session.json").exists():
            write_text_atomic(self.folder / "session.json", json.dumps({
                "session_id": self.session_id, "reviewer": reviewer, "started_at": _now().isoformat(),
                "host": socket.gethostname(), "pid": os.getpid()}, indent=1))

    def _write(self, kind: str, row: dict) -> int:
        with self._lock:
            self._seq += 1
            seq = self._seq
            row = {"session_id": self.session_id, "seq": seq, "reviewer": self.reviewer, "time": _now(), **row}
            table = pa.Table.from_pylist([row], schema=_KINDS[kind])
            write_atomic(self.folder / f"{kind}-{seq:06d}.parquet", lambda p: pq.write_table(table, p))
        return seq

    def decide(self, item_id: str, object_id: int, decision: str, duplicate_of: str | None = None,
               label: str | None = None) -> int:
        """Record accept | reject | duplicate (with `duplicate_of`, a masklet id) | label (with `label`) |
        clear (withdraw this session's latest decision on the masklet). Returns the action's seq."""
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
        if decision == "duplicate" and not duplicate_of:
            raise ValueError("a 'duplicate' decision needs duplicate_of: the masklet id (<item_id>/<object_id>) it repeats")
        if decision == "label" and not label:
            raise ValueError("a 'label' decision needs label: the class name")
        return self._write("decisions", {
            "item_id": item_id, "object_id": int(object_id), "masklet_id": masklet_id(item_id, object_id),
            "decision": decision, "duplicate_of": duplicate_of, "label": label})

    def correct(self, item_id: str, object_id: int, frame: int, points: Sequence[Sequence[float]],
                point_labels: Sequence[int], box: Sequence[float] | None = None, candidate: int = 0,
                lock: bool = False, base_version: int = 0) -> str:
        """Record a correction (prompts on one decoded frame; object_id -1: a new masklet for a missed
        object). Points are (x, y) in the stored masks' pixels; labels 1 positive, 0 negative. Returns its id."""
        points = [[float(x), float(y)] for x, y in points]
        point_labels = [int(v) for v in point_labels]
        if len(points) != len(point_labels):
            raise ValueError(f"{len(points)} points but {len(point_labels)} point labels: give one label per point")
        if any(v not in (0, 1) for v in point_labels):
            raise ValueError(f"point labels must be 1 (positive) or 0 (negative), got {point_labels}")
        if not points and box is None:
            raise ValueError("a correction needs at least one point or a box")
        if box is not None and len(box) != 4:
            raise ValueError(f"box must be x0, y0, x1, y1, got {box!r}")
        if not 0 <= int(candidate) <= 2:
            raise ValueError(f"candidate must be 0, 1 or 2 (SAM 2's multimask outputs), got {candidate}")
        correction_id = uuid.uuid4().hex
        object_id = int(object_id)
        self._write("corrections", {
            "correction_id": correction_id, "item_id": item_id, "object_id": object_id,
            "masklet_id": None if object_id < 0 else masklet_id(item_id, object_id), "frame": int(frame),
            "points": points, "point_labels": point_labels,
            "box": None if box is None else [float(v) for v in box], "candidate": int(candidate),
            "lock": bool(lock), "base_version": int(base_version)})
        return correction_id

    def event(self, kind: str, item_id: str, object_id: int | None = None, frame: int | None = None,
              ms: float | None = None, fg_clicks: int | None = None, bg_clicks: int | None = None) -> int:
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind {kind!r} is not one of {', '.join(EVENT_KINDS)}")
        return self._write("events", {
            "kind": kind, "item_id": item_id, "object_id": object_id, "frame": frame, "ms": ms,
            "fg_clicks": fg_clicks, "bg_clicks": bg_clicks})


def _last_seq(folder: Path) -> int:
    seqs = [int(m.group(2)) for p in folder.iterdir() if (m := _SEQ_FILE.match(p.name))]
    return max(seqs, default=0)


def _read(out: str | Path, kind: str) -> pa.Table:
    schema = _KINDS[kind]
    root = RunPaths.of(out).review_sessions
    if not root.exists():
        return schema.empty_table()
    files = sorted(str(p) for p in root.glob(f"*/{kind}-*.parquet"))
    if not files:
        return schema.empty_table()
    table = pa.concat_tables([pq.read_table(f, schema=schema) for f in files])
    return table.sort_by([("time", "ascending"), ("session_id", "ascending"), ("seq", "ascending")])


def all_decisions(out: str | Path) -> pa.Table:
    """Every decision of every session, in order (records.py's order)."""
    return _read(out, "decisions")


def decisions(out: str | Path) -> pa.Table:
    """One row per decided masklet (DECISIONS_SCHEMA): `decision` is its status (accept | reject |
    duplicate, or null when it only has a label), `label` its latest label; the other columns come from the
    latest action that counts. `clear` withdraws its session's latest decision on the masklet."""
    rows = all_decisions(out).to_pylist()
    stacks: dict[str, list[dict]] = {}
    for row in rows:
        stack = stacks.setdefault(row["masklet_id"], [])
        if row["decision"] == "clear":
            for i in range(len(stack) - 1, -1, -1):
                if stack[i]["session_id"] == row["session_id"]:
                    del stack[i]
                    break
        else:
            stack.append(row)
    merged = []
    for stack in stacks.values():
        if not stack:
            continue
        status = next((r for r in reversed(stack) if r["decision"] in STATUS_DECISIONS), None)
        label = next((r for r in reversed(stack) if r["decision"] == "label"), None)
        row = dict(stack[-1])
        row["decision"] = status["decision"] if status else None
        row["duplicate_of"] = status["duplicate_of"] if status else None
        row["label"] = label["label"] if label else None
        merged.append(row)
    table = pa.Table.from_pylist(merged, schema=DECISIONS_SCHEMA)
    return table.sort_by([("item_id", "ascending"), ("object_id", "ascending")])


def replayed_correction_ids(out: str | Path) -> set[str]:
    """The correction ids some published version lists (their prompts are in a version's masks)."""
    root = RunPaths.of(out).versions
    if not root.exists():
        return set()
    done: set[str] = set()
    for p in root.glob("*/*/v*/masklet.parquet"):
        for ids in pq.read_table(p, columns=["corrections"]).column("corrections").to_pylist():
            done.update(ids or ())
    return done


def corrections(out: str | Path, pending_only: bool = False) -> pa.Table:
    """Every correction (CORRECTIONS_SCHEMA), in order; with pending_only, those no version lists yet."""
    table = _read(out, "corrections")
    if pending_only and table.num_rows:
        done = replayed_correction_ids(out)
        if done:
            keep = [cid not in done for cid in table.column("correction_id").to_pylist()]
            table = table.filter(pa.array(keep, pa.bool_()))
    return table


def events(out: str | Path) -> pa.Table:
    """Every event (EVENTS_SCHEMA), in order."""
    return _read(out, "events")
