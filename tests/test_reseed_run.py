"""Re-seeding end to end (issue 12): objects that enter a clip after its first frame become masklets on the
re-seed frame that finds them, through the real worker, tracker, writer and tables.

The tracker runs SAM 2.1's real architecture with SEEDED RANDOM WEIGHTS (its masks are plumbing, not
segmentation). The automatic mask generator is replaced by an exact one that segments the synthetic clip's
bright shapes, so which candidates exist on each frame is known; whether a candidate becomes a masklet then
depends on the tracked masks of that frame (random), which are read back from the Zarr array and the rule
(pipeline/stages/reseed.py's new_prompts, tested exactly in tests/test_reseed.py) applied to them again here.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.compute as pc
import pytest
from PIL import Image

from pipeline import open_run
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.paths import RunPaths
from pipeline.stages.reseed import new_prompts
from pipeline.store.masks import open_masks
from tests.runcompare import assert_same_outputs

FRAMES, W, H = 24, 128, 96
# (x0, y0, x1, y1, first frame it is in the clip)
SHAPES = [(8, 8, 40, 36, 0), (70, 50, 110, 86, 10), (60, 6, 96, 30, 20)]
RESEED = ["prompt.reseed_every=5", "prompt.share_features=false", "prompt.max_objects=6",
          "prompt.reseed_min_area=50", "store.frames_per_file=4"]


def _frame(t: int) -> np.ndarray:
    rgb = np.full((H, W, 3), 20, dtype=np.uint8)
    for x0, y0, x1, y1, start in SHAPES:
        if t >= start:
            rgb[y0:y1, x0:x1] = (230, 220, 40)
    return rgb


class ShapeGenerator:
    """An exact automatic mask generator for the clip above: one record per bright connected region."""

    def generate(self, rgb: np.ndarray) -> list[dict]:
        bright = (rgb.astype(np.int32).sum(axis=2) > 300).astype(np.uint8)
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(bright, connectivity=4)
        out = []
        for k in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[k])
            out.append({"segmentation": labels == k, "area": area, "bbox": [x, y, w, h],
                        "predicted_iou": 0.9 + 0.01 * k, "stability_score": 0.95,
                        "point_coords": [[float(centroids[k][0]), float(centroids[k][1])]]})
        return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("reseed")
    folder = root / "media" / "enter"
    folder.mkdir(parents=True)
    for t in range(FRAMES):
        Image.fromarray(_frame(t)).save(folder / f"{t:05d}.png")
    path = root / "m.parquet"
    assert main(["manifest", "build", str(root / "media"), "-o", str(path)]) == 0
    return path


@pytest.fixture
def shape_generator(monkeypatch):
    monkeypatch.setattr("pipeline.worker.make_generator", lambda model, cfg: ShapeGenerator())


def _run(manifest, out, demo_config, fast_overrides, *extra) -> int:
    return main(["run", "--manifest", str(manifest), "--out", str(out), "--config", demo_config, *fast_overrides,
                 *RESEED, *extra])


@pytest.fixture(scope="module")
def reseeded(manifest, demo_config, fast_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("reseeded") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr("pipeline.worker.make_generator", lambda model, cfg: ShapeGenerator())
        assert _run(manifest, out, demo_config, fast_overrides) == 0
    return out


def test_objects_that_enter_later_become_masklets_from_the_frame_that_finds_them(reseeded, demo_config,
                                                                                  fast_overrides):
    run = open_run(reseeded)
    rows = run.masklets.to_pylist()
    assert run.random_weights
    first = [r for r in rows if r["prompt_source"] == "amg"]
    assert [r["prompt_frame"] for r in first] == [0]  # only the first shape is there on frame 0
    masks = open_masks(RunPaths.of(reseeded), "enter")[:]
    assert masks.shape == (len(rows), FRAMES, H, W)
    assert [r["object_id"] for r in rows] == list(range(len(rows)))
    cfg = load_config(demo_config, [*fast_overrides, *RESEED]).prompt
    # Replay the rule on every re-seed frame against the masks the run stored there.
    expected = []
    for t in range(5, FRAMES, 5):
        live = [r["object_id"] for r in rows if r["prompt_frame"] < t and
                not (r["dropped_frame"] is not None and r["dropped_frame"] < t)]
        result = new_prompts(ShapeGenerator().generate(_frame(t)), masks[live, t], cfg, t,
                             len([r for r in rows if r["prompt_frame"] < t]), cfg.max_objects - len(
                                 [r for r in rows if r["prompt_frame"] < t]))
        expected += [(t, p.area, p.point) for p in result.prompts]
    got = [(r["prompt_frame"], r["prompt_area"], (pytest.approx(r["prompt_x"]), pytest.approx(r["prompt_y"])))
           for r in rows if r["prompt_source"] == "reseed"]
    assert got == expected
    assert expected, "no re-seed added a masklet: the test shows nothing"
    for r in rows:  # nothing before a masklet's seed frame (no reverse tracking here), rows from it on
        assert not masks[r["object_id"], :r["prompt_frame"]].any()
        frames = run.frames.filter(pc.equal(run.frames["object_id"], r["object_id"]))
        assert min(frames["frame"].to_pylist()) == r["prompt_frame"]


def test_dropped_masklets_keep_their_masks_up_to_the_drop_and_nothing_after(reseeded):
    run = open_run(reseeded)
    masks = open_masks(RunPaths.of(reseeded), "enter")[:]
    for r in run.masklets.to_pylist():
        if r["dropped_reason"] is None:
            assert r["merged_into"] is None and r["dropped_frame"] is None
            continue
        assert r["prompt_source"] == "reseed"
        assert r["dropped_reason"] in ("duplicate", "empty")
        assert (r["merged_into"] is None) == (r["dropped_reason"] == "empty")
        assert not masks[r["object_id"], r["dropped_frame"] + 1:].any()
        frames = run.frames.filter(pc.equal(run.frames["object_id"], r["object_id"]))
        assert max(frames["frame"].to_pylist()) == r["dropped_frame"]


def test_reseeding_off_gives_the_first_frame_masklets_only(manifest, demo_config, fast_overrides, tmp_path,
                                                           shape_generator):
    out = tmp_path / "off"
    assert _run(manifest, out, demo_config, fast_overrides, "prompt.reseed_every=null") == 0
    rows = open_run(out).masklets.to_pylist()
    assert [(r["prompt_source"], r["prompt_frame"]) for r in rows] == [("amg", 0)]


def test_a_run_stopped_after_a_reseed_goes_on_to_identical_outputs(manifest, reseeded, demo_config,
                                                                   fast_overrides, tmp_path, monkeypatch,
                                                                   shape_generator):
    """Checkpoints every shard file (4 frames); the run is preempted right after the checkpoint at frame 16
    (after the re-seeds of frames 5, 10 and 15), then resumed: masks, rows and signals equal the
    uninterrupted run's."""
    from pipeline.store.partial import PartialItem

    saves, original = [], PartialItem.save

    def save(self, next_frame, *args, **kwargs):
        saves.append(next_frame)
        original(self, next_frame, *args, **kwargs)
        if next_frame == 16:
            raise SystemExit("preempted after the checkpoint")

    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(PartialItem, "save", save)
        with pytest.raises(SystemExit):
            _run(manifest, out, demo_config, fast_overrides, "store.checkpoint_seconds=0")
    assert saves[-1] == 16
    assert main(["resume", str(out)]) == 0
    logs = "".join(p.read_text() for p in RunPaths.of(out).logs.glob("*.log"))
    assert "continuing from its checkpoint at frame 16" in logs
    assert_same_outputs(reseeded, out)


