"""Lazy frame decoding: a MediaItem in, (source frame index, RGB uint8 frame) pairs out, one at a time.

Owns turning every supported input into the same thing: upright RGB uint8 (H, W, 3) frames. Videos are
read with PyAV, sequentially, converting only the frames that are wanted and applying the display rotation
that phones record. Frame folders and images are read with PIL exactly as sam2's own loader does
(`Image.open(p).convert("RGB")`), so that our frames equal the ones SAM 2 was evaluated on, bit for bit.
Frames larger than `max_side` (4096 by default) are downscaled (see `fit_size`); smaller ones are untouched.

Bad input fails with an exception whose message names the item's path, the cause and, where there is one,
the fix (missing, empty, unreadable, not media, cut short, no frames, mixed frame sizes); see `check_readable`
and `sniff_media`. Odd but valid input decodes: rotated videos come out upright, variable-frame-rate videos
yield every stored frame, grayscale/palette/alpha/16-bit images become RGB uint8, any size of at least 1x1
works (the model resizes every frame to its square input size).

It also owns what counts as readable media (extensions, which files of a folder are frames, in which order),
which the manifest's discovery and probing share, so that what is listed is exactly what is decoded.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import av
import cv2
import numpy as np
from PIL import Image, ImageOps

from pipeline.config import DecodeConfig
from pipeline.records import MediaItem, MediaKind

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
# Frames whose longer side exceeds this are downscaled to it: the config's default, defined once there.
DEFAULT_MAX_SIDE: int = DecodeConfig.max_side
_EXIF_ORIENTATION = 0x0112  # the EXIF tag of a photo's orientation
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


def fit_size(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """The (width, height) a width x height frame is decoded at: the rule every kind of media follows.

    A frame whose longer side is at most `max_side` keeps its size. A larger one is scaled by
    max_side / longer side, aspect kept: the longer side becomes exactly `max_side`, the shorter side is
    shorter * max_side / longer rounded half up to a whole pixel (at least 1), computed in integers so that
    every machine gets the same size. E.g. 12000x9000 at 4096 -> 4096x3072; 5000x1001 -> 4096x820 (820.0192).
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    longer = max(width, height)
    if longer <= max_side:
        return width, height

    def scaled(side: int) -> int:
        # round(side * max_side / longer), half up, without floating point: floor((2*s*m + l) / (2*l)).
        return max(1, (2 * side * max_side + longer) // (2 * longer))

    return scaled(width), scaled(height)


def _current_user() -> str:
    uid = os.geteuid()
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def permission_message(path: str, is_dir: bool) -> str:
    """The message for a file or folder the pipeline may not read, with the fix."""
    shown = display_path(path)
    what, mode = ("folder", "a+rx") if is_dir else ("file", "a+r")
    return (
        f"{shown}: permission denied: the user running the pipeline, {_current_user()}, cannot read this {what}; "
        f"make it readable (chmod {mode} '{shown}') or run as a user who can read it"
    )


def unreachable_message(path: str) -> str | None:
    """The message for a path that a folder above it hides (no search permission), else None. Without this
    check such a path would read as 'not found', which sends the user looking in the wrong place."""
    try:
        os.stat(path)
    except PermissionError:
        return (
            f"{display_path(path)}: permission denied: a folder on its path cannot be searched by the user running "
            f"the pipeline, {_current_user()}; make its folders searchable (chmod a+x) or run as a user who can"
        )
    except OSError:
        pass  # missing (and the rest) are reported by the caller's own checks
    return None


def check_readable(path: str, kind: MediaKind) -> None:
    """Raise, naming `path`, the cause and the fix, unless `path` is there, of the right type and readable.

    Cheap (a stat and an open): it turns the commonest bad inputs into one clear message before any decoding.
    Files: FileNotFoundError, IsADirectoryError, DecodeError (0 bytes), PermissionError. Frame folders:
    FileNotFoundError, NotADirectoryError, PermissionError (the folder or its first frame).
    """
    shown = display_path(path)
    unreachable = unreachable_message(path)
    if unreachable:
        raise PermissionError(unreachable)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{shown}: file not found: it was moved or deleted after the manifest was built; restore it, or "
            f"rebuild the manifest without it"
        )
    if kind == "frames":
        if not os.path.isdir(path):
            raise NotADirectoryError(
                f"{shown}: a frame folder must be a folder, found a file; give it kind 'video' or 'image'"
            )
        try:
            files = frame_files(path)
        except PermissionError as e:
            raise PermissionError(permission_message(path, is_dir=True)) from e
        if not files:
            raise FileNotFoundError(
                f"frame folder {shown} holds no frames any more: they were moved or deleted after the manifest was "
                f"built; restore them, or rebuild the manifest without it"
            )
        _check_file_opens(files[0])
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"{shown}: is a folder; a {kind} must be a file (a folder of frames has kind 'frames')")
    if os.path.getsize(path) == 0:
        raise DecodeError(
            f"{shown}: empty file (0 bytes): the copy, download or recording did not finish; copy it again from "
            f"the source or remove it from the manifest"
        )
    _check_file_opens(path)


