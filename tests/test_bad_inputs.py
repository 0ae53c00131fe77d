"""One manifest of bad and odd inputs beside good ones, through `manifest build` -> `run` -> open_run: every
bad item is a failed row whose error names the file and the cause, every good or odd-but-valid item is done
with masks of the right shape, and no item is lost.

The pipeline runs in a child process that has dropped root's permission override (tests/privileges.py), so
that the mode-000 file is really unreadable, as for any user; everything else about the run is unchanged.
"""
from __future__ import annotations

import os
import stat

import cv2
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pipeline import open_run
from pipeline.config import load_config
from pipeline.manifest import read_manifest
from pipeline.samples import draw_frame, make_empty_video, make_frame_folder, make_image, make_video
from pipeline.stages.decode import display_path, fit_size, open_frames
from tests.privileges import run_python, unreadable_without_override

W, H = 96, 64  # every small item's size (as displayed)


def _image(path, rgb: np.ndarray, mode: str | None = None) -> str:
    os.makedirs(os.path.dirname(os.fsencode(path)), exist_ok=True)
    img = Image.fromarray(rgb) if mode is None else Image.fromarray(rgb, mode)
    img.save(path)
    return os.fspath(path)


def _cut(path: str, fraction: float) -> str:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return path


def _make_media(media: str) -> tuple[dict[str, str], dict[str, dict]]:
    """Writes every case under `media`. Returns (bad: path -> words its error must hold, as one string per
    word separated by '|'), (odd or good: path -> expectations)."""
    j = lambda name: os.path.join(media, name)  # noqa: E731
    scene = draw_frame(0, W, H, seed=7)
    bad: dict[str, str] = {}
    good: dict[str, dict] = {}

    # ---- good items
    good[make_video(j("good.mp4"), frames=2, width=W, height=H, seed=1)] = {"frames": 2, "hw": (H, W)}
    frames = make_frame_folder(j("good_frames"), frames=2, width=W, height=H, ext="png", seed=2)
    good[frames] = {"frames": 2, "hw": (H, W)}
    good[make_image(j("good.jpg"), W, H, seed=3)] = {"frames": 1, "hw": (H, W)}

    # ---- bad items
    missing = make_video(j("missing.mp4"), frames=3, width=W, height=H)  # deleted after the manifest is built
    bad[missing] = "file not found|moved or deleted|rebuild the manifest"
    open(j("empty.mp4"), "wb").close()
    bad[j("empty.mp4")] = "empty file (0 bytes)|copy it again"
    bad[_cut(make_video(j("truncated.mp4"), frames=6, width=W, height=H), 0.5)] = "cut short|moov|copy it again"
    with open(j("text.mp4"), "w") as f:
        f.write("<html><body>403 Forbidden</body></html>\n")
    bad[j("text.mp4")] = "holds text, not video|403 Forbidden"
    # An mp4 muxer writes no track for a stream without frames (the AVI variant is in test_decode.py).
    bad[make_empty_video(j("no_frames.mp4"), W, H)] = "has no video stream|never got a frame|nothing to segment"
    mixed = make_frame_folder(j("mixed_frames"), frames=3, width=W, height=H, ext="png", seed=4)
    for name, width in (("00001.png", 80), ("00002.png", 72)):  # the first mismatching file is 00001.png
        _image(os.path.join(mixed, name), draw_frame(1, width, H))
    bad[mixed] = f"mixes frame sizes|00001.png is 80x{H}|first frame is {W}x{H}|resize the frames"
    locked = make_video(j("locked.mp4"), frames=3, width=W, height=H)
    os.chmod(locked, 0)
    bad[locked] = "permission denied|cannot read|chmod a+r"

    # ---- odd but valid: each must be done
    good[make_video(j("rotated.mov"), frames=2, width=W, height=H, rotation=-90, seed=5)] = {"frames": 2, "hw": (H, W)}
    ticks = [0, 1, 5]  # gaps of 1 and 4 frame times
    good[make_video(j("vfr.mp4"), frames=3, width=W, height=H, timestamps=ticks, seed=6)] = {"frames": 3, "hw": (H, W)}
    # The index comes first, so the cut copy still opens: it decodes the frames that made it, fewer than probed.
    cut = _cut(make_video(j("cut_faststart.mp4"), frames=8, width=W, height=H, faststart=True, seed=8), 0.75)
    good[cut] = {"frames": "fewer", "hw": (H, W)}
    gray = cv2.cvtColor(scene, cv2.COLOR_RGB2GRAY)
    good[_image(j("gray.png"), gray, "L")] = {"frames": 1, "hw": (H, W)}
    alpha = np.dstack([scene, np.full((H, W), 128, np.uint8)])
    good[_image(j("alpha.png"), alpha, "RGBA")] = {"frames": 1, "hw": (H, W)}
    good[_image(j("deep16.png"), gray.astype(np.uint16) * 257)] = {"frames": 1, "hw": (H, W)}  # 16-bit gray
    # Huge along its longer side only: the rule depends on the longer side, and a 12000x9000 photo would make
    # the AMG hold 192 float masks of 4096x3072 (about 10 GB) at the default points_per_batch.
    huge = cv2.resize(scene, (12000, 120), interpolation=cv2.INTER_NEAREST)
    good[_image(j("huge_panorama.jpg"), huge)] = {"frames": 1, "hw": "downscaled"}
    good[_image(j("tiny_1x1.png"), np.full((1, 1, 3), 200, np.uint8))] = {"frames": 1, "hw": (1, 1)}
    latin1 = os.fsdecode(os.path.join(os.fsencode(media), b"caf\xe9-\xff.png"))  # not valid UTF-8
    good[_image(latin1, scene)] = {"frames": 1, "hw": (H, W)}
    good[_image(j("long_" + "n" * 240 + ".png"), scene)] = {"frames": 1, "hw": (H, W)}
    return bad, good


