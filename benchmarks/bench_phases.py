"""The data engine's three phases (configs/phases/phase{1,2,3}.yaml) on the same media: model seconds per
frame and masklets found per item, for 1 / 8 / 32 objects (prompt.max_objects).

    python benchmarks/bench_phases.py [--device cpu|cuda] [--objects 1 8 32] [--frames 24] [--image-size 256]
        [--sam1-image-size 256] [--points-per-side 32] [--reseed-every 16] [--video PATH] [--phases 1 2 3] [--real]

Each phase is a real `masklet run` with its preset on one video (the sample scene unless --video), every
frame decoded (decode.target_fps off, so the phases see the same frames). Without --real the models are
the real architectures with SEEDED RANDOM WEIGHTS (SAM 2.1 tiny at --image-size, SAM 1 vit_b at
--sam1-image-size) and the generator's filters opened (random scores never pass the real ones): the
figures are costs of the machinery, the masklet counts are what the caps allow, NOT segmentation results.
With --real the presets run as they are with the checkpoints in the model cache.

Printed per phase and object cap, from the run's items.parquet: frames, masklets in the item (re-seeded
ones and those dropped as duplicates apart), the generator's seconds per frame (seconds_prompt: the AMG on
frame 0, on re-seed frames, or on every frame in phase 1), the tracker's (seconds_propagate), and their sum:
the model seconds per frame. SA-V's reported figures are printed beside them for what they are: human
annotation time per frame in the data engine (SAM 2 paper, section 5), not model time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc

SAV_REPORTED = {1: "37.8 s/frame (annotators, SAM per frame)", 2: "5.1x faster than phase 1 (SAM + SAM 2 Mask)",
                3: "4.5 s/frame, 8.4x faster than phase 1 (SAM 2 with clicks)"}
OPEN_FILTERS = ["prompt.pred_iou_thresh=0.0", "prompt.stability_score_thresh=0.0", "prompt.mask_threshold=0.2",
                "prompt.min_mask_region_area=0", "prompt.min_area=16"]


def run_phase(phase: int, objects: int, manifest: Path, out: Path, args, reseed: bool = True) -> dict:
    from pipeline import open_run
    from pipeline.cli import main

    overrides = [f"prompt.max_objects={objects}", f"prompt.points_per_side={args.points_per_side}",
                 f"model.device={args.device}", "decode.target_fps=null",
                 f"decode.max_frames={args.frames}", "local.workers=0"]
    if not args.real:
        overrides += ["model.random_weights=true", f"model.image_size={args.image_size}", "sam1.random_weights=true",
                      f"sam1.image_size={args.sam1_image_size}", *OPEN_FILTERS]
        if phase in (1, 2):
            overrides.remove("prompt.mask_threshold=0.2")  # SAM 1's generator has no mask_threshold
    if args.threads:
        overrides.append(f"model.threads={args.threads}")
    if phase == 3:
        overrides += ([f"prompt.reseed_every={args.reseed_every}"] if reseed else
                      ["prompt.reseed_every=null", "propagate.reverse=false"])
    preset = Path(__file__).resolve().parent.parent / "configs" / "phases" / f"phase{phase}.yaml"
    t0 = time.perf_counter()
    code = main(["run", "--manifest", str(manifest), "--out", str(out), "--config", str(preset), *overrides])
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"phase {phase} with {objects} objects failed (exit {code}); see {out}/logs")
    run = open_run(out)
    item = run.items.to_pylist()[0]
    m = run.masklets
    frames = max(1, item["num_frames"])
    return {
        "phase": f"{phase}" if reseed or phase != 3 else "3-off", "objects": objects, "frames": item["num_frames"], "masklets": m.num_rows,
        "reseeded": int(pc.sum(pc.equal(m["prompt_source"], "reseed")).as_py() or 0),
        "dropped": int(m["dropped_reason"].is_valid().to_numpy(zero_copy_only=False).sum()),
        "generator_s": item["seconds_prompt"] / frames, "tracker_s": item["seconds_propagate"] / frames,
        "model_s": (item["seconds_prompt"] + item["seconds_propagate"]) / frames, "wall_s": wall,
        "random": bool(item["random_weights"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--objects", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--phases", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--sam1-image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--points-per-side", type=int, default=32, help="the generators' grid (SA-V's recipe: 32)")
    ap.add_argument("--reseed-every", type=int, default=16, help="phase 3's prompt.reseed_every (the preset's: 16)")
    ap.add_argument("--video", help="a video file (default: the sample scene, 320x240)")
    ap.add_argument("--real", action="store_true", help="real checkpoints from the model cache, presets as they are")
    args = ap.parse_args()

    from pipeline.cli import main as cli
    from pipeline.samples import make_video

    with tempfile.TemporaryDirectory(prefix="bench-phases-") as tmp:
        root = Path(tmp)
        media = root / "media"
        media.mkdir()
        if args.video:
            os.symlink(os.path.abspath(args.video), media / Path(args.video).name)
        else:
            make_video(media / "scene.mp4", frames=args.frames, width=320, height=240, seed=7)
        manifest = root / "m.parquet"
        assert cli(["manifest", "build", str(media), "-o", str(manifest)]) == 0
        results = []
        for n in args.objects:
            for p in args.phases:
                results.append(run_phase(p, n, manifest, root / f"p{p}-{n}", args))
                if p == 3:  # the baseline of the re-seeding default: phase 3 with re-seeding off
                    results.append(run_phase(p, n, manifest, root / f"p{p}off-{n}", args, reseed=False))
    label = "RANDOM WEIGHTS (costs only; masklet counts are what the caps allow)" if any(
        r["random"] for r in results) else "real checkpoints"
    print(f"bench_phases {datetime.date.today()} device={args.device} load={os.getloadavg()[0]:.1f} {label}")
    print(f"SAM 2.1 tiny @ {args.image_size}, SAM 1 vit_b @ {args.sam1_image_size}, {args.points_per_side}x"
          f"{args.points_per_side} grid; {results[0]['frames']} frames")
    print(f"{'phase':>5} {'objects':>7} {'frames':>6} {'masklets':>8} {'reseeded':>8} {'dropped':>7} "
          f"{'gen s/fr':>9} {'track s/fr':>10} {'model s/fr':>10} {'wall s':>7}")
    for r in results:
        print(f"{r['phase']:>5} {r['objects']:>7} {r['frames']:>6} {r['masklets']:>8} {r['reseeded']:>8} "
              f"{r['dropped']:>7} {r['generator_s']:>9.3f} {r['tracker_s']:>10.3f} {r['model_s']:>10.3f} "
              f"{r['wall_s']:>7.1f}")
    for n in args.objects:
        by = {r["phase"]: r for r in results if r["objects"] == n}
        if "1" in by and "3" in by and by["3"]["model_s"] > 0:
            print(f"objects={n}: phase 1 / phase 3 model seconds per frame = "
                  f"{by['1']['model_s'] / by['3']['model_s']:.2f}x")
        if "3" in by and "3-off" in by and by["3-off"]["model_s"] > 0:
            print(f"objects={n}: re-seeding (every {args.reseed_every} frames, backwards tracking) costs "
                  f"{by['3']['model_s'] / by['3-off']['model_s']:.2f}x the model seconds per frame without it")
    print("SA-V reported (human annotation time per frame, not model time):")
    for p in args.phases:
        print(f"  phase {p}: {SAV_REPORTED[p]}")


if __name__ == "__main__":
    main()
