"""Propagation: the plain sam2 flow against the pipeline's tracker, on the same video, checkpoint and settings.

    python benchmarks/bench_propagation.py [--image-size 512] [--objects 1 8 32] [--lengths 60 480]
        [--device cpu|cuda] [--model sam2.1_hiera_tiny] [--random-weights | --checkpoint PATH] [--video PATH]
        [--fps-frames 12] [--threads N] [--quick] [--measure-object-memory]

Plain flow, as sam2's README does it: SAM2AutomaticMaskGenerator on frame 0, `init_state` on the JPEG folder,
`add_new_mask` per object, `propagate_in_video`, each frame's masks written to Zarr as it arrives.
Pipeline: the prompt stage (sam2's AMG through pipeline.stages.prompt, on frame 0 preprocessed as tracking
preprocesses it: `share_features`), then pipeline.stages.track fed by pipeline.stages.decode and reusing the
prompt stage's features of frame 0, its masks written by the same Zarr writer behind the model
(`write_behind`). Both flows track the same masks, the stock AMG's, so that their outputs can be compared (the
pipeline's own AMG masks, from a slightly different resize of frame 0, are counted in the table).

It prints, measured in this run:
- speed at each object count (`--objects`) on `--fps-frames` frames, both flows in this process after a
  warm-up: frames per second from the start of tracking (state creation, prompts added) to the last mask
  written (the AMG is timed apart), their ratio, the share of that wall time spent inside the model's forward
  calls (forward_image, track_step, the memory encoder), the time per frame outside them (each flow's own
  overhead), and whether the two flows' masks agree. On a CPU the two flows run interleaved, a frame of one
  then a frame of the other, each timed over its own steps: on a shared host (a virtual machine) speed drifts
  from minute to minute (on 2026-12-01 the plain flow at 1 object ran 1.121, 0.833 and 0.979 fps in three
  runs minutes apart), more than the difference being measured, and interleaving makes the drift hit both
  flows alike (`--sequential`: one after the other, as on a GPU, where the pipeline's writer thread
  would overlap the other flow's steps);
- peak memory of each flow at each video length (`--lengths`), each run in a fresh process so that the two do
  not share an allocator: peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA. These runs use
  `--memory-objects` objects (default 1) prompted with grid boxes and no AMG, so the peak is propagation's own;
- how much CPU other processes used during each measurement (the figures are only as good as the machine is
  quiet).
With random weights the AMG keeps few masks; when it gives fewer than asked, the rest of the prompts are grid
boxes, the same for both flows, and the output says how many.

`--measure-object-memory` measures instead the peak memory of one batched tracking step per object, the
figure behind pipeline.stages.track.BYTES_PER_OBJECT_PIXEL (the object-batch rule).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ModelConfig, PromptConfig, StoreConfig  # noqa: E402
from pipeline.paths import RunPaths  # noqa: E402
from pipeline.records import FrameMasks, MediaItem, Prompt  # noqa: E402
from pipeline.stages.decode import frame_files, open_frames  # noqa: E402
from pipeline.stages.models import LoadedModel, load_model, patched_method  # noqa: E402
from pipeline.stages.prompt import (  # noqa: E402
    KeyframeFeatures, amg_kwargs, make_generator, prompt_and_encode_keyframe, select_records,
)
from pipeline.stages.track import TrackOptions, resolve_autocast, spare_core, track, write_behind  # noqa: E402
from pipeline.quality.signals import MaskletSignals, PromptSignals  # noqa: E402
from pipeline.store.masks import MaskWriter  # noqa: E402
from pipeline.store.metadata import FrameRows  # noqa: E402

MiB = 1024 * 1024
QUIET_CORES = 0.1  # a speed run during which other processes used more CPU than this is run again


# --- measuring -----------------------------------------------------------------------------------------------


class ModelTimer:
    """Wall time spent inside the model's forward calls: the SAM2Base methods every frame goes through,
    wrapped on the instance (nested calls count once)."""

    METHODS = ("forward_image", "track_step", "_encode_new_memory")

    def __init__(self, predictor):
        self.predictor = predictor
        self.by_flow: dict[str, float] = {}  # seconds per `flow`, the flow whose step is running
        self.flow = ""
        self._local = threading.local()
        self._patches = contextlib.ExitStack()

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth:
                return fn(*args, **kwargs)
            self._local.depth = 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.predictor.device)
                self.by_flow[self.flow] = self.by_flow.get(self.flow, 0.0) + time.perf_counter() - t0
                self._local.depth = 0
        return timed

    def __enter__(self) -> "ModelTimer":
        for name in self.METHODS:
            self._patches.enter_context(patched_method(self.predictor, name, self._wrap))
        return self

    def __exit__(self, *exc) -> None:
        self._patches.close()


class OthersCPU:
    """Cores' worth of CPU used by other processes while a measurement ran (Linux /proc/stat minus our
    own and our children's CPU time); None where /proc/stat is not available."""

    def __enter__(self) -> "OthersCPU":
        self.busy0, self.ours0, self.t0 = _busy_seconds(), _our_seconds(), time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc) -> None:
        busy1 = _busy_seconds()
        if self.busy0 is None or busy1 is None:
            return
        wall = time.perf_counter() - self.t0
        self.cores = max(0.0, ((busy1 - self.busy0) - (_our_seconds() - self.ours0)) / max(wall, 1e-9))


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _our_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- media and prompts ---------------------------------------------------------------------------------------


