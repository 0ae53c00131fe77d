"""Run health: how fast, how well and how reliably a run is going, from its committed items and masklets
tables, as one JSON-able dict (what `masklet report` writes to report.json and draws).

Memory is bounded whatever the size of the run. The items table (one row per item) is read with only the
columns used, and its timings are kept as arrays so their percentiles are exact. The masklets table (one row
per object: 2 million for 100,000 items) is never held whole: it is scanned in record batches with only the
columns used, and each batch is folded into fixed-bin histograms (scores, area share, length), counters
(flags, scores below qa.low_score) and a running top-N by review priority. What is kept is a few histograms
per group (run, early/late tenth of items, each shard and device), not rows. That fold, and the masklets
table's columns and bins, are pipeline/quality/health_masklets.py; this module turns them into the report.

Only committed data is read (`open_run` sees an item whole or not at all), so a report of a run in flight is
a report of what it finished; items not yet committed are counted as pending from the plan.

Definitions (the README's report section repeats them):
- ms per frame: seconds_<stage> * 1000 / num_frames of a done item, for each stage (decode, prompt,
  propagate, write, signals, total); per item: seconds_<stage>. Percentiles are numpy's linear ones
  (np.percentile, method="linear"), exact over the items. Items without frames or timings are left out.
- resolution bucket: the shorter side of the stored masks (min(width, height), the decoded frames), named as
  video heights are: <=480p, <=720p, <=1080p, >1080p. The shorter side, not the longer: a 1280x720 clip is
  720p whether it was filmed upright or not.
  Alert `frame_budget`: p95 ms per frame (total) of a bucket > qa.frame_budget_ms.
- scores: predicted_iou, stability_score and object_score_mean of the masklets; object_score_mean is a
  logit (SAM 2's object presence), shown as sigmoid(logit) so that all three lie in [0, 1] and share one
  threshold scale. Median from a histogram of SCORE_BINS bins over [0, 1] (linear inside the bin: within
  1 / SCORE_BINS of the exact median); the share below qa.low_score is counted exactly (float32 columns
  compared at float32, like the low_score flag). Alerts: median < qa.score_median_min (`score_median`),
  share below > qa.score_low_share_max (`score_low_share`).
- drift: the two-sample Kolmogorov-Smirnov statistic D = max |F1(x) - F2(x)| between the masklet scores of
  the first tenth and of the latest tenth of done items (by finished_at), and between each shard and each
  device (its `device` and `device_class` joined: "cuda cuda-sm90") and the rest of the run. D is computed
  on the histograms (at the bin edges: the exact D of the scores rounded down to the bin edges,
  `ks_from_histograms`; `ks_statistic` is the exact one). Alert `drift`: D > qa.drift_max, for groups of
  at least DRIFT_MIN_MASKLETS masklets on both sides.
- failures: items committed as failed over items committed; kind = the exception name that starts the
  error ("ValueError: ..."), "out of memory" for the memory ladder's message, else its first word.
  Retried: items with attempts > 1.
- top masklets: the top_n highest review_priority, ties broken by masklet_id, kept batch by batch.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import QAConfig
from pipeline.quality.health_masklets import (AREA_EDGES, LENGTH_EDGES, SCORE_BINS, SCORES, ItemGroups, MaskletFold,
                                              ScoreGroups, column_values, fold_masklets, histogram, sigmoid)
# the names that lived here before the fold moved out, still importable from here (tests import TopN)
from pipeline.quality.health_masklets import (MASKLET_COLUMNS, SHARD_SCORE_BINS, TOP_COLUMNS, TopN,  # noqa: F401
                                              score_bin)

STAGES = ("decode", "prompt", "propagate", "write", "signals", "total")
# (label, largest shorter side in the bucket); the last bucket is unbounded
BUCKETS = (("<=480p", 480), ("<=720p", 720), ("<=1080p", 1080), (">1080p", math.inf))
DRIFT_MIN_MASKLETS = 50  # smaller groups are not compared (D of a handful of values is noise)
COVERAGE_EDGES = np.linspace(0.0, 1.0, 21)
TIME_BINS = 48  # throughput over time: at most this many bins
NICE_SECONDS = (1, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 604800)
BATCH_ROWS = 65_536

ITEM_COLUMNS = ["item_id", "shard_id", "status", "error", "attempts", "num_frames", "num_objects", "width",
                "height", "device", "device_class", *[f"seconds_{s}" for s in STAGES], "coverage_mean",
                "coverage_min", "finished_at"]


# ---------------------------------------------------------------- small pure functions (tested one by one)

def _num(x) -> float | int | None:
    """A JSON number: None for NaN, inf and None; Python int/float otherwise."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def percentiles(values) -> dict:
    """count, mean, p50, p95, p99 (np.percentile, linear) of the finite values; None where empty."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"count": int(len(v)), "mean": _num(v.mean()), "p50": _num(p50), "p95": _num(p95), "p99": _num(p99)}


def resolution_bucket(short_side: np.ndarray) -> np.ndarray:
    """Index into BUCKETS of each shorter side (-1 where unknown)."""
    side = np.asarray(short_side, dtype=np.float64)
    out = np.searchsorted(np.array([b for _, b in BUCKETS[:-1]], dtype=np.float64), side, side="left")
    return np.where(np.isfinite(side) & (side > 0), out, -1)


_EXCEPTION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:")


def error_kind(error: str | None) -> str:
    """The exception name that starts an error text ("ValueError: ..." -> ValueError), "out of memory" for
    the memory ladder's message, else the first word ("unknown" when empty)."""
    text = (error or "").strip()
    if not text:
        return "unknown"
    m = _EXCEPTION.match(text)
    if m:
        return m.group(1).rsplit(".", 1)[-1]
    if text.lower().startswith("out of memory"):
        return "out of memory"
    return re.split(r"[\s:;,]+", text, maxsplit=1)[0]


