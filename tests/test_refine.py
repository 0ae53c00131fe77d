"""masklet refine: corrections replayed with SAM 2 into masklet versions; readers, exports and resume."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline.review import store, versions
from pipeline.review.refine import (
    Replayer,
    pending_masklets,
    refine_masklet,
    refine_run,
)
from pipeline.review.store import ReviewSession
from tests.conftest import needs_slurm_cluster


@pytest.fixture()
def run_copy(small_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    return str(out)


@pytest.fixture(scope="module")
def refined(small_run, tmp_path_factory):
    """One refine shared by the read-only tests: masklet 0 corrected on frame 1 (locked) and frame 3 (candidate
    2), masklet 1 rejected, the rest untouched."""
    out = tmp_path_factory.mktemp("refined") / "run"
    shutil.copytree(small_run, out)
    out = str(out)
    run, item = _clip(out)
    h, w = run.masks(item).shape[2:]
    s = ReviewSession(out, "ann")
    ids = [s.correct(item, 0, 1, [(w / 2, h / 2)], [1], lock=True),
           s.correct(item, 0, 3, [(w / 4, h / 4), (2, 2)], [1, 0], candidate=2)]
    s.decide(item, 1, "reject")
    seen = []
    assert refine_masklet(out, item, 0, progress=lambda *a: seen.append(a)) == 1
    return out, item, ids, seen


def _versions_equal(a, b, item, object_id):
    return np.array_equal(versions.masklet_mask(a, item, object_id), versions.masklet_mask(b, item, object_id))


def _clip(out):
    from pipeline import open_run

    run = open_run(out, versions="original")
    items = [i for i in run.item_ids() if i.endswith(".mp4")]
    return run, items[0]


def test_refine_writes_a_manual_version_with_the_lock_rule(refined):
    out, item, ids, seen = refined
    run, _ = _clip(out)
    arr = run.masks(item)
    assert seen and {a[0] for a in seen} >= {"track", "write"}
    assert pending_masklets(out) == [] and store.corrections(out, pending_only=True).num_rows == 0
    row = versions.latest_versions(out).to_pylist()[0]
    assert row["masklet_type"] == "manual" and row["version"] == 1 and row["corrections"] == ids
    assert row["edited_frame_count"] == 2 and row["locked_frames"] == [2]  # lock on 1, next correction on 3
    m = versions.masklet_mask(out, item, 0)
    assert m.shape == arr.shape[1:] and m.dtype == bool
    assert np.array_equal(m[2], np.asarray(arr[0, 2]))  # the locked frame keeps the base version's mask
    frames = versions.version_frames(out, item, 0, 1)
    assert frames.column("area").to_pylist() == [int(x.sum()) for x in m]
    assert row["frames_visible"] == int(m.any(axis=(1, 2)).sum()) and row["flags"] is not None


def test_open_run_gives_the_latest_version_and_leaves_rejected_out(refined, small_run):
    from pipeline import open_run

    out, item, _, _ = refined
    plain = open_run(small_run).masklets  # no review folder: the run's rows as version 0
    assert set(plain.column("version").to_pylist()) == {0}
    assert set(plain.column("masklet_type").to_pylist()) == {"auto"}
    got = {r["masklet_id"]: r for r in open_run(out).masklets.to_pylist()}
    assert got[f"{item}/0"]["version"] == 1 and got[f"{item}/0"]["masklet_type"] == "manual"
    assert f"{item}/1" not in got and len(got) == plain.num_rows - 1
    assert open_run(out, versions="original").masklets.num_rows == plain.num_rows
    assert open_run(out, versions="all").masklets.num_rows == plain.num_rows + 1
    r = open_run(out)
    assert np.array_equal(r.masklet_masks(item, 0, version=0), r.masks(item)[0])
    assert np.array_equal(r.masklet_masks(item, 0), versions.masklet_mask(out, item, 0, 1))
    assert np.array_equal(np.asarray(r.masks(item)), np.asarray(open_run(small_run).masks(item)))


def test_exports_read_the_newest_version_and_untouched_masklets_stay_bit_identical(refined, small_run):
    from pipeline import open_run
    from pipeline.export import filters
    from pipeline.export.filters import ExportFilter
    from pipeline.export.runner import build_item, run_info

    out, item, _, _ = refined
    assert filters.review_decisions(open_run(small_run)) is None
    r = open_run(out)
    ex = build_item(r, item, ExportFilter(), run_info(r))
    arr = open_run(small_run).masks(item)
    for k, o in enumerate(ex.object_ids):
        want = versions.masklet_mask(out, item, 0, 1) if o == 0 else np.asarray(arr[o])
        for t in range(arr.shape[1]):
            assert np.array_equal(ex.mask(k, t), want[t]), (o, t)
    d = filters.review_decisions(r)
    assert d == {f"{item}/1": "rejected"}
    kept = build_item(r, item, ExportFilter(decision="not-rejected"), run_info(r), d)
    assert 1 not in kept.object_ids and 0 in kept.object_ids


def test_corrections_on_missed_objects_become_new_masklets(run_copy):
    """Two corrections with object_id -1: each becomes its own masklet, ids max + 1 and max + 2 in
    correction order, tracked from its frame forward, version 1 of type manual, read by open_run and exports;
    a rerun creates nothing more."""
    from pipeline import open_run
    from pipeline.export.filters import ExportFilter
    from pipeline.export.runner import build_item, run_info

    run, item = _clip(run_copy)
    _, frames, h, w = run.masks(item).shape
    top = max(run.masklets_for(item)["object_id"].to_pylist())
    s = ReviewSession(run_copy, "ann")
    first = s.correct(item, -1, 2, [(w / 3, h / 3)], [1])
    second = s.correct(item, -1, 1, [(w / 2, h / 2), (3, 3)], [1, 0], candidate=1)
    assert (item, -1) in pending_masklets(run_copy)
    assert refine_run(run_copy) == {"masklets": 2, "pending_after": 0}  # two new masklets made
    replayer = Replayer(run_copy)
    rgb = replayer.frames(item, frames)
    for object_id, cid, frame, fg_bg in ((top + 1, first, 2, (1, 0)), (top + 2, second, 1, (1, 1))):
        assert versions.published_versions(replayer.paths, item, object_id) == [1]
        row = versions.version_rows_of(run_copy, item, object_id, [1])[0]
        assert (row["masklet_type"], row["prompt_source"], row["prompt_frame"]) == ("manual", "correction", frame)
        assert row["corrections"] == [cid] and row["edited_frame_count"] == 1
        assert (row["prompt_fg_points"], row["prompt_bg_points"]) == fg_bg
        m = versions.masklet_mask(run_copy, item, object_id)
        assert not m[:frame].any()  # tracked forward from the correction's frame only
        correction = next(c for c in store.corrections(run_copy).to_pylist() if c["correction_id"] == cid)
        from pipeline.review.refine import _correction

        assert np.array_equal(m[frame], replayer.candidate_mask(rgb[frame], _correction(correction)))
    got = {r["masklet_id"]: r for r in open_run(run_copy).masklets.to_pylist()}
    assert {f"{item}/{top + 1}", f"{item}/{top + 2}"} <= set(got)
    assert got[f"{item}/{top + 1}"]["masklet_type"] == "manual"
    r = open_run(run_copy)
    ex = build_item(r, item, ExportFilter(), run_info(r))
    assert ex.object_ids[-2:] == [top + 1, top + 2]
    k = ex.object_ids.index(top + 2)
    assert all(np.array_equal(ex.mask(k, t), versions.masklet_mask(run_copy, item, top + 2)[t]) for t in range(frames))
    assert set(ex.frames.filter(pc.equal(ex.frames["object_id"], top + 2))["frame"].to_pylist()) == set(range(frames))
    assert refine_run(run_copy) == {"masklets": 0, "pending_after": 0}
    # A correction on the new masklet (by its new id) replays its creating correction too: version 2.
    s.correct(item, top + 1, 3, [(w / 3, h / 2)], [1])
    assert refine_masklet(run_copy, item, top + 1) == 2
    row = versions.latest_versions(run_copy).filter(pc.equal(versions.latest_versions(run_copy)["object_id"],
                                                              top + 1)).to_pylist()[0]
    assert row["corrections"][0] == first and row["edited_frame_count"] == 2
    assert not versions.masklet_mask(run_copy, item, top + 1)[:2].any()


def _emptied_version(out):
    """Version 1 of the clip's masklet 0 with every frame empty, written without the model: its signals,
    flags and review priority differ from the run's row (never visible)."""
    run, item = _clip(out)
    _, frames, h, w = run.masks(item).shape
    versions.write_version(out, item, 0, np.zeros((frames, h, w), bool), np.full(frames, np.nan, np.float32), [], [])
    run_row = run.masklets_for(item).filter(pc.equal(run.masklets_for(item)["object_id"], 0)).to_pylist()[0]
    return item, run_row, versions.version_rows_of(out, item, 0, [1])[0]


