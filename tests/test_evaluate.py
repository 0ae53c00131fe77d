"""masklet evaluate: per-frame J and F, the sav and davis semantics, matching, the layouts, the CLI.

Oracles: vos-benchmark (PyPI; the same per-frame arithmetic and `sav` aggregation as sam2's SA-V evaluator,
DAVIS layout), a straightforward full-frame J and F written here, and the worked numbers of
/work/shared/notes/formats-and-metrics.md (section 9) for the davis aggregation (davis2017-evaluation is not
on PyPI).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.evaluate import evaluate
from pipeline.evaluate.metrics import (
    boundary_map,
    boundary_radius,
    disk,
    f_measure,
    jaccard,
)
from pipeline.evaluate.semantics import counted_frames, score_object

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- an independent per-frame J and F
def plain_j(p, g):
    inter = np.logical_and(p, g).sum()
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else inter / union


def plain_f(p, g):
    """Full-frame F, dilation by explicit offsets (no OpenCV, no crop)."""
    h, w = g.shape
    r = math.ceil(0.008 * math.sqrt(h * h + w * w))

    def bmap(m):
        m = m.astype(bool)
        b = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                if y == h - 1 and x == w - 1:
                    continue
                if y == h - 1:
                    b[y, x] = m[y, x] != m[y, x + 1]
                elif x == w - 1:
                    b[y, x] = m[y, x] != m[y + 1, x]
                else:
                    b[y, x] = m[y, x] != m[y, x + 1] or m[y, x] != m[y + 1, x] or m[y, x] != m[y + 1, x + 1]
        return b

    def dilate(b):
        out = np.zeros_like(b)
        ys, xs = np.nonzero(b)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dy * dy + dx * dx <= r * r:
                    yy, xx = ys + dy, xs + dx
                    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                    out[yy[ok], xx[ok]] = True
        return out

    pb, gb = bmap(p), bmap(g)
    n_p, n_g = pb.sum(), gb.sum()
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    prec = (pb & dilate(gb)).sum() / n_p
    rec = (gb & dilate(pb)).sum() / n_g
    return 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)


def edge_pairs(h=30, w=41, seed=0):
    rng = np.random.default_rng(seed)
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    one = empty.copy()
    one[7, 9] = True
    corner = empty.copy()
    corner[-1, -1] = True
    border = empty.copy()
    border[:, -4:] = True
    bottom = empty.copy()
    bottom[-3:, 5:20] = True
    blob = empty.copy()
    blob[5:20, 8:30] = True
    shifted = np.roll(blob, (2, -3), axis=(0, 1))
    noisy = blob ^ (rng.random((h, w)) < 0.05)
    pairs = [(empty, empty), (empty, full), (full, empty), (full, full), (one, one), (one, empty),
             (empty, one), (one, corner), (corner, corner), (border, blob), (bottom, border), (blob, shifted),
             (noisy, blob), (blob, noisy), (full, blob), (blob, full)]
    for _ in range(6):
        a = rng.random((h, w)) < rng.uniform(0.05, 0.6)
        b = rng.random((h, w)) < rng.uniform(0.05, 0.6)
        pairs.append((a, b))
    return pairs


@pytest.mark.parametrize("shape", [(30, 41), (48, 64), (130, 90)])
def test_per_frame_j_and_f_equal_a_plain_computation(shape):
    pairs = edge_pairs(*shape)
    p = np.stack([a for a, _ in pairs])
    g = np.stack([b for _, b in pairs])
    j, f = jaccard(p, g), f_measure(p, g)
    for i, (a, b) in enumerate(pairs):
        assert j[i] == pytest.approx(plain_j(a, b), abs=1e-12), i
        assert f[i] == pytest.approx(plain_f(a, b), abs=1e-12), i


def test_per_frame_j_and_f_equal_vos_benchmark():
    from vos_benchmark.evaluator import Evaluator

    pairs = edge_pairs(48, 64, seed=3)
    ours_j = jaccard(np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs]))
    ours_f = f_measure(np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs]))
    for i, (a, b) in enumerate(pairs):
        ev = Evaluator()
        # id 1 on both sides, fed after a frame where it is present, so the frame always counts
        ev.feed_frame(np.ones((48, 64), np.uint8), np.ones((48, 64), np.uint8))
        ev.feed_frame(a.astype(np.uint8), b.astype(np.uint8))
        assert ours_j[i] == pytest.approx(ev.object_iou[1][1], abs=1e-12), i
        assert ours_f[i] == pytest.approx(ev.boundary_f[1][1], abs=1e-12), i


def test_boundary_radius_and_disk():
    assert [boundary_radius(*s) for s in [(48, 64), (480, 854), (848, 480), (720, 1280), (1080, 1920),
                                          (2160, 3840)]] == [1, 8, 8, 12, 18, 36]
    from skimage.morphology import disk as sk_disk

    for r in (1, 2, 8, 12):
        assert np.array_equal(disk(r), sk_disk(r).astype(np.uint8))
    m = np.zeros((4, 5), bool)
    m[1:3, 1:4] = True
    assert boundary_map(m).sum() == boundary_map(m.copy()).sum()


# ---------------------------------------------------------------- the note's worked numbers (section 9)
def test_aggregation_reproduces_the_notes_worked_numbers():
    """Fixture of section 4a: 5 evaluated frames; object 1 J = 9/11, F = 0.525 on each; object 2 absent in GT
    on evaluated frames 1-2, present on 3-5, predicted only on frame 5 (J = 9/11, F = 1 there). The masks of
    the note's fixture are not given (no rectangle pair on 48x64 gives J = 9/11 with F = 0.525), so the per-frame
    values its numbers imply are fed to the aggregation; the per-frame arithmetic is tested above."""
    j1, f1 = np.full(5, 9 / 11), np.full(5, 0.525)
    gt2 = np.array([False, False, True, True, True])
    pred2 = np.array([False, False, False, False, True])
    j2 = np.where(gt2 | pred2, np.where(pred2 & gt2, 9 / 11, 0.0), 1.0)
    f2 = np.where(gt2 | pred2, np.where(pred2 & gt2, 1.0, 0.0), 1.0)
    present1 = np.ones(5, bool)
    sav = [score_object("sav", j1, f1, counted_frames("sav", present1, present1)),
           score_object("sav", j2, f2, counted_frames("sav", gt2, pred2))]
    assert sav[0].j == pytest.approx(81.81818181818181, abs=1e-9) and sav[0].f == pytest.approx(52.5, abs=1e-9)
    assert sav[1].j == pytest.approx(27.272727272727277, abs=1e-9)
    assert sav[1].f == pytest.approx(33.33333333333333, abs=1e-9)
    j = (sav[0].j + sav[1].j) / 2
    f = (sav[0].f + sav[1].f) / 2
    assert j == pytest.approx(54.54545454545455, abs=1e-9) and f == pytest.approx(42.916666666666664, abs=1e-9)
    assert (j + f) / 2 == pytest.approx(48.73106060606061, abs=1e-9)

    davis = [score_object("davis", j1, f1, counted_frames("davis", present1, present1)),
             score_object("davis", j2, f2, counted_frames("davis", gt2, pred2))]
    mean = lambda name: sum(getattr(s, name) for s in davis) / 2 / 100
    assert (mean("j") + mean("f")) / 2 == pytest.approx(0.626705, abs=1e-6)
    assert mean("j") == pytest.approx(0.690909, abs=1e-6) and mean("f") == pytest.approx(0.5625, abs=1e-6)
    assert mean("j_recall") == pytest.approx(0.8, abs=1e-6) and mean("f_recall") == pytest.approx(0.8, abs=1e-6)
    assert mean("j_decay") == pytest.approx(0.295455, abs=1e-6) and mean("f_decay") == pytest.approx(0.25, abs=1e-6)


# ---------------------------------------------------------------- synthetic GT / prediction folders
def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128] + [0] * (768 - 15))
    im.save(path)


def synthetic_video(rng, frames=9, h=40, w=56, objects=3, step=1):
    """(gt, pred) id maps (T, H, W) with the edge cases: an object appearing late, one-pixel objects, masks on
    the border, an empty and a full frame in the prediction, a predicted-only id."""
    gt = np.zeros((frames, h, w), np.uint8)
    pred = np.zeros_like(gt)
    for t in range(frames):
        y, x = 3 + t % 4, 4 + 2 * t
        gt[t, y:y + 12, x:x + 15] = 1
        pred[t, y + rng.integers(0, 3):y + 11, x + rng.integers(-1, 2):x + 16] = 1
        gt[t, h - 6:, w - 9:] = 2  # border, bottom-right corner
        if t % 3:
            pred[t, h - 5:, w - 10:] = 2
        if objects >= 3 and t >= frames // 2:  # appears late, one pixel on some frames
            if t % 2:
                gt[t, 30, 5] = 3
                pred[t, 30, 5 + (t % 4 == 1)] = 3
            else:
                gt[t, 25:29, 2:9] = 3
                pred[t, 25:30, 2:8] = 3
    pred[2] = 0  # an empty prediction
    pred[3, :, :] = 1  # a full one
    pred[4, 0:2, 0:3] = 4  # an id GT never has
    return gt, pred


def write_davis(root: Path, videos: dict, step=1):
    for name, (gt, pred) in videos.items():
        for t in range(gt.shape[0]):
            save_png(root / "gt" / "Annotations" / "480p" / name / f"{t * step:05d}.png", gt[t])
            save_png(root / "pred" / name / f"{t * step:05d}.png", pred[t])


def vos_benchmark_scores(gt_root: Path, pred_root: Path):
    from vos_benchmark.benchmark import benchmark

    jf, j, f, objects = benchmark([str(gt_root)], [str(pred_root)], num_processes=1, verbose=False)
    return jf[0], j[0], f[0], objects[0]


def object_rows(ev):
    return {(r["video"], r["gt_object"]): r for r in ev.table.to_pylist() if r["level"] == "object"}


def test_sav_semantics_equal_vos_benchmark_on_davis_layout(tmp_path):
    rng = np.random.default_rng(7)
    videos = {f"v{i}": synthetic_video(rng, frames=7 + i) for i in range(3)}
    write_davis(tmp_path, videos)
    gt_root = tmp_path / "gt" / "Annotations" / "480p"
    ev = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), semantics="sav", matched_ids=True, workers=1)
    jf, j, f, ref = vos_benchmark_scores(gt_root, tmp_path / "pred")
    overall = ev.table.to_pylist()[-1]
    assert overall["JF"] == pytest.approx(jf, abs=1e-6)
    assert overall["J"] == pytest.approx(j, abs=1e-6) and overall["F"] == pytest.approx(f, abs=1e-6)
    rows = object_rows(ev)
    expected = {(v, obj - 1): (ious[obj], fs[obj]) for v, (ious, fs) in ref.items() for obj in ious}
    assert set(rows) == set(expected)
    for key, (rj, rf) in expected.items():
        assert rows[key]["J"] == pytest.approx(rj, abs=1e-6), key
        assert rows[key]["F"] == pytest.approx(rf, abs=1e-6), key


def test_sav_layout_equals_vos_benchmark_per_object(tmp_path):
    """SA-V layout (one binary PNG per object, overlapping objects, every 4th frame annotated): sam2's evaluator
    scores each object folder alone, which is vos-benchmark on a one-object DAVIS video per object."""
    rng = np.random.default_rng(11)
    gt, pred = synthetic_video(rng, frames=10)
    overlap_gt = gt == 1
    overlap_gt[:, 8:20, 10:30] |= True  # object 3 covers object 0 partly: only the SA-V layout can hold it
    sav = tmp_path / "sav"
    objects = {0: (gt == 1, pred == 1), 1: (gt == 2, pred == 2), 2: (gt == 3, pred == 3), 3: (overlap_gt, pred == 1)}
    for k, (g, p) in objects.items():
        for t in range(g.shape[0]):
            save_png(sav / "Annotations_6fps" / "vid" / f"{k:03d}" / f"{4 * t:05d}.png", g[t])
            save_png(sav / "pred" / "vid" / f"{k:03d}" / f"{4 * t:05d}.png", p[t])
            save_png(sav / "oracle_gt" / f"o{k}" / f"{4 * t:05d}.png", g[t])
            save_png(sav / "oracle_pred" / f"o{k}" / f"{4 * t:05d}.png", p[t])
    ev = evaluate(str(sav / "pred"), str(sav), matched_ids=True, workers=1)
    assert ev.semantics == "sav"  # SA-V GT: its own semantics by default
    jf, _, _, ref = vos_benchmark_scores(sav / "oracle_gt", sav / "oracle_pred")
    rows = object_rows(ev)
    for k in objects:
        (rj,), (rf,) = ref[f"o{k}"][0].values(), ref[f"o{k}"][1].values()
        assert rows[("vid", k)]["J"] == pytest.approx(rj, abs=1e-6)
        assert rows[("vid", k)]["F"] == pytest.approx(rf, abs=1e-6)
    assert ev.table.to_pylist()[-1]["JF"] == pytest.approx(jf, abs=1e-6)


def test_davis_semantics_count_every_frame(tmp_path):
    rng = np.random.default_rng(5)
    gt, pred = synthetic_video(rng, frames=9)
    gt[0, 30, 5] = 3  # davis2017 takes the object count from the first frame: make object 3 count
    write_davis(tmp_path, {"v": (gt, pred)})
    ev = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), semantics="davis", matched_ids=True, workers=1)
    rows = object_rows(ev)
    assert sorted(k for _, k in rows) == [0, 1, 2]
    for k in range(3):  # every evaluated frame counts, both-empty ones as 1
        g, p = gt[1:-1] == k + 1, pred[1:-1] == k + 1
        j = np.array([plain_j(a, b) for a, b in zip(p, g)])
        f = np.array([plain_f(a, b) for a, b in zip(p, g)])
        assert rows[("v", k)]["J"] == pytest.approx(j.mean() * 100, abs=1e-9)
        assert rows[("v", k)]["F"] == pytest.approx(f.mean() * 100, abs=1e-9)
        assert rows[("v", k)]["J_recall"] == pytest.approx((j > 0.5).mean() * 100, abs=1e-9)
        assert rows[("v", k)]["frames"] == 7


def test_matching_recovers_permuted_ids_and_counts_the_rest(tmp_path):
    rng = np.random.default_rng(9)
    gt, pred = synthetic_video(rng, frames=8)
    permuted = np.zeros_like(pred)
    for old, new in {1: 3, 2: 1, 3: 5, 4: 6}.items():
        permuted[pred == old] = new
    extra = np.zeros_like(permuted, dtype=bool)
    extra[:, 15:18, 40:44] = True
    permuted[extra & (permuted == 0)] = 2  # a masklet no GT object has
    write_davis(tmp_path, {"v": (gt, pred)})
    write_davis(tmp_path / "perm", {"v": (gt, permuted)})
    by_id = object_rows(evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), semantics="sav", matched_ids=True))
    ev = evaluate(str(tmp_path / "perm" / "pred"), str(tmp_path / "gt"), semantics="sav", workers=1)
    matched = object_rows(ev)
    assert {k: r["masklet"] for (_, k), r in matched.items()} == {0: 2, 1: 0, 2: 4}
    for key, row in by_id.items():
        assert matched[key]["J"] == pytest.approx(row["J"], abs=1e-9)
        assert matched[key]["F"] == pytest.approx(row["F"], abs=1e-9)
    overall = ev.table.to_pylist()[-1]
    assert (overall["gt_objects"], overall["matched_objects"], overall["masklets"]) == (3, 3, 5)
    assert overall["precision"] == pytest.approx(60.0) and overall["recall"] == pytest.approx(100.0)


def test_unmatched_gt_object_scores_as_an_empty_prediction(tmp_path):
    rng = np.random.default_rng(2)
    gt, pred = synthetic_video(rng, frames=8)
    pred[pred == 2] = 0  # object 2 never predicted
    write_davis(tmp_path, {"v": (gt, pred)})
    ev = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), semantics="sav", workers=1)
    rows = object_rows(ev)
    assert rows[("v", 1)]["masklet"] is None and rows[("v", 1)]["J"] == 0.0
    assert ev.table.to_pylist()[-1]["recall"] == pytest.approx(200 / 3)


def test_videos_in_a_process_pool_equal_one_process(tmp_path):
    rng = np.random.default_rng(4)
    write_davis(tmp_path, {f"v{i}": synthetic_video(rng, frames=6) for i in range(4)})
    one = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), workers=1)
    two = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), workers=2)
    assert one.table.equals(two.table)


# ---------------------------------------------------------------- the command line
def masklet(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=False, capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_cli_prints_writes_parquet_and_the_random_weights_label(tmp_path):
    rng = np.random.default_rng(1)
    write_davis(tmp_path, {"v": synthetic_video(rng, frames=6)})
    (tmp_path / "pred" / "export.json").write_text(json.dumps(
        {"format": "davis-png", "random_weights": True, "label": "RANDOM WEIGHTS: plumbing only"}))
    out = tmp_path / "results.parquet"
    res = masklet("evaluate", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--matched-ids", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "RANDOM WEIGHTS: plumbing only"
    assert "overall: J&F" in res.stdout
    table = pq.read_table(out)
    assert table.column("level").to_pylist()[-1] == "overall"
    assert all(table.column("random_weights").to_pylist())


@pytest.mark.parametrize("case", ["no-layout", "missing-video"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, case):
    rng = np.random.default_rng(1)
    write_davis(tmp_path, {"v": synthetic_video(rng, frames=5), "w": synthetic_video(rng, frames=5)})
    if case == "no-layout":
        (tmp_path / "empty").mkdir()
        res = masklet("evaluate", str(tmp_path / "pred"), "--gt", str(tmp_path / "empty"))
        assert "no recognised ground-truth layout" in res.stderr
    else:
        import shutil

        shutil.rmtree(tmp_path / "pred" / "w")
        res = masklet("evaluate", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"))
        assert "video 'w'" in res.stderr and "missing" in res.stderr
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_benchmark_quick_runs(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_evaluate
    finally:
        sys.path.pop(0)
    assert bench_evaluate.main(["--quick", "--workers", "2"]) == 0
    assert "vos-benchmark" in capsys.readouterr().out