def test_bad_inputs_fail_clearly_and_the_run_goes_on(tmp_path, demo_config, fast_overrides):
    media = str(tmp_path / "media")
    bad, good = _make_media(media)
    locked = os.path.join(media, "locked.mp4")
    if not unreadable_without_override(locked):
        # Honest skip of this one case: a file system that ignores modes (or a kernel that refuses capset).
        os.chmod(locked, stat.S_IRUSR | stat.S_IWUSR)
        os.remove(locked)
        del bad[locked]
        print(f"SKIPPED the unreadable-file case: {locked} stays readable with mode 000 here "
              f"(uid {os.geteuid()}); file modes are not enforced on this file system")
    duplicate = os.path.join(media, "good.jpg")  # given twice: inside the folder and by name
    manifest = str(tmp_path / "manifest.parquet")
    out = str(tmp_path / "run")

    build = run_python(f"""
        from pipeline.cli import main
        raise SystemExit(main(["manifest", "build", {media!r}, {duplicate!r}, "-o", {manifest!r}]))
    """)
    print(build.stdout, build.stderr)
    assert build.returncode == 0, build.stderr
    assert "listed more than once" in build.stderr and "good.jpg" in build.stderr  # the duplicate's warning
    os.remove(os.path.join(media, "missing.mp4"))  # it was probed; now it is gone, as when a disk is cleaned

    run = run_python(f"""
        from pipeline.cli import main
        raise SystemExit(main(["run", "--manifest", {manifest!r}, "--out", {out!r}, "--config", {demo_config!r},
                               *{fast_overrides!r}, "plan.max_items_per_shard=4"]))
    """)
    print(run.stdout, run.stderr[-3000:])
    assert run.returncode == 0, run.stderr

    items = {item.path: item for item in read_manifest(manifest)}
    assert set(items) == set(bad) | set(good), "one manifest row per input, the duplicate kept once"
    assert len(pq.read_table(manifest)) == len(items)
    res = open_run(out)
    rows = {r["item_id"]: r for r in res.items.to_pylist()}
    assert len(rows) == res.items.num_rows == len(items), "every item has exactly one row: none lost"

    for path, words in bad.items():
        row = rows[items[path].item_id]
        assert row["status"] == "failed", (path, row)
        error = row["error"]
        assert display_path(path) in error, f"the error names the file: {error}"
        for word in words.split("|"):
            assert word in error, f"{display_path(path)}: {word!r} not in {error!r}"
        assert row["num_objects"] == 0

    # The size the run decodes at: the worker passes decode.max_side (4096 unless configured) to open_frames.
    max_side = load_config(demo_config, fast_overrides).decode.max_side
    for path, expect in good.items():
        item = items[path]
        row = rows[item.item_id]
        assert row["status"] == "done", (display_path(path), row["error"])
        source = open_frames(item, max_side=max_side)
        height, width = (source.height, source.width) if expect["hw"] == "downscaled" else expect["hw"]
        if expect["frames"] == "fewer":
            assert 0 < row["num_frames"] < item.num_frames == row["source_num_frames"], row
        else:
            assert row["num_frames"] == expect["frames"], (display_path(path), row["num_frames"])
        masks = res.masks(item.item_id)
        assert masks.shape == (row["num_objects"], row["num_frames"], height, width), display_path(path)

    # The odd ones, one by one.
    by_name = {os.path.basename(os.fsencode(p)): items[p] for p in good}
    huge = by_name[b"huge_panorama.jpg"]
    assert (huge.width, huge.height) == (12000, 120)
    # At 4096: 4096 x 41 (120 * 4096 / 12000 = 40.96, rounded half up).
    assert res.masks(huge.item_id).shape[2:] == fit_size(12000, 120, max_side)[::-1] != (120, 12000)
    assert len(by_name[b"long_" + b"n" * 240 + b".png"].item_id) <= 120
    vfr_frames = res.frames.filter(pc.equal(res.frames["item_id"], by_name[b"vfr.mp4"].item_id))
    assert sorted(set(vfr_frames["source_frame"].to_pylist())) == [0, 1, 2]  # every frame, in decode order
    kept = (b"good.mp4", b"good_frames", b"good.jpg", b"rotated.mov", b"vfr.mp4", b"gray.png", b"huge_panorama.jpg")
    for name in kept:
        assert rows[by_name[name].item_id]["num_objects"] >= 1, f"{name!r}: the demo settings keep objects"

    failed = sum(r["status"] == "failed" for r in rows.values())
    done = sum(r["status"] == "done" for r in rows.values())
    lost = len(items) - len(rows)
    print(f"\nbad inputs tried: {len(bad) + 1} ({len(bad)} failed items + 1 duplicate path kept once); "
          f"failed rows: {failed}")
    print(f"good items done: {done} of {len(good)} ({len(good) - 3} odd but valid, 3 plain)")
    print(f"items lost: {lost} (manifest {len(items)}, rows {len(rows)})")
    assert failed == len(bad) and done == len(good) and lost == 0


def test_sam2_tracks_a_one_pixel_image(demo_config, fast_overrides):
    """No minimum size is needed: in the run above the 1x1 image keeps no AMG mask (min_area 16), so this
    checks the other half, that SAM 2 propagates a mask on 1x1 frames (it resizes every frame to its input size)."""
    from pipeline.config import load_config
    from pipeline.records import Prompt
    from pipeline.stages.models import load_model
    from pipeline.stages.track import track

    model = load_model(load_config(demo_config, fast_overrides).model)
    dot = np.full((1, 1, 3), 200, np.uint8)
    prompt = Prompt(object_id=0, frame=0, mask=np.ones((1, 1), bool), point=(0.0, 0.0), predicted_iou=1.0,
                    stability_score=1.0, area=1, bbox=(0, 0, 1, 1))
    out = list(track(model, [dot, dot], 2, 1, 1, [prompt], [0, 1]))
    assert [fm.masks.shape for fm in out] == [(1, 1, 1), (1, 1, 1)]