def test_reseeded_masklets_tracked_backwards_fill_the_frames_before_their_seed(manifest, demo_config,
                                                                              fast_overrides, tmp_path,
                                                                              shape_generator):
    """propagate.reverse: a re-seeded masklet the duplicate rule keeps (made lenient here: only identical masks
    count as duplicates) is tracked back from its seed frame over propagate.reverse_frames frames; the stored
    masks there are exactly track_backward's from the same prompt (rebuilt from the exact generator), and the
    rows and signals describe the stored masks."""
    from pipeline.stages.models import load_model
    from pipeline.stages.prompt import prompts_from_records, select_records
    from pipeline.stages.track import TrackOptions, track_backward

    out = tmp_path / "reverse"
    settings = ["propagate.reverse=true", "propagate.reverse_frames=4", "prompt.dup_iou=1.0",
                "prompt.hotstart_min=15", "propagate.object_batch=1"]
    assert _run(manifest, out, demo_config, fast_overrides, *settings) == 0
    run = open_run(out)
    rows = run.masklets.to_pylist()
    masks = open_masks(RunPaths.of(out), "enter")[:]
    kept = [r for r in rows if r["prompt_source"] == "reseed" and r["dropped_reason"] is None]
    assert kept, "no re-seeded masklet survived: the test shows nothing"
    assert any(r["first_frame"] < r["prompt_frame"] for r in kept), "nothing was found before a seed frame"
    cfg = load_config(demo_config, [*fast_overrides, *RESEED, *settings])
    model = load_model(cfg.model)
    for r in kept:
        t = r["prompt_frame"]
        records = select_records(ShapeGenerator().generate(_frame(t)), cfg.prompt)
        seed = next(p for p in prompts_from_records(records, t) if p.area == r["prompt_area"])
        first = max(0, t - 4)
        expected = {fm.frame: fm.masks[0] for fm in track_backward(
            model, (_frame(f) for f in range(t, first - 1, -1)), t, H, W, [seed], list(range(FRAMES)), FRAMES,
            TrackOptions(object_batch=1), first_frame=first)}
        assert sorted(expected) == list(range(first, t))
        for f in range(first, t):
            np.testing.assert_array_equal(masks[r["object_id"], f], expected[f], err_msg=f"frame {f}")
        assert not masks[r["object_id"], :first].any()
        frames = run.frames.filter(pc.equal(run.frames["object_id"], r["object_id"]))
        assert min(frames["frame"].to_pylist()) == first
        visible = [f for f in range(FRAMES) if masks[r["object_id"], f].any()]
        assert r["first_frame"] == (visible[0] if visible else -1)
        assert r["frames_visible"] == len(visible)