def ks_statistic(a, b) -> float | None:
    """Exact two-sample Kolmogorov-Smirnov D = sup |F_a(x) - F_b(x)| (NaNs dropped; None if a side is empty)."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if not len(a) or not len(b):
        return None
    x = np.concatenate([a, b])
    fa = np.searchsorted(a, x, side="right") / len(a)
    fb = np.searchsorted(b, x, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def ks_from_histograms(h1, h2) -> float | None:
    """KS D between two samples given as counts over the same bins: the largest gap between their empirical
    CDFs at the bin edges (exact for samples whose values are the bins' lower edges)."""
    h1, h2 = np.asarray(h1, dtype=np.float64), np.asarray(h2, dtype=np.float64)
    n1, n2 = h1.sum(), h2.sum()
    if n1 <= 0 or n2 <= 0:
        return None
    return float(np.max(np.abs(np.cumsum(h1) / n1 - np.cumsum(h2) / n2)))


def hist_quantile(counts, edges, q: float) -> float | None:
    """Quantile q of a sample given as a histogram: linear inside the bin where the cumulative count crosses
    q * n (so within one bin width of the exact quantile)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n <= 0:
        return None
    cum = np.cumsum(counts)
    target = q * n
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    below = cum[i] - counts[i]
    frac = (target - below) / counts[i] if counts[i] else 0.0
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def nice_bin_seconds(span_s: float, max_bins: int = TIME_BINS) -> int:
    """The smallest of NICE_SECONDS that covers `span_s` in at most `max_bins` bins."""
    for s in NICE_SECONDS:
        if span_s / s < max_bins:
            return s
    return int(math.ceil(span_s / max_bins / 86400.0)) * 86400



# ---------------------------------------------------------------- the report

def _items_arrays(run) -> dict[str, np.ndarray]:
    """The items columns used, as numpy arrays (numbers as float64 with NaN for null); strings are not turned
    into Python objects per row (a million items): status as two bool arrays, device as codes into a sorted
    list of names, errors kept for failed items only."""
    table = run.dataset("items").to_table(columns=ITEM_COLUMNS)
    a: dict = {"n": len(table), "ids": table.column("item_id").combine_chunks() if len(table)
               else pa.array([], pa.string())}
    status = table.column("status")
    a["done"] = np.asarray(pc.fill_null(pc.equal(status, "done"), False).to_numpy(zero_copy_only=False), dtype=bool)
    a["failed"] = np.asarray(pc.fill_null(pc.equal(status, "failed"), False).to_numpy(zero_copy_only=False),
                             dtype=bool)
    a["errors"] = table.filter(pa.array(a["failed"])).column("error").to_pylist() if len(table) else []
    # a device is its kind and class ("cuda cuda-sm90"): two GPU generations compute different numerics
    device = pc.utf8_trim_whitespace(pc.binary_join_element_wise(
        pc.fill_null(table.column("device"), ""), pc.fill_null(table.column("device_class"), ""), " "))
    names = sorted(set(pc.unique(device).to_pylist())) if len(table) else []
    a["device_names"] = names
    a["device_code"] = np.asarray(pc.index_in(device, value_set=pa.array(names, pa.string())).to_numpy(
        zero_copy_only=False), dtype=np.int64) if len(table) else np.zeros(0, dtype=np.int64)
    for name in ITEM_COLUMNS:
        if name in ("item_id", "status", "error", "device", "device_class"):
            continue
        col = table.column(name)
        if name == "finished_at":
            a[name] = np.asarray(col.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.float64) / 1000.0
        else:
            a[name] = column_values(table, name)
    return a


def _latency(a: dict, done: np.ndarray, qa: QAConfig, alerts: list) -> dict:
    frames = a["num_frames"]
    ok = done & (frames > 0)
    bucket = resolution_bucket(np.fmin(a["width"], a["height"]))
    per_frame, per_item = {}, {}
    for stage in STAGES:
        sec = a[f"seconds_{stage}"]
        ms = np.where(ok, sec * 1000.0 / np.where(frames > 0, frames, 1), np.nan)
        per_item[stage] = percentiles(np.where(done, sec, np.nan))
        per_frame[stage] = {"all": percentiles(ms),
                            "by_bucket": {label: percentiles(ms[bucket == b]) for b, (label, _) in enumerate(BUCKETS)}}
    for label, _ in BUCKETS:
        p95 = per_frame["total"]["by_bucket"][label]["p95"]
        if p95 is not None and p95 > qa.frame_budget_ms:
            alerts.append({"kind": "frame_budget", "key": f"latency.per_frame_ms.total.by_bucket.{label}.p95",
                           "value": p95, "limit": qa.frame_budget_ms,
                           "message": f"p95 time per frame of {label} items is {p95:.0f} ms, over the budget "
                                      f"qa.frame_budget_ms={qa.frame_budget_ms:g}"})
    return {"buckets": [{"name": label, "short_side_max": None if math.isinf(b) else int(b)} for label, b in BUCKETS],
            "per_frame_ms": per_frame, "per_item_s": per_item}


def _group_stats(keys: np.ndarray, done: np.ndarray, failed: np.ndarray, ms_total: np.ndarray) -> list[dict]:
    """Items done and failed and ms-per-frame percentiles of each key (sorted; one pass over sorted rows)."""
    if not len(keys):
        return []
    uniq, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    out = []
    for g, k in enumerate(uniq.tolist()):
        rows = order[bounds[g]:bounds[g + 1]]
        out.append({"key": k, "items_done": int(done[rows].sum()), "items_failed": int(failed[rows].sum()),
                    "frame_ms": percentiles(ms_total[rows][done[rows]])})
    return out


def _over_time(a: dict, finished: np.ndarray, done: np.ndarray, failed: np.ndarray, ms_total: np.ndarray,
               max_bins: int) -> dict:
    t = a["finished_at"]
    t_ok = finished & np.isfinite(t)
    if not t_ok.any():
        return {"bin_seconds": None, "start": None, "bins": []}
    t0, t1 = float(t[t_ok].min()), float(t[t_ok].max())
    width = nice_bin_seconds(t1 - t0, max_bins)
    start = math.floor(t0 / width) * width
    idx = np.where(t_ok, np.floor((t - start) / width), -1).astype(np.int64)
    bins = []
    for i in range(int(idx.max()) + 1):
        sel = idx == i
        n_done, n_failed = int((sel & done).sum()), int((sel & failed).sum())
        pct = percentiles(ms_total[sel & done])
        bins.append({"start": _iso(start + i * width), "items_done": n_done, "items_failed": n_failed,
                     "items_per_hour": _num((n_done + n_failed) * 3600.0 / width),
                     "frame_ms_p50": pct["p50"], "frame_ms_p95": pct["p95"]})
    return {"bin_seconds": width, "start": _iso(start), "bins": bins}


def _iso(seconds: float | None) -> str | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")


def _failures(a: dict, finished: np.ndarray, failed: np.ndarray) -> dict:
    kinds: dict[str, list] = {}
    for err in a["errors"]:
        k = error_kind(err)
        entry = kinds.setdefault(k, [0, err])
        entry[0] += 1
    n_fin, n_failed = int(finished.sum()), int(failed.sum())
    attempts = a["attempts"][finished]
    attempts = attempts[np.isfinite(attempts)]
    retried = int((attempts > 1).sum())
    by_attempts = {str(int(k)): int(v) for k, v in zip(*np.unique(attempts, return_counts=True))}
    return {"items_failed": n_failed, "failure_rate": _num(n_failed / n_fin) if n_fin else None,
            "by_kind": [{"kind": k, "count": c, "share": _num(c / n_fin), "example": (ex or "")[:300]}
                        for k, (c, ex) in sorted(kinds.items(), key=lambda kv: (-kv[1][0], kv[0]))],
            "retried": retried, "retried_share": _num(retried / n_fin) if n_fin else None,
            "items_by_attempts": by_attempts}


def run_health(run, qa: QAConfig | None = None, top_n: int = 12, time_bins: int = TIME_BINS,
               batch_rows: int = BATCH_ROWS) -> dict:
    """The health of `run` (a pipeline.results.RunResults) as a JSON-able dict; `qa` defaults to the thresholds
    in force for the run (OUT/qa.json when `masklet qa --set` changed them, else the run config's)."""
    from pipeline.quality.reflag import current_qa

    qa = qa or current_qa(run.paths, run.plan.config)
    a = _items_arrays(run)
    done, failed = a["done"], a["failed"]
    finished = done | failed
    frames = a["num_frames"]
    ms_total = np.where(done & (frames > 0), a["seconds_total"] * 1000.0 / np.where(frames > 0, frames, 1), np.nan)
    groups = ItemGroups.of(done, a["finished_at"], a["shard_id"], a["device_names"], a["device_code"])
    fold = fold_masklets(run.dataset("masklets"), a["ids"], groups, qa.low_score, top_n, batch_rows)

    # the alerts' order: scores (early/late drift among them), then shard and device drift, then latency
    alerts: list[dict] = []
    scores = _score_summary(fold, qa, alerts)
    by_shard = _by_shard(groups, fold, done, failed, ms_total)
    by_device = _by_device(groups, fold, done, failed, ms_total)
    alerts.extend(_group_drift_alerts(by_shard, by_device, qa))
    latency = _latency(a, done, qa, alerts)
    return {
        "version": 1,
        "run": _run_summary(run, a, groups, fold),
        "thresholds": asdict(qa),
        "latency": latency,
        "over_time": _over_time(a, finished, done, failed, ms_total, time_bins),
        "by_shard": by_shard,
        "by_device": by_device,
        "scores": scores,
        "drift": {"early_items": groups.tenth, "late_items": groups.tenth, "min_masklets": DRIFT_MIN_MASKLETS,
                  "statistic": "two-sample Kolmogorov-Smirnov D on histograms",
                  "flagged": [{"key": x["key"], "value": x["value"], "message": x["message"]}
                              for x in alerts if x["kind"] == "drift"]},  # early/late, shard and device
        "failures": _failures(a, finished, failed),
        **_distributions(a, fold),
        "alerts": alerts,
        "top_masklets": [_jsonable(r) for r in fold.top.rows],
    }


def _run_summary(run, a: dict, groups: ItemGroups, fold: MaskletFold) -> dict:
    """The report's `run` section: what was planned, committed, done and failed, and when."""
    n, planned = a["n"], int(run.plan.num_items)
    done, failed = a["done"], a["failed"]
    fin_t = a["finished_at"][(done | failed) & np.isfinite(a["finished_at"])]
    return {
        "root": str(run.paths.root), "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "random_weights": bool(run.random_weights), "items_planned": planned, "items_committed": n,
        "items_done": int(done.sum()), "items_failed": int(failed.sum()), "items_pending": max(0, planned - n),
        "in_flight": planned > n, "masklets": fold.masklets, "shards_planned": len(run.plan.shard_ids),
        "shards_committed": len([k for k in groups.shard_keys if k >= 0]), "devices": groups.device_keys,
        "first_finished_at": _iso(float(fin_t.min())) if len(fin_t) else None,
        "last_finished_at": _iso(float(fin_t.max())) if len(fin_t) else None,
        "frames_done": int(np.nansum(a["num_frames"][done])),
    }


def _score_summary(fold: MaskletFold, qa: QAConfig, alerts: list) -> dict:
    """The report's `scores` section: per score, the run's count, mean, median and share below qa.low_score,
    the early and late tenth's medians and their drift (KS D on histograms); its alerts go to `alerts`."""
    score_edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    counts = fold.run_hist.counts  # groups: 0 run, 1 early, 2 late (no rows at all when no masklets)
    out = {}
    for k, name in enumerate(SCORES):
        hist, early, late = (counts[g, k] if counts.shape[0] else np.zeros(SCORE_BINS, dtype=np.int64)
                             for g in range(3))
        cnt = fold.score_n[name]
        median = hist_quantile(hist, score_edges, 0.5)
        share_low = fold.score_low[name] / cnt if cnt else None
        d = ks_from_histograms(early, late) if min(early.sum(), late.sum()) >= DRIFT_MIN_MASKLETS else None
        out[name] = {
            "count": cnt, "null": fold.masklets - cnt, "mean": _num(fold.score_sum[name] / cnt) if cnt else None,
            "median": _num(median), "share_below_low": _num(share_low),
            "early_median": _num(hist_quantile(early, score_edges, 0.5)),
            "late_median": _num(hist_quantile(late, score_edges, 0.5)),
            "drift_early_late": _num(d),
            "histogram": _coarse(hist, 50), "early_histogram": _coarse(early, 50), "late_histogram": _coarse(late, 50),
        }
        alerts.extend(_score_alerts(name, median, share_low, d, qa))
    return out


def _score_alerts(name: str, median: float | None, share_low: float | None, drift: float | None,
                  qa: QAConfig) -> list[dict]:
    key = f"scores.{name}"
    alerts = []
    if median is not None and median < qa.score_median_min:
        alerts.append({"kind": "score_median", "key": f"{key}.median", "value": median,
                       "limit": qa.score_median_min,
                       "message": f"median {name} is {median:.3f}, under qa.score_median_min="
                                  f"{qa.score_median_min:g}"})
    if share_low is not None and share_low > qa.score_low_share_max:
        alerts.append({"kind": "score_low_share", "key": f"{key}.share_below_low", "value": share_low,
                       "limit": qa.score_low_share_max,
                       "message": f"{share_low:.1%} of {name} are below qa.low_score={qa.low_score:g}, over "
                                  f"qa.score_low_share_max={qa.score_low_share_max:g}"})
    if drift is not None and drift > qa.drift_max:
        alerts.append({"kind": "drift", "key": f"{key}.drift_early_late", "value": drift, "limit": qa.drift_max,
                       "message": f"{name} drifted between the first and the latest tenth of items: KS D = "
                                  f"{drift:.3f} > qa.drift_max={qa.drift_max:g}"})
    return alerts


def _group_drift(hist: ScoreGroups, g: int) -> dict:
    """KS D of each score between group g and the rest of the run (None for groups too small to compare)."""
    out = {}
    for k, name in enumerate(SCORES):
        if g >= hist.counts.shape[0]:
            out[name] = None
            continue
        mine = hist.counts[g, k]
        rest = hist.counts[:, k].sum(axis=0) - mine
        ok = min(mine.sum(), rest.sum()) >= DRIFT_MIN_MASKLETS
        out[name] = _num(ks_from_histograms(mine, rest)) if ok else None
    return out


def _by_shard(groups: ItemGroups, fold: MaskletFold, done: np.ndarray, failed: np.ndarray,
              ms_total: np.ndarray) -> list[dict]:
    by_shard = _group_stats(groups.shard_ids, done, failed, ms_total)
    for g, entry in enumerate(by_shard):  # np.unique order: the same as groups.shard_keys
        entry["shard_id"] = entry.pop("key")
        entry["masklets"] = int(fold.masklets_per_shard[g])
        entry["drift"] = _group_drift(fold.shard_hist, g)
    return by_shard


def _by_device(groups: ItemGroups, fold: MaskletFold, done: np.ndarray, failed: np.ndarray,
               ms_total: np.ndarray) -> list[dict]:
    by_device = _group_stats(groups.device_code, done, failed, ms_total)
    for entry in by_device:
        g = entry.pop("key")
        entry["device"] = groups.device_keys[g]
        entry["drift"] = _group_drift(fold.dev_hist, g)
    return by_device


def _group_drift_alerts(by_shard: list[dict], by_device: list[dict], qa: QAConfig) -> list[dict]:
    alerts = []
    for label, groups, field in (("shard", by_shard, "shard_id"), ("device", by_device, "device")):
        for i, entry in enumerate(groups):
            for name, d in entry["drift"].items():
                if d is not None and d > qa.drift_max:
                    alerts.append({"kind": "drift", "key": f"by_{label}.{i}.drift.{name}", "value": d,
                                   "limit": qa.drift_max,
                                   "message": f"{label} {entry[field]}: {name} differs from the rest of the "
                                              f"run, KS D = {d:.3f} > qa.drift_max={qa.drift_max:g}"})
    return alerts


def _distributions(a: dict, fold: MaskletFold) -> dict:
    """The report's histogram sections, in the report's order: masklets per item, area share, frames
    visible, flags, coverage."""
    done = a["done"]
    per_item = a["num_objects"][done]
    return {
        "masklets_per_item": {**percentiles(per_item), "max": _num(np.nanmax(per_item)) if len(per_item) else None,
                              "histogram": {"edges": LENGTH_EDGES[:-1].tolist() + [None],
                                            "counts": histogram(per_item, LENGTH_EDGES.astype(np.float64))}},
        "area_share": {"edges": AREA_EDGES.tolist(), "counts": fold.area_counts.tolist(), "null": fold.area_null},
        "frames_visible": {"edges": LENGTH_EDGES[:-1].tolist() + [None], "counts": fold.length_counts.tolist()},
        "flags": {"counts": fold.flag_counts, "unflagged": fold.unflagged, "not_flagged_yet": fold.flags_null,
                  "by_number_of_flags": {str(k): v for k, v in sorted(fold.by_flag_count.items())}},
        "coverage": {"mean": percentiles(a["coverage_mean"][done]), "min": percentiles(a["coverage_min"][done]),
                     "histogram": {"edges": COVERAGE_EDGES.tolist(),
                                   "counts": histogram(a["coverage_mean"][done], COVERAGE_EDGES)}},
    }

def _coarse(hist: np.ndarray, bins: int) -> dict:
    """A fine histogram over [0, 1] summed into `bins` bins (SCORE_BINS must be a multiple of bins)."""
    h = np.asarray(hist, dtype=np.int64).reshape(bins, -1).sum(axis=1)
    return {"edges": np.linspace(0.0, 1.0, bins + 1).round(6).tolist(), "counts": h.tolist()}


def _jsonable(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, list):
            out[k] = list(v)
        elif isinstance(v, str) or v is None:
            out[k] = v
        else:
            out[k] = _num(v)
    if "object_score_mean" in out and out["object_score_mean"] is not None:
        out["object_score_mean"] = _num(sigmoid(out["object_score_mean"]))
    return out
