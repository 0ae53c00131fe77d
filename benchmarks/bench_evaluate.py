"""Time `masklet evaluate` on synthetic DAVIS-layout GT and a davis-png prediction export, beside the
vos-benchmark oracle on the same folders (the SA-V evaluator's arithmetic, its own multiprocessing Pool).

Default: 1,000 videos of 100 frames, 480x270, 2-3 objects each. `--quick`: 12 videos of 10 frames (a test
runs it). Prints the measured figures, the date and the machine.

    python benchmarks/bench_evaluate.py [--quick] [--workers N] [--folder DIR] [--no-oracle]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date

import numpy as np
from PIL import Image

W, H = 480, 270


def _video(args) -> None:
    folder, name, frames, seed = args
    rng = np.random.default_rng(seed)
    objects = 2 + seed % 2
    boxes = [(rng.integers(0, H - 80), rng.integers(0, W - 120), rng.integers(30, 80), rng.integers(40, 120))
             for _ in range(objects)]
    for t in range(frames):
        gt = np.zeros((H, W), np.uint8)
        pred = np.zeros((H, W), np.uint8)
        for k, (y, x, h, w) in enumerate(boxes, start=1):
            y, x = (y + t) % (H - h), (x + 2 * t) % (W - w)
            gt[y:y + h, x:x + w] = k
            jy, jx = rng.integers(-3, 4, size=2)
            pred[max(y + jy, 0):y + h + jy, max(x + jx, 0):x + w + jx] = k
        for sub, arr in (("gt", gt), ("pred", pred)):
            path = os.path.join(folder, sub, name, f"{t:05d}.png")
            Image.fromarray(arr).save(path)


def fabricate(folder: str, videos: int, frames: int, workers: int) -> None:
    for v in range(videos):
        for sub in ("gt", "pred"):
            os.makedirs(os.path.join(folder, sub, f"v{v:04d}"), exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_video, [(folder, f"v{v:04d}", frames, v) for v in range(videos)], chunksize=8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--folder", default=None, help="keep the synthetic data here (default: a temp folder)")
    parser.add_argument("--no-oracle", action="store_true", help="skip the vos-benchmark baseline")
    args = parser.parse_args(argv)
    videos, frames = (12, 10) if args.quick else (1000, 100)
    folder = args.folder or tempfile.mkdtemp(prefix="bench-evaluate-")
    from pipeline.evaluate import evaluate

    try:
        t0 = time.perf_counter()
        fabricate(folder, videos, frames, args.workers)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate(os.path.join(folder, "pred"), os.path.join(folder, "gt"), semantics="sav", matched_ids=True,
                      workers=args.workers)
        ours = time.perf_counter() - t0
        overall = ev.table.to_pylist()[-1]
        t0 = time.perf_counter()
        matched = evaluate(os.path.join(folder, "pred"), os.path.join(folder, "gt"), semantics="sav",
                           workers=args.workers)
        ours_matching = time.perf_counter() - t0
        objects = overall["gt_objects"]
        print(f"bench_evaluate {date.today().isoformat()} on {platform.node()} ({os.cpu_count()} CPUs visible, "
              f"a shared machine), {videos} videos x {frames} frames, {W}x{H}, {objects} objects; "
              f"data made in {made:.1f} s")
        print(f"  masklet evaluate --matched-ids, {args.workers} workers: {ours:8.1f} s "
              f"({videos * frames / ours:,.0f} frames/s)  J&F {overall['JF']:.4f}")
        print(f"  masklet evaluate (Hungarian),   {args.workers} workers: {ours_matching:8.1f} s  "
              f"J&F {matched.table.to_pylist()[-1]['JF']:.4f}")
        if not args.no_oracle:
            from vos_benchmark.benchmark import benchmark

            t0 = time.perf_counter()
            jf, _, _, _ = benchmark([os.path.join(folder, "gt")], [os.path.join(folder, "pred")],
                                    num_processes=args.workers, verbose=False)
            ref = time.perf_counter() - t0
            print(f"  vos-benchmark 0.1.0 (baseline), {args.workers} processes: {ref:8.1f} s  J&F {jf[0]:.4f}")
            assert abs(jf[0] - overall["JF"]) < 1e-6, (jf[0], overall["JF"])
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