def prepare_video(args, work: Path, frames_needed: int) -> tuple[Path, str]:
    """A JPEG folder of at least `frames_needed` frames (sam2's init_state reads JPEG folders; both flows read
    the same files). Returns (folder, description)."""
    folder = work / "frames"
    if args.video is None:
        from pipeline.samples import make_frame_folder

        make_frame_folder(folder, frames=frames_needed, width=640, height=480, ext="jpg", seed=0)
        return folder, f"synthetic 640x480 JPEG folder (pipeline.samples), {frames_needed} frames"
    src = Path(args.video)
    if src.is_dir():
        files = [f for f in frame_files(str(src)) if f.lower().endswith((".jpg", ".jpeg"))]
        if len(files) < frames_needed:
            raise SystemExit(f"{src} has {len(files)} JPEG frames; this benchmark needs {frames_needed} "
                             f"(lower --lengths / --fps-frames)")
        folder.mkdir(parents=True)
        for i, f in enumerate(files[:frames_needed]):
            os.symlink(os.path.abspath(f), folder / f"{i:05d}.jpg")
        return folder, f"{src} (JPEG folder), first {frames_needed} frames"
    import av

    folder.mkdir(parents=True)
    n = 0
    with av.open(str(src)) as container:
        for frame in container.decode(video=0):
            frame.to_image().save(folder / f"{n:05d}.jpg", quality=95)
            n += 1
            if n == frames_needed:
                break
    if n < frames_needed:
        raise SystemExit(f"{src} has {n} frames; this benchmark needs {frames_needed} (lower --lengths / --fps-frames)")
    return folder, f"{src}, first {frames_needed} frames extracted to JPEG (quality 95) for both flows"


def sub_folder(folder: Path, frames: int) -> Path:
    """The first `frames` frames of `folder` (symlinks), for init_state, which reads a whole folder."""
    sub = folder.parent / f"frames-{frames}"
    if not sub.exists():
        sub.mkdir()
        for i in range(frames):
            os.symlink(folder / f"{i:05d}.jpg", sub / f"{i:05d}.jpg")
    return sub


def grid_masks(n: int, height: int, width: int) -> list[np.ndarray]:
    """n boxes on a near-square grid over the frame, each a third of its cell's size, centred in it."""
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    ch, cw = height / rows, width / cols
    masks = []
    for i in range(n):
        r, c = divmod(i, cols)
        m = np.zeros((height, width), bool)
        y0, x0 = int(r * ch + ch / 3), int(c * cw + cw / 3)
        m[y0:max(y0 + 1, int(r * ch + 2 * ch / 3)), x0:max(x0 + 1, int(c * cw + 2 * cw / 3))] = True
        masks.append(m)
    return masks


def prompt_config(model: LoadedModel, objects: int) -> PromptConfig:
    if model.random_weights:  # configs/random-demo.yaml: random weights keep no mask under the real thresholds
        return PromptConfig(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, mask_threshold=0.2,
                            min_mask_region_area=0, min_area=16, max_objects=objects)
    return PromptConfig(points_per_side=16, max_objects=objects)


def pad_with_grid(masks: list[np.ndarray], n: int, height: int, width: int) -> list[np.ndarray]:
    return masks + grid_masks(n, height, width)[len(masks):]


def as_prompts(masks: list[np.ndarray], source: str) -> list[Prompt]:
    return [Prompt(object_id=i, frame=0, mask=m, point=(0.0, 0.0), predicted_iou=0.0, stability_score=0.0,
                   area=int(m.sum()), bbox=(0, 0, 0, 0), source=source) for i, m in enumerate(masks)]


