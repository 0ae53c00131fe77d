"""The report's charts, drawn from the health dict (pipeline/quality/health.py) into PNG bytes.

Why matplotlib: it is the standard Python plotting library, well kept, and its Agg backend renders PNG files
offline with no display, browser or server; the page embeds them as data URIs, so the report opens anywhere
as one file. (A JavaScript charting library would need a script on the page or a CDN; SVG built by hand is
code to maintain.) Each function takes the health dict and returns PNG bytes, or None when there is nothing
to draw.
"""
from __future__ import annotations

import io
from datetime import datetime

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, PNG only
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.quality.health import SCORES, STAGES  # noqa: E402

DPI = 96
SIZE = (7.0, 3.0)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _time_axis(ax) -> None:
    """Readable clock labels at any span (seconds to days): matplotlib's concise date formatter."""
    locator = mdates.AutoDateLocator(maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def throughput(health: dict) -> bytes | None:
    bins = health["over_time"]["bins"]
    if not bins:
        return None
    t = [datetime.fromisoformat(b["start"]) for b in bins]
    width = health["over_time"]["bin_seconds"] / 86400.0
    fig, ax = plt.subplots(figsize=SIZE)
    done = np.array([b["items_done"] for b in bins])
    failed = np.array([b["items_failed"] for b in bins])
    ax.bar(t, done, width=width, align="edge", color="#4c72b0", label="done")
    ax.bar(t, failed, width=width, align="edge", bottom=done, color="#c44e52", label="failed")
    ax.set_ylabel(f"items per {health['over_time']['bin_seconds']} s")
    ax.set_title("items finished over time (UTC)")
    ax.legend(loc="upper left", fontsize=8)
    _time_axis(ax)
    return _png(fig)


def latency_over_time(health: dict) -> bytes | None:
    bins = [b for b in health["over_time"]["bins"] if b["frame_ms_p50"] is not None]
    if not bins:
        return None
    t = [datetime.fromisoformat(b["start"]) for b in bins]
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot(t, [b["frame_ms_p50"] for b in bins], marker=".", label="p50")
    ax.plot(t, [b["frame_ms_p95"] for b in bins], marker=".", label="p95")
    ax.axhline(health["thresholds"]["frame_budget_ms"], color="#c44e52", ls="--", lw=1, label="qa.frame_budget_ms")
    ax.set_ylabel("ms per frame (total)")
    ax.set_title("time per frame over time")
    ax.legend(fontsize=8)
    _time_axis(ax)
    return _png(fig)


def latency(health: dict) -> bytes | None:
    per_frame = health["latency"]["per_frame_ms"]
    if not per_frame["total"]["all"]["count"]:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 3.2))
    x = np.arange(len(STAGES))
    for k, q in enumerate(("p50", "p95", "p99")):
        a1.bar(x + (k - 1) * 0.27, [per_frame[s]["all"][q] or 0 for s in STAGES], width=0.27, label=q)
    a1.set_xticks(x, STAGES, fontsize=8)
    a1.set_ylabel("ms per frame")
    a1.set_title("by stage")
    a1.legend(fontsize=8)
    labels = [b["name"] for b in health["latency"]["buckets"]]
    xb = np.arange(len(labels))
    for k, q in enumerate(("p50", "p95", "p99")):
        a2.bar(xb + (k - 1) * 0.27, [per_frame["total"]["by_bucket"][b][q] or 0 for b in labels], width=0.27, label=q)
    a2.axhline(health["thresholds"]["frame_budget_ms"], color="#c44e52", ls="--", lw=1, label="budget")
    a2.set_xticks(xb, labels, fontsize=8)
    a2.set_title("total, by resolution (shorter side)")
    a2.legend(fontsize=8)
    return _png(fig)


def scores(health: dict) -> bytes | None:
    if not any(health["scores"][s]["count"] for s in SCORES):
        return None
    fig, axes = plt.subplots(1, len(SCORES), figsize=(10.0, 3.0))
    for ax, name in zip(axes, SCORES):
        s = health["scores"][name]
        edges = np.asarray(s["histogram"]["edges"])
        for key, label, style in (("histogram", "all", dict(color="#999999", alpha=0.5)),
                                  ("early_histogram", "first tenth", dict(histtype="step", color="#4c72b0", lw=1.5)),
                                  ("late_histogram", "latest tenth", dict(histtype="step", color="#dd8452", lw=1.5))):
            counts = np.asarray(s[key]["counts"], dtype=np.float64)
            if counts.sum():
                ax.hist(edges[:-1], bins=edges, weights=counts / counts.sum(), label=label, **style)
        ax.axvline(health["thresholds"]["low_score"], color="#c44e52", ls="--", lw=1)
        ax.set_title(name + (" (sigmoid)" if name == "object_score_mean" else ""), fontsize=9)
        ax.set_xlim(0, 1)
    axes[0].set_ylabel("share of masklets")
    axes[0].legend(fontsize=7)
    return _png(fig)


def shapes(health: dict) -> bytes | None:
    area, length = health["area_share"], health["frames_visible"]
    if not sum(area["counts"]) and not sum(length["counts"]):
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.0, 3.0))
    edges = np.asarray(area["edges"], dtype=np.float64)
    a1.bar(range(len(area["counts"])), area["counts"], color="#55a868")
    a1.set_xticks(range(0, len(area["counts"]), 4), [f"{e:.0e}" if e else "0" for e in edges[:-1:4]], fontsize=7)
    a1.set_title("area share of the frame (mean over visible frames)", fontsize=9)
    a1.set_ylabel("masklets")
    labels = [str(e) for e in length["edges"][:-1]]
    a2.bar(range(len(length["counts"])), length["counts"], color="#8172b2")
    a2.set_xticks(range(len(labels)), [f">={x}" for x in labels], fontsize=7, rotation=45)
    a2.set_title("length: frames visible", fontsize=9)
    return _png(fig)


def flags(health: dict) -> bytes | None:
    counts = health["flags"]["counts"]
    if not sum(counts.values()):
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    names = list(counts)
    ax.barh(names, [counts[n] for n in names], color="#dd8452")
    ax.invert_yaxis()
    ax.set_xlabel("masklets")
    ax.set_title("flags")
    return _png(fig)


def failures(health: dict) -> bytes | None:
    kinds = health["failures"]["by_kind"]
    if not kinds:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 0.6 + 0.35 * len(kinds)))
    ax.barh([k["kind"] for k in kinds], [k["count"] for k in kinds], color="#c44e52")
    ax.invert_yaxis()
    ax.set_xlabel("failed items")
    ax.set_title("failures by kind")
    return _png(fig)


CHARTS = {"throughput": throughput, "latency_over_time": latency_over_time, "latency": latency, "scores": scores,
          "shapes": shapes, "flags": flags, "failures": failures}