def test_export_filters_apply_to_the_newest_version_rows(run_copy):
    from pipeline import open_run
    from pipeline.export.filters import ExportFilter
    from pipeline.export.runner import build_item, run_info

    item, run_row, new = _emptied_version(run_copy)
    assert run_row["frames_visible"] > 0 and new["frames_visible"] == 0
    r = open_run(run_copy)

    def kept(**kw):
        return 0 in build_item(r, item, ExportFilter(**kw), run_info(r)).object_ids

    assert kept() and not kept(min_frames_visible=1)  # the run's row (visible) would have passed
    gained = sorted(set(new["flags"]) - set(run_row["flags"] or []))
    assert gained, "the emptied version should carry a flag the run's row does not"
    assert kept(flags=(gained[0],)) and not kept(no_flags=(gained[0],))
    assert kept(min_area_share=0.0) or new["area_share_mean"] is None


def test_qa_set_reflags_version_rows_too(run_copy):
    from pipeline.quality.reflag import reflag_run

    item, run_row, before = _emptied_version(run_copy)
    was_low = "low_score" in (before["flags"] or [])  # predicted_iou < low_score: flip it either way
    iou = float(before["predicted_iou"])
    summary = reflag_run(run_copy, [f"qa.low_score={iou if was_low else iou + 0.01!r}"])
    after = versions.version_rows_of(run_copy, item, 0, [1])[0]
    assert summary.versions == 1 and ("low_score" in after["flags"]) != was_low
    assert after["review_priority"] != before["review_priority"] or after["flags"] != before["flags"]
    assert {k: after[k] for k in ("version", "corrections", "masklet_type")} == \
        {k: before[k] for k in ("version", "corrections", "masklet_type")}
    assert "refined versions" in "\n".join(summary.lines())