# --- the two flows -------------------------------------------------------------------------------------------


@dataclass
class FlowResult:
    frames: int
    seconds: float = 0.0  # state creation to last mask written
    model_seconds: float = 0.0
    array: object = None  # the written Zarr array
    others_cores: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds

    @property
    def quiet(self) -> bool:
        return self.others_cores is None or self.others_cores <= QUIET_CORES

    @property
    def model_share(self) -> float:
        return self.model_seconds / self.seconds

    @property
    def outside_ms(self) -> float:
        """Milliseconds per frame spent outside the model's forward calls: the flow's own overhead."""
        return 1000 * (self.seconds - self.model_seconds) / self.frames


def pooled(runs: list[FlowResult]) -> FlowResult:
    """The undisturbed runs (all of them if none was) as one: total frames over total seconds."""
    kept = [r for r in runs if r.quiet] or runs
    return FlowResult(sum(r.frames for r in kept), sum(r.seconds for r in kept),
                      sum(r.model_seconds for r in kept), array=kept[0].array, extra=kept[0].extra,
                      others_cores=max((r.others_cores for r in kept if r.others_cores is not None), default=None))


def plain_amg(model: LoadedModel, folder: Path, cfg: PromptConfig) -> list[np.ndarray]:
    """sam2's own AMG on frame 0 read as sam2's loader reads it; our selection rule (it runs no model code)."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    amg = SAM2AutomaticMaskGenerator(model.predictor, **amg_kwargs(cfg))
    s = model.image_size
    amg.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    frame0 = np.array(Image.open(folder / "00000.jpg").convert("RGB"))
    return [np.asarray(r["segmentation"], bool) for r in select_records(amg.generate(frame0), cfg)]


def plain_steps(model: LoadedModel, folder: Path, masks: list[np.ndarray], out: RunPaths, tag: str,
                result: "FlowResult"):
    """sam2's video predictor as its README uses it, masks written to Zarr as each frame arrives; one step per
    frame (state creation and prompts are the first step), filling `result` (not its timings)."""
    predictor = model.predictor
    height, width = masks[0].shape
    state = predictor.init_state(video_path=str(folder))
    for obj_id, m in enumerate(masks):
        predictor.add_new_mask(state, frame_idx=0, obj_id=obj_id, mask=m)
    writer = MaskWriter(out, tag, len(masks), result.frames, height, width, StoreConfig(), {})
    nan = np.full(len(masks), np.nan, np.float32)
    frames = predictor.propagate_in_video(state)  # sam2 runs it in inference mode, step by step
    yield
    for t, obj_ids, video_res_masks in frames:
        writer.write(FrameMasks(t, t, tuple(obj_ids), (video_res_masks[:, 0] > 0.0).cpu().numpy(), nan))
        yield
    writer.finish()
    _sync(model.device)
    result.array = writer.array


def pipeline_amg(model: LoadedModel, folder: Path, cfg: PromptConfig, height: int,
                 width: int) -> tuple[list[np.ndarray], KeyframeFeatures | None]:
    """The pipeline's prompt stage on frame 0 as pipeline.stages.decode reads it: its masks, and with
    `cfg.share_features` (the default) the frame's features, which tracking reuses."""
    item = MediaItem(item_id="bench", path=str(folder), kind="frames", num_frames=1, width=width, height=height)
    _, rgb = next(iter(open_frames(item)))
    prompts, keyframe = prompt_and_encode_keyframe(make_generator(model, cfg), rgb, cfg, frame=0)
    return [p.mask for p in prompts], keyframe


