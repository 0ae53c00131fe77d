"""Bytes per masklet-frame and write speed of the Zarr mask store, per compressor.

Masks with natural, irregular outlines are made from real frames (the largest connected regions of a
coarse colour quantisation, per frame): not SAM masks, but shaped like object masks at the video's real
resolution. Without a video argument a synthetic clip from pipeline.samples is used.

    python benchmarks/bench_store.py [VIDEO] [--frames 32] [--objects 16]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import StoreConfig
from pipeline.manifest import probe
from pipeline.paths import RunPaths
from pipeline.records import FrameMasks
from pipeline.samples import make_video
from pipeline.stages.decode import open_frames
from pipeline.store.masks import MaskWriter


def region_masks(rgb: np.ndarray, objects: int) -> np.ndarray:
    quant = (cv2.GaussianBlur(rgb, (9, 9), 0) // 64).astype(np.int32)
    labels_in = quant[..., 0] * 16 + quant[..., 1] * 4 + quant[..., 2]
    masks = []
    for value in np.unique(labels_in):
        n, comp, stats, _ = cv2.connectedComponentsWithStats((labels_in == value).astype(np.uint8))
        for c in range(1, n):
            masks.append((stats[c, cv2.CC_STAT_AREA], comp == c))
    masks.sort(key=lambda m: -m[0])
    out = np.zeros((objects,) + rgb.shape[:2], dtype=bool)
    for i, (_, m) in enumerate(masks[:objects]):
        out[i] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video", nargs="?")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--objects", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    video = args.video or make_video(tmp / "synthetic.mp4", frames=args.frames, width=640, height=360)
    item = probe(str(video), "video")
    src = open_frames(item, max_frames=args.frames)
    masks = [region_masks(rgb, args.objects) for _, rgb in src]
    T = len(masks)
    H, W = masks[0].shape[1:]
    visible = sum(int(m.reshape(args.objects, -1).any(axis=1).sum()) for m in masks)
    print(f"{Path(video).name}: {T} frames of {W}x{H}, {args.objects} objects, {visible} non-empty masklet-frames")
    print(f"{'compressor':<12} {'level':>5} {'bytes/masklet-frame':>20} {'raw bytes':>10} {'ratio':>7} {'write MB/s (raw)':>17} {'files':>6}")
    for comp, level in (("blosc-zstd", 5), ("zstd", 5), ("blosc-zstd", 1), ("none", 0)):
        paths = RunPaths.of(tmp / f"run-{comp}-{level}").ensure()
        cfg = StoreConfig(compressor=comp, level=level)
        t0 = time.perf_counter()
        w = MaskWriter(paths, "bench", args.objects, T, H, W, cfg, {})
        for t, m in enumerate(masks):
            w.write(FrameMasks(t, t, tuple(range(args.objects)), m, np.zeros(args.objects, np.float32)))
        w.finish()
        final = w.publish()
        secs = time.perf_counter() - t0
        files = [os.path.join(r, f) for r, _, fs in os.walk(final) for f in fs]
        size = sum(os.path.getsize(f) for f in files)
        raw = args.objects * T * H * W
        print(f"{comp:<12} {level:>5} {size / (args.objects * T):>20.0f} {H * W:>10} {raw / size:>7.0f} "
              f"{raw / secs / 1e6:>17.0f} {len(files):>6}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
