"""Lazy decoding: which frames come out, in what form, and how failures read."""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import replace

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline import samples
from pipeline.manifest import probe
from pipeline.records import MediaItem
from pipeline.stages.decode import DecodeError, FrameSource, fit_size, open_frames, read_frame
from tests.privileges import run_python, unreadable_without_override


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
    folder = samples.make_frame_folder(tmp_path / "f", frames=4, width=64, height=48, ext="png")
    item = _item(folder, "frames")
    source = open_frames(item)  # all one size now
    Image.fromarray(np.zeros((40, 64, 3), np.uint8)).save(os.path.join(folder, "00002.png"))
    Image.fromarray(np.zeros((30, 64, 3), np.uint8)).save(os.path.join(folder, "00003.png"))
    # Caught from the headers when the item is opened, before any model time: the first bad file is named.
    with pytest.raises(ValueError, match=r"mixes frame sizes: 00002\.png is 64x40.*first frame is 64x48.*resize"):
        open_frames(item)
    # A folder that changes after it was opened is caught while decoding, at the same file.
    with pytest.raises(ValueError, match=r"mixes frame sizes: 00002\.png is 64x40.*first frame is 64x48"):
        list(source)
    # Frames a stride skips are not checked: they are never used.
    assert [i for i, _ in open_frames(item, stride=4)] == [0]


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


# ------------------------------------------------------------------------------------ downscaling (max_side)


def test_fit_size_rule():
    assert fit_size(12000, 9000) == (4096, 3072)  # default max_side 4096
    assert fit_size(9000, 12000) == (3072, 4096)
    assert fit_size(4096, 4096) == (4096, 4096) and fit_size(4096, 10) == (4096, 10)  # at the limit: untouched
    assert fit_size(4097, 10) == (4096, 10)  # 9.9976 -> 10
    assert fit_size(5000, 1001) == (4096, 820)  # 820.0192 -> 820
    assert fit_size(8192, 5, 4096) == (4096, 3)  # 2.5 rounds half up (round() would give 2)
    assert fit_size(8192, 3, 4096) == (4096, 2)  # 1.5 -> 2
    assert fit_size(100_000, 1, 4096) == (4096, 1)  # never below one pixel
    assert fit_size(1, 1, 1) == (1, 1)
    with pytest.raises(ValueError, match="max_side must be >= 1"):
        fit_size(10, 10, 0)


def test_downscaled_frames_are_area_interpolated_originals(tmp_path):
    image = _item(samples.make_image(tmp_path / "i.png", 160, 120), "image")
    full = dict(open_frames(image))[0]
    source = open_frames(image, max_side=80)
    assert (source.width, source.height, source.source_width, source.source_height) == (80, 60, 160, 120)
    assert source.scale == 0.5 and source.downscaled and "from 160x120" in repr(source)
    (_, small), = list(source)
    assert np.array_equal(small, cv2.resize(full, (80, 60), interpolation=cv2.INTER_AREA))
    assert np.array_equal(read_frame(image, 0, max_side=80), small)  # lines up with a run's masks

    same = open_frames(image)  # 160x120 is far under the default 4096: untouched
    assert same.scale == 1.0 and not same.downscaled and np.array_equal(dict(same)[0], full)

    video = _item(samples.make_video(tmp_path / "v.mp4", frames=3, width=64, height=48), "video")
    full_video = dict(open_frames(video))
    for index, rgb in open_frames(video, max_side=40):
        assert rgb.shape == (30, 40, 3)
        assert np.array_equal(rgb, cv2.resize(full_video[index], (40, 30), interpolation=cv2.INTER_AREA))

    folder = _item(samples.make_frame_folder(tmp_path / "f", frames=2, width=64, height=48, ext="png"), "frames")
    full_folder = dict(open_frames(folder))
    for index, rgb in open_frames(folder, max_side=50):  # 48 * 50/64 = 37.5 -> 38 (half up)
        assert np.array_equal(rgb, cv2.resize(full_folder[index], (50, 38), interpolation=cv2.INTER_AREA))

    with pytest.raises(ValueError, match="max_side must be >= 1"):
        open_frames(image, max_side=0)


def test_rotated_video_is_turned_upright_then_downscaled(tmp_path):
    item = _item(samples.make_video(tmp_path / "phone.mov", frames=2, width=96, height=64, rotation=90), "video")
    upright = dict(open_frames(item))
    source = open_frames(item, max_side=48)
    assert (source.width, source.height) == (48, 32)  # the displayed 96x64, halved: not the coded 64x96
    for index, rgb in source:
        assert np.array_equal(rgb, cv2.resize(upright[index], (48, 32), interpolation=cv2.INTER_AREA))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns above 89 MP; 108 MP is fine
