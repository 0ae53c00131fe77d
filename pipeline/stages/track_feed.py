"""Frames for the tracking engine: decoded and preprocessed ahead of the model, in a helper thread that does
no torch arithmetic, and `Tracking`, the iterator `track` returns, which runs that thread beside the engine.

Threads. The model runs in the caller's thread. Torch's OpenMP runtime (libgomp) gives every thread that runs
a parallel op its own worker pool and stops spinning between parallel regions once there are more pool threads
than cores: measured on a 2-core CPU, sam2's per-object propagation ran 1.7x slower in a second thread than
in the main thread, so the helper threads here do no torch arithmetic (decoding is PIL and numpy). And
2-thread torch on 2 cores collapses when anything else takes a core (measured: 1.84 -> 0.18 fps at 512
while another process used one core), so decoding ahead and writing behind (`write_behind`) run in helper
threads only where a core is free for them (`spare_core`: always beside a GPU); else they run between the
model's frames, in its thread, which costs the same CPU time without stalling it (measured on a quiet
2-core CPU: fps within 1% either way).
"""
from __future__ import annotations

import queue
import threading
import weakref
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from pipeline.records import FrameMasks
from pipeline.stages.track_options import TrackerState, TrackOptions, TrackStats, resolve_tf32

if TYPE_CHECKING:
    from pipeline.stages.track import _Engine


_IMG_MEAN = np.asarray((0.485, 0.456, 0.406), dtype=np.float32)[:, None, None]
_IMG_STD = np.asarray((0.229, 0.224, 0.225), dtype=np.float32)[:, None, None]


# sam2's loader maps each uint8 value v of channel c to float32(v / 255.0 in float64), then subtracts the mean
# and divides by the std in float32. Every step is correctly rounded elementwise IEEE arithmetic that depends
# on (c, v) alone, so a table of the 3 x 256 results gives the same bits with one gather per pixel.
_NORMALIZED = ((np.arange(256) / 255.0).astype(np.float32)[None, :] - _IMG_MEAN[:, 0]) / _IMG_STD[:, 0]


def preprocess_frame_numpy(rgb: np.ndarray, image_size: int, pin_memory: bool = False) -> torch.Tensor:
    """sam2's JPEG-folder loader bit for bit (the same PIL resize, float64 /255, float32 mean/std; the last
    three as a table, `_NORMALIZED`), computed with numpy so that the prefetch thread starts no OpenMP pool of
    torch's (see the module's docstring). With `pin_memory` the result is written straight into page-locked
    memory for an asynchronous GPU copy."""
    resized = np.asarray(Image.fromarray(rgb).resize((image_size, image_size)))
    image = torch.empty((3, image_size, image_size), dtype=torch.float32, pin_memory=pin_memory)
    out = image.numpy()
    for c in range(3):
        np.take(_NORMALIZED[c], resized[..., c], out=out[c], mode="clip")  # uint8 indices: clip never clips
    return image


class MediaEnded(IndexError):
    """The media yielded fewer frames than probed (headers can overstate frame counts)."""


class _Ended:
    """The caller's iterator ran out after `count` frames."""

    def __init__(self, count: int):
        self.count = count


