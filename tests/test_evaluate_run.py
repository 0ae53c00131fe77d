"""`masklet evaluate` on a RUN FOLDER, end to end: a tiny DAVIS-layout dataset (conftest `make_davis_dataset`),
`manifest build` on its root (which links each sequence to its GT), a random-weight `masklet run` (conftest
`davis_run`), then evaluate the run (GT found from the run's manifest copy, predictions read from the Zarr
masks through `source_frames`), its sav-png and davis-png exports (`--gt ROOT`), and `--matched-ids`.

The scores are of RANDOM WEIGHTS: they check the plumbing (the same numbers whichever way the masks travel,
and equal to a direct computation), never segmentation quality."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.export.base import RANDOM_WEIGHTS_LABEL
from pipeline.results import open_run
from tests.conftest import DAVIS_FRAMES, DAVIS_SEQUENCES

TOL = 1e-9
EVALUATED = list(range(1, DAVIS_FRAMES - 1))  # annotated frames without the first and the last (davis semantics)


def _evaluate(capsys, *argv) -> tuple[str, list[dict]]:
    """Run `masklet evaluate ... -o results.parquet`; (stdout, rows)."""
    *args, dest = argv
    capsys.readouterr()  # drop what came before (an export's lines)
    assert main(["evaluate", *args, "-o", dest]) == 0
    return capsys.readouterr().out, pq.read_table(dest).to_pylist()


def _objects(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["video"], r["gt_object"]): r for r in rows if r["level"] == "object"}


def _export(out: str, fmt: str, dest: str) -> str:
    assert main(["export", out, "--format", fmt, "-o", dest]) == 0
    return dest


def _same_scores(a: dict, b: dict, masklet: bool = True) -> None:
    for col in ("J", "F", "JF", "J_recall", "J_decay", "F_recall", "F_decay", "frames"):
        assert a[col] == pytest.approx(b[col], abs=TOL), (a["video"], a["gt_object"], col, a[col], b[col])
    if masklet:
        assert a["masklet"] == b["masklet"]


@pytest.fixture(scope="module")
def run_eval(davis_run, tmp_path_factory):
    """Evaluate the run folder once (GT from the manifest): (stdout, rows, root, out)."""
    root, out = davis_run
    dest = str(tmp_path_factory.mktemp("eval") / "run.parquet")
    buf = io.StringIO()  # capsys is function-scoped: capture by hand in this module-scoped fixture
    with contextlib.redirect_stdout(buf):
        assert main(["evaluate", out, "-o", dest]) == 0
    return buf.getvalue(), pq.read_table(dest).to_pylist(), root, out


def test_the_manifest_links_each_sequence_to_its_gt(davis_run):
    root, out = davis_run
    table = pq.read_table(open_run(out).paths.manifest).to_pylist()
    assert sorted(r["item_id"] for r in table) == list(DAVIS_SEQUENCES)
    for r in table:
        assert r["gt_layout"] == "davis"
        assert os.path.normpath(r["gt_path"]) == os.path.join(root, "Annotations", "480p", r["item_id"])


def test_evaluate_run_folder_prints_the_label_first_and_writes_every_level(run_eval):
    stdout, rows, _, out = run_eval
    assert open_run(out).random_weights
    assert stdout.splitlines()[0] == RANDOM_WEIGHTS_LABEL  # above the numbers
    assert "overall: J&F" in stdout
    levels = [r["level"] for r in rows]
    assert levels.count("object") == 2 * len(DAVIS_SEQUENCES)  # two GT objects per sequence
    assert levels.count("video") == len(DAVIS_SEQUENCES)
    assert levels.count("overall") == 1 and levels[-1] == "overall"
    assert all(r["random_weights"] is True and r["semantics"] == "davis" for r in rows)
    for r in rows:
        if r["level"] == "object":
            assert r["frames"] == len(EVALUATED)
            assert 0.0 <= r["J"] <= 100.0 and 0.0 <= r["F"] <= 100.0
    videos = {r["video"]: r for r in rows if r["level"] == "video"}
    assert set(videos) == set(DAVIS_SEQUENCES)
    for v, r in videos.items():
        objs = [o for o in rows if o["level"] == "object" and o["video"] == v]
        assert r["J"] == pytest.approx(np.mean([o["J"] for o in objs]), abs=TOL)  # object-weighted
        assert r["masklets"] == open_run(out).masks(v).shape[0]


def test_run_j_equals_a_direct_computation_from_zarr_and_gt_pngs(run_eval):
    """J of every object row = mean over the evaluated frames of |G & P| / |G | P| (1 where both are empty),
    with P the matched masklet read from the run's Zarr at the decoded frame whose source frame is the GT
    frame, and G read from the GT PNG with PIL: no evaluator code involved."""
    _, rows, root, out = run_eval
    run = open_run(out)
    checked = 0
    for (video, key), r in _objects(rows).items():
        masks = run.masks(video)
        t_of = {int(s): t for t, s in enumerate(masks.attrs["source_frames"])}
        js = []
        for f in EVALUATED:
            with Image.open(os.path.join(root, "Annotations", "480p", video, f"{f:05d}.png")) as im:
                g = np.asarray(im) == key + 1
            p = (np.asarray(masks[r["masklet"], t_of[f]]) if r["masklet"] is not None
                 else np.zeros_like(g))
            union = np.logical_or(g, p).sum()
            js.append(1.0 if union == 0 else np.logical_and(g, p).sum() / union)
        assert r["J"] == pytest.approx(100.0 * np.mean(js), abs=TOL), (video, key)
        checked += r["masklet"] is not None
    assert checked >= 1  # at least one matched object was checked against real masklet pixels


def test_sav_png_export_evaluates_to_the_same_numbers(run_eval, tmp_path, capsys):
    _, rows_run, root, out = run_eval
    export = _export(out, "sav-png", str(tmp_path / "sav-png"))
    stdout, rows = _evaluate(capsys, export, "--gt", root, str(tmp_path / "e.parquet"))
    assert stdout.splitlines()[0] == RANDOM_WEIGHTS_LABEL  # from export.json
    a, b = _objects(rows_run), _objects(rows)
    assert a.keys() == b.keys()
    for k in a:
        _same_scores(a[k], b[k])
    summary = lambda rs: [(r["level"], r["video"], r["masklets"], r["matched_objects"]) for r in rs
                          if r["level"] != "object"]
    assert summary(rows) == summary(rows_run)


def test_davis_png_export_differs_only_where_it_resolved_overlaps(run_eval, tmp_path, capsys):
    """davis-png holds one id per pixel: where masklets overlap, the lowest id keeps the pixel, so a masklet
    can lose pixels (and Hungarian matching can pair differently). With --matched-ids (GT object k <->
    masklet k on both sides, davis-png id k + 1) the scores are equal for every masklet that no lower one
    overlapped on an evaluated frame (masklet 0 always), and differ only for the others."""
    _, _, root, out = run_eval
    run_rows = _evaluate(capsys, out, "--matched-ids", str(tmp_path / "r.parquet"))[1]
    export = _export(out, "davis-png", str(tmp_path / "davis-png"))
    stdout, rows = _evaluate(capsys, export, "--gt", root, "--matched-ids", str(tmp_path / "d.parquet"))
    assert stdout.splitlines()[0] == RANDOM_WEIGHTS_LABEL
    a, b = _objects(run_rows), _objects(rows)
    assert a.keys() == b.keys()
    run = open_run(out)
    untouched = 0
    for (video, key), r in a.items():
        masks = run.masks(video)
        if key >= masks.shape[0]:
            continue  # no masklet k: both sides score an empty prediction
        t_of = {int(s): t for t, s in enumerate(masks.attrs["source_frames"])}
        overlapped = any(np.any(np.asarray(masks[key, t_of[f]]) & np.asarray(masks[:key, t_of[f]]).any(axis=0))
                         for f in EVALUATED) if key else False
        if not overlapped:
            _same_scores(r, b[(video, key)], masklet=False)
            untouched += 1
    assert untouched >= len(DAVIS_SEQUENCES)  # masklet 0 of each video at least


def test_matched_ids_on_an_export_relabelled_to_gt_ids(run_eval, tmp_path, capsys):
    """A GT-prompted run cannot be made here (prompts are automatic), so make its export by hand: copy the
    sav-png export with each matched masklet's folder renamed to its GT object's key (and the others moved
    out of the way, to 100+). `--matched-ids` must then give the Hungarian numbers, object by object."""
    _, rows_run, root, out = run_eval
    export = _export(out, "sav-png", str(tmp_path / "sav-png"))
    relabelled = tmp_path / "relabelled"
    relabelled.mkdir()
    shutil.copy(os.path.join(export, "export.json"), relabelled / "export.json")
    objects = _objects(rows_run)
    for video in DAVIS_SEQUENCES:
        to_gt = {r["masklet"]: key for (v, key), r in objects.items() if v == video and r["masklet"] is not None}
        spare = 100
        for name in sorted(os.listdir(os.path.join(export, video))):
            m = int(name)
            new = to_gt.get(m)
            if new is None:
                new, spare = spare, spare + 1
            shutil.copytree(os.path.join(export, video, name), relabelled / video / f"{new:03d}")
    with open(relabelled / "export.json") as f:
        assert json.load(f)["random_weights"] is True
    _, rows = _evaluate(capsys, str(relabelled), "--gt", root, "--matched-ids", str(tmp_path / "m.parquet"))
    b = _objects(rows)
    assert objects.keys() == b.keys()
    for k, r in objects.items():
        _same_scores(r, b[k], masklet=False)
        assert b[k]["masklet"] == (k[1] if r["masklet"] is not None else None)