def test_huge_photo_is_downscaled_to_max_side(tmp_path):
    # A 108 MP phone photo. Built by blowing up a small scene (drawing at full size would take gigabytes).
    scene = samples.draw_frame(0, 400, 300)
    Image.fromarray(scene).resize((12000, 9000), Image.Resampling.NEAREST).save(tmp_path / "huge.jpg", quality=90)
    item = _item(tmp_path / "huge.jpg", "image")
    assert (item.width, item.height) == (12000, 9000)
    source = open_frames(item)  # default max_side: 4096
    assert (source.width, source.height) == (4096, 3072)
    assert source.scale == pytest.approx(4096 / 12000)
    (_, rgb), = list(source)
    assert rgb.shape == (3072, 4096, 3) and rgb.dtype == np.uint8
    expected = cv2.resize(scene, (4096, 3072), interpolation=cv2.INTER_LINEAR)
    assert cv2.absdiff(rgb, expected).mean() < 4  # the same picture, up to JPEG and edge pixels


def test_one_pixel_image_decodes(tmp_path):
    Image.fromarray(np.full((1, 1, 3), 7, np.uint8)).save(tmp_path / "dot.png")
    item = _item(tmp_path / "dot.png", "image")
    for max_side in (1, 4096):
        (_, rgb), = list(open_frames(item, max_side=max_side))
        assert rgb.shape == (1, 1, 3) and int(rgb[0, 0, 0]) == 7


def test_more_image_modes(tmp_path):
    wide = np.zeros((4, 6, 3), np.uint16)  # 16-bit RGB: OpenCV writes BGR
    wide[..., 0], wide[..., 1], wide[..., 2] = 0x1234, 0xABCD, 0xFF00
    cv2.imwrite(str(tmp_path / "rgb16.png"), wide)
    Image.fromarray(np.dstack([np.full((4, 6), 90, np.uint8), np.full((4, 6), 3, np.uint8)]), "LA").save(
        tmp_path / "gray_alpha.png"
    )
    (_, rgb16), = list(open_frames(_item(tmp_path / "rgb16.png", "image")))
    assert rgb16[0, 0].tolist() == [0xFF, 0xAB, 0x12]  # the high byte of each channel
    (_, la), = list(open_frames(_item(tmp_path / "gray_alpha.png", "image")))
    assert (la == 90).all()  # alpha dropped, not blended


def test_variable_frame_rate_video_yields_every_frame_in_decode_order(tmp_path):
    ticks = [0, 1, 4, 5, 11]  # uneven gaps, in 1/24 s
    item = _item(samples.make_video(tmp_path / "vfr.mp4", frames=5, width=64, height=48, timestamps=ticks), "video")
    assert item.num_frames == 5 and item.fps < 24  # the average rate: nominal for such a video
    frames = list(open_frames(item))
    assert [i for i, _ in frames] == [0, 1, 2, 3, 4]  # decode order, not timestamp * fps
    for index, rgb in frames:
        drawn = samples.draw_frame(index, 64, 48, frames=5).astype(int)
        assert np.abs(rgb.astype(int) - drawn).mean() < 12, index


# ------------------------------------------------------------------------------------ bad input, clear errors


def test_files_gone_or_emptied_after_probing(tmp_path):
    video = _item(samples.make_video(tmp_path / "v.mp4", frames=2, width=64, height=48), "video")
    image = _item(samples.make_image(tmp_path / "i.png", 64, 48), "image")
    folder = _item(samples.make_frame_folder(tmp_path / "f", frames=2, width=64, height=48), "frames")
    os.remove(video.path)
    gone = f"{re.escape(video.path)}: file not found: it was moved or deleted.*rebuild"
    with pytest.raises(FileNotFoundError, match=gone):
        open_frames(video)
    open(image.path, "wb").close()
    with pytest.raises(DecodeError, match=f"{re.escape(image.path)}: empty file \\(0 bytes\\).*copy it again"):
        open_frames(image)
    for name in os.listdir(folder.path):
        os.remove(os.path.join(folder.path, name))
    with pytest.raises(FileNotFoundError, match="holds no frames any more"):
        open_frames(folder)