@pytest.mark.slow
def test_a_second_round_keeps_locks_and_replays_every_correction(refined, tmp_path):
    out0, item, _, _ = refined
    out = str(tmp_path / "run")
    shutil.copytree(out0, out)
    run, _ = _clip(out)
    h, w = run.masks(item).shape[2:]
    ReviewSession(out, "bob").correct(item, 0, 4, [(w / 2, h / 3)], [1])
    assert refine_masklet(out, item, 0) == 2
    row = versions.latest_versions(out).to_pylist()[0]
    assert row["version"] == 2 and row["edited_frame_count"] == 3 and len(row["corrections"]) == 3
    assert row["locked_frames"] == [2]
    assert np.array_equal(versions.masklet_mask(out, item, 0)[2], np.asarray(run.masks(item)[0, 2]))


@pytest.mark.slow
def test_replay_is_deterministic_and_add_all_frames_to_correct_as_cond_changes_nothing_here(run_copy, tmp_path):
    """The same corrections replayed twice give identical masks; and with sam2's
    add_all_frames_to_correct_as_cond on, too (every prompt is added before any propagation, see refine.py)."""
    run, item = _clip(run_copy)
    h, w = run.masks(item).shape[2:]
    s = ReviewSession(run_copy, "ann")
    s.correct(item, 0, 2, [(w / 2, h / 2), (5, 5)], [1, 0], candidate=1)
    s.correct(item, 0, 4, [(w / 3, h / 2)], [1])
    other = tmp_path / "again"
    third = tmp_path / "flag"
    shutil.copytree(run_copy, other)
    shutil.copytree(run_copy, third)
    refine_masklet(run_copy, item, 0)
    refine_masklet(str(other), item, 0)
    refine_masklet(str(third), item, 0, replayer=Replayer(str(third), add_all_frames_to_correct_as_cond=True))
    assert _versions_equal(run_copy, str(other), item, 0)
    assert _versions_equal(run_copy, str(third), item, 0)
    # and the replay changed something: it is not the run's own masklet copied
    assert versions.masklet_mask(run_copy, item, 0).shape == run.masks(item).shape[1:]


