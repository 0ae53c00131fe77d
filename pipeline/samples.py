"""Synthetic media for the quick start, the tests and demos.

Owns drawing a small scene (coloured shapes moving over a textured background) and writing it as a video,
a frame folder or an image. The shapes are large, saturated and move smoothly, so that a segmentation model
finds them and a tracker can follow them; the background carries a gradient and a faint texture so that it
is not one flat region that swallows the prompts.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

import av
import numpy as np
from PIL import Image

# Preferred encoders per container, best first. The installed PyAV wheel decides which exist, so every
# list ends with an encoder that ships in every FFmpeg build (mpeg4 or mjpeg).
CONTAINER_CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("libx264", "mpeg4"),
    ".mov": ("libx264", "mpeg4"),
    ".mkv": ("libvpx-vp9", "libx264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
    ".avi": ("mjpeg", "mpeg4"),
}

# Encoder options that keep the tiny sample clips sharp and quick to write: default x264/VPx settings are
# tuned for size at real resolutions and blur 160x120 shapes; libvpx's default "good" deadline is slow.
_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "16", "preset": "veryfast"},
    "libvpx-vp9": {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"crf": "8", "b": "2M", "deadline": "realtime", "cpu-used": "8"},
    "mpeg4": {"qscale": "3"},
    "mjpeg": {"qscale": "3"},
}

# (R, G, B) of the shapes: saturated and far apart, and far from the grey-blue background.
_SHAPE_COLOURS = (
    (230, 40, 40),  # red circle
    (40, 200, 60),  # green rectangle
    (250, 210, 30),  # yellow triangle
    (150, 60, 220),  # purple circle
)


@lru_cache(maxsize=32)
def encoder_available(name: str) -> bool:
    """Whether the installed PyAV/FFmpeg build can encode with `name` (e.g. 'libx264')."""
    try:
        av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


def choose_codec(path: str | os.PathLike[str], codec: str | None = None) -> str:
    """The encoder used for `path`: `codec` if given (and available), else the first available one for its container."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if codec is not None:
        if not encoder_available(codec):
            raise ValueError(
                f"cannot write {os.fspath(path)!r}: encoder {codec!r} is not in this PyAV build; "
                f"pass codec=None to pick one automatically"
            )
        return codec
    if ext not in CONTAINER_CODECS:
        raise ValueError(
            f"cannot write {os.fspath(path)!r}: unknown video container {ext!r}; "
            f"use one of {', '.join(sorted(CONTAINER_CODECS))}"
        )
    for candidate in CONTAINER_CODECS[ext]:
        if encoder_available(candidate):
            return candidate
    raise ValueError(
        f"cannot write {os.fspath(path)!r}: none of the encoders {CONTAINER_CODECS[ext]} is in this PyAV build; "
        f"pick another container, e.g. '.avi' (mjpeg)"
    )