def pipeline_steps(model: LoadedModel, folder: Path, masks: list[np.ndarray], out: RunPaths, tag: str,
                   options: TrackOptions, result: "FlowResult", write_thread: bool | None = None,
                   keyframe: KeyframeFeatures | None = None, rows: str | None = None):
    """pipeline.stages.decode -> track -> the same Zarr writer, writing behind the model; one step per frame
    when the writes run in the model's thread (`write_thread` False, as on a CPU without a spare core), else
    a single step for the whole run (write_behind's own loop). `rows`: also build the frame rows beside the
    Zarr writes as the worker does, "plain" (areas and boxes) or "signals" (with the quality signals)."""
    height, width = masks[0].shape
    frame_rows = None
    if rows is not None:
        signals = None
        if rows == "signals":
            signals = MaskletSignals([PromptSignals(i, 0, 0.0, 0.0, int(m.sum())) for i, m in enumerate(masks)],
                                     height, width, keep_rows=False)
        frame_rows = FrameRows(tag, signals)

    def write(fm: FrameMasks) -> None:
        writer.write(fm)
        if frame_rows is not None:
            frame_rows.add(fm.frame, fm.source_frame, fm.object_ids, fm.masks, fm.object_scores)

    item = MediaItem(item_id="bench", path=str(folder), kind="frames", num_frames=result.frames, width=width,
                     height=height)
    source = open_frames(item)
    writer = MaskWriter(out, tag, len(masks), result.frames, height, width, StoreConfig(), {})
    stream = track(model, (rgb for _, rgb in source), result.frames, height, width, as_prompts(masks, "bench"),
                   source.source_frames, options, keyframe=keyframe)
    if write_thread is None:
        write_thread = spare_core(model.device)
    if write_thread:
        written = write_behind(stream, write, thread=True)
    else:  # write_behind's loop when no core is free for a writer thread, a frame per step
        yield
        written = 0
        for fm in stream:
            write(fm)
            written += 1
            yield
    writer.finish()
    _sync(model.device)
    stats = stream.stats
    result.frames, result.array = written, writer.array
    result.extra = {"object_batch": stats.object_batch, "autocast": stats.autocast,
                    "max_non_cond_retained": stats.max_non_cond_retained, "memory_window": stats.memory_window,
                    "max_frames_alive": stats.max_frames_alive, "self_attention_runs": stats.self_attention_runs,
                    "keyframe_reused": stats.keyframe_reused,
                    "seconds_signals": frame_rows.seconds_signals if frame_rows is not None else 0.0}


def run_flows(model: LoadedModel, steps: dict[str, object], results: dict[str, "FlowResult"],
              interleave: bool) -> None:
    """Run the flows' step generators, timing each flow's steps apart (and its model calls). Interleaved: a
    step of one, then a step of the other, which goes first alternating every frame, so that whatever else
    slows the machine (other tenants of a virtual machine's host) slows both flows alike. Else one flow to
    its end, then the next."""
    with ModelTimer(model.predictor) as timer:
        live = list(steps)
        turn = 0
        while live:
            order = live if turn % 2 == 0 or not interleave else live[::-1]
            for flow in list(order if interleave else order[:1]):
                timer.flow = flow
                t0 = time.perf_counter()
                try:
                    next(steps[flow])
                except StopIteration:
                    live.remove(flow)
                results[flow].seconds += time.perf_counter() - t0
            turn += 1
        for flow, r in results.items():
            r.model_seconds = timer.by_flow.get(flow, 0.0)


def plain_flow(model: LoadedModel, folder: Path, masks: list[np.ndarray], out: RunPaths, tag: str) -> "FlowResult":
    result = FlowResult(len(frame_files(str(folder))))
    amp = (torch.autocast("cuda", dtype=torch.bfloat16)
           if resolve_autocast("auto", model.device) == "bf16" else contextlib.nullcontext())
    with amp:
        run_flows(model, {"plain": plain_steps(model, folder, masks, out, tag, result)}, {"plain": result}, False)
    return result


def pipeline_flow(model: LoadedModel, folder: Path, masks: list[np.ndarray], out: RunPaths, tag: str,
                  options: TrackOptions, keyframe: KeyframeFeatures | None = None) -> "FlowResult":
    result = FlowResult(len(frame_files(str(folder))))
    run_flows(model, {"pipeline": pipeline_steps(model, folder, masks, out, tag, options, result,
                                                 keyframe=keyframe)},
              {"pipeline": result}, False)
    return result


def both_flows(model: LoadedModel, folder: Path, masks: list[np.ndarray], out: RunPaths, tag: str,
               options: TrackOptions, first: str, keyframe: KeyframeFeatures | None) -> dict[str, "FlowResult"]:
    """Both flows interleaved frame by frame (`first` steps first on even frames), on a CPU: each flow's
    seconds are its own steps' (see run_flows)."""
    frames = len(frame_files(str(folder)))
    results = {"plain": FlowResult(frames), "pipeline": FlowResult(frames)}
    steps = {"plain": plain_steps(model, folder, masks, out, f"plain-{tag}", results["plain"]),
             "pipeline": pipeline_steps(model, folder, masks, out, f"pipeline-{tag}", options,
                                        results["pipeline"], write_thread=False, keyframe=keyframe)}
    if first == "pipeline":
        steps = {"pipeline": steps["pipeline"], "plain": steps["plain"]}
    run_flows(model, steps, results, interleave=True)
    return results


