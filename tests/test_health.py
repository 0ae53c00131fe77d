"""Run health (pipeline/quality/health.py): each aggregate against a hand computation on small committed runs
(fabricated through the store, every column filled, then the columns under test set by hand)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from benchmarks.fabricate_run import Spec, fabricate_run, flag_vectorised
from pipeline import open_run
from pipeline.config import QAConfig
from pipeline.quality import health
from pipeline.quality.health import (TopN, error_kind, hist_quantile, ks_from_histograms, ks_statistic,
                                     percentiles, resolution_bucket, run_health)
from pipeline.store import metadata


def _set(table: pa.Table, **columns) -> pa.Table:
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))
    return table


@pytest.fixture()
def five_items(tmp_path):
    """Five done items, one shard: ms per frame (total) 100..500, sizes in known buckets, 4 masklets each."""
    def edit(shard_id, t):
        frames = [10, 20, 10, 40, 5]
        total_ms = [100, 200, 300, 400, 500]
        items = _set(t["items"], num_frames=frames, seconds_total=[m * f / 1000 for m, f in zip(total_ms, frames)],
                     width=[640, 1280, 1280, 1920, 3840], height=[360, 720, 720, 1080, 2160],
                     num_objects=[4] * 5, status=["done"] * 5, error=[None] * 5)
        m = pa.concat_tables([t["masklets"]] * 20).slice(0, 20)
        ids = [items["item_id"][k // 4].as_py() for k in range(20)]
        m = _set(m, item_id=ids, object_id=[k % 4 for k in range(20)],
                 masklet_id=[f"{i}/{k % 4}" for k, i in enumerate(ids)])
        return {**t, "items": items, "masklets": m}

    out = tmp_path / "run"
    fabricate_run(out, Spec(items=5, masklets=20, shards=1, fail_share=0.0, retry_share=0.0), edit=edit)
    return out


def test_percentiles_by_hand():
    p = percentiles([100, 200, 300, 400, 500, np.nan])
    assert p == {"count": 5, "mean": 300.0, "p50": 300.0, "p95": 480.0, "p99": 496.0}
    assert percentiles([]) == {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}


def test_resolution_buckets_by_shorter_side():
    assert resolution_bucket([360, 480, 481, 720, 1080, 1081, 2160, 0]).tolist() == [0, 0, 1, 1, 2, 3, 3, -1]


def test_latency_percentiles_and_buckets_of_a_run(five_items):
    h = run_health(open_run(five_items))
    total = h["latency"]["per_frame_ms"]["total"]
    assert total["all"]["p50"] == pytest.approx(300.0)
    assert total["all"]["p95"] == pytest.approx(480.0)
    assert total["all"]["p99"] == pytest.approx(496.0)
    by = total["by_bucket"]
    assert by["<=480p"]["count"] == 1 and by["<=480p"]["p50"] == pytest.approx(100.0)
    assert by["<=720p"]["count"] == 2 and by["<=720p"]["p50"] == pytest.approx(250.0)
    assert by["<=720p"]["p95"] == pytest.approx(200 + 0.95 * 100)
    assert by["<=1080p"]["p50"] == pytest.approx(400.0) and by[">1080p"]["p50"] == pytest.approx(500.0)
    assert h["latency"]["per_item_s"]["total"]["p50"] == pytest.approx(np.percentile([1, 4, 3, 16, 2.5], 50))
    json.dumps(h, allow_nan=False)  # JSON as it is


def test_frame_budget_alert_fires_just_over_and_not_just_under(five_items):
    run = open_run(five_items)
    p95 = 200 + 0.95 * 100  # the <=720p bucket; the others have one item each: p95 = its value
    over = run_health(run, qa=QAConfig(frame_budget_ms=p95 - 0.01))
    under = run_health(run, qa=QAConfig(frame_budget_ms=p95 + 0.01))
    keys = lambda h: {a["key"] for a in h["alerts"] if a["kind"] == "frame_budget"}  # noqa: E731
    assert "latency.per_frame_ms.total.by_bucket.<=720p.p95" in keys(over)
    assert "latency.per_frame_ms.total.by_bucket.<=720p.p95" not in keys(under)


def test_ks_on_two_known_samples():
    # F_a: 1/3, 2/3, 1, 1, 1 and F_b: 0, 1/4, 1/2, 3/4, 1 at x = 1..5: the largest gap is 1/2 at x = 3
    assert ks_statistic([1, 2, 3], [2, 3, 4, 5]) == pytest.approx(0.5)
    assert ks_statistic([0.1, 0.2], [0.8, 0.9]) == 1.0
    assert ks_statistic([0.3, 0.5], [0.5, 0.3]) == 0.0
    assert ks_statistic([], [1.0]) is None
    # on histograms: the exact D of values on the bins' lower edges
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 20, 300) / 20, rng.integers(3, 20, 200) / 20
    ha = np.bincount((a * 20).astype(int), minlength=20)
    hb = np.bincount((b * 20).astype(int), minlength=20)
    assert ks_from_histograms(ha, hb) == pytest.approx(ks_statistic(a, b))


def test_hist_quantile_is_within_a_bin_of_the_median():
    v = np.array([0.1, 0.2, 0.3, 0.4, 0.95])
    counts = np.bincount(np.floor(v * 1000).astype(int), minlength=1000)
    assert abs(hist_quantile(counts, np.linspace(0, 1, 1001), 0.5) - 0.3) <= 1e-3


def _scored_run(tmp_path, early: float, late: float, items: int = 20, per_item: int = 30, low=None):
    """`items` done items, `per_item` masklets each: predicted IoU `early` for the first half in finish
    order, `late` for the second (or the values `low` cycled over all masklets)."""
    def edit(shard_id, t):
        ids = t["items"]["item_id"].to_pylist()
        order = np.argsort(t["items"]["finished_at"].cast(pa.int64()).to_numpy())
        first_half = {ids[k] for k in order[: items // 2]}
        row = t["masklets"].slice(0, 1).to_pylist()[0]
        ml = []
        for i in ids:
            for o in range(per_item):
                score = low[len(ml) % len(low)] if low is not None else early if i in first_half else late
                ml.append({**row, "item_id": i, "object_id": o, "masklet_id": f"{i}/{o}", "predicted_iou": score,
                           "stability_score": 0.95, "object_score_mean": 8.0})
        base = pa.schema([f for f in metadata.MASKLETS_SCHEMA if f.name not in ("flags", "review_priority")])
        m = pa.Table.from_pylist([{k: r[k] for k in base.names} for r in ml], schema=base)
        return {**t, "masklets": flag_vectorised(m, QAConfig()),
                "items": _set(t["items"], status=["done"] * items, error=[None] * items,
                              num_objects=[per_item] * items)}

    out = tmp_path / "scored"
    fabricate_run(out, Spec(items=items, masklets=items * per_item, shards=1, fail_share=0.0), edit=edit)
    return out


def test_score_median_and_low_share_alerts_at_their_limits(tmp_path):
    # 0.7 stored as float32 is not below qa.low_score = 0.7 (as the low_score flag): share below = 2/4
    out = _scored_run(tmp_path, 0, 0, low=[0.5, 0.69, 0.7, 0.9])
    run = open_run(out)
    h = run_health(run)
    s = h["scores"]["predicted_iou"]
    assert s["share_below_low"] == 0.5
    assert s["count"] == 600 and s["null"] == 0
    assert abs(s["median"] - 0.695) <= 0.006  # between 0.69 and 0.7, to a bin
    kinds = lambda h: {a["key"] for a in h["alerts"]}  # noqa: E731
    assert "scores.predicted_iou.share_below_low" in kinds(run_health(run, qa=QAConfig(score_low_share_max=0.49)))
    assert "scores.predicted_iou.share_below_low" not in kinds(run_health(run, qa=QAConfig(score_low_share_max=0.5)))
    assert "scores.predicted_iou.median" in kinds(run_health(run, qa=QAConfig(score_median_min=0.71)))
    assert "scores.predicted_iou.median" not in kinds(run_health(run, qa=QAConfig(score_median_min=0.68)))


def test_drift_between_the_first_and_latest_tenth(tmp_path):
    run = open_run(_scored_run(tmp_path, early=0.9, late=0.5))
    h = run_health(run)
    assert h["drift"]["early_items"] == 2
    assert h["scores"]["predicted_iou"]["drift_early_late"] == 1.0
    assert h["scores"]["stability_score"]["drift_early_late"] == 0.0
    assert any(a["key"] == "scores.predicted_iou.drift_early_late" for a in h["alerts"])
    assert "scores.predicted_iou.drift_early_late" in [f["key"] for f in h["drift"]["flagged"]]
    quiet = run_health(run, qa=QAConfig(drift_max=1.0))  # alerts only over the limit
    assert not any(a["key"] == "scores.predicted_iou.drift_early_late" for a in quiet["alerts"])


def test_error_kinds():
    assert error_kind("ValueError: cannot decode x.mp4") == "ValueError"
    assert error_kind("pipeline.stages.decode.DecodeError: bad") == "DecodeError"
    assert error_kind("out of memory at every rung down to 1") == "out of memory"
    assert error_kind("timeout after 30 s") == "timeout"
    assert error_kind(None) == "unknown" and error_kind("  ") == "unknown"


def test_failures_retries_and_flag_counts_against_a_hand_count(tmp_path):
    out = tmp_path / "run"
    fabricate_run(out, Spec(items=60, masklets=600, shards=3, fail_share=0.2, retry_share=0.3))
    run = open_run(out)
    items = run.items.to_pylist()
    masklets = run.masklets.to_pylist()
    h = run_health(run)
    failed = [r for r in items if r["status"] == "failed"]
    assert h["failures"]["items_failed"] == len(failed) > 0
    assert h["failures"]["failure_rate"] == pytest.approx(len(failed) / len(items))
    by_kind = {}
    for r in failed:
        by_kind[error_kind(r["error"])] = by_kind.get(error_kind(r["error"]), 0) + 1
    assert {k["kind"]: k["count"] for k in h["failures"]["by_kind"]} == by_kind
    assert h["failures"]["retried"] == sum(r["attempts"] > 1 for r in items)
    counts = {}
    for r in masklets:
        for f in r["flags"]:
            counts[f] = counts.get(f, 0) + 1
    assert {k: v for k, v in h["flags"]["counts"].items() if v} == counts
    assert h["flags"]["unflagged"] == sum(not r["flags"] for r in masklets)
    assert h["run"]["masklets"] == len(masklets)
    done = [r for r in items if r["status"] == "done"]
    assert h["masklets_per_item"]["p50"] == pytest.approx(np.percentile([r["num_objects"] for r in done], 50))
    assert h["coverage"]["mean"]["p95"] == pytest.approx(np.percentile([r["coverage_mean"] for r in done], 95))
    assert sum(h["frames_visible"]["counts"]) == len(masklets)
    assert sum(h["area_share"]["counts"]) + h["area_share"]["null"] == len(masklets)
    assert sum(b["items_done"] + b["items_failed"] for b in h["over_time"]["bins"]) == len(items)
    assert sum(s["masklets"] for s in h["by_shard"]) == len(masklets)


def test_top_n_equals_a_full_sort(tmp_path):
    rng = np.random.default_rng(1)
    n = 1000
    pri = np.round(rng.uniform(0, 4, n), 1)  # many ties: the masklet id decides
    table = pa.table({"masklet_id": [f"m{k:04d}" for k in rng.permutation(n)], "item_id": ["i"] * n,
                      "object_id": pa.array(range(n), pa.int32()), "review_priority": pri,
                      "flags": [["tiny"]] * n})
    top = TopN(12)
    for batch in table.to_batches(max_chunksize=37):
        top.add(batch)
    full = sorted(table.to_pylist(), key=lambda r: (-r["review_priority"], r["masklet_id"]))[:12]
    assert [r["masklet_id"] for r in top.rows] == [r["masklet_id"] for r in full]
    # and in a run, in batches of 7 rows
    out = tmp_path / "run"
    fabricate_run(out, Spec(items=30, masklets=300, shards=2))
    run = open_run(out)
    h = run_health(run, top_n=12, batch_rows=7)
    rows = sorted(run.masklets.to_pylist(), key=lambda r: (-r["review_priority"], r["masklet_id"]))[:12]
    assert [r["masklet_id"] for r in h["top_masklets"]] == [r["masklet_id"] for r in rows]


def test_a_run_in_flight_counts_pending_items_from_the_plan(tmp_path):
    out = tmp_path / "run"
    plan = fabricate_run(out, Spec(items=40, masklets=200, shards=4), commit=[0, 2])
    h = run_health(open_run(out))
    committed = plan.shard_size(0) + plan.shard_size(2)
    assert h["run"]["items_committed"] == committed
    assert h["run"]["items_pending"] == 40 - committed and h["run"]["in_flight"] is True
    assert h["run"]["shards_committed"] == 2


def test_an_empty_run_gives_a_report_of_nothing(tmp_path):
    out = tmp_path / "run"
    fabricate_run(out, Spec(items=10, masklets=10, shards=2), commit=[])
    h = run_health(open_run(out))
    assert h["run"]["items_pending"] == 10 and h["run"]["masklets"] == 0
    assert h["scores"]["predicted_iou"]["median"] is None and h["alerts"] == []
    json.dumps(h, allow_nan=False)


def test_health_reads_the_masklets_in_batches_not_whole(tmp_path, monkeypatch):
    """Bounded memory: the masklets are never turned into one table (RunResults.masklets is not touched)."""
    out = tmp_path / "run"
    fabricate_run(out, Spec(items=20, masklets=200, shards=2))
    run = open_run(out)
    monkeypatch.setattr(type(run), "masklets", property(lambda self: pytest.fail("read the masklets whole")))
    assert run_health(run, batch_rows=16)["run"]["masklets"] > 0
    assert health.BATCH_ROWS <= 65_536


def test_the_thresholds_in_force_are_the_ones_masklet_qa_set(tmp_path):
    from pipeline.cli import main

    out = tmp_path / "run"
    fabricate_run(out, Spec(items=20, masklets=200, shards=2))
    assert run_health(open_run(out))["thresholds"]["score_median_min"] == QAConfig().score_median_min
    assert main(["qa", str(out), "--set", "qa.score_median_min=0.99"]) == 0
    h = run_health(open_run(out))
    assert h["thresholds"]["score_median_min"] == 0.99
    assert any(a["kind"] == "score_median" and a["limit"] == 0.99 for a in h["alerts"])