def test_not_a_video_says_what_it_is(tmp_path):
    text = tmp_path / "text.mp4"
    text.write_text("<!DOCTYPE html><html>Access denied</html>\n")
    error = probe(str(text), "video").error
    assert str(text) in error and "holds text, not video" in error and "Access denied" in error

    clean = samples.make_video(tmp_path / "clean.mp4", frames=6, width=64, height=48)
    data = open(clean, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    error = probe(str(tmp_path / "cut.mp4"), "video").error
    assert "cut short" in error and "index (moov box) is missing" in error and "copy it again" in error

    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 8)
    assert "not those of any container FFmpeg knows" in probe(str(tmp_path / "noise.mp4"), "video").error

    # A file replaced after probing fails when it is decoded, with the same explanation.
    item = _item(clean, "video")
    text_bytes = text.read_bytes()
    with open(clean, "wb") as f:
        f.write(text_bytes)
    with pytest.raises(DecodeError, match=f"cannot open video {re.escape(clean)}.*holds text, not video"):
        list(open_frames(item))


@pytest.mark.parametrize(
    "ext, words",
    [(".avi", "the video stream holds no frames"), (".mp4", "has no video stream"),
     (".mkv", "ends or breaks before its first frame")],
)
def test_video_without_frames_is_a_probe_error(tmp_path, ext, words):
    path = samples.make_empty_video(tmp_path / f"empty{ext}")
    error = probe(path, "video").error
    assert error.startswith(path) and words in error


def test_decompression_bomb_is_refused_with_the_fix(tmp_path):
    # A PNG header claiming 20000 x 10000 pixels (200 MP, over PIL's 179 MP limit), with no pixel data.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (20000).to_bytes(4, "big") + (10000).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    error = probe(str(tmp_path / "bomb.png"), "image").error
    assert str(tmp_path / "bomb.png") in error
    assert "too large to decode safely" in error and "downscale it below" in error


def test_unreadable_files_name_the_file_and_the_fix(tmp_path):
    """Mode-000 files, read by a process without root's permission override (see tests/privileges.py)."""
    video = _item(samples.make_video(tmp_path / "v.mp4", frames=2, width=64, height=48), "video")
    folder = _item(samples.make_frame_folder(tmp_path / "f", frames=3, width=64, height=48, ext="png"), "frames")
    locked_frame = os.path.join(folder.path, "00001.png")
    never_probed = samples.make_image(tmp_path / "locked.png", 64, 48)
    hidden = samples.make_image(tmp_path / "closed" / "inside.png", 64, 48)
    for path in (video.path, locked_frame, never_probed):
        os.chmod(path, 0)
    os.chmod(tmp_path / "closed", 0o600)  # listable by its owner, not searchable: its files cannot be reached
    if not unreadable_without_override(video.path):
        pytest.skip(f"mode 000 does not stop uid {os.geteuid()} from reading {video.path} on this file system")
    done = run_python(f"""
        import json
        from pipeline.manifest import probe
        from pipeline.records import MediaItem
        from pipeline.stages.decode import open_frames
        messages = {{"probe": probe({never_probed!r}, "image").error, "hidden": probe({hidden!r}, "image").error}}
        for name, item in (("video", MediaItem(**{video.__dict__!r})), ("folder", MediaItem(**{folder.__dict__!r}))):
            try:
                open_frames(item)
                messages[name] = "no error"
            except Exception as e:
                messages[name] = f"{{type(e).__name__}}: {{e}}"
        print(json.dumps(messages))
    """, timeout=120)
    assert done.returncode == 0, done.stderr
    messages = json.loads(done.stdout.strip().splitlines()[-1])
    assert messages["probe"].startswith(f"{never_probed}: permission denied") and "chmod a+r" in messages["probe"]
    assert messages["hidden"].startswith(f"{hidden}: permission denied: a folder on its path cannot be searched")
    assert messages["video"].startswith(f"PermissionError: {video.path}: permission denied")
    assert "cannot read this file" in messages["video"] and "chmod a+r" in messages["video"]
    # The folder's unreadable frame is found from the headers, before any decoding, and named.
    assert messages["folder"].startswith(f"PermissionError: {locked_frame}: permission denied"), messages["folder"]


def test_messages_are_valid_utf8_for_names_that_are_not(tmp_path):
    # PIL puts the raw name in its message; a surrogate-escaped name would make the failed row unwritable.
    folder = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"seq\xff"))
    samples.make_frame_folder(folder, frames=2, width=32, height=32, ext="png")
    item = _item(folder, "frames")
    with open(os.path.join(folder, "00001.png"), "wb") as f:
        f.write(b"\x89PNG damaged")
    with pytest.raises(DecodeError) as raised:
        open_frames(item)
    message = str(raised.value)
    message.encode("utf-8")  # no surrogates left
    assert "seq\\xff" in message and "00001.png" in message and "damaged or cut short" in message
