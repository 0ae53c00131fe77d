"""The review store: one file per action, sessions merged by readers, concurrent sessions lose nothing, a
kill mid-write leaves no partial file visible."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.review import store
from pipeline.review.records import CORRECTIONS_SCHEMA, DECISIONS_SCHEMA, EVENTS_SCHEMA
from pipeline.review.store import ReviewSession

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def out(tmp_path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    return out


def test_empty_run_reads_empty_tables(out):
    assert store.decisions(out).schema == DECISIONS_SCHEMA and store.decisions(out).num_rows == 0
    assert store.corrections(out, pending_only=True).schema == CORRECTIONS_SCHEMA
    assert store.events(out).schema == EVENTS_SCHEMA and store.events(out).num_rows == 0


def test_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        ReviewSession(tmp_path, "ann")


def test_each_action_is_one_file_in_the_session_folder(out):
    s = ReviewSession(out, "ann")
    s.decide("clip", 0, "accept")
    cid = s.correct("clip", 1, 3, [(10, 20), (30.5, 4)], [1, 0], box=(0, 0, 5, 5), candidate=2, lock=True)
    s.event("correction", "clip", 1, frame=3, ms=12.5, fg_clicks=1, bg_clicks=1)
    names = sorted(p.name for p in s.folder.iterdir())
    assert names == ["corrections-000002.parquet", "decisions-000001.parquet", "events-000003.parquet",
                     "session.json"]
    c = store.corrections(out).to_pylist()
    assert len(c) == 1 and c[0]["correction_id"] == cid and c[0]["masklet_id"] == "clip/1"
    assert c[0]["points"] == [[10.0, 20.0], [30.5, 4.0]] and c[0]["point_labels"] == [1, 0]
    assert c[0]["box"] == [0, 0, 5, 5] and c[0]["candidate"] == 2 and c[0]["lock"] is True
    e = store.events(out).to_pylist()
    assert e[0]["kind"] == "correction" and e[0]["ms"] == 12.5 and e[0]["reviewer"] == "ann"


def test_bad_actions_are_refused_with_the_reason(out):
    s = ReviewSession(out, "ann")
    with pytest.raises(ValueError, match="not one of"):
        s.decide("clip", 0, "maybe")
    with pytest.raises(ValueError, match="duplicate_of"):
        s.decide("clip", 0, "duplicate")
    with pytest.raises(ValueError, match="one label per point"):
        s.correct("clip", 0, 0, [(1, 1)], [1, 0])
    with pytest.raises(ValueError, match="event kind"):
        s.event("nap", "clip")
    assert list(s.folder.glob("*.parquet")) == []


def test_latest_decision_wins_and_clear_withdraws_only_its_own_session(out):
    a, b = ReviewSession(out, "ann"), ReviewSession(out, "bob")
    a.decide("clip", 0, "accept")
    time.sleep(0.003)
    b.decide("clip", 0, "reject")
    time.sleep(0.003)
    a.decide("clip", 1, "reject")
    time.sleep(0.003)
    a.decide("clip", 1, "label", label="cat")
    time.sleep(0.003)
    a.decide("clip", 2, "duplicate", duplicate_of="clip/0")
    time.sleep(0.003)
    a.decide("clip", 2, "clear")
    d = {r["masklet_id"]: r for r in store.decisions(out).to_pylist()}
    assert d["clip/0"]["decision"] == "reject" and d["clip/0"]["reviewer"] == "bob"
    # A label does not undo a status: clip/1 stays rejected and gets its label.
    assert d["clip/1"]["decision"] == "reject" and d["clip/1"]["label"] == "cat"
    assert "clip/2" not in d
    time.sleep(0.003)
    b.decide("clip", 0, "clear")
    d = {r["masklet_id"]: r for r in store.decisions(out).to_pylist()}
    assert d["clip/0"]["decision"] == "accept" and d["clip/0"]["reviewer"] == "ann"
    assert store.all_decisions(out).num_rows == 7


def test_a_session_goes_on_with_its_numbering(out):
    s = ReviewSession(out, "ann")
    s.decide("clip", 0, "accept")
    again = ReviewSession(out, "ann", session_id=s.session_id)
    assert again.decide("clip", 1, "accept") == 2


def test_pending_corrections_exclude_those_a_version_lists(out):
    import pyarrow as pa

    s = ReviewSession(out, "ann")
    c1 = s.correct("clip", 0, 1, [(1, 1)], [1])
    c2 = s.correct("clip", 0, 2, [(1, 1)], [1])
    v = out / "versions" / "clip" / "0" / "v001"
    v.mkdir(parents=True)
    pq.write_table(pa.table({"corrections": pa.array([[c1]], pa.list_(pa.string()))}), v / "masklet.parquet")
    assert store.corrections(out, pending_only=True).column("correction_id").to_pylist() == [c2]
    assert store.corrections(out).num_rows == 2


_WRITER = textwrap.dedent("""
    import sys
    from pipeline.review.store import ReviewSession
    out, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = ReviewSession(out, who)
    print(s.session_id, flush=True)
    for i in range(n):
        s.decide("clip", i, "accept" if i % 2 else "reject")
        s.correct("clip", i, i % 5, [(i, i)], [1])
        s.event("decision", "clip", i)
""")


def _writer(out: Path, who: str, n: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(out), who, str(n)], env=env,
                            stdout=subprocess.PIPE, text=True)


def test_two_sessions_writing_at_once_lose_nothing(out):
    n = 60
    procs = [_writer(out, "ann", n), _writer(out, "bob", n)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    d = store.all_decisions(out)
    assert d.num_rows == 2 * n
    assert sorted(set(d.column("reviewer").to_pylist())) == ["ann", "bob"]
    assert store.corrections(out).num_rows == 2 * n and store.events(out).num_rows == 2 * n
    for who in ("ann", "bob"):
        seqs = [r["seq"] for r in d.to_pylist() if r["reviewer"] == who]
        assert sorted(seqs) == list(range(1, 3 * n, 3))
    assert store.decisions(out).num_rows == n


def test_a_kill_mid_write_leaves_no_partial_file_visible(out):
    p = _writer(out, "ann", 100000)
    p.stdout.readline()
    time.sleep(1.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    files = list((out / "review" / "sessions").glob("*/*.parquet"))
    assert len(files) > 10
    for f in files:  # every visible file is whole
        pq.read_table(f)
    d, c, e = store.all_decisions(out), store.corrections(out), store.events(out)
    # Actions are written in order decide, correct, event: counts can differ by at most one.
    assert d.num_rows - 1 <= c.num_rows <= d.num_rows and c.num_rows - 1 <= e.num_rows <= c.num_rows
