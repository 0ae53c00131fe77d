"""Run health: how fast, how well and how reliably a run is going, from its committed items and masklets
tables, as one JSON-able dict (what `masklet report` writes to report.json and draws).

Memory is bounded whatever the size of the run. The items table (one row per item) is read with only the
columns used, and its timings are kept as arrays so their percentiles are exact. The masklets table (one row
per object: 2 million for 100,000 items) is never held whole: it is scanned in record batches with only the
columns used, and each batch is folded into fixed-bin histograms (scores, area share, length), counters
(flags, scores below qa.low_score) and a running top-N by review priority. What is kept is a few histograms
per group (run, early/late tenth of items, each shard and device), not rows.

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
from pipeline.quality.flags import FLAG_NAMES

STAGES = ("decode", "prompt", "propagate", "write", "signals", "total")
# (label, largest shorter side in the bucket); the last bucket is unbounded
BUCKETS = (("<=480p", 480), ("<=720p", 720), ("<=1080p", 1080), (">1080p", math.inf))
SCORES = ("predicted_iou", "stability_score", "object_score_mean")
SCORE_BINS = 1000  # run, early, late and per-device score histograms over [0, 1]
SHARD_SCORE_BINS = 100  # per-shard histograms (thousands of shards): drift to within 0.01 of a score
DRIFT_MIN_MASKLETS = 50  # smaller groups are not compared (D of a handful of values is noise)
AREA_EDGES = np.concatenate([[0.0], np.logspace(-5, 0, 21)])  # area share: 0, then log bins 1e-5 .. 1
LENGTH_EDGES = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 2**31 - 1], dtype=np.int64)
COVERAGE_EDGES = np.linspace(0.0, 1.0, 21)
TIME_BINS = 48  # throughput over time: at most this many bins
NICE_SECONDS = (1, 5, 10, 30, 60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 604800)
BATCH_ROWS = 65_536

ITEM_COLUMNS = ["item_id", "shard_id", "status", "error", "attempts", "num_frames", "num_objects", "width",
                "height", "device", "device_class", *[f"seconds_{s}" for s in STAGES], "coverage_mean",
                "coverage_min", "finished_at"]
MASKLET_COLUMNS = ["item_id", "masklet_id", "object_id", *SCORES, "area_share_mean", "frames_visible", "flags",
                   "review_priority"]
TOP_COLUMNS = ["masklet_id", "item_id", "object_id", "review_priority", "flags", *SCORES, "iou_min", "iou_mean",
               "frames_visible", "first_frame", "last_frame", "area_share_mean"]


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


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def histogram(values, edges) -> list[int]:
    """Counts of the finite values in [edges[i], edges[i+1]) (the last bin closed; outside values clipped in)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(np.int64).tolist()


def score_bin(values: np.ndarray, bins: int) -> np.ndarray:
    """Bin index in [0, bins) of each score in [0, 1] (clipped; NaN -> -1)."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.clip(np.floor(v * bins), 0, bins - 1)
    return np.where(np.isnan(v), -1, idx).astype(np.int64)


def nice_bin_seconds(span_s: float, max_bins: int = TIME_BINS) -> int:
    """The smallest of NICE_SECONDS that covers `span_s` in at most `max_bins` bins."""
    for s in NICE_SECONDS:
        if span_s / s < max_bins:
            return s
    return int(math.ceil(span_s / max_bins / 86400.0)) * 86400


class TopN:
    """The n rows of highest review priority seen so far (ties: smaller masklet_id first), fed batch by batch:
    each batch's candidates are cut to n with argpartition before they meet the kept rows."""

    def __init__(self, n: int):
        self.n = n
        self.rows: list[dict] = []

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self.n <= 0 or not len(batch):
            return
        pri = np.asarray(batch.column("review_priority").to_numpy(zero_copy_only=False), dtype=np.float64)
        pri = np.where(np.isnan(pri), -np.inf, pri)
        if len(pri) > self.n:
            cut = np.partition(pri, len(pri) - self.n)[len(pri) - self.n]
            take = np.flatnonzero(pri >= cut)  # ties at the cut all kept: the masklet_id decides below
        else:
            take = np.arange(len(pri))
        part = batch.take(pa.array(take, pa.int64()))
        cols = [c for c in TOP_COLUMNS if c in part.schema.names]
        cand = pa.Table.from_batches([part]) if isinstance(part, pa.RecordBatch) else part
        self.rows.extend(cand.select(cols).to_pylist())
        self.rows.sort(key=lambda r: (-(r["review_priority"] if r["review_priority"] is not None else -math.inf),
                                      r["masklet_id"]))
        del self.rows[self.n:]