def compare_masks(a, b) -> str:
    """'identical', or the lowest per-object per-frame IoU (empty vs empty counts as 1)."""
    if a.shape != b.shape:
        return f"shapes differ {a.shape} vs {b.shape}"
    worst, identical = 1.0, True
    for t in range(a.shape[1]):
        x, y = a[:, t], b[:, t]
        if identical and np.array_equal(x, y):
            continue
        identical = False
        inter = np.logical_and(x, y).reshape(len(x), -1).sum(1)
        union = np.logical_or(x, y).reshape(len(x), -1).sum(1)
        iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
        worst = min(worst, float(iou.min()))
    return "identical" if identical else f"min IoU {worst:.4f}"


# --- children for peak memory --------------------------------------------------------------------------------


def model_config(args) -> ModelConfig:
    return ModelConfig(name=args.model, checkpoint=args.checkpoint, random_weights=args.checkpoint is None,
                       seed=0, image_size=args.image_size, device=args.device, threads=args.threads,
                       allow_download=False)


def child_main(args) -> None:
    """One flow on one folder in this fresh process; prints a RESULT line with its peak memory."""
    model = load_model(model_config(args))
    folder = Path(args.child_folder)
    first = np.array(Image.open(folder / "00000.jpg").convert("RGB"))
    masks = grid_masks(args.memory_objects, first.shape[0], first.shape[1])
    out = RunPaths.of(args.child_out)
    out.tmp.mkdir(parents=True, exist_ok=True)
    # Building the model peaks higher than tracking a small model does; measure from here on.
    baseline = _reset_peak_memory(model.device)
    if args.child == "plain":
        result = plain_flow(model, folder, masks, out, "plain")
    else:
        result = pipeline_flow(model, folder, masks, out, "pipeline", TrackOptions())
    peak = _peak_memory(model.device)
    print("RESULT " + json.dumps({"peak_bytes": peak, "baseline_bytes": baseline, "frames": result.frames, "seconds": result.seconds,
                                  "model_seconds": result.model_seconds, **result.extra}), flush=True)


def _reset_peak_memory(device: torch.device) -> int:
    """Reset the peak-memory mark; returns the memory in use now (CUDA: allocated; CPU: RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise SystemExit(f"cannot reset the peak RSS (/proc/self/clear_refs: {e}); this benchmark's memory part "
                         f"needs Linux") from e
    return _status_bytes("VmRSS")


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise SystemExit(f"/proc/self/status has no {key}")


def run_child(args, flow: str, folder: Path, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", flow, "--child-folder", str(folder),
           "--child-out", str(work / f"child-{flow}-{folder.name}"), "--image-size", str(args.image_size),
           "--device", args.device, "--model", args.model, "--memory-objects", str(args.memory_objects),
           "--threads", str(args.threads)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    with OthersCPU() as others:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {flow} child on {folder} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["others_cores"] = others.cores
    return result


# --- the object-batch measurement ----------------------------------------------------------------------------


def _peak_live_bytes_cpu(step) -> int:
    """Peak bytes of the tensors created while `step()` runs and still alive, over its course: every op's new
    output storage is counted when made and uncounted when freed (a finalizer on the storage). Storages that
    existed before (inputs, in-place results, the model's weights) are not counted, nor their frees, so this
    bounds the step's own need from above."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.counted: set[int] = set()

        def _free(self, key: int, nbytes: int) -> None:
            self.counted.discard(key)
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = id(storage)
                if key in inputs or key in self.counted:
                    continue
                self.counted.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
            return out

    mode = LiveBytes()
    with mode:
        step()
    return mode.peak


def measure_object_memory(args) -> None:
    """Peak memory of one tracking step (memory attention, decoder, memory encoder for all objects of a
    batch, plus the frame's upsampling) at several batch sizes, after enough frames that the memory bank is
    full; the slope per object is what default_object_batch budgets."""
    sizes = args.sizes
    batches = args.batches
    frames = 9  # 7 memory frames (num_maskmem) fill the bank; the step measured is the 9th
    height, width = 480, 640
    rng = np.random.default_rng(0)
    rgb = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)]
    print(f"peak memory of one batched tracking step, {args.model}, device {args.device}, "
          f"{'random weights' if args.checkpoint is None else args.checkpoint}, {frames}th frame of {width}x{height}")
    print(f"{'image size':>10} {'objects':>8} {'step peak MiB':>14}")
    per_pixel = []
    for size in sizes:
        model = load_model(replace(model_config(args), image_size=size))
        peaks = []
        for b in batches:
            stream = track(model, iter(rgb), frames, height, width, as_prompts(grid_masks(b, height, width), "grid"),
                           list(range(frames)), TrackOptions(object_batch=b))
            for _ in range(frames - 1):
                next(stream)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                next(stream)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = _peak_live_bytes_cpu(lambda: next(stream))
            stream.close()
            peaks.append(peak)
            print(f"{size:>10} {b:>8} {peak / MiB:>14.1f}", flush=True)
        slope = float(np.polyfit(batches, peaks, 1)[0])
        per_pixel.append(slope / size**2)
        print(f"{size:>10} {'slope':>8} {slope / MiB:>14.1f} MiB per object = {slope / size**2:.0f} bytes per input pixel")
    print(f"largest: {max(per_pixel):.0f} bytes per object per input pixel (track.BYTES_PER_OBJECT_PIXEL is the "
          f"budget used by default_object_batch)")


