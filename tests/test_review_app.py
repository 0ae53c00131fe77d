"""The review app under Streamlit's AppTest (headless, no browser): the queue's order, a decision written to
disk, a click (the image component's value set in session_state, as AppTest cannot click inside a custom
component) answered by SAM 2 and queued as a correction, and two reviewers at once losing nothing."""
from __future__ import annotations

import os
import shutil

import pyarrow.compute as pc
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from pipeline import open_run
from pipeline.review import store

APP = os.path.join(os.path.dirname(__file__), "..", "pipeline", "review", "app.py")


@pytest.fixture(scope="module")
def review_run(small_run, tmp_path_factory) -> str:
    """A copy of the shared small run: the review writes into OUT, and other tests read small_run as made."""
    out = tmp_path_factory.mktemp("review") / "run"
    shutil.copytree(small_run, out)
    return str(out)


def app(monkeypatch, out: str, reviewer: str) -> AppTest:
    monkeypatch.setenv("MASKLET_REVIEW_OUT", out)
    monkeypatch.setenv("MASKLET_REVIEW_REVIEWER", reviewer)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def test_queue_is_ordered_by_review_priority_and_shows_random_weights(monkeypatch, review_run):
    at = app(monkeypatch, review_run, "ann")
    assert any("RANDOM WEIGHTS" in e.value for e in at.error)
    shown = at.dataframe[0].value
    masklets = open_run(review_run).scan("masklets", columns=["masklet_id", "review_priority"])
    order = pc.sort_indices(masklets, sort_keys=[("review_priority", "descending"), ("masklet_id", "ascending")])
    assert list(shown["masklet"]) == masklets.take(order)["masklet_id"].to_pylist()
    assert list(shown["priority"]) == sorted(shown["priority"], reverse=True)
    assert at.selectbox(key="masklet_pick").value == shown["masklet"][0]


def test_decision_is_written_to_disk_and_the_filter_follows_it(monkeypatch, review_run):
    at = app(monkeypatch, review_run, "ann")
    first = at.selectbox(key="masklet_pick").value
    button(at, "accept").click().run()
    assert not at.exception
    rows = {r["masklet_id"]: r for r in store.decisions(review_run).to_pylist()}
    assert rows[first]["decision"] == "accept" and rows[first]["reviewer"] == "ann"
    at.selectbox(key="f_decision").set_value("accept").run()
    assert first in list(at.dataframe[0].value["masklet"])
    kinds = store.events(review_run)["kind"].to_pylist()
    assert "open_item" in kinds and "decision" in kinds


def test_click_is_answered_by_sam2_and_queued_as_a_correction(monkeypatch, review_run):
    at = app(monkeypatch, review_run, "bea")
    item_id, obj = at.selectbox(key="masklet_pick").value.rsplit("/", 1)
    before = len(store.corrections(review_run))
    # Displayed 640 wide: a click at (320, y) is the frame's middle column in mask pixels.
    at.session_state["click"] = {"x": 320, "y": 200, "width": 640, "height": 480, "unix_time": 1}
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    labels = at.radio(key="candidate_shown").options
    assert len(labels) == 3 and all("score" in s and "perimeter" in s for s in labels)
    button(at, "use_candidate").click().run()
    assert not at.exception, [e.message for e in at.exception]
    corr = store.corrections(review_run, pending_only=True).to_pylist()
    assert len(corr) == before + 1
    new = corr[-1]
    assert (new["item_id"], new["object_id"], new["reviewer"]) == (item_id, int(obj), "bea")
    assert new["point_labels"] == [1] and len(new["points"]) == 1
    kinds = store.events(review_run)["kind"].to_pylist()
    assert "frame_prediction" in kinds and "correction" in kinds


def test_two_reviewers_at_once_lose_nothing(monkeypatch, review_run):
    a = app(monkeypatch, review_run, "ann")
    b = app(monkeypatch, review_run, "bob")
    ids = list(a.dataframe[0].value["masklet"])
    before = len(store.all_decisions(review_run))
    for k, mid in enumerate(ids[:4]):
        at = a if k % 2 == 0 else b
        at.selectbox(key="masklet_pick").set_value(mid).run()
        button(at, "reject").click().run()
        assert not at.exception
    after = store.all_decisions(review_run).to_pylist()
    assert len(after) == before + 4
    mine = {r["masklet_id"]: r["reviewer"] for r in after[before:]}
    assert mine == {mid: ("ann" if k % 2 == 0 else "bob") for k, mid in enumerate(ids[:4])}
    assert len({r["session_id"] for r in after[before:]}) == 2


def test_decision_and_next_buttons_carry_keyboard_shortcuts(monkeypatch, small_run_copy):
    from streamlit.elements.lib.shortcut_utils import normalize_shortcut

    from pipeline.review.view import KEYS

    at = app(monkeypatch, small_run_copy, "ann")
    for key, shortcut in KEYS.items():
        assert button(at, key).proto.shortcut == normalize_shortcut(shortcut), key
    assert {KEYS["accept"], KEYS["reject"]}.isdisjoint({"C", "R"})  # Streamlit's own keys


def test_next_masklet_and_next_item_follow_the_queue_past_decided_masklets(monkeypatch, small_run_copy):
    at = app(monkeypatch, small_run_copy, "ann")
    ids = list(at.dataframe[0].value["masklet"])
    assert at.selectbox(key="masklet_pick").value == ids[0]
    button(at, "next_masklet").click().run()
    assert at.selectbox(key="masklet_pick").value == ids[1]
    button(at, "accept").click().run()  # ids[1] is decided: the queue puts it last, next goes on to ids[2]
    assert list(at.dataframe[0].value["masklet"])[-1] == ids[1]
    button(at, "next_masklet").click().run()
    assert at.selectbox(key="masklet_pick").value == ids[2]
    item = ids[2].rsplit("/", 1)[0]
    button(at, "next_item").click().run()
    want = next(m for m in ids[3:] if m.rsplit("/", 1)[0] != item)
    assert at.selectbox(key="masklet_pick").value == want