# ---------------------------------------------------------------- masklets: a histogram accumulator per group

class _ScoreGroups:
    """Score histograms of groups 0..k-1 (k may grow): counts[group, score, bin]."""

    def __init__(self, bins: int):
        self.bins = bins
        self.counts = np.zeros((0, len(SCORES), bins), dtype=np.int64)

    def add(self, group: np.ndarray, score_index: int, bins: np.ndarray, groups: int) -> None:
        if groups > self.counts.shape[0]:
            grown = np.zeros((groups, len(SCORES), self.bins), dtype=np.int64)
            grown[: self.counts.shape[0]] = self.counts
            self.counts = grown
        ok = (bins >= 0) & (group >= 0)
        flat = group[ok] * self.bins + bins[ok]
        add = np.bincount(flat, minlength=groups * self.bins)[: groups * self.bins]
        self.counts[:groups, score_index] += add.reshape(groups, self.bins)


def _coalesce(batches, rows: int):
    """Tables of at least `rows` rows (the last may be shorter) from a stream of record batches: a shard's
    file gives a batch of a few thousand rows, and each batch pays a fixed cost (the item-id lookup builds
    a hash of every item id: 1,000 such batches cost 4.6 of 8 seconds, measured at 100,000 items)."""
    held, n = [], 0
    for batch in batches:
        if not len(batch):
            continue
        held.append(batch)
        n += len(batch)
        if n >= rows:
            yield pa.Table.from_batches(held)
            held, n = [], 0
    if held:
        yield pa.Table.from_batches(held)


def _column(batch, name: str, dtype=np.float64) -> np.ndarray:
    return np.asarray(batch.column(name).to_numpy(zero_copy_only=False), dtype=dtype)


