"""Lazy decoding: which frames come out, in what form, and how failures read."""
from __future__ import annotations

import os
from dataclasses import replace

import av
import numpy as np
import pytest
from PIL import Image

from pipeline import samples
from pipeline.manifest import probe
from pipeline.records import MediaItem
from pipeline.stages.decode import DecodeError, FrameSource, open_frames, read_frame


def _item(path, kind) -> MediaItem:
    item = probe(os.fspath(path), kind)
    assert item.error is None, item.error
    return item


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi", ".mkv"])
def test_video_decodes_as_many_frames_as_probed(tmp_path, ext):
    item = _item(samples.make_video(tmp_path / f"v{ext}", frames=7, width=64, height=48), "video")
    assert item.num_frames == 7
    frames = list(open_frames(item))
    assert [i for i, _ in frames] == list(range(7))
    for _, rgb in frames:
        assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3)


def test_stride_and_max_frames(tmp_path):
    item = _item(samples.make_video(tmp_path / "v.mp4", frames=10, width=64, height=48), "video")
    source = open_frames(item, stride=3)
    assert source.source_frames == [0, 3, 6, 9] and len(source) == 4
    assert [i for i, _ in source] == [0, 3, 6, 9]
    capped = open_frames(item, stride=2, max_frames=3)
    assert capped.source_frames == [0, 2, 4]
    assert [i for i, _ in capped] == [0, 2, 4]
    assert (capped.height, capped.width) == (48, 64)
    # Strided frames are the same pixels as the full decode's frames at those indices.
    full = dict(open_frames(item))
    for index, rgb in capped:
        assert np.array_equal(rgb, full[index])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        open_frames(item, stride=0)
    with pytest.raises(ValueError, match="max_frames must be >= 1"):
        open_frames(item, max_frames=0)


def test_frame_source_is_lazy_and_restartable(tmp_path):
    item = _item(samples.make_video(tmp_path / "v.mp4", frames=6, width=64, height=48), "video")
    source = open_frames(item)
    iterator = iter(source)
    first_index, _ = next(iterator)  # nothing decoded beyond what was asked
    assert first_index == 0
    iterator.close()  # stopping early closes the container
    assert [i for i, _ in source] == list(range(6))


def test_read_frame_random_access(tmp_path):
    item = _item(samples.make_video(tmp_path / "v.avi", frames=6, width=64, height=48), "video")
    assert np.array_equal(read_frame(item, 4), dict(open_frames(item))[4])
    with pytest.raises(IndexError, match="frame 6 does not exist"):
        read_frame(item, 6)
    folder = _item(samples.make_frame_folder(tmp_path / "f", frames=3, width=64, height=48), "frames")
    assert np.array_equal(read_frame(folder, 2), np.array(Image.open(tmp_path / "f" / "00002.jpg").convert("RGB")))


def test_rotated_video_comes_out_upright(tmp_path):
    item = _item(samples.make_video(tmp_path / "phone.mov", frames=3, width=96, height=64, rotation=-90), "video")
    assert (item.width, item.height) == (96, 64)  # as displayed
    for index, rgb in open_frames(item):
        assert rgb.shape == (64, 96, 3)
        drawn = samples.draw_frame(index, 96, 64, frames=3).astype(int)
        assert np.abs(rgb.astype(int) - drawn).mean() < 12


def test_frame_folder_equals_pil_bit_for_bit(tmp_path):
    folder = samples.make_frame_folder(tmp_path / "f", frames=4, width=64, height=48, ext="jpg")
    item = _item(folder, "frames")
    for index, rgb in open_frames(item):
        expected = np.array(Image.open(os.path.join(folder, f"{index:05d}.jpg")).convert("RGB"))
        assert rgb.dtype == np.uint8
        assert np.array_equal(rgb, expected)