def test_rejected_masklets_can_be_filtered_out(monkeypatch, small_run_copy):
    at = app(monkeypatch, small_run_copy, "ann")
    first = at.selectbox(key="masklet_pick").value
    button(at, "reject").click().run()
    assert first in list(at.dataframe[0].value["masklet"])  # still listed by default, after the to-do ones
    at.selectbox(key="f_decision").set_value("not rejected").run()
    assert first not in list(at.dataframe[0].value["masklet"])
    at.selectbox(key="f_decision").set_value("reject").run()
    assert list(at.dataframe[0].value["masklet"]) == [first]


def test_queue_ranks_a_refined_masklet_by_its_newest_version(monkeypatch, small_run_copy):
    """A version whose masks differ (here: emptied, written without the model) has other signals and so
    another review priority; the queue must rank it by that one, not by the run's row."""
    import numpy as np

    from pipeline.review import versions

    run = open_run(small_run_copy, versions="original")
    masklets = run.scan("masklets", columns=["masklet_id", "item_id", "object_id", "review_priority"])
    top = masklets.take(pc.sort_indices(masklets, [("review_priority", "descending"),
                                                   ("masklet_id", "ascending")])).to_pylist()[0]
    item, obj = top["item_id"], top["object_id"]
    _, frames, h, w = run.masks(item).shape
    assert versions.write_version(small_run_copy, item, obj, np.zeros((frames, h, w), bool),
                                  np.full(frames, np.nan, np.float32), [], []) == 1
    new_priority = versions.latest_versions(small_run_copy).to_pylist()[0]["review_priority"]
    assert new_priority != top["review_priority"], "the test needs a version that ranks differently"
    at = app(monkeypatch, small_run_copy, "ann")
    shown = at.dataframe[0].value
    priority = {r["masklet_id"]: r["review_priority"] for r in masklets.to_pylist()}
    priority[top["masklet_id"]] = new_priority
    want = sorted(priority, key=lambda m: (-(priority[m] if priority[m] is not None else -np.inf), m))
    assert list(shown["masklet"]) == want
    row = shown[shown["masklet"] == top["masklet_id"]].iloc[0]
    assert row["version"] == 1 and row["priority"] == pytest.approx(new_priority)


def test_a_new_masklet_propagated_in_the_app_joins_the_queue(monkeypatch, small_run_copy):
    """'correct masklet: new masklet', a click, the candidate, 'propagate now': refine creates the item's next
    object id as version 1 and the queue lists it."""
    from pipeline.review import versions

    at = app(monkeypatch, small_run_copy, "ann")
    item_id = at.selectbox(key="masklet_pick").value.rsplit("/", 1)[0]
    top = max(open_run(small_run_copy).masklets_for(item_id)["object_id"].to_pylist())
    at.selectbox(key="target").set_value(-1).run()
    at.session_state["click"] = {"x": 320, "y": 200, "width": 640, "height": 480, "unix_time": 7}
    at.run()
    button(at, "use_candidate").click().run()
    assert store.corrections(small_run_copy).to_pylist()[-1]["object_id"] == -1
    button(at, "propagate").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert versions.versioned_objects(small_run_copy, item_id) == [top + 1]
    at.run()
    shown = at.dataframe[0].value
    assert list(shown[shown["masklet"] == f"{item_id}/{top + 1}"]["version"]) == [1]


def test_open_time_benchmark_quick(capsys):
    """benchmarks/bench_review_open.py --quick: a fabricated 2,000-item run opens well under the target."""
    from benchmarks.bench_review_open import main

    assert main(["--quick"]) == 0
    assert "first run" in capsys.readouterr().out


def test_report_shows_the_review_section_under_the_data_key_contract(review_run):
    import re

    from pipeline.report import build_report
    from pipeline.report.html import format_number, lookup

    session = store.ReviewSession(review_run, "cara")
    session.event("open_item", "x")
    session.event("frame_prediction", "x", 0, 0, ms=12.5)
    session.decide("x", 0, "label", label="cat")
    report, page = build_report(review_run, gallery=False)
    review = report["review"]
    assert review["decisions"]["labelled"] >= 1 and review["monitor"]["latency"][0]["count"] >= 1
    keys = re.findall(r'<span data-key="(review\.[^"]+)">([^<]*)</span>', page)
    assert len(keys) >= 15 and "<h2>Review</h2>" in page
    for key, text in keys:
        assert text == format_number(lookup(report, key)), key


def test_review_command_runs_streamlit_headless_on_localhost(review_run):
    from pipeline.cli import build_parser, review_command

    args = build_parser().parse_args(["review", review_run, "--port", "8600", "--reviewer", "dee"])
    assert (args.out, args.port, args.reviewer) == (review_run, 8600, "dee")
    cmd = review_command(review_run, 8600, "dee")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith(os.path.join("review", "app.py"))
    flags = dict(zip(cmd[5:cmd.index("--")][::2], cmd[5:cmd.index("--")][1::2]))
    assert flags["--server.headless"] == "true" and flags["--server.address"] == "localhost"
    assert flags["--server.port"] == "8600"
    assert cmd[cmd.index("--") + 1:] == ["--out", os.path.abspath(review_run), "--reviewer", "dee"]