def _check_file_opens(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except PermissionError as e:
        raise PermissionError(permission_message(path, is_dir=False)) from e


# Top-level box types that ISO base media files (mp4, mov, m4v, 3gp) start with.
_ISO_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid"})
_IMAGE_MAGIC = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"BM": "a BMP image"
}


def sniff_media(path: str) -> str | None:
    """Why FFmpeg could not open `path`, from its first bytes and its top-level structure, with the fix; None
    when nothing specific can be said. Used to explain 'Invalid data found when processing input'."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
            if head[4:8] in _ISO_BOXES:
                return _sniff_iso(f, size)
    except OSError:
        return None
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return ("it is a Matroska/WebM file that ends or breaks before its first frame: an empty recording, or a "
                "file cut short or damaged; copy it again from the source")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "it is an AVI file whose header is damaged or cut short; copy it again from the source"
    for magic, what in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return f"it is {what} named like a video: give it an image extension (.png, .jpg) so it is read as an image"
    if head and b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            # A multi-byte character cut at byte 512 is still text.
            text = head[: e.start].decode("utf-8") if e.start > len(head) - 4 else ""
        if text and sum(ch.isprintable() or ch in "\r\n\t" for ch in text) >= 0.95 * len(text):
            first_line = text.strip().splitlines()[0][:60] if text.strip() else ""
            return (f"it holds text, not video (it starts {first_line!r}): an error page saved by a failed download, "
                    f"or a wrong file under this name; check the file and fetch the video again")
    return "its first bytes are not those of any container FFmpeg knows: not a video, or damaged"


def _sniff_iso(f, size: int) -> str | None:
    """Walk the top-level boxes of an mp4/mov: a box running past the end or a missing 'moov' means cut short."""
    offset, boxes = 0, []
    while offset + 8 <= size:
        f.seek(offset)
        header = f.read(16)
        box_size, box_type = int.from_bytes(header[:4], "big"), header[4:8]
        if box_size == 1 and len(header) >= 16:  # 64-bit size follows the type
            box_size = int.from_bytes(header[8:16], "big")
        elif box_size == 0:  # the box runs to the end of the file
            box_size = size - offset
        if box_size < 8:
            return "it starts like an MP4/MOV but its box structure is damaged; copy it again from the source"
        boxes.append(box_type)
        if offset + box_size > size:
            return (f"it starts like an MP4/MOV but is cut short: its {box_type.decode('latin-1')!r} box needs "
                    f"{offset + box_size} bytes and the file has {size}"
                    + ("" if b"moov" in boxes else " and the index (moov box) is missing")
                    + ": an interrupted copy, download or recording; copy it again from the source (a recording "
                    "cut off by a crash can sometimes be repaired with a tool such as untrunc)")
        offset += box_size
    if b"moov" not in boxes:
        return ("it starts like an MP4/MOV but has no index (moov box): the recording or copy was interrupted; "
                "copy it again from the source")
    return None


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
    frame count. A video's frame index is the frame's position in the order the decoder returns frames
    (presentation order), counted from 0; it is not derived from timestamps. So a variable-frame-rate video
    yields every stored frame once, in order, with nothing duplicated or dropped to even out the timing, and
    its `fps` (the stream's average rate) is nominal: `decode.target_fps` strides by it.

    `source_width` x `source_height` is the media's upright size (as probed); `width` x `height` is the size
    of the yielded frames: the same, or smaller when the longer side exceeds `max_side` (see `fit_size`).
    `scale` is output / original along the longer side (1.0 when not downscaled); the shorter side's own
    factor differs from it by the rounding to whole pixels. Iterating decodes lazily, so a long video never
    sits in memory; each iteration starts from the beginning.
    """

    def __init__(self, item: MediaItem, source_frames: list[int], max_side: int = DEFAULT_MAX_SIDE) -> None:
        self.item = item
        self.source_frames = source_frames
        self.max_side = max_side
        self.source_width = item.width
        self.source_height = item.height
        self.width, self.height = fit_size(item.width, item.height, max_side)
        self.scale = max(self.width, self.height) / max(self.source_width, self.source_height)

    @property
    def downscaled(self) -> bool:
        return (self.width, self.height) != (self.source_width, self.source_height)

    def __len__(self) -> int:
        return len(self.source_frames)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        source_shape = (self.source_height, self.source_width)
        out_shape = (self.height, self.width)
        if self.item.kind == "video":
            return _iter_video(self.item, self.source_frames, source_shape, out_shape)
        if self.item.kind == "frames":
            return _iter_frame_folder(self.item, self.source_frames, source_shape, out_shape)
        return _iter_image(self.item, source_shape, out_shape)

    def __repr__(self) -> str:
        size = f"{self.width}x{self.height}"
        if self.downscaled:
            size += f" (from {self.source_width}x{self.source_height}, scale {self.scale:.4g})"
        return f"FrameSource({self.item.item_id!r}, {len(self)} frames, {size})"


