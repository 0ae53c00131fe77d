"""Probing media: frames, fps, displayed size, codec and bytes of one item (`probe`), never raising, and of
many in parallel (`probe_many`, dask threads: PyAV and PIL release the GIL while they read)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import av
import dask.bag
from PIL import Image

from pipeline.manifest.table import MEDIA_KINDS
from pipeline.records import MediaItem, MediaKind
from pipeline.stages.decode import (
    FRAME_CODECS,
    IMAGE_EXTENSIONS,
    DecodeError,
    decode_video_frames,
    display_path,
    ffmpeg_reason,
    frame_files,
    permission_message,
    sniff_media,
    unreachable_message,
    utf8_text,
)


def probe(path: str, kind: MediaKind) -> MediaItem:
    """What one item holds: frames, fps, size (as displayed), codec, bytes. `item_id` is left empty.

    Never raises: any failure gives a MediaItem whose `error` names the path and the cause, so that one bad
    file is a failed row, not a failed manifest.
    """
    path = os.path.abspath(path)
    empty = MediaItem(item_id="", path=path, kind=kind)
    try:
        if kind == "video":
            return _probe_video(path, empty)
        if kind == "frames":
            return _probe_frames(path, empty)
        if kind == "image":
            return _probe_image(path, empty)
        return replace(empty, error=f"{display_path(path)}: unknown kind {kind!r}; use one of {', '.join(MEDIA_KINDS)}")
    except Exception as e:  # noqa: BLE001 -- a probe failure is data about the item, recorded in its row
        reason = f"{type(e).__name__}: {utf8_text(str(e))}"
        return replace(empty, error=f"{display_path(path)}: cannot probe {kind}: {reason}")


def _missing_or_empty(path: str, item: MediaItem, want_dir: bool) -> MediaItem | None:
    shown = display_path(path)
    unreachable = unreachable_message(path)
    if unreachable:
        return replace(item, error=unreachable)
    if not os.path.exists(path):
        return replace(item, error=f"{shown}: file not found")
    if want_dir and not os.path.isdir(path):
        return replace(item, error=f"{shown}: a frame folder must be a folder, found a file")
    if not want_dir and os.path.isdir(path):
        return replace(
            item, error=f"{shown}: is a folder; a {item.kind} must be a file (a folder of frames has kind 'frames')"
        )
    if not want_dir and os.path.getsize(path) == 0:
        return replace(
            item,
            error=f"{shown}: empty file (0 bytes): the copy, download or recording did not finish; copy it again "
            f"from the source or leave it out",
        )
    # Opening proves read permission; the mode bits alone would not (root and ACLs bypass them).
    try:
        if want_dir:
            frame_files(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError:
        return replace(item, error=permission_message(path, is_dir=want_dir))
    return None


_NO_FRAMES = ("the video stream holds no frames (an empty recording or export): nothing to segment; export it "
              "again or leave it out")


def _probe_video(path: str, item: MediaItem) -> MediaItem:
    failed = _missing_or_empty(path, item, want_dir=False)
    if failed:
        return failed
    size = os.path.getsize(path)
    shown = display_path(path)
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        cause = sniff_media(path)
        error = f"{shown}: not a readable video ({ffmpeg_reason(e)})" + (f": {cause}" if cause else "")
        return replace(item, bytes=size, error=error)
    with container:
        if not container.streams.video:
            # An mp4/mov muxer writes no track for a stream that never got a frame, so an empty recording
            # lands here too.
            error = (f"{shown}: has no video stream (audio only, or a recording that never got a frame): nothing "
                     f"to segment; leave it out")
            return replace(item, bytes=size, error=error)
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        codec = ctx.name if ctx is not None else None
        # The container's frame count (mp4/mov keep one); Matroska/WebM and some AVIs do not.
        num_frames = int(stream.frames or 0)

        # Decode the first frame: it proves the stream decodes, and it carries the display rotation that
        # phones write (the decoder attaches the container's display matrix to each frame).
        try:
            first = next(decode_video_frames(container, stream, shown), None)
        except DecodeError as e:
            reason = ffmpeg_reason(e.__cause__) if e.__cause__ is not None else str(e)
            error = (f"{shown}: cannot decode the first frame ({reason}): the file is damaged; copy it again from the "
                     f"source or re-encode it")
            return replace(item, bytes=size, codec=codec, fps=fps, error=error)
        if first is None:
            return replace(item, bytes=size, codec=codec, fps=fps, error=f"{shown}: {_NO_FRAMES}")
        width, height = first.width, first.height
        if round(first.rotation / 90) % 2:
            width, height = height, width

    if num_frames <= 0:
        num_frames = _count_packets(path)
    if num_frames <= 0:
        return replace(item, bytes=size, codec=codec, fps=fps, error=f"{shown}: {_NO_FRAMES}")
    return replace(item, num_frames=num_frames, fps=fps, width=width, height=height, codec=codec, bytes=size)


def _count_packets(path: str) -> int:
    """Frames in the first video stream, counted by demuxing (no decoding): one packet per frame."""
    count = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            # The demuxer ends with an empty flush packet; it is not a frame.
            if packet.size > 0:
                count += 1
    return count


def _probe_frames(path: str, item: MediaItem) -> MediaItem:
    failed = _missing_or_empty(path, item, want_dir=True)
    if failed:
        return failed
    files = frame_files(path)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        return replace(item, error=f"{display_path(path)}: the frame folder holds no frames ({extensions})")
    total = sum(os.path.getsize(f) for f in files)
    try:
        with Image.open(files[0]) as first:  # reads the header only
            width, height = first.size
    except PermissionError:
        return replace(item, error=permission_message(files[0], is_dir=False))
    except (OSError, SyntaxError, ValueError) as e:
        return replace(item, error=f"{display_path(path)}: cannot read its first frame {display_path(files[0])} ({e}); "
                                   f"the file is damaged or not an image: replace or remove it")
    codecs = sorted({FRAME_CODECS[os.path.splitext(f)[1].lower()] for f in files})
    return replace(item, num_frames=len(files), width=width, height=height, codec="+".join(codecs), bytes=total)


def _probe_image(path: str, item: MediaItem) -> MediaItem:
    failed = _missing_or_empty(path, item, want_dir=False)
    if failed:
        return failed
    size = os.path.getsize(path)
    try:
        img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179 MP): decoding them would take gigabytes.
        error = (f"{display_path(path)}: too large to decode safely ({e}); downscale it below "
                 f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels first")
        return replace(item, bytes=size, error=error)
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        error = (f"{display_path(path)}: cannot probe image: not a readable image ({e}): damaged, cut short or not "
                 f"an image; replace it")
        return replace(item, bytes=size, error=error)
    with img:
        width, height = img.size
        codec = (img.format or "").lower() or None
        # Phone photos store sideways pixels plus an EXIF orientation; decode turns them upright (see
        # stages/decode.py), so report the upright size. Orientations 5-8 swap width and height.
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return replace(item, num_frames=1, width=width, height=height, codec=codec, bytes=size)


def probe_many(entries: Sequence[tuple[str, MediaKind]], workers: int | None = None) -> list[MediaItem]:
    """`probe` over (path, kind) pairs in parallel (dask, threads), in the same order."""
    if not entries:
        return []
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    if workers == 1 or len(entries) == 1:
        return [probe(p, k) for p, k in entries]
    bag = dask.bag.from_sequence(list(entries), npartitions=min(len(entries), workers * 4))
    return list(bag.map(lambda entry: probe(entry[0], entry[1])).compute(scheduler="threads", num_workers=workers))