def _background(width: int, height: int, seed: int) -> np.ndarray:
    """A grey-blue diagonal gradient with faint, seeded low-frequency texture (float32, H x W x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (x / max(1, width - 1) + y / max(1, height - 1)) / 2.0
    base = np.stack([70 + 50 * ramp, 85 + 45 * ramp, 110 + 50 * ramp], axis=-1)
    # Low-frequency texture: coarse noise upsampled by repetition, so it reads as texture, not sensor noise.
    cell = 8
    coarse = rng.normal(0.0, 8.0, size=(height // cell + 1, width // cell + 1, 1)).astype(np.float32)
    texture = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:height, :width]
    return base + texture


def draw_frame(index: int, width: int = 160, height: int = 120, seed: int = 0, frames: int = 8) -> np.ndarray:
    """Frame `index` of the sample scene as RGB uint8 (height, width, 3).

    Shapes follow smooth paths (one period over `frames` frames and a bit), so consecutive frames differ by a
    few pixels; `seed` varies the background texture and the shapes' starting places.
    """
    if width < 16 or height < 16:
        raise ValueError(f"sample frames must be at least 16x16 pixels, got {width}x{height}")
    rng = np.random.default_rng(seed + 1)
    phases = rng.uniform(0, 2 * np.pi, size=4)
    t = 2 * np.pi * index / max(frames, 2) * 0.8
    img = _background(width, height, seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    s = min(width, height)

    # Red circle: moves left-right across the upper half.
    cx = width * (0.3 + 0.12 * np.sin(t + phases[0]))
    cy = height * 0.32
    r = 0.17 * s
    img[(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = _SHAPE_COLOURS[0]

    # Green rectangle: drifts diagonally in the lower left.
    rx = width * (0.12 + 0.08 * np.sin(t + phases[1]))
    ry = height * (0.58 + 0.06 * np.cos(t + phases[1]))
    rw, rh = 0.30 * s, 0.24 * s
    img[(x >= rx) & (x < rx + rw) & (y >= ry) & (y < ry + rh)] = _SHAPE_COLOURS[1]

    # Yellow triangle: moves up-down on the right.
    tx = width * 0.74
    ty = height * (0.55 + 0.1 * np.sin(t + phases[2]))
    half = 0.18 * s
    apex, left, right = (tx, ty - half), (tx - half, ty + half), (tx + half, ty + half)
    img[_inside_triangle(x, y, apex, left, right)] = _SHAPE_COLOURS[2]

    # Purple circle: small, circles around the centre; it partly occludes the others now and then.
    px = width * (0.55 + 0.1 * np.cos(t + phases[3]))
    py = height * (0.5 + 0.1 * np.sin(t + phases[3]))
    pr = 0.11 * s
    img[(x - px) ** 2 + (y - py) ** 2 <= pr * pr] = _SHAPE_COLOURS[3]

    return np.clip(img, 0, 255).astype(np.uint8)


def _inside_triangle(
    x: np.ndarray, y: np.ndarray, a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]
) -> np.ndarray:
    def side(p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
        return (x - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (y - q[1])

    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    has_neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    has_pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(has_neg & has_pos)


def make_video(
    path: str | os.PathLike[str],
    frames: int = 8,
    width: int = 160,
    height: int = 120,
    fps: int = 24,
    codec: str | None = None,
    seed: int = 0,
    rotation: int = 0,
    timestamps: Sequence[int] | None = None,
    faststart: bool = False,
) -> str:
    """Write the sample scene as a video; the container comes from the extension. Returns the path.

    `rotation` (a multiple of 90) stores the frames turned and records a display rotation, as phones do: a
    reader that honours the metadata (PyAV's `VideoFrame.rotation`, counter-clockwise degrees) shows the
    drawn `width` x `height` scene upright, while the coded frames are `height` x `width` for +-90.
    `timestamps` (one per frame, increasing, in units of 1/`fps` s; default 0, 1, 2, ...) with gaps make a
    variable-frame-rate video, as phones write when the light is low. `faststart` (mp4/mov) puts the index
    before the frames, as streaming sites do, so that a copy cut short still opens.
    """
    path = os.fspath(path)
    if frames < 1:
        raise ValueError(f"cannot write {path!r}: frames must be >= 1, got {frames}")
    if timestamps is not None and (
        len(timestamps) != frames or any(b <= a for a, b in zip(timestamps, timestamps[1:])) or timestamps[0] < 0
    ):
        raise ValueError(
            f"cannot write {path!r}: timestamps must be {frames} increasing ticks >= 0 (one per frame), "
            f"got {timestamps}"
        )
    if rotation % 90:
        raise ValueError(f"cannot write {path!r}: rotation must be a multiple of 90 degrees, got {rotation}")
    # 4:2:0 chroma (every encoder used here) needs even sizes; say so rather than let FFmpeg fail obscurely.
    if width % 2 or height % 2:
        raise ValueError(f"cannot write {path!r}: width and height must be even for 4:2:0 video, got {width}x{height}")
    encoder = choose_codec(path, codec)
    turns = (rotation // 90) % 4
    coded_w, coded_h = (height, width) if turns % 2 else (width, height)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(path, mode="w", options=options) as container:
        stream = container.add_stream(encoder, rate=Fraction(fps))
        stream.width, stream.height = coded_w, coded_h
        stream.pix_fmt = "yuvj420p" if encoder == "mjpeg" else "yuv420p"
        stream.options = dict(_ENCODER_OPTIONS.get(encoder, {}))
        if turns:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            rgb = draw_frame(i, width, height, seed, frames)
            # Store the inverse turn so that applying the display rotation gives the drawn scene back.
            coded = np.ascontiguousarray(np.rot90(rgb, k=-turns))
            frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
            frame.pts = i if timestamps is None else int(timestamps[i])
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_empty_video(path: str | os.PathLike[str], width: int = 64, height: int = 48) -> str:
    """Write a container whose video stream never got a frame (an empty recording or export). Returns the path.

    mp4/mov muxers drop a track without samples, so those files end up with no video stream at all; AVI keeps
    the stream header with zero frames; Matroska/WebM end right after their header.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    encoder = choose_codec(path)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(encoder, rate=24)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if encoder == "mjpeg" else "yuv420p"
        container.start_encoding()  # the header is written here; without it nothing is written at all
    return path


def make_frame_folder(
    path: str | os.PathLike[str],
    frames: int = 6,
    width: int = 160,
    height: int = 120,
    ext: str = "jpg",
    seed: int = 0,
) -> str:
    """Write the sample scene as numbered frames 00000.<ext>, 00001.<ext>, ... (sam2's layout). Returns the folder."""
    path = os.fspath(path)
    if frames < 1:
        raise ValueError(f"cannot write {path!r}: frames must be >= 1, got {frames}")
    ext = ext.lower().lstrip(".")
    os.makedirs(path, exist_ok=True)
    for i in range(frames):
        _save_image(draw_frame(i, width, height, seed, frames), os.path.join(path, f"{i:05d}.{ext}"))
    return path


def make_image(path: str | os.PathLike[str], width: int = 160, height: int = 120, seed: int = 0) -> str:
    """Write one frame of the sample scene as an image; the format comes from the extension. Returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _save_image(draw_frame(0, width, height, seed), path)
    return path


def _save_image(rgb: np.ndarray, path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    # High JPEG quality keeps the shapes' edges crisp at 160x120; other formats are lossless.
    options = {"quality": 95} if ext in (".jpg", ".jpeg", ".webp") else {}
    Image.fromarray(rgb).save(path, **options)


def make_sample_dataset(folder: str | os.PathLike[str]) -> str:
    """A small mixed dataset for the quick start: two videos (different containers and codecs), a frame folder
    and an image, all about 160x120 with 6-8 frames so that a CPU run takes seconds. Returns the folder.

    Layout: clip_a.mp4 (h264 where available), clip_b.webm (VP9 or VP8), frames_c/00000.jpg..., image_d.png.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    make_video(os.path.join(folder, "clip_a.mp4"), frames=8, seed=1)
    make_video(os.path.join(folder, "clip_b.webm"), frames=6, seed=2)
    make_frame_folder(os.path.join(folder, "frames_c"), frames=6, seed=3)
    make_image(os.path.join(folder, "image_d.png"), seed=4)
    return folder