# --- main ----------------------------------------------------------------------------------------------------


FULL = {"image_size": 512, "objects": [1, 8, 32], "lengths": [60, 480]}
QUICK = {"image_size": 256, "objects": [1, 8], "lengths": [24, 96]}


def parse_args(argv=None):
    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    defaults = QUICK if quick else FULL  # --quick changes the defaults; explicit options still win
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=defaults["image_size"])
    ap.add_argument("--objects", type=int, nargs="+", default=defaults["objects"])
    ap.add_argument("--lengths", type=int, nargs="+", default=defaults["lengths"])
    ap.add_argument("--fps-frames", type=int, default=12, help="frames of the speed runs")
    ap.add_argument("--repeats", type=int, default=2,
                    help="speed runs per flow and object count (the undisturbed ones pooled)")
    ap.add_argument("--sequential", action="store_true",
                    help="on a CPU too, run the flows one after the other instead of interleaved frame by frame")
    ap.add_argument("--max-repeats", type=int, default=4,
                    help="runs per flow at most, when other processes disturbed the first ones")
    ap.add_argument("--memory-objects", type=int, default=1, help="objects of the peak-memory runs")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="sam2.1_hiera_tiny")
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument("--random-weights", action="store_true", help="seeded random weights (the default)")
    weights.add_argument("--checkpoint")
    ap.add_argument("--video", help="a video file or a JPEG frame folder (default: a synthetic 640x480 clip)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="image size 256, lengths 24 and 96, objects 1 and 8")
    ap.add_argument("--measure-object-memory", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="with --measure-object-memory")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="with --measure-object-memory")
    ap.add_argument("--child", choices=["plain", "pipeline"], help=argparse.SUPPRESS)
    ap.add_argument("--child-folder", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _fmt_cores(c: float | None) -> str:
    return "n/a" if c is None else f"{c:.2f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args)
    if args.measure_object_memory:
        return measure_object_memory(args)

    import sam2.sam2_video_predictor as svp

    import sam2.utils.misc as sam2_misc

    svp.tqdm = sam2_misc.tqdm = lambda iterable, *a, **k: iterable  # keep sam2's progress bars out of the table
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-propagation-"))
    try:
        folder, video_desc = prepare_video(args, work, max(max(args.lengths), args.fps_frames))
        model = load_model(model_config(args))
        out = RunPaths.of(work / "run")
        out.tmp.mkdir(parents=True)
        fps_folder = sub_folder(folder, args.fps_frames)
        first = np.array(Image.open(folder / "00000.jpg").convert("RGB"))
        height, width = first.shape[:2]
        options = TrackOptions()
        print(f"# propagation benchmark, {datetime.date.today().isoformat()}", flush=True)
        print(f"model {model.label}, device {model.device}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs; video: {video_desc}")
        print(f"pipeline: TrackOptions() -> autocast {resolve_autocast(options.autocast, model.device)}, "
              f"object batch by default_object_batch; Zarr: StoreConfig() defaults for both flows", flush=True)

        # Warm-up: first calls pay one-time costs (allocator growth, kernel selection); time neither flow on them.
        warm = sub_folder(folder, 2)
        warm_masks = grid_masks(1, height, width)
        plain_amg(model, warm, prompt_config(model, 1))
        pipeline_amg(model, warm, prompt_config(model, 1), height, width)
        plain_flow(model, warm, warm_masks, out, "warm-plain")
        pipeline_flow(model, warm, warm_masks, out, "warm-pipeline", options)

        interleave = model.device.type == "cpu" and not args.sequential
        rows = []
        for index, n in enumerate(args.objects):
            cfg = prompt_config(model, n)
            t0 = time.perf_counter()
            plain_prompt = plain_amg(model, fps_folder, cfg)
            plain_amg_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipe_prompt, keyframe = pipeline_amg(model, fps_folder, cfg, height, width)
            pipe_amg_s = time.perf_counter() - t0
            same_prompts = len(plain_prompt) == len(pipe_prompt) and all(
                np.array_equal(a, b) for a, b in zip(plain_prompt, pipe_prompt))
            amg_note = ("" if same_prompts else
                        f" (pipeline AMG: {len(pipe_prompt)} masks, not the same"
                        + (", frame preprocessed for tracking)" if cfg.share_features else "!)"))
            amg_count = len(plain_prompt)
            # Both flows track the same masks, the stock AMG's (padded with grid boxes), so that their masks can
            # be compared; the pipeline's AMG (on frame 0 preprocessed as for tracking, share_features) gave
            # `pipe_prompt` and the frame's features, which its tracking reuses.
            masks = pad_with_grid(plain_prompt, n, height, width)
            runs = {"plain": [], "pipeline": []}
            rep = 0
            # A run during which other processes used more than QUIET_CORES is run again, up to --max-repeats
            # runs per flow. Interleaved (CPU): which flow steps first alternates by frame, by run and by
            # object count. Sequential: which flow runs first alternates by run and object count.
            while rep < args.max_repeats and (rep < args.repeats or not all(
                    any(r.quiet for r in runs[flow]) for flow in runs)):
                first = ("plain", "pipeline")[(rep + index) % 2]
                if interleave:
                    with OthersCPU() as others:
                        got = both_flows(model, fps_folder, masks, out, f"{n}-{rep}", options, first, keyframe)
                    for r in got.values():
                        r.others_cores = others.cores
                else:
                    got = {}
                    for flow in (first, "pipeline" if first == "plain" else "plain"):
                        with OthersCPU() as others:
                            got[flow] = (plain_flow(model, fps_folder, masks, out, f"plain-{n}-{rep}")
                                         if flow == "plain" else
                                         pipeline_flow(model, fps_folder, masks, out, f"pipeline-{n}-{rep}",
                                                       options, keyframe))
                        got[flow].others_cores = others.cores
                for flow in ("plain", "pipeline"):
                    r = got[flow]
                    runs[flow].append(r)
                    print(f"  speed, {n} objects, run {rep + 1} ({first} first), {flow}: {r.fps:.3f} fps, "
                          f"model share {r.model_share:.1%}, outside the model {r.outside_ms:.0f} ms/frame, "
                          f"others {_fmt_cores(r.others_cores)} cores", flush=True)
                rep += 1
            plain, pipe = pooled(runs["plain"]), pooled(runs["pipeline"])
            agree = compare_masks(runs["plain"][0].array, runs["pipeline"][0].array)
            rows.append((n, amg_count, amg_note, plain_amg_s, pipe_amg_s, plain, pipe, agree,
                         " / ".join(f"{q.fps / p.fps:.3f}" for p, q in zip(runs["plain"], runs["pipeline"]))))
            print(f"  speed, {n} objects: plain {plain.fps:.3f} fps, pipeline {pipe.fps:.3f} fps "
                  f"(object batch {pipe.extra['object_batch']}, keyframe features reused "
                  f"{pipe.extra['keyframe_reused']}, first self-attention runs {pipe.extra['self_attention_runs']} "
                  f"for {args.fps_frames - 1} frames), masks {agree}", flush=True)

        memory = {}
        for length in args.lengths:
            sub = sub_folder(folder, length)
            for flow in ("plain", "pipeline"):
                memory[(flow, length)] = run_child(args, flow, sub, work)
                r = memory[(flow, length)]
                print(f"  memory, {flow}, {length} frames: peak {r['peak_bytes'] / MiB:.0f} MiB, "
                      f"{r['frames'] / r['seconds']:.3f} fps", flush=True)

        # --- the table ---
        print()
        how = ("interleaved frame by frame, each flow timed over its own steps (so that a host's slowdowns hit "
               "both alike), which flow steps first alternating" if interleave else
               "one after the other, which flow runs first alternating")
        print(f"## Speed: {args.fps_frames} frames at image size {model.image_size}, both flows in one process "
              f"after a warm-up, {how}; {args.repeats} runs (more, up to {args.max_repeats}, while other processes "
              f"used over {QUIET_CORES} cores), the undisturbed runs pooled")
        print("fps = frames / seconds from state creation to the last mask written (AMG timed apart); model share "
              "= time inside forward_image + track_step + memory encoder / that wall time; outside = the rest, "
              "per frame; 'others' = cores used by other processes meanwhile (most of any run kept); runs = "
              "each run's ratio")
        print("| objects | prompts (AMG+grid) | plain fps | pipeline fps | ratio | model share plain / pipeline | "
              "outside the model ms/frame plain / pipeline | AMG s plain / pipeline | masks | others | runs |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n, amg_count, amg_note, pa, pp, plain, pipe, agree, all_runs in rows:
            used = min(amg_count, n)
            prompts = f"{used}+{n - used}{amg_note}"
            others = max((c for c in (plain.others_cores, pipe.others_cores) if c is not None), default=None)
            print(f"| {n} | {prompts} | {plain.fps:.3f} | {pipe.fps:.3f} | {pipe.fps / plain.fps:.3f}x | "
                  f"{plain.model_share:.1%} / {pipe.model_share:.1%} | {plain.outside_ms:.0f} / {pipe.outside_ms:.0f} | "
                  f"{pa:.1f} / {pp:.1f} | {agree} | {_fmt_cores(others)} | {all_runs} |")
        what = ("peak RSS (VmHWM, reset once the model is built: building it peaks higher than tracking a small "
                "model does; 'at start' is the RSS then)" if model.device.type == "cpu"
                else "torch.cuda.max_memory_allocated, reset once the model is built ('at start': allocated then)")
        print()
        print(f"## Peak memory, {what}: {args.memory_objects} object(s), grid-box prompts, no AMG, each flow in "
              f"a fresh process")
        print("| frames | plain MiB (at start) | pipeline MiB (at start) | plain fps | pipeline fps | pipeline non-cond outputs held "
              "(max / window) | others plain / pipeline |")
        print("|---|---|---|---|---|---|---|")
        for length in args.lengths:
            p, q = memory[("plain", length)], memory[("pipeline", length)]
            print(f"| {length} | {p['peak_bytes'] / MiB:.0f} ({p['baseline_bytes'] / MiB:.0f}) | "
                  f"{q['peak_bytes'] / MiB:.0f} ({q['baseline_bytes'] / MiB:.0f}) | "
                  f"{p['frames'] / p['seconds']:.3f} | {q['frames'] / q['seconds']:.3f} | "
                  f"{q['max_non_cond_retained']} / {q['memory_window']} | "
                  f"{_fmt_cores(p['others_cores'])} / {_fmt_cores(q['others_cores'])} |")
        lo, hi = min(args.lengths), max(args.lengths)
        growth = {flow: memory[(flow, hi)]["peak_bytes"] / memory[(flow, lo)]["peak_bytes"] - 1
                  for flow in ("plain", "pipeline")}
        delta = {flow: (memory[(flow, hi)]["peak_bytes"] - memory[(flow, lo)]["peak_bytes"]) / MiB
                 for flow in ("plain", "pipeline")}
        print(f"growth {lo} -> {hi} frames: plain {growth['plain']:+.1%} ({delta['plain']:+.0f} MiB), "
              f"pipeline {growth['pipeline']:+.1%} ({delta['pipeline']:+.0f} MiB)")

        print()
        print("## Targets" + (" (CPU)" if model.device.type == "cpu" else ""))
        fps_ok = all(pipe.fps >= plain.fps for *_, plain, pipe, _, _ in rows)
        share = min(pipe.model_share for *_, pipe, _, _ in rows)
        checks = [
            ("pipeline fps >= plain fps at every object count", fps_ok),
            (f"pipeline peak at {hi} frames within 10% of its peak at {lo}", abs(growth["pipeline"]) <= 0.10),
            (f"plain peak grows from {lo} to {hi} frames (by more than 5%)", growth["plain"] > 0.05),
            (f"pipeline model share >= 90% (lowest: {share:.1%})", share >= 0.90),
        ]
        for text, ok in checks:
            print(f"- [{'x' if ok else ' '}] {text}")
        print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
