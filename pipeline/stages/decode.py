"""Lazy frame decoding: a MediaItem in, (source frame index, RGB uint8 frame) pairs out, one at a time.

Owns turning every supported input into the same thing: upright RGB uint8 (H, W, 3) frames. Videos are
read with PyAV, sequentially, converting only the frames that are wanted and applying the display rotation
that phones record. Frame folders and images are read with PIL exactly as sam2's own loader does
(`Image.open(p).convert("RGB")`), so that our frames equal the ones SAM 2 was evaluated on, bit for bit.

It also owns what counts as readable media (extensions, which files of a folder are frames, in which order),
which the manifest's discovery and probing share, so that what is listed is exactly what is decoded.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
from PIL import Image, ImageOps

from pipeline.records import MediaItem, MediaKind

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
# The codec a frame folder reports, by its frames' extension.
FRAME_CODECS = {
    ".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff", ".webp": "webp"
}


def display_path(path: str) -> str:
    """`path` as valid UTF-8 text for messages and tables: undecodable bytes are shown as \\xNN."""
    return utf8_text(path)


def utf8_text(text: str) -> str:
    """`text` as valid UTF-8: surrogate-escaped bytes (from os.fsdecode) are shown as \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that did not come from os.fsdecode
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def ffmpeg_reason(error: Exception) -> str:
    """The cause in an FFmpeg error without its errno and file name, e.g. 'Invalid data found when processing input'."""
    reason = getattr(error, "strerror", None) or str(error)
    return utf8_text(str(reason))


def natural_key(name: str) -> tuple[Any, ...]:
    # Text and number parts alternate (re.split with a group), so the tuples compare part by part.
    """Sort key that orders numbered names by their numbers: 2.jpg before 10.jpg; ties broken by the name."""
    parts = re.split(r"(\d+)", name)
    key = tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts))
    return key, os.fsencode(name)


def media_kind_of_name(name: str) -> MediaKind | None:
    """'video' or 'image' by (case-insensitive) extension, None for anything else."""
    ext = os.path.splitext(name)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return None


def frame_files(folder: str) -> list[str]:
    """The frame images of a frame folder, in natural order (00002.jpg before 00010.jpg); hidden files skipped."""
    names = [
        entry.name
        for entry in os.scandir(folder)
        if not entry.name.startswith(".") and entry.is_file() and media_kind_of_name(entry.name) == "image"
    ]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]


class DecodeError(RuntimeError):
    """Media could not be decoded; the message names the item's path and the frame index."""


def decode_video_frames(
    container: av.container.InputContainer, stream: av.VideoStream, shown: str
) -> Iterator[av.VideoFrame]:
    """The decoded frames of `stream`, in order. Raises DecodeError naming `shown` and the frame index.

    A file cut short (an interrupted copy or download) ends in a partial packet that fails to decode: that is
    a short video, not a damaged one, so the partial packet is dropped and the frames before it still come
    out (with frame threading, the decoder may also drop the few frames it was still working on). A packet
    that fails anywhere else is damage, and raises.
    """
    index = 0
    for packet, is_last in _packets_with_last_flag(container, stream, shown):
        try:
            frames = packet.decode()
        except av.FFmpegError as e:
            if is_last:
                continue  # the flush packet after it still returns the frames the decoder holds
            raise DecodeError(f"decoding {shown} failed at frame {index}: {ffmpeg_reason(e)}") from e
        for frame in frames:
            yield frame
            index += 1


def _packets_with_last_flag(
    container: av.container.InputContainer, stream: av.VideoStream, shown: str
) -> Iterator[tuple[av.Packet, bool]]:
    """The stream's packets, each with whether no packet holding data follows it.

    The demuxer ends with empty flush packets; they and the last data packet before them count as last.
    """
    demuxed = container.demux(stream)
    pending: list[av.Packet] = []  # the latest data packet and the empty packets after it
    while True:
        try:
            packet = next(demuxed, None)
        except av.FFmpegError as e:
            raise DecodeError(f"reading {shown} failed: {ffmpeg_reason(e)}") from e
        if packet is None:
            break
        if packet.size > 0 and pending:
            for held in pending:
                yield held, False
            pending = []
        pending.append(packet)
    for held in pending:
        yield held, True


class FrameSource:
    """The frames of one item that a run uses: every `stride`-th frame, at most `max_frames` of them.

    `source_frames` are the indices in the original media that iteration yields, computed from the probed
    frame count; `height` and `width` are those of the yielded frames (upright). Iterating decodes lazily,
    so a long video never sits in memory; each iteration starts from the beginning.
    """

    def __init__(self, item: MediaItem, source_frames: list[int]) -> None:
        self.item = item
        self.source_frames = source_frames
        self.height = item.height
        self.width = item.width

    def __len__(self) -> int:
        return len(self.source_frames)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.item.kind == "video":
            return _iter_video(self.item, self.source_frames, (self.height, self.width))
        if self.item.kind == "frames":
            return _iter_frame_folder(self.item, self.source_frames, (self.height, self.width))
        return _iter_image(self.item, (self.height, self.width))

    def __repr__(self) -> str:
        return f"FrameSource({self.item.item_id!r}, {len(self)} frames, {self.width}x{self.height})"


def open_frames(item: MediaItem, stride: int = 1, max_frames: int | None = None) -> FrameSource:
    """A lazy FrameSource for `item`: frames 0, stride, 2*stride, ..., at most `max_frames` of them."""
    shown = display_path(item.path)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride} (for {shown})")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames} (for {shown})")
    if item.error:
        raise ValueError(f"cannot decode {shown}: probing failed: {item.error}")
    if item.num_frames < 1 or item.width < 1 or item.height < 1:
        raise ValueError(
            f"cannot decode {shown}: the manifest says {item.num_frames} frames of {item.width}x{item.height}; "
            f"rebuild the manifest (or leave its probe columns empty) so the file is probed"
        )
    count = 1 if item.kind == "image" else item.num_frames
    source_frames = list(range(0, count, stride))
    if max_frames is not None:
        source_frames = source_frames[:max_frames]
    return FrameSource(item, source_frames)


