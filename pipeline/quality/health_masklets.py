"""The masklets half of run health (pipeline/quality/health.py): the masklets table's columns and bins, and
`MaskletFold`, which scans that table once in record batches and keeps only fixed-size aggregates.

The masklets table is the one that grows without bound (one row per object: 2 million for 100,000 items), so
it is never held whole: each batch is folded into fixed-bin score histograms per group (run, early/late tenth
of items, each shard and device: `ItemGroups` says which item is in which), histograms of area share and
length, counters (flags, scores below qa.low_score) and a running top-N by review priority (`TopN`). What the
fold holds is a few histograms per group, whatever the number of rows.

This module imports nothing from health.py; health.py imports from it and turns the fold into the report's
sections (medians, drift, alerts). It was split out when run_health's one 200-line function held the set-up,
the fold and the report together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.quality.flags import FLAG_NAMES

SCORES = ("predicted_iou", "stability_score", "object_score_mean")
SCORE_BINS = 1000  # run, early, late and per-device score histograms over [0, 1]
SHARD_SCORE_BINS = 100  # per-shard histograms (thousands of shards): drift to within 0.01 of a score
AREA_EDGES = np.concatenate([[0.0], np.logspace(-5, 0, 21)])  # area share: 0, then log bins 1e-5 .. 1
LENGTH_EDGES = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 2**31 - 1], dtype=np.int64)
MASKLET_COLUMNS = ["item_id", "masklet_id", "object_id", *SCORES, "area_share_mean", "frames_visible", "flags",
                   "review_priority"]
TOP_COLUMNS = ["masklet_id", "item_id", "object_id", "review_priority", "flags", *SCORES, "iou_min", "iou_mean",
               "frames_visible", "first_frame", "last_frame", "area_share_mean"]


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


@dataclass(frozen=True, eq=False)
class ItemGroups:
    """Which groups each item's masklets are counted in, as codes aligned with the items table's rows."""

    tenth: int  # items in each of the early and late tenth of done items (0 when fewer than 2 are done)
    phase: np.ndarray  # 0: middle, 1: early tenth, 2: late tenth (by finished_at)
    shard_ids: np.ndarray  # each item's shard_id, -1 where unknown
    shard_keys: list[int]  # the sorted distinct shard_ids; shard_code indexes them
    shard_code: np.ndarray
    device_keys: list[str]  # the sorted device names ("cuda cuda-sm90"); device_code indexes them
    device_code: np.ndarray

    @classmethod
    def of(cls, done: np.ndarray, finished_at: np.ndarray, shard_id: np.ndarray, device_keys: list[str],
           device_code: np.ndarray) -> ItemGroups:
        order = np.flatnonzero(done)
        order = order[np.argsort(finished_at[order], kind="stable")]
        tenth = max(1, len(order) // 10) if len(order) >= 2 else 0
        phase = np.zeros(len(done), dtype=np.int64)
        if tenth:
            phase[order[:tenth]] = 1
            phase[order[-tenth:]] = 2
        shard_ids = np.nan_to_num(shard_id, nan=-1).astype(np.int64)
        shard_keys = np.unique(shard_ids).tolist()
        shard_code = np.searchsorted(np.asarray(shard_keys, dtype=np.int64), shard_ids).astype(np.int64)
        return cls(tenth, phase, shard_ids, shard_keys, shard_code, device_keys, device_code)


# ---------------------------------------------------------------- the fold

class ScoreGroups:
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


def column_values(batch, name: str, dtype=np.float64) -> np.ndarray:
    """A column of a batch or table as a numpy array of `dtype` (nulls become NaN for float dtypes)."""
    return np.asarray(batch.column(name).to_numpy(zero_copy_only=False), dtype=dtype)


def _scores(batch) -> dict[str, np.ndarray]:
    out = {name: column_values(batch, name) for name in SCORES}
    out["object_score_mean"] = sigmoid(out["object_score_mean"])
    return out


class MaskletFold:
    """The masklets table folded batch by batch (`add`) into what the report needs, in memory that does not
    grow with the rows: score histograms per group (run_hist: 0 run, 1 early, 2 late; dev_hist, shard_hist),
    score counts, sums and counts below low_score, area share and length histograms, flag counts and the top
    masklets by review priority."""

    def __init__(self, item_ids: pa.Array, groups: ItemGroups, low_score: float, top_n: int):
        self.item_ids = item_ids
        self.groups = groups
        self.low_score = low_score
        self.low32 = np.float32(low_score)  # float32 scores compared at float32, like the low_score flag
        self.run_hist = ScoreGroups(SCORE_BINS)  # groups: 0 run, 1 early, 2 late
        self.dev_hist = ScoreGroups(SCORE_BINS)
        self.shard_hist = ScoreGroups(SHARD_SCORE_BINS)
        self.score_n = {s: 0 for s in SCORES}
        self.score_sum = {s: 0.0 for s in SCORES}
        self.score_low = {s: 0 for s in SCORES}
        self.area_counts = np.zeros(len(AREA_EDGES) - 1, dtype=np.int64)
        self.area_null = 0
        self.length_counts = np.zeros(len(LENGTH_EDGES) - 1, dtype=np.int64)
        self.flag_counts = {f: 0 for f in FLAG_NAMES}
        self.by_flag_count: dict[int, int] = {}
        self.unflagged = self.flags_null = 0
        self.masklets = 0
        self.masklets_per_shard = np.zeros(len(groups.shard_keys), dtype=np.int64)
        self.top = TopN(top_n)

    def add(self, batch: pa.Table) -> None:
        g = self.groups
        self.masklets += len(batch)
        found = pc.index_in(batch.column("item_id"), value_set=self.item_ids)
        item = np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
        known = item >= 0
        row = np.where(known, item, 0)
        phase = np.where(known, g.phase[row], -1)
        shard = np.where(known, g.shard_code[row], -1)
        device = np.where(known, g.device_code[row], -1)
        shards = len(g.shard_keys)
        self.masklets_per_shard += np.bincount(shard[shard >= 0], minlength=shards)[:shards]
        self._add_scores(batch, phase, shard, device)
        self._add_shapes(batch)
        self._add_flags(batch)
        self.top.add(batch)

    def _add_scores(self, batch: pa.Table, phase: np.ndarray, shard: np.ndarray, device: np.ndarray) -> None:
        scores = _scores(batch)
        everyone = np.zeros(len(batch), dtype=np.int64)
        early_late = np.where(phase > 0, phase, -1)
        devices, shards = max(1, len(self.groups.device_keys)), max(1, len(self.groups.shard_keys))
        for k, name in enumerate(SCORES):
            v = scores[name]
            finite = np.isfinite(v)
            self.score_n[name] += int(finite.sum())
            self.score_sum[name] += float(v[finite].sum())
            if name == "object_score_mean":  # a sigmoid of a logit, computed here: compared in float64
                self.score_low[name] += int((v[finite] < self.low_score).sum())
            else:
                self.score_low[name] += int((column_values(batch, name, np.float32) < self.low32).sum())
            fine = score_bin(v, SCORE_BINS)
            self.run_hist.add(everyone, k, fine, 3)
            self.run_hist.add(early_late, k, fine, 3)
            self.dev_hist.add(device, k, fine, devices)
            self.shard_hist.add(shard, k, score_bin(v, SHARD_SCORE_BINS), shards)

    def _add_shapes(self, batch: pa.Table) -> None:
        area = column_values(batch, "area_share_mean")
        self.area_null += int((~np.isfinite(area)).sum())
        self.area_counts += np.asarray(histogram(area, AREA_EDGES), dtype=np.int64)
        length = column_values(batch, "frames_visible")
        self.length_counts += np.asarray(histogram(length, LENGTH_EDGES.astype(np.float64)), dtype=np.int64)

    def _add_flags(self, batch: pa.Table) -> None:
        flags = batch.column("flags")
        self.flags_null += flags.null_count
        lengths = np.asarray(pc.list_value_length(flags).to_numpy(zero_copy_only=False), dtype=np.float64)
        self.unflagged += int((lengths == 0).sum())
        for k, c in zip(*np.unique(lengths[np.isfinite(lengths)].astype(np.int64), return_counts=True)):
            self.by_flag_count[int(k)] = self.by_flag_count.get(int(k), 0) + int(c)
        flat = pc.list_flatten(flags)
        if len(flat):
            for entry in pc.value_counts(flat).to_pylist():
                self.flag_counts[entry["values"]] = self.flag_counts.get(entry["values"], 0) + int(entry["counts"])


def fold_masklets(dataset, item_ids: pa.Array, groups: ItemGroups, low_score: float, top_n: int,
                  batch_rows: int) -> MaskletFold:
    """Scan the masklets `dataset` (only the columns used, `batch_rows` rows at a time, one batch read ahead)
    into a MaskletFold; `item_ids` are the items table's ids, in the order `groups` is aligned with."""
    fold = MaskletFold(item_ids, groups, low_score, top_n)
    columns = list(dict.fromkeys(MASKLET_COLUMNS + TOP_COLUMNS))
    batches = dataset.to_batches(columns=columns, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1)
    for batch in _coalesce(batches, batch_rows):
        fold.add(batch)
    return fold
