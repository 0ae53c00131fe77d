"""The synthetic media: every container writes and reads back, and the scene is what a segmenter can use."""
from __future__ import annotations

import os

import av
import numpy as np
import pytest
from PIL import Image

from pipeline import samples


@pytest.mark.parametrize("ext", [".mp4", ".mov", ".mkv", ".webm", ".avi"])
def test_make_video_every_container_reads_back(tmp_path, ext):
    path = samples.make_video(tmp_path / f"clip{ext}", frames=6, width=96, height=64, fps=12)
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(12)
    assert len(frames) == 6
    assert frames[0].shape == (64, 96, 3)
    # Lossy, but close to what was drawn: the shapes survive encoding.
    for i, frame in enumerate(frames):
        drawn = samples.draw_frame(i, 96, 64, seed=0, frames=6)
        assert np.abs(frame.astype(int) - drawn).mean() < 12


def test_choose_codec_prefers_modern_encoders_and_falls_back():
    assert samples.choose_codec("a.mp4") in ("libx264", "mpeg4")
    assert samples.choose_codec("a.avi") in ("mjpeg", "mpeg4")
    assert samples.choose_codec("a.webm") in ("libvpx-vp9", "libvpx")
    with pytest.raises(ValueError, match="unknown video container '.xyz'"):
        samples.choose_codec("a.xyz")
    with pytest.raises(ValueError, match="not in this PyAV build"):
        samples.choose_codec("a.mp4", codec="no-such-encoder")


def test_make_video_rejects_odd_sizes_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="must be even"):
        samples.make_video(tmp_path / "odd.mp4", width=161)


def test_rotated_video_stores_turned_frames_and_the_display_rotation(tmp_path):
    path = samples.make_video(tmp_path / "phone.mp4", frames=2, width=96, height=64, rotation=-90)
    with av.open(path) as container:
        first = next(container.decode(video=0))
    assert (first.width, first.height) == (64, 96)
    assert first.rotation == -90


def test_frames_differ_and_shapes_are_high_contrast():
    a, b = samples.draw_frame(0), samples.draw_frame(3)
    assert a.shape == (120, 160, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)  # things move
    # The saturated shape colours cover a sizeable share of the frame (objects to find).
    saturated = (a.max(axis=2).astype(int) - a.min(axis=2)) > 120
    assert 0.1 < saturated.mean() < 0.6
    # Same seed, same pixels: tests and demos are reproducible.
    assert np.array_equal(samples.draw_frame(2, seed=5), samples.draw_frame(2, seed=5))
    assert not np.array_equal(samples.draw_frame(2, seed=5), samples.draw_frame(2, seed=6))


def test_frame_folder_uses_sam2_names(tmp_path):
    folder = samples.make_frame_folder(tmp_path / "f", frames=3, width=64, height=48, ext="png")
    assert sorted(os.listdir(folder)) == ["00000.png", "00001.png", "00002.png"]
    written = np.array(Image.open(os.path.join(folder, "00001.png")))
    assert np.array_equal(written, samples.draw_frame(1, 64, 48, frames=3))


def test_make_image(tmp_path):
    path = samples.make_image(tmp_path / "img.png", width=64, height=48, seed=3)
    assert np.array_equal(np.array(Image.open(path)), samples.draw_frame(0, 64, 48, seed=3))


def test_sample_dataset_is_mixed_and_small(tmp_path):
    folder = samples.make_sample_dataset(tmp_path / "ds")
    assert sorted(os.listdir(folder)) == ["clip_a.mp4", "clip_b.webm", "frames_c", "image_d.png"]
    total = sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names
    )
    assert total < 500_000