def open_frames(
    item: MediaItem, stride: int = 1, max_frames: int | None = None, max_side: int = DEFAULT_MAX_SIDE
) -> FrameSource:
    """A lazy FrameSource for `item`: frames 0, stride, 2*stride, ..., at most `max_frames` of them, each
    downscaled with area interpolation (cv2.INTER_AREA) when its longer side exceeds `max_side`, so that the
    longer side is exactly `max_side` and the shorter one is rounded half up (`fit_size`).

    Checks first that the item's file or folder is there, non-empty and readable (`check_readable`), and for
    a frame folder the header of every wanted frame (`check_frame_folder`), so the commonest bad inputs fail
    here, before any model time, with one clear message; damage inside the media surfaces while iterating,
    as a DecodeError naming the path and the frame.
    """
    shown = display_path(item.path)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride} (for {shown})")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames} (for {shown})")
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side} (for {shown})")
    if item.error:
        raise ValueError(f"cannot decode {shown}: probing failed: {item.error}")
    if item.num_frames < 1 or item.width < 1 or item.height < 1:
        raise ValueError(
            f"cannot decode {shown}: the manifest says {item.num_frames} frames of {item.width}x{item.height}; "
            f"rebuild the manifest (or leave its probe columns empty) so the file is probed"
        )
    check_readable(item.path, item.kind)
    count = 1 if item.kind == "image" else item.num_frames
    source_frames = list(range(0, count, stride))
    if max_frames is not None:
        source_frames = source_frames[:max_frames]
    if item.kind == "frames":
        check_frame_folder(item, source_frames)
    return FrameSource(item, source_frames, max_side)