class _Failure:
    """An exception raised in a helper thread, carried to the thread that reports it."""

    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class _AliveCounter:
    """Counts preprocessed frames whose memory is still held anywhere (the queue, the model, sam2's feature
    cache): a finalizer on the tensor's storage fires only when the last view of it is gone."""

    def __init__(self, stats: TrackStats):
        self._lock = threading.Lock()
        self._alive = 0
        self._stats = stats

    def track(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._alive += 1
            self._stats.max_frames_alive = max(self._stats.max_frames_alive, self._alive)
        weakref.finalize(tensor.untyped_storage(), self._release)

    def _release(self) -> None:
        with self._lock:
            self._alive -= 1


def _produce(frames: Iterable[np.ndarray], start: int, num_frames: int, image_size: int, pin: bool,
             stats: TrackStats, alive: _AliveCounter) -> Iterator:
    """(t, preprocessed frame) for t = start..num_frames-1, pulling frames 0..num_frames-1 from the caller's
    iterator (never more); ends with _Ended(t) if the iterator runs out first."""
    it = iter(frames)
    for t in range(num_frames):
        try:
            rgb = next(it)
        except StopIteration:
            yield _Ended(t)
            return
        stats.frames_pulled = t + 1
        stats.max_frames_ahead = max(stats.max_frames_ahead, t + 1 - stats.frames)
        if t < start:
            continue  # before the first prompt: never tracked, so never preprocessed
        image = preprocess_frame_numpy(rgb, image_size, pin_memory=pin)
        del rgb
        alive.track(image)
        yield t, image
        del image


def _prefetch(produce: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Run the producer in the helper thread, at most the queue's size ahead of the model."""
    try:
        for item in produce:
            if not _put(out, item, stop):
                return
    except BaseException as e:  # noqa: BLE001 - carried to the caller's thread and raised there
        _put(out, _Failure(e), stop)


class _FrameFeed:
    """sam2's `images[t]`: frames taken in order from the prefetch queue (or, without a decode thread, from
    the producer directly); `release_before` drops old ones."""

    def __init__(self, source: queue.Queue | Iterator, num_frames: int, device: torch.device):
        self._next_item = source.get if isinstance(source, queue.Queue) else source.__next__
        self._n = num_frames
        self._device = device
        self._held: dict[int, torch.Tensor] = {}
        self._next = 0  # every frame before this one was received (and maybe released)
        self._ended: _Ended | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, t: int) -> torch.Tensor:
        while t not in self._held:
            if t < self._next:
                raise IndexError(f"frame {t} was already released (frames are streamed in order)")
            if self._ended is not None:
                raise MediaEnded(f"the media ended at frame {self._ended.count}, expected {self._n} frames")
            item = self._next_item()
            if isinstance(item, _Failure):
                raise item.error
            if isinstance(item, _Ended):
                self._ended = item
                continue
            index, image = item
            self._held[index] = image
            self._next = index + 1
        image = self._held[t]
        if image.device != self._device:
            return image.to(self._device, non_blocking=True)  # from pinned memory: asynchronous
        return image

    def release_before(self, t: int) -> None:
        for index in [i for i in self._held if i < t]:
            del self._held[index]


def _set_tf32(value: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = value


class Tracking(Iterator[FrameMasks]):
    """The iterator `track` returns: FrameMasks in frame order, with live `stats`.

    The model runs in the caller's thread, one frame per `next()`. Decoding runs ahead in a thread started
    by the first `next()` and joined after the last frame, on an error, or by `close()` (also called when
    the iterator is dropped); after that the caller's frame iterator is free again."""

    def __init__(self, engine: "_Engine | None", frames: Iterable[np.ndarray], stats: TrackStats,
                 options: TrackOptions, decode_thread: bool = False):
        self.stats = stats
        self.device = engine.device if engine is not None else None  # the model's device
        self._engine = engine
        self._restore: list = []  # (setter, old value) of global flags to put back when done
        self._gen = self._generate(engine, frames, options, decode_thread) if engine is not None else iter(())

    def __iter__(self) -> "Tracking":
        return self

    def __next__(self) -> FrameMasks:
        return next(self._gen)

    def snapshot(self) -> TrackerState:
        """The engine's state after the last frame yielded, for `track(..., resume=...)` (see TrackerState).
        Take it between frames, in the thread that iterates."""
        if self._engine is None:
            raise RuntimeError("nothing is tracked (no prompts): there is no state to save")
        return self._engine.snapshot()

    def drop(self, object_ids: Iterable[int]) -> None:
        """Stop tracking these objects from the next frame on. They stay in every later FrameMasks'
        `object_ids` (the layout is stable for the writer) with all-False masks and NaN scores. Call it between
        frames, in the thread that iterates; ValueError for an id that was never tracked."""
        if self._engine is None:
            raise ValueError(f"nothing is tracked (no prompts): there are no objects {list(object_ids)} to drop")
        self._engine.drop(object_ids)

    def close(self) -> None:
        """Stop decoding ahead and restore global flags; later `next()` calls raise StopIteration."""
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()
        self._restore_flags()

    def __del__(self) -> None:
        self.close()

    def _restore_flags(self) -> None:
        while self._restore:
            setter, value = self._restore.pop()
            setter(value)

    def _generate(self, engine: "_Engine", frames: Iterable[np.ndarray], options: TrackOptions, decode_thread: bool):
        device = engine.device
        if resolve_tf32(options.tf32, device):
            self._restore.append((_set_tf32, (torch.backends.cuda.matmul.allow_tf32,
                                              torch.backends.cudnn.allow_tf32)))
            _set_tf32((True, True))
            self.stats.tf32 = True
        produce = _produce(frames, engine.start, engine.num_frames, engine.model.image_size,
                           device.type == "cuda", self.stats, _AliveCounter(self.stats))
        stop = threading.Event()
        self.stats.decode_thread = decode_thread
        if decode_thread:
            frames_q: queue.Queue = queue.Queue(maxsize=options.prefetch)
            prefetch = threading.Thread(target=_prefetch, name="masklet-prefetch", daemon=True,
                                        args=(produce, frames_q, stop))
            prefetch.start()
            feed = _FrameFeed(frames_q, engine.num_frames, device)
        else:
            prefetch = None
            feed = _FrameFeed(produce, engine.num_frames, device)
        try:
            for fm in engine.frames(feed):
                self.stats.frames += 1
                yield fm
        finally:
            stop.set()
            if prefetch is not None:
                prefetch.join()
            produce.close()
            self._restore_flags()