def test_frame_folder_natural_order(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    # Unpadded numbers: lexical order would put 10 before 2.
    for number in (1, 2, 10):
        Image.fromarray(np.full((8, 8, 3), number, np.uint8)).save(folder / f"{number}.png")
    item = _item(folder, "frames")
    assert [int(rgb[0, 0, 0]) for _, rgb in open_frames(item)] == [1, 2, 10]


def test_image_modes_convert_to_rgb8(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "palette.png")
    deep = (gray.astype(np.uint16) * 257)  # 16-bit: 0..65535
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    def decoded(name):
        frames = list(open_frames(_item(tmp_path / name, "image")))
        assert len(frames) == 1 and frames[0][0] == 0
        rgb = frames[0][1]
        assert rgb.dtype == np.uint8 and rgb.shape == (8, 16, 3)
        return rgb

    assert np.array_equal(decoded("gray.png"), np.repeat(gray[:, :, None], 3, axis=2))
    rgba_out = decoded("rgba.png")
    assert (rgba_out[..., 0] == 200).all() and (rgba_out[..., 1:] == 0).all()  # alpha dropped, not blended
    assert np.array_equal(decoded("palette.png"), np.repeat(gray[:, :, None], 3, axis=2))
    # 16-bit is scaled down (not clipped to white): 257*v >> 8 == v.
    assert np.array_equal(decoded("deep.png"), np.repeat(gray[:, :, None], 3, axis=2))


def test_exif_rotated_photo_comes_out_upright(tmp_path):
    pixels = samples.draw_frame(0, 64, 48)
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(pixels, k=1)))  # stored turned left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    sideways.save(tmp_path / "photo.png", exif=exif)
    item = _item(tmp_path / "photo.png", "image")
    assert (item.width, item.height) == (64, 48)
    (_, rgb), = list(open_frames(item))
    assert np.array_equal(rgb, pixels)


def test_mixed_size_frame_folder_names_the_file(tmp_path):
    folder = samples.make_frame_folder(tmp_path / "f", frames=3, width=64, height=48, ext="png")
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(os.path.join(folder, "00002.png"))
    source = open_frames(_item(folder, "frames"))
    with pytest.raises(ValueError, match=r"mixes frame sizes: 00002\.png is 64x40.*first frame is 64x48"):
        list(source)


def test_frame_folder_shorter_than_probed_stops(tmp_path):
    folder = samples.make_frame_folder(tmp_path / "f", frames=4, width=32, height=32, ext="png")
    item = _item(folder, "frames")
    os.remove(os.path.join(folder, "00003.png"))
    assert [i for i, _ in open_frames(item)] == [0, 1, 2]


def _write_faststart_mp4(path, frames):
    # Index first, so that a cut file still opens and claims all frames: the "fewer than probed" case.
    with av.open(os.fspath(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(samples.choose_codec("x.mp4"), rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(samples.draw_frame(i, 64, 48, frames=frames), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_truncated_video_stops_early_without_raising(tmp_path):
    full = tmp_path / "full.mp4"
    _write_faststart_mp4(full, frames=30)
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 3 // 4])
    item = _item(cut, "video")
    assert item.num_frames == 30  # the header still claims them all
    got = [i for i, _ in open_frames(item)]
    assert 0 < len(got) < 30 and got == list(range(len(got)))


def test_corrupt_video_raises_naming_path_and_frame(tmp_path):
    clean = samples.make_video(tmp_path / "v.mp4", frames=20, width=64, height=48)
    data = open(clean, "rb").read()
    item = _item(clean, "video")
    raised = []
    # Where exactly a packet boundary falls depends on the encoder build, so damage several places.
    for fraction in (0.5, 0.6, 0.7, 0.8):
        damaged = bytearray(data)
        start = int(len(data) * fraction)
        damaged[start : start + 300] = b"\xff" * 300
        bad = tmp_path / f"bad{int(fraction * 10)}.mp4"
        bad.write_bytes(bytes(damaged))
        try:
            list(open_frames(replace(item, path=os.fspath(bad))))
        except DecodeError as e:
            raised.append((os.fspath(bad), str(e)))
    # Damage to the index (at the end of this mp4) fails on opening; damage to frame data names the frame.
    assert any("failed at frame" in message for _, message in raised), raised
    assert all(path in message for path, message in raised)


def test_items_that_failed_probing_are_refused(tmp_path):
    broken = probe(os.fspath(tmp_path / "missing.mp4"), "video")
    with pytest.raises(ValueError, match="probing failed.*file not found"):
        open_frames(broken)


def test_frame_source_repr_and_attributes(tmp_path):
    item = _item(samples.make_image(tmp_path / "i.jpg", 64, 48), "image")
    source = open_frames(item, stride=5, max_frames=10)
    assert isinstance(source, FrameSource)
    assert source.item is item and source.source_frames == [0] and len(source) == 1
    assert "64x48" in repr(source)
