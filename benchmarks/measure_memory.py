"""The two per-pixel memory costs of an item that grow with the video's resolution, measured on CPU.

    python benchmarks/measure_memory.py [--image-size 256] [--sizes 320x240 640x480] [--batches 16 32]
        [--objects 1 2 4] [--threads N] [--quick]

- AMG: SAM2AutomaticMaskGenerator upsamples each batch of `points_per_batch` points' masks (3 per point with
  multimask output) to the frame's full resolution in float32, then thresholds them, scores their stability
  and encodes them; its peak grows as points_per_batch x frame pixels. Measured: the peak of one `generate()`
  at each frame size and batch, the slope of a least-squares line through peak against
  points_per_batch x pixels = bytes per point per pixel (pipeline.device.AMG_BYTES_PER_POINT_PIXEL budgets it).
- Upsampling: each tracked frame, every object's low-resolution mask goes to video resolution in float32
  (sam2's `_get_orig_video_res_output`) and is thresholded to bool, an object batch at a time
  (pipeline.stages.track). Measured: the peak of that step for 1, 2, 4 objects at each frame size, slope per
  object per pixel (pipeline.device.UPSAMPLE_BYTES_PER_OBJECT_PIXEL budgets it).

Peaks are the bytes of torch tensors created during the call and alive at once (a TorchDispatchMode counts
each new storage when made and uncounts it when freed), so they are what the call needs on the device the
model runs on; weights and inputs made before are not counted. On a CUDA device the same code reads
torch.cuda.max_memory_allocated instead. Model weights are random (the real architecture): the sizes of the
tensors do not depend on the weights, except how many masks survive the AMG's filters, which are opened here
(every mask survives) to measure the worst case. The figures printed are this run's.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.config import ModelConfig, PromptConfig  # noqa: E402
from pipeline.device import AMG_BYTES_PER_POINT_PIXEL, UPSAMPLE_BYTES_PER_OBJECT_PIXEL  # noqa: E402
from pipeline.stages.models import load_model  # noqa: E402
from pipeline.stages.prompt import make_generator  # noqa: E402
from bench_propagation import _peak_live_bytes_cpu  # noqa: E402

MiB = 1024**2


def peak_live_bytes(step, device: torch.device) -> int:
    """Peak bytes of the tensors `step()` creates that are alive at once (see the module's docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _peak_live_bytes_cpu(step)  # the propagation benchmark's counter of live tensor storage


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)[0])


def frame(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A frame with large flat regions (the AMG finds masks there) and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = np.where((x // max(1, width // 4) + y // max(1, height // 3)) % 2, 200, 40)
    rgb[..., 1] = (x * 255 // max(1, width - 1)).astype(np.uint8)
    rgb[..., 2] = rng.integers(0, 60, (height, width), dtype=np.uint8)
    return rgb


def measure_amg(model, sizes: list[tuple[int, int]], batches: list[int], points_per_side: int) -> float:
    print(f"AMG: peak of one generate(), {points_per_side}x{points_per_side} grid, multimask, filters open")
    print(f"{'frame':>10} {'points/batch':>13} {'peak MiB':>9} {'B per point-pixel':>18}")
    xs, ys = [], []
    for width, height in sizes:
        rgb = frame(width, height)
        for ppb in batches:
            cfg = PromptConfig(points_per_side=points_per_side, points_per_batch=ppb, pred_iou_thresh=0.0,
                               stability_score_thresh=0.0, min_mask_region_area=0, share_features=False)
            generator = make_generator(model, cfg)
            peak = peak_live_bytes(lambda: generator.generate(rgb), model.device)
            xs.append(ppb * width * height)
            ys.append(peak)
            print(f"{width}x{height:<5} {ppb:>13} {peak / MiB:>9.1f} {peak / xs[-1]:>18.2f}", flush=True)
    per = slope(xs, ys)
    print(f"AMG slope: {per:.2f} bytes per point per frame pixel (budget: AMG_BYTES_PER_POINT_PIXEL = "
          f"{AMG_BYTES_PER_POINT_PIXEL})")
    return per


def measure_upsampling(model, sizes: list[tuple[int, int]], objects: list[int], threshold: float = 0.0) -> float:
    print("upsampling: one object batch's low-res masks to video resolution, thresholded (as the tracker does)")
    print(f"{'frame':>10} {'objects':>8} {'peak MiB':>9} {'B per object-pixel':>19}")
    low = model.image_size // 4
    per_size = []
    for width, height in sizes:
        state = {"device": model.device, "video_height": height, "video_width": width}
        peaks = []
        for n in objects:
            low_res = torch.randn(n, 1, low, low, device=model.device)

            def step() -> None:
                with torch.inference_mode():
                    _, video = model.predictor._get_orig_video_res_output(state, low_res)
                    (video[:, 0] > threshold).cpu().numpy()

            peaks.append(peak_live_bytes(step, model.device))
            print(f"{width}x{height:<5} {n:>8} {peaks[-1] / MiB:>9.1f} {peaks[-1] / (n * width * height):>19.2f}",
                  flush=True)
        per_size.append(slope(objects, peaks) / (width * height))
    per = max(per_size)
    print(f"upsampling slope: {per:.2f} bytes per object per video pixel (budget: UPSAMPLE_BYTES_PER_OBJECT_PIXEL = "
          f"{UPSAMPLE_BYTES_PER_OBJECT_PIXEL})")
    return per


def parse_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256, help="model input size (the costs measured do not "
                    "depend on it: they are at the frame's resolution)")
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=[(320, 240), (640, 480), (1280, 720)])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="AMG points per batch")
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--objects", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="320x240 and 640x480, batches 8 and 16 of a 4x4 grid")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.points_per_side = [(320, 240), (640, 480)], [8, 16], 4
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(replace(ModelConfig(random_weights=True, image_size=args.image_size, device=args.device),
                               threads=args.threads))
    print(f"sam2.1_hiera_tiny (random weights) at image size {args.image_size} on {model.device}, torch "
          f"{torch.__version__}")
    amg = measure_amg(model, args.sizes, args.batches, args.points_per_side)
    upsampling = measure_upsampling(model, args.sizes, args.objects)
    return {"amg_bytes_per_point_pixel": amg, "upsample_bytes_per_object_pixel": upsampling}


if __name__ == "__main__":
    main()
