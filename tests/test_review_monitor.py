"""pipeline/review/monitor.py: each figure and each alert rule, on hand-made event tables."""
from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest

from pipeline.review.monitor import monitor
from pipeline.review.records import EVENTS_SCHEMA

T = datetime(2026, 12, 5, tzinfo=UTC)


def table(*rows) -> pa.Table:
    full = []
    for i, (session, kind, item, extra) in enumerate(rows):
        row = {name: None for name in EVENTS_SCHEMA.names}
        row.update(session_id=session, seq=i, reviewer="r", time=T, kind=kind, item_id=item, **extra)
        full.append(row)
    return pa.Table.from_pylist(full, schema=EVENTS_SCHEMA)


def correction(item, obj, frame, fg, bg):
    return ("s", "correction", item, {"object_id": obj, "frame": frame, "fg_clicks": fg, "bg_clicks": bg})


def test_latency_percentiles_per_kind():
    rows = [("s", "frame_prediction", "a", {"ms": float(ms)}) for ms in range(1, 101)]
    rows.append(("s", "propagation", "a", {"ms": 2000.0}))
    m = monitor(table(*rows))
    fp, prop = m.latency
    assert (fp.kind, fp.count, fp.p50) == ("frame_prediction", 100, pytest.approx(50.5))
    assert fp.p95 == pytest.approx(95.05) and fp.p99 == pytest.approx(99.01)
    assert (prop.count, prop.p50, prop.p99) == (1, 2000.0, 2000.0)
    assert m.alerts == []


def test_empty_events_give_no_figures_and_no_alerts():
    m = monitor(EVENTS_SCHEMA.empty_table())
    assert m.latency[0].p50 is None and m.clicks_median is None and m.retry_rate is None
    assert m.abandon_rate is None and m.alerts == []


def test_clicks_alert_on_three_typical_clicks_and_on_bg_share():
    few = monitor(table(correction("a", 0, 0, 1, 0), correction("a", 1, 0, 2, 0), correction("b", 0, 0, 1, 1)))
    assert few.clicks_median == 2 and few.bg_share_median == 0.0 and few.alerts == []
    many = monitor(table(correction("a", 0, 0, 3, 0), correction("a", 1, 0, 2, 1), correction("b", 0, 0, 1, 3)))
    assert many.clicks_median == 3
    assert any("3 clicks" in a for a in many.alerts)
    bg = monitor(table(correction("a", 0, 0, 1, 1), correction("a", 1, 0, 1, 1)))
    assert bg.bg_share_median == 0.5 and any("negative" in a for a in bg.alerts)


def test_retries_are_corrections_on_an_already_corrected_masklet_frame():
    m = monitor(table(correction("a", 0, 3, 1, 0), correction("a", 0, 3, 1, 0), correction("a", 0, 4, 1, 0),
                      correction("a", 1, 3, 1, 0), correction("b", 0, 3, 1, 0)))
    assert (m.corrections, m.retries, m.retry_rate) == (5, 1, 0.2) and m.alerts == []
    m = monitor(table(correction("a", 0, 3, 1, 0), correction("a", 0, 3, 1, 0), correction("a", 0, 3, 1, 0)))
    assert m.retry_rate == pytest.approx(2 / 3) and any("redo" in a for a in m.alerts)


def test_abandons_are_finished_visits_without_a_decision_on_that_item():
    m = monitor(table(
        ("s", "open_item", "a", {}), ("s", "decision", "a", {"object_id": 0}),
        ("s", "open_item", "b", {}),  # left for c without a decision: abandoned
        ("s", "open_item", "c", {}), ("s", "decision", "b", {"object_id": 0}),  # a decision on another item
        ("s", "close_item", "c", {}),  # c: abandoned
        ("t", "open_item", "d", {}),  # still open in session t: in progress, not counted
    ))
    assert (m.visits, m.abandons, m.decisions) == (3, 2, 2)
    assert m.abandon_rate == pytest.approx(2 / 3) and any("without a decision" in a for a in m.alerts)


def test_sessions_are_followed_separately():
    m = monitor(table(("s", "open_item", "a", {}), ("t", "open_item", "a", {}),
                      ("s", "decision", "a", {"object_id": 0}), ("s", "close_item", "a", {}),
                      ("t", "close_item", "a", {})))
    assert (m.visits, m.abandons) == (2, 1)
