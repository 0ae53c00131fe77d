"""Cost of the quality-signal accumulator per object-frame, on CPU, beside the worker's existing per-frame
statistics (pipeline.store.metadata.mask_stats: areas and boxes) as the baseline.

    python benchmarks/bench_signals.py [--sizes 720p 1080p] [--objects 8 32] [--frames 20] [--repeats 3]
    python benchmarks/bench_signals.py --with-model [--device cpu|cuda] [--image-size 256] [--objects 1 8]
        [--fps-frames 10] [--repeats 2] [--video PATH] [--checkpoint PATH]

Masks are filled ellipses of mixed sizes (0.05 % to about 15 % of the frame), a third with a hole, a third
with a second blob, drifting a few pixels per frame and missing on 5 % of frames; pairs of objects overlap
when their ellipses meet. Masks are drawn before each timed call, so only the accumulator's `add` (and
`finish` once, reported apart) is timed. The best of `--repeats` runs is printed, with the load average, as
the host is shared.

`--with-model` measures what the signals cost the model: the pipeline's tracker (bench_propagation's flow:
decode -> track -> Zarr writer) run twice, interleaved frame by frame, each writing its frame rows as the
worker does, once without the signals ("before": areas and boxes) and once with them, writing in the model's
thread (as on a CPU with no spare core, so their cost lands in the wall time; on a GPU host the writer runs in
its own thread, `spare_core`). It prints each flow's frames per second, the share of wall time inside the
model's forward calls, the time outside them and the signals' own ms per frame.
"""
from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from pipeline.quality.signals import MaskletSignals, PromptSignals
from pipeline.store.metadata import mask_stats

SIZES = {"720p": (720, 1280), "1080p": (1080, 1920)}


def make_objects(rng: np.random.Generator, n: int, h: int, w: int) -> list[dict]:
    objects = []
    for _ in range(n):
        share = 10 ** rng.uniform(-3.3, -0.8)  # 0.05 % .. 16 % of the frame
        ratio = rng.uniform(0.5, 2.0)
        b = np.sqrt(share * h * w / (np.pi * ratio))
        objects.append({"c": np.array([rng.uniform(0, w), rng.uniform(0, h)]), "axes": (int(b * ratio) + 1, int(b) + 1),
                        "angle": float(rng.uniform(0, 180)), "kind": int(rng.integers(0, 3)),
                        "v": rng.normal(0, 3, size=2)})
    return objects


