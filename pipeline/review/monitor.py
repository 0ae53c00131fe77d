"""The review's monitoring: latency, clicks, retries and abandons, computed from the events a review leaves
(EVENTS_SCHEMA rows, pipeline/review/records.py). Pure: a table in, a `ReviewMonitor` out, so the app's
sidebar and `masklet report` show the same figures from the same rules.

What each figure means and when it alerts (the thresholds are the module's constants):

- latency p50 / p95 / p99, per interaction kind (`frame_prediction`: SAM 2's answer on one frame after a
  click; `propagation`: "propagate now"), in ms. No alert: the figures are for the reader to compare.
- clicks per correction (fg + bg of each `correction` event): alerts when the typical correction (the
  median) needs CLICKS_ALERT clicks or more, or its median share of negative clicks is above BG_SHARE_ALERT.
  Many clicks mean the model's answer is hard to steer: the prompts, the model size or the frame
  resolution deserve a look.
- retries: corrections on a masklet and frame that already had one (the reviewer was not happy with the
  first); the share of corrections that are retries alerts above RETRY_ALERT.
- abandons: items opened and left (the next item opened, or the item closed) without a decision on it;
  the share of finished visits alerts above ABANDON_ALERT. A session's last visit with no close yet is still
  in progress and counts as neither.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

LATENCY_KINDS = ("frame_prediction", "propagation")
CLICKS_ALERT = 3  # median clicks per correction at or above this alerts
BG_SHARE_ALERT = 0.30  # median share of negative clicks per correction above this alerts
RETRY_ALERT = 0.40
ABANDON_ALERT = 0.20


@dataclass(frozen=True)
class Latency:
    kind: str
    count: int
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass
class ReviewMonitor:
    latency: list[Latency]
    corrections: int
    clicks_median: float | None
    bg_share_median: float | None
    retries: int
    retry_rate: float | None
    visits: int  # finished visits (open_item .. next open / close)
    abandons: int
    abandon_rate: float | None
    decisions: int
    alerts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _percentiles(values: np.ndarray) -> tuple[float | None, float | None, float | None]:
    if not len(values):
        return None, None, None
    p = np.percentile(values, [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def monitor(events: pa.Table) -> ReviewMonitor:
    """Every figure of the module's docstring from `events` (any order; EVENTS_SCHEMA columns)."""
    rows = sorted(events.to_pylist(), key=lambda r: (r["session_id"] or "", r["seq"] or 0))
    latency = []
    for kind in LATENCY_KINDS:
        ms = np.array([r["ms"] for r in rows if r["kind"] == kind and r["ms"] is not None], dtype=np.float64)
        latency.append(Latency(kind, len(ms), *_percentiles(ms)))

    corrections = [r for r in rows if r["kind"] == "correction"]
    clicks, bg_shares, seen, retries = [], [], set(), 0
    for r in corrections:
        fg, bg = r["fg_clicks"] or 0, r["bg_clicks"] or 0
        clicks.append(fg + bg)
        if fg + bg:
            bg_shares.append(bg / (fg + bg))
        key = (r["item_id"], r["object_id"], r["frame"])
        retries += key in seen
        seen.add(key)
    clicks_median = float(np.median(clicks)) if clicks else None
    bg_median = float(np.median(bg_shares)) if bg_shares else None

    visits = abandons = decisions = 0
    current: dict[str, tuple[str, bool]] = {}  # session -> (item being visited, decided on it yet)
    for r in rows:
        session, kind = r["session_id"], r["kind"]
        if kind == "decision":
            decisions += 1
            if session in current and current[session][0] == r["item_id"]:
                current[session] = (r["item_id"], True)
        elif kind in ("open_item", "close_item"):
            if session in current:  # the visit before ends here
                visits += 1
                abandons += not current.pop(session)[1]
            if kind == "open_item":
                current[session] = (r["item_id"], False)

    result = ReviewMonitor(latency, len(corrections), clicks_median, bg_median, retries,
                           _rate(retries, len(corrections)), visits, abandons, _rate(abandons, visits), decisions)
    result.alerts = alerts(result)
    return result


def alerts(m: ReviewMonitor) -> list[str]:
    """One sentence per rule broken, naming the figure and the threshold."""
    out = []
    if m.clicks_median is not None and m.clicks_median >= CLICKS_ALERT:
        out.append(f"a typical correction takes {m.clicks_median:g} clicks (alert at {CLICKS_ALERT}+): SAM 2's "
                   f"answers are hard to steer")
    if m.bg_share_median is not None and m.bg_share_median > BG_SHARE_ALERT:
        out.append(f"a typical correction is {m.bg_share_median:.0%} negative clicks (alert above "
                   f"{BG_SHARE_ALERT:.0%}): masks spill over their objects")
    if m.retry_rate is not None and m.retry_rate > RETRY_ALERT:
        out.append(f"{m.retry_rate:.0%} of corrections redo a corrected frame (alert above {RETRY_ALERT:.0%})")
    if m.abandon_rate is not None and m.abandon_rate > ABANDON_ALERT:
        out.append(f"{m.abandon_rate:.0%} of item visits end without a decision (alert above {ABANDON_ALERT:.0%})")
    return out


def review_summary(out) -> dict | None:
    """The review's figures for `masklet report` (report.json's "review"): decisions by status, labels,
    corrections (pending: not yet in a version) and the monitor; None for a run never reviewed."""
    from pipeline.paths import RunPaths
    from pipeline.review import store

    if not RunPaths.of(out).review.exists():
        return None
    decided = store.decisions(out).to_pylist()
    status = [r["decision"] for r in decided]
    corrections = store.corrections(out)
    return {
        "decisions": {"accept": status.count("accept"), "reject": status.count("reject"),
                      "duplicate": status.count("duplicate"), "labelled": sum(1 for r in decided if r["label"])},
        "corrections": {"total": corrections.num_rows,
                        "pending": store.corrections(out, pending_only=True).num_rows},
        "monitor": monitor(store.events(out)).to_dict(),
    }