@pytest.mark.slow
def test_cli_refine_and_a_kill_mid_batch_rerun_equals_an_uninterrupted_refine(run_copy, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipeline.cli import main

    run, item = _clip(run_copy)
    n_obj, _, h, w = run.masks(item).shape
    objs = list(range(min(3, n_obj)))
    s = ReviewSession(run_copy, "ann")
    for o in objs:
        s.correct(item, o, 1 + o % 3, [(w / 2 - o, h / 2)], [1])
    whole = tmp_path / "whole"
    shutil.copytree(run_copy, whole)
    assert main(["refine", str(whole)]) == 0
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "refine", run_copy],
                         env={**os.environ, "PYTHONPATH": str(repo)})
    first = Path(run_copy) / "versions" / item / "0" / "v001"
    deadline = time.monotonic() + 300
    while not first.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(pending_masklets(run_copy)) < len(objs) or not first.exists()
    assert main(["refine", run_copy]) == 0
    assert pending_masklets(run_copy) == []
    for o in objs:
        assert versions.latest_version(run_copy, item, o) == 1
        assert _versions_equal(run_copy, str(whole), item, o)
    assert not list((Path(run_copy) / "tmp" / "versions").rglob("*.zarr"))



@needs_slurm_cluster
def test_slurm_refine_cancelled_mid_batch_then_rerun_equals_an_uninterrupted_refine(run_copy, tmp_path):
    import subprocess
    import time
    from pathlib import Path

    from pipeline.executors import slurm

    run, item = _clip(run_copy)
    n_obj, _t, h, w = run.masks(item).shape
    objs = list(range(min(4, n_obj)))
    s = ReviewSession(run_copy, "ann")
    for o in objs:
        s.correct(item, o, 1 + o % 3, [(w / 2 - o, h / 2)], [1])
    whole = tmp_path / "whole"
    shutil.copytree(run_copy, whole)
    refine_run(str(whole))  # local, uninterrupted
    # Submit without waiting, cancel once the first version is out, then rerun through SLURM to the end.
    from pipeline.plan import load_run
    from pipeline.review.refine import _slurm_config

    plan = load_run(run_copy)
    tasks = [slurm.CallTask("pipeline.review.refine", "refine_masklets", (str(plan.paths.root), tuple(objs_chunk)))
             for objs_chunk in ([(item, o) for o in objs],)]
    plan.paths.refine_submitit_folder.parent.mkdir(parents=True, exist_ok=True)
    ids = slurm.submit_array(plan.paths.refine_submitit_folder, _slurm_config(plan, "local-test"), tasks)
    first = Path(run_copy) / "versions" / item / "0" / "v001"
    deadline = time.monotonic() + 300
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", ids[0].split("_")[0]], check=True)
    slurm.wait(None, [ids[0].split("_")[0]])
    assert refine_run(run_copy, executor="slurm", profile="local-test")["pending_after"] == 0
    for o in objs:
        assert _versions_equal(run_copy, str(whole), item, o)