def _scores(batch) -> dict[str, np.ndarray]:
    out = {name: _column(batch, name) for name in SCORES}
    out["object_score_mean"] = sigmoid(out["object_score_mean"])
    return out


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
            a[name] = _column(table, name)
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
    alerts: list[dict] = []
    a = _items_arrays(run)
    n = a["n"]
    done, failed = a["done"], a["failed"]
    finished = done | failed
    frames = a["num_frames"]
    ms_total = np.where(done & (frames > 0), a["seconds_total"] * 1000.0 / np.where(frames > 0, frames, 1), np.nan)
    planned = int(run.plan.num_items)

    # early / late tenth of done items by finish time; shard and device group codes per item
    order = np.flatnonzero(done)
    order = order[np.argsort(a["finished_at"][order], kind="stable")]
    tenth = max(1, len(order) // 10) if len(order) >= 2 else 0
    phase = np.zeros(n, dtype=np.int64)  # 0: middle, 1: early tenth, 2: late tenth
    if tenth:
        phase[order[:tenth]] = 1
        phase[order[-tenth:]] = 2
    shard_ids = np.nan_to_num(a["shard_id"], nan=-1).astype(np.int64)
    shard_keys = np.unique(shard_ids).tolist()
    shard_code = np.searchsorted(np.asarray(shard_keys, dtype=np.int64), shard_ids).astype(np.int64)
    device_keys, device_code = a["device_names"], a["device_code"]

    # masklets, batch by batch
    run_hist = _ScoreGroups(SCORE_BINS)  # groups: 0 run, 1 early, 2 late
    dev_hist = _ScoreGroups(SCORE_BINS)
    shard_hist = _ScoreGroups(SHARD_SCORE_BINS)
    score_n = {s: 0 for s in SCORES}
    score_sum = {s: 0.0 for s in SCORES}
    score_low = {s: 0 for s in SCORES}
    area_counts = np.zeros(len(AREA_EDGES) - 1, dtype=np.int64)
    area_null = 0
    length_counts = np.zeros(len(LENGTH_EDGES) - 1, dtype=np.int64)
    flag_counts = {f: 0 for f in FLAG_NAMES}
    by_flag_count: dict[int, int] = {}
    unflagged = flags_null = 0
    masklets = 0
    masklets_per_shard = np.zeros(len(shard_keys), dtype=np.int64)
    top = TopN(top_n)
    dataset = run.dataset("masklets")
    columns = [c for c in dict.fromkeys(MASKLET_COLUMNS + TOP_COLUMNS)]
    low32 = np.float32(qa.low_score)
    batches = dataset.to_batches(columns=columns, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1)
    for batch in _coalesce(batches, batch_rows):
        masklets += len(batch)
        found = pc.index_in(batch.column("item_id"), value_set=a["ids"])
        item = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
        known = item >= 0
        ph = np.where(known, phase[np.where(known, item, 0)], -1)
        sh = np.where(known, shard_code[np.where(known, item, 0)], -1)
        dv = np.where(known, device_code[np.where(known, item, 0)], -1)
        masklets_per_shard += np.bincount(sh[sh >= 0], minlength=len(shard_keys))[: len(shard_keys)]
        scores = _scores(batch)
        for k, name in enumerate(SCORES):
            v = scores[name]
            finite = np.isfinite(v)
            score_n[name] += int(finite.sum())
            score_sum[name] += float(v[finite].sum())
            if name == "object_score_mean":
                score_low[name] += int((v[finite] < qa.low_score).sum())
            else:
                score_low[name] += int((_column(batch, name, np.float32) < low32).sum())
            fine = score_bin(v, SCORE_BINS)
            run_hist.add(np.zeros(len(v), dtype=np.int64), k, fine, 3)
            run_hist.add(np.where(ph > 0, ph, -1), k, fine, 3)
            dev_hist.add(dv, k, fine, max(1, len(device_keys)))
            shard_hist.add(sh, k, score_bin(v, SHARD_SCORE_BINS), max(1, len(shard_keys)))
        area = _column(batch, "area_share_mean")
        area_null += int((~np.isfinite(area)).sum())
        area_counts += np.asarray(histogram(area, AREA_EDGES), dtype=np.int64)
        length = _column(batch, "frames_visible")
        length_counts += np.asarray(histogram(length, LENGTH_EDGES.astype(np.float64)), dtype=np.int64)
        flags = batch.column("flags")
        flags_null += flags.null_count
        lengths = np.asarray(pc.list_value_length(flags).to_numpy(zero_copy_only=False), dtype=np.float64)
        unflagged += int((lengths == 0).sum())
        for k, c in zip(*np.unique(lengths[np.isfinite(lengths)].astype(np.int64), return_counts=True)):
            by_flag_count[int(k)] = by_flag_count.get(int(k), 0) + int(c)
        flat = pc.list_flatten(flags)
        if len(flat):
            for entry in pc.value_counts(flat).to_pylist():
                flag_counts[entry["values"]] = flag_counts.get(entry["values"], 0) + int(entry["counts"])
        top.add(batch)

    # scores and drift
    score_edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    scores_out = {}
    drift_alerts: list[dict] = []
    for k, name in enumerate(SCORES):
        hist = run_hist.counts[0, k] if run_hist.counts.shape[0] else np.zeros(SCORE_BINS, dtype=np.int64)
        cnt = score_n[name]
        median = hist_quantile(hist, score_edges, 0.5)
        share_low = score_low[name] / cnt if cnt else None
        early = run_hist.counts[1, k] if run_hist.counts.shape[0] else np.zeros(SCORE_BINS, dtype=np.int64)
        late = run_hist.counts[2, k] if run_hist.counts.shape[0] else np.zeros(SCORE_BINS, dtype=np.int64)
        d = ks_from_histograms(early, late) if min(early.sum(), late.sum()) >= DRIFT_MIN_MASKLETS else None
        scores_out[name] = {
            "count": cnt, "null": masklets - cnt, "mean": _num(score_sum[name] / cnt) if cnt else None,
            "median": _num(median), "share_below_low": _num(share_low),
            "early_median": _num(hist_quantile(early, score_edges, 0.5)),
            "late_median": _num(hist_quantile(late, score_edges, 0.5)),
            "drift_early_late": _num(d),
            "histogram": _coarse(hist, 50), "early_histogram": _coarse(early, 50), "late_histogram": _coarse(late, 50),
        }
        key = f"scores.{name}"
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
        if d is not None and d > qa.drift_max:
            alerts.append({"kind": "drift", "key": f"{key}.drift_early_late", "value": d, "limit": qa.drift_max,
                           "message": f"{name} drifted between the first and the latest tenth of items: KS D = "
                                      f"{d:.3f} > qa.drift_max={qa.drift_max:g}"})

    def group_drift(hist: _ScoreGroups, g: int) -> dict:
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

    by_shard = _group_stats(shard_ids, done, failed, ms_total)
    for g, entry in enumerate(by_shard):  # np.unique order: the same as shard_keys
        entry["shard_id"] = entry.pop("key")
        entry["masklets"] = int(masklets_per_shard[g])
        entry["drift"] = group_drift(shard_hist, g)
    by_device = _group_stats(device_code, done, failed, ms_total)
    for entry in by_device:
        g = entry.pop("key")
        entry["device"] = device_keys[g]
        entry["drift"] = group_drift(dev_hist, g)
    for label, groups, field in (("shard", by_shard, "shard_id"), ("device", by_device, "device")):
        for i, entry in enumerate(groups):
            for name, d in entry["drift"].items():
                if d is not None and d > qa.drift_max:
                    drift_alerts.append({"kind": "drift", "key": f"by_{label}.{i}.drift.{name}", "value": d,
                                         "limit": qa.drift_max,
                                         "message": f"{label} {entry[field]}: {name} differs from the rest of the "
                                                    f"run, KS D = {d:.3f} > qa.drift_max={qa.drift_max:g}"})
    alerts.extend(drift_alerts)
    latency = _latency(a, done, qa, alerts)
    failures = _failures(a, finished, failed)
    per_item = a["num_objects"][done]
    fin_t = a["finished_at"][finished & np.isfinite(a["finished_at"])]
    return {
        "version": 1,
        "run": {
            "root": str(run.paths.root), "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "random_weights": bool(run.random_weights), "items_planned": planned, "items_committed": n,
            "items_done": int(done.sum()), "items_failed": int(failed.sum()), "items_pending": max(0, planned - n),
            "in_flight": planned > n, "masklets": masklets, "shards_planned": len(run.plan.shard_ids),
            "shards_committed": len([k for k in shard_keys if k >= 0]), "devices": device_keys,
            "first_finished_at": _iso(float(fin_t.min())) if len(fin_t) else None,
            "last_finished_at": _iso(float(fin_t.max())) if len(fin_t) else None,
            "frames_done": int(np.nansum(frames[done])),
        },
        "thresholds": asdict(qa),
        "latency": latency,
        "over_time": _over_time(a, finished, done, failed, ms_total, time_bins),
        "by_shard": by_shard,
        "by_device": by_device,
        "scores": scores_out,
        "drift": {"early_items": tenth, "late_items": tenth, "min_masklets": DRIFT_MIN_MASKLETS,
                  "statistic": "two-sample Kolmogorov-Smirnov D on histograms",
                  "flagged": [{"key": x["key"], "value": x["value"], "message": x["message"]} for x in drift_alerts]},
        "failures": failures,
        "masklets_per_item": {**percentiles(per_item), "max": _num(np.nanmax(per_item)) if len(per_item) else None,
                              "histogram": {"edges": LENGTH_EDGES[:-1].tolist() + [None],
                                            "counts": histogram(per_item, LENGTH_EDGES.astype(np.float64))}},
        "area_share": {"edges": AREA_EDGES.tolist(), "counts": area_counts.tolist(), "null": area_null},
        "frames_visible": {"edges": LENGTH_EDGES[:-1].tolist() + [None], "counts": length_counts.tolist()},
        "flags": {"counts": flag_counts, "unflagged": unflagged, "not_flagged_yet": flags_null,
                  "by_number_of_flags": {str(k): v for k, v in sorted(by_flag_count.items())}},
        "coverage": {"mean": percentiles(a["coverage_mean"][done]), "min": percentiles(a["coverage_min"][done]),
                     "histogram": {"edges": COVERAGE_EDGES.tolist(),
                                   "counts": histogram(a["coverage_mean"][done], COVERAGE_EDGES)}},
        "alerts": alerts,
        "top_masklets": [_jsonable(r) for r in top.rows],
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