def draw(rng: np.random.Generator, objects: list[dict], h: int, w: int) -> np.ndarray:
    masks = np.zeros((len(objects), h, w), dtype=np.uint8)
    for k, o in enumerate(objects):
        o["c"] = o["c"] + o["v"]
        if rng.random() < 0.05:
            continue
        cx, cy = int(o["c"][0]), int(o["c"][1])
        cv2.ellipse(masks[k], (cx, cy), o["axes"], o["angle"], 0, 360, 1, -1)
        if o["kind"] == 1:
            cv2.ellipse(masks[k], (cx, cy), (o["axes"][0] // 3, o["axes"][1] // 3), o["angle"], 0, 360, 0, -1)
        elif o["kind"] == 2:
            cv2.circle(masks[k], (cx + 2 * o["axes"][0], cy), max(2, o["axes"][1] // 3), 1, -1)
    return masks.astype(bool)


def measure(h: int, w: int, n: int, frames: int, seed: int) -> tuple[float, float, float]:
    """Seconds in add, in finish, and in the baseline mask_stats, over `frames` frames of `n` objects."""
    rng = np.random.default_rng(seed)
    objects = make_objects(rng, n, h, w)
    acc = MaskletSignals([PromptSignals(i, 0, 0.9, 0.95, 1000) for i in range(n)], h, w)
    ids, scores = tuple(range(n)), np.zeros(n, np.float32)
    t_add = t_base = 0.0
    for f in range(frames):
        masks = draw(rng, objects, h, w)
        t0 = time.perf_counter()
        acc.add(f, ids, masks, scores)
        t1 = time.perf_counter()
        mask_stats(masks)
        t_base += time.perf_counter() - t1
        t_add += t1 - t0
    t0 = time.perf_counter()
    acc.finish()
    return t_add, time.perf_counter() - t0, t_base


def with_model(args) -> None:
    """The tracker with frame rows, without and with signals, interleaved (see the module's docstring)."""
    import shutil
    import tempfile
    from pathlib import Path

    import torch

    import bench_propagation as bp
    from pipeline.paths import RunPaths
    from pipeline.stages.models import load_model
    from pipeline.stages.track import TrackOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-signals-"))
    try:
        folder, desc = bp.prepare_video(args, work, args.fps_frames)
        model = load_model(bp.model_config(args))
        out = RunPaths.of(work / "run")
        out.tmp.mkdir(parents=True)
        first = cv2.imread(str(folder / "00000.jpg"))
        height, width = first.shape[:2]
        print(f"model {model.label} ({'random weights' if model.random_weights else args.checkpoint}), device "
              f"{model.device}, image size {model.image_size}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs; video: {desc}; load average before {os.getloadavg()}")
        bp.pipeline_flow(model, bp.sub_folder(folder, 2), bp.grid_masks(1, height, width), out, "warm",
                         TrackOptions())
        print("| objects | fps before / with signals | model share before / with | outside the model ms/frame "
              "before / with | signals ms/frame | signals ms/object-frame |")
        print("|---|---|---|---|---|---|")
        for n in args.objects:
            masks = bp.grid_masks(n, height, width)
            runs: dict[str, list] = {"before": [], "signals": []}
            for rep in range(args.repeats):
                results = {k: bp.FlowResult(args.fps_frames) for k in runs}
                steps = {k: bp.pipeline_steps(model, folder, masks, out, f"{k}-{n}-{rep}", TrackOptions(),
                                              results[k], write_thread=False,
                                              rows="plain" if k == "before" else "signals") for k in runs}
                if rep % 2:
                    steps = dict(reversed(list(steps.items())))
                bp.run_flows(model, steps, results, interleave=True)
                for k in runs:
                    runs[k].append(results[k])
            b, s = bp.pooled(runs["before"]), bp.pooled(runs["signals"])
            sig_s = sum(r.extra["seconds_signals"] for r in runs["signals"])
            frames = sum(r.frames for r in runs["signals"])
            print(f"| {n} | {b.fps:.3f} / {s.fps:.3f} | {b.model_share:.1%} / {s.model_share:.1%} | "
                  f"{b.outside_ms:.0f} / {s.outside_ms:.0f} | {1e3 * sig_s / frames:.1f} | "
                  f"{1e3 * sig_s / (frames * n):.2f} |", flush=True)
        print(f"load average after {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--objects", nargs="+", type=int, default=None, help="default: 8 32 (with the model: 1 8)")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--with-model", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--model", default="sam2.1_hiera_tiny")
    ap.add_argument("--checkpoint")
    ap.add_argument("--video")
    ap.add_argument("--fps-frames", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.with_model:
        args.objects = args.objects or [1, 8]
        args.repeats = min(args.repeats, 2)
        return with_model(args)
    args.objects = args.objects or [8, 32]
    cv2.setNumThreads(1)  # the writer thread has one core at most
    print(f"load average before: {os.getloadavg()}")
    print(f"{'size':>6} {'objects':>7} {'ms/obj-frame':>12} {'baseline ms':>11} {'ratio':>6} {'finish ms':>9}")
    for size in args.sizes:
        h, w = SIZES[size]
        for n in args.objects:
            runs = [measure(h, w, n, args.frames, seed=r) for r in range(args.repeats)]
            add, fin, base = min(r[0] for r in runs), min(r[1] for r in runs), min(r[2] for r in runs)
            per = 1e3 / (n * args.frames)
            print(f"{size:>6} {n:>7} {add * per:12.3f} {base * per:11.3f} {add / base:6.1f} {fin * 1e3:9.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