def read_frame(item: MediaItem, source_frame: int) -> np.ndarray:
    """Frame `source_frame` of the original media as RGB uint8 (H, W, 3). Videos decode from the start: slow."""
    count = 1 if item.kind == "image" else item.num_frames
    if not 0 <= source_frame < count:
        raise IndexError(f"{display_path(item.path)} has frames 0..{count - 1}; frame {source_frame} does not exist")
    open_frames(item)  # the same checks as a run makes
    for _, rgb in FrameSource(item, [source_frame]):
        return rgb
    raise IndexError(
        f"{display_path(item.path)}: frame {source_frame} was probed but the file ends before it; rebuild the manifest"
    )


# ------------------------------------------------------------------------------------------------- videos


def _iter_video(item: MediaItem, wanted: list[int], shape: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
    if not wanted:
        return
    shown = display_path(item.path)
    wanted_set = set(wanted)
    last = max(wanted)
    try:
        container = av.open(item.path)
    except av.FFmpegError as e:
        raise DecodeError(f"cannot open video {shown}: {ffmpeg_reason(e)}") from e
    with container:  # closed also when the caller stops early (the generator is closed)
        if not container.streams.video:
            raise DecodeError(f"cannot decode {shown}: it has no video stream")
        stream = container.streams.video[0]
        # Frame threading decodes several frames at once; it is the largest single speed-up for H.264/HEVC.
        stream.thread_type = "AUTO"
        for index, frame in enumerate(decode_video_frames(container, stream, shown)):
            # Unwanted frames are decoded (later frames depend on them) but never converted to RGB.
            if index in wanted_set:
                yield index, _video_frame_to_rgb(frame, item, index, shape)
            if index >= last:
                return
        # Fewer frames than probed (a cut file, an optimistic header): stop here; the caller counts.


def _video_frame_to_rgb(frame: av.VideoFrame, item: MediaItem, index: int, shape: tuple[int, int]) -> np.ndarray:
    try:
        rgb = frame.to_ndarray(format="rgb24")
    except av.FFmpegError as e:
        raise DecodeError(
            f"converting frame {index} of {display_path(item.path)} to RGB failed: {ffmpeg_reason(e)}"
        ) from e
    # `rotation` is counter-clockwise degrees from the display matrix; np.rot90 turns counter-clockwise too.
    turns = round(frame.rotation / 90) % 4
    if turns:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=turns))
    if rgb.shape[:2] != shape:
        raise ValueError(
            f"{display_path(item.path)}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]} but the manifest says "
            f"{shape[1]}x{shape[0]}; the file changed since probing (rebuild the manifest) or its resolution "
            f"changes mid-stream (re-encode it at one size)"
        )
    return rgb


# ------------------------------------------------------------------------------------ frame folders, images


def _iter_frame_folder(
    item: MediaItem, wanted: list[int], shape: tuple[int, int]
) -> Iterator[tuple[int, np.ndarray]]:
    files = frame_files(item.path)
    first: tuple[int, int] | None = None
    for index in wanted:
        if index >= len(files):
            return  # fewer frames than probed: stop, as for a short video
        name = display_path(os.path.basename(files[index]))
        rgb = _read_image(files[index], item, index, exif=False)
        if first is None:
            first = rgb.shape[:2]
            if first != shape:
                raise ValueError(
                    f"frame folder {display_path(item.path)}: {name} is {first[1]}x{first[0]} but the manifest says "
                    f"{shape[1]}x{shape[0]}; the frames changed since probing: rebuild the manifest"
                )
        elif rgb.shape[:2] != first:
            raise ValueError(
                f"frame folder {display_path(item.path)} mixes frame sizes: {name} is {rgb.shape[1]}x{rgb.shape[0]}, "
                f"the first frame is {first[1]}x{first[0]}; resize the frames to one size, or if these are separate "
                f"photos, list them with a glob ('folder/*.jpg') so that each is an image item"
            )
        yield index, rgb


def _iter_image(item: MediaItem, shape: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
    rgb = _read_image(item.path, item, 0, exif=True)
    if rgb.shape[:2] != shape:
        raise ValueError(
            f"{display_path(item.path)} is {rgb.shape[1]}x{rgb.shape[0]} but the manifest says {shape[1]}x{shape[0]}; "
            f"the file changed since probing: rebuild the manifest"
        )
    yield 0, rgb


def _read_image(path: str, item: MediaItem, index: int, exif: bool) -> np.ndarray:
    try:
        with Image.open(path) as img:
            # Standalone photos are turned upright by their EXIF orientation, like phone videos by theirs.
            # Frame folders are not: sam2's loader ignores EXIF, and frames cut from video carry none.
            if exif:
                img = ImageOps.exif_transpose(img)
            return to_rgb8(img)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or corrupt files
        raise DecodeError(f"cannot read frame {index} of {display_path(item.path)} ({display_path(path)}): {e}") from e


def to_rgb8(img: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3) from any PIL image: grayscale, palette, alpha (dropped) and 16-bit are converted.

    Everything but 16-bit goes through `convert("RGB")`, which is what sam2's loader does. PIL's convert
    clips 16-bit grayscale at 255 (nearly all white), so those are scaled down by 256 instead.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        # Mode "I" is 32-bit; PIL uses it for 16-bit grayscale in some formats, so read it as 16-bit too.
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    return np.array(img.convert("RGB"))