def test_exports_leave_dropped_masklets_out_unless_asked(reseeded, tmp_path):
    """A masklet the duplicate rule dropped is the same object as an older one: exporting it would give that
    object twice. `masklet export` leaves such masklets out; --include-dropped keeps them."""
    from pipeline.export.filters import ExportFilter, select_masklets

    rows = open_run(reseeded).masklets
    dropped = {r["object_id"] for r in rows.to_pylist() if r["dropped_reason"] is not None}
    assert dropped, "the run dropped nothing: the test shows nothing"
    kept = set(select_masklets(ExportFilter(), rows)["object_id"].to_pylist())
    assert kept == set(rows["object_id"].to_pylist()) - dropped
    assert set(select_masklets(ExportFilter(include_dropped=True), rows)["object_id"].to_pylist()) == set(
        rows["object_id"].to_pylist())
    for extra, expected in (([], kept), (["--include-dropped"], kept | dropped)):
        dest = tmp_path / f"sav{len(extra)}"
        assert main(["export", str(reseeded), "--format", "sav-png", "-o", str(dest), *extra]) == 0
        objects = {int(p.name) for p in (dest / "enter").iterdir() if p.is_dir()}
        assert len(objects) == len(expected)


_WRAPPER = """
import sys
import pipeline.worker as worker
from tests.test_reseed_run import ShapeGenerator
worker.make_generator = lambda model, cfg: ShapeGenerator()
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("after", [8, 12, 20])
def test_kill_minus_nine_during_a_reseeded_item_then_resume(manifest, reseeded, demo_config, fast_overrides,
                                                            tmp_path, after):
    """SIGKILL the worker process once its checkpoint has passed frame `after` (re-seeds on frames 5, 10, 15,
    20 came before it), wherever it is by then (tracking, writing, the next checkpoint); `masklet resume`
    ends with the uninterrupted run's masks and rows."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo}
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", _WRAPPER, "run", "--manifest", str(manifest), "--out", str(out), "--config",
           demo_config, *fast_overrides, *RESEED, "store.checkpoint_seconds=0"]
    proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = RunPaths.of(out).partial("enter") / "progress.json"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(progress.read_text())["next_frame"] >= after:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the kill: the test shows nothing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([sys.executable, "-c", _WRAPPER, "resume", str(out)], env=env, cwd=repo,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = "".join(p.read_text() for p in RunPaths.of(out).logs.glob("*.log"))
    assert "continuing from its checkpoint" in logs
    assert_same_outputs(reseeded, out)