def read_frame(item: MediaItem, source_frame: int, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """Frame `source_frame` of the original media as RGB uint8 (H, W, 3), at the size a run with the same
    `max_side` decodes it (so it lines up with that run's masks). Videos decode from the start: slow."""
    count = 1 if item.kind == "image" else item.num_frames
    if not 0 <= source_frame < count:
        raise IndexError(f"{display_path(item.path)} has frames 0..{count - 1}; frame {source_frame} does not exist")
    open_frames(item, max_frames=1, max_side=max_side)  # the checks a run makes (frame 0's header for folders)
    for _, rgb in FrameSource(item, [source_frame], max_side):
        return rgb
    raise IndexError(
        f"{display_path(item.path)}: frame {source_frame} was probed but the file ends before it; rebuild the manifest"
    )


def _fit(rgb: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """`rgb` at `out_shape` (height, width): unchanged when it already is, else area-downscaled."""
    if rgb.shape[:2] == out_shape:
        return rgb
    # INTER_AREA averages every source pixel that falls in a destination pixel: no aliasing when shrinking.
    return cv2.resize(rgb, (out_shape[1], out_shape[0]), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------------- videos


def _iter_video(
    item: MediaItem, wanted: list[int], shape: tuple[int, int], out_shape: tuple[int, int]
) -> Iterator[tuple[int, np.ndarray]]:
    if not wanted:
        return
    shown = display_path(item.path)
    wanted_set = set(wanted)
    last = max(wanted)
    try:
        container = av.open(item.path)
    except av.FFmpegError as e:
        if isinstance(e, PermissionError):
            raise PermissionError(permission_message(item.path, is_dir=False)) from e
        cause = sniff_media(item.path)
        raise DecodeError(f"cannot open video {shown}: {ffmpeg_reason(e)}" + (f": {cause}" if cause else "")) from e
    with container:  # closed also when the caller stops early (the generator is closed)
        if not container.streams.video:
            raise DecodeError(
                f"cannot decode {shown}: it has no video stream; the file changed since probing: rebuild the manifest"
            )
        stream = container.streams.video[0]
        # Frame threading decodes several frames at once; it is the largest single speed-up for H.264/HEVC.
        stream.thread_type = "AUTO"
        for index, frame in enumerate(decode_video_frames(container, stream, shown)):
            # Unwanted frames are decoded (later frames depend on them) but never converted to RGB.
            if index in wanted_set:
                yield index, _fit(_video_frame_to_rgb(frame, item, index, shape), out_shape)
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


def _list_frames(item: MediaItem) -> list[str]:
    try:
        return frame_files(item.path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"frame folder {display_path(item.path)} not found: it was moved or deleted after the manifest was built; "
            f"restore it, or rebuild the manifest without it"
        ) from e
    except PermissionError as e:
        raise PermissionError(permission_message(item.path, is_dir=True)) from e


def _check_frame_size(
    item: MediaItem, path: str, size: tuple[int, int], first: tuple[int, int] | None, shape: tuple[int, int]
) -> None:
    """Raise if frame `path` (height, width `size`) breaks the folder's one size. Sizes are compared before
    downscaling: a folder must hold frames of one size, whatever max_side is."""
    name = display_path(os.path.basename(path))
    if first is None:
        if size != shape:
            raise ValueError(
                f"frame folder {display_path(item.path)}: {name} is {size[1]}x{size[0]} but the manifest says "
                f"{shape[1]}x{shape[0]}; the frames changed since probing: rebuild the manifest"
            )
    elif size != first:
        raise ValueError(
            f"frame folder {display_path(item.path)} mixes frame sizes: {name} is {size[1]}x{size[0]}, "
            f"the first frame is {first[1]}x{first[0]}; resize the frames to one size, or if these are separate "
            f"photos, list them with a glob ('folder/*.jpg') so that each is an image item"
        )


def check_frame_folder(item: MediaItem, wanted: list[int]) -> None:
    """Read the header of every wanted frame (a few bytes each, no pixels) and raise, naming the first bad
    file, if one is unreadable, damaged or of another size than the first: so such a folder fails before any
    model time is spent on it (sam2 would otherwise run up to the bad frame, and again on a retry)."""
    files = _list_frames(item)
    first: tuple[int, int] | None = None
    for index in wanted:
        if index >= len(files):
            return  # fewer frames than probed: iteration stops there, as for a short video
        with _image_errors(files[index], item, index), Image.open(files[index]) as img:
            size = (img.height, img.width)
        _check_frame_size(item, files[index], size, first, (item.height, item.width))
        first = first or size


def _iter_frame_folder(
    item: MediaItem, wanted: list[int], shape: tuple[int, int], out_shape: tuple[int, int]
) -> Iterator[tuple[int, np.ndarray]]:
    files = _list_frames(item)
    first: tuple[int, int] | None = None
    for index in wanted:
        if index >= len(files):
            return  # fewer frames than probed: stop, as for a short video
        rgb = _read_image(files[index], item, index, exif=False)
        # Checked again while decoding: files can change after open_frames checked their headers.
        _check_frame_size(item, files[index], rgb.shape[:2], first, shape)
        first = first or rgb.shape[:2]
        yield index, _fit(rgb, out_shape)


def _iter_image(
    item: MediaItem, shape: tuple[int, int], out_shape: tuple[int, int]
) -> Iterator[tuple[int, np.ndarray]]:
    rgb = _read_image(item.path, item, 0, exif=True)
    if rgb.shape[:2] != shape:
        raise ValueError(
            f"{display_path(item.path)} is {rgb.shape[1]}x{rgb.shape[0]} but the manifest says {shape[1]}x{shape[0]}; "
            f"the file changed since probing: rebuild the manifest"
        )
    yield 0, _fit(rgb, out_shape)


def _read_image(path: str, item: MediaItem, index: int, exif: bool) -> np.ndarray:
    with _image_errors(path, item, index), Image.open(path) as img:
        # Standalone photos are turned upright by their EXIF orientation, like phone videos by theirs.
        # Frame folders are not: sam2's loader ignores EXIF, and frames cut from video carry none.
        # exif_transpose returns a copy even when there is nothing to turn: ask first (a frame of memory on
        # a 100 MP photo).
        if exif and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb8(img)


@contextlib.contextmanager
def _image_errors(path: str, item: MediaItem, index: int) -> Iterator[None]:
    """PIL's errors while reading frame `index` (file `path`) of `item`, as messages with the cause and fix."""
    where = f"frame {index} of {display_path(item.path)} ({display_path(path)})"
    try:
        yield
    except PermissionError as e:
        raise PermissionError(permission_message(path, is_dir=False)) from e
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{where} not found: it was moved or deleted after the manifest was built; restore it, or rebuild the "
            f"manifest"
        ) from e
    except Image.DecompressionBombError as e:
        # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179 MP) before decoding them; they would need
        # gigabytes before any downscaling could happen.
        raise DecodeError(
            f"cannot read {where}: {utf8_text(str(e))}; downscale it below {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
            f"before adding it"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or corrupt files
        raise DecodeError(
            # PIL's messages can hold the raw file name; a name that is not UTF-8 must not reach the Parquet row.
            f"cannot read {where}: {utf8_text(str(e))}; the file is damaged or cut short: copy it again from the source"
        ) from e


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
    # convert("RGB") of an RGB image is a plain copy: skipping it saves one frame of memory (huge photos).
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))
