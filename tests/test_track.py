"""The tracking engine (pipeline/stages/track.py) against plain sam2, and the bounds it promises.

The reference is sam2's own flow on a JPEG folder: SAM2VideoPredictor.init_state, add_new_mask per object,
propagate_in_video, with a predictor built by sam2's builder from the same random-weight checkpoint, the same
thread count (pinned in conftest) and the same prompts. The clip (48 frames) is longer than the model's memory
window (15 frames for SAM 2.1: 16 object pointers), so the engine's pruning is exercised: had it dropped one
frame the model could still read, the masks would differ (test_pruning_one_frame_more_changes_masks shows the
comparison notices).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.stages.track as track_mod
from pipeline.config import ModelConfig
from pipeline.records import FrameMasks, Prompt
from pipeline.samples import make_frame_folder
from pipeline.stages.models import MODEL_SPECS, load_model, patched_method
from pipeline.stages.track import (
    MediaEnded, TrackerState, TrackOptions, default_object_batch, memory_window, preprocess_frame_numpy, track,
    write_behind,
)
from tests.conftest import IMAGE_SIZE, THREADS

FRAMES = 48
OBJECTS = 8
WIDTH, HEIGHT = 160, 120
PREFETCH = 2


def _shape_masks(n: int) -> list[np.ndarray]:
    """n prompt masks on a 2 x ceil(n/2) grid: rectangles and circles of different sizes."""
    masks = []
    cols = (n + 1) // 2
    cw, ch = WIDTH / cols, HEIGHT / 2
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    for i in range(n):
        r, c = divmod(i, cols)
        cx, cy = (c + 0.5) * cw, (r + 0.5) * ch
        size = 0.25 + 0.05 * (i % 3)
        if i % 2:
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= (size * min(cw, ch)) ** 2
        else:
            mask = (abs(x - cx) <= size * cw) & (abs(y - cy) <= size * ch)
        masks.append(mask)
    return masks


def _prompts(frames_of_objects: list[int]) -> list[Prompt]:
    masks = _shape_masks(len(frames_of_objects))
    return [
        Prompt(object_id=10 + i, frame=f, mask=m, point=(0.0, 0.0), predicted_iou=1.0, stability_score=1.0,
               area=int(m.sum()), bbox=(0, 0, 1, 1), source="test-grid")
        for i, (f, m) in enumerate(zip(frames_of_objects, masks))
    ]


class _CountingFrames:
    """The clip's frames read with PIL (as sam2's loader reads them), counting how many were pulled."""

    def __init__(self, folder: str, limit: int | None = None):
        names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
        self.paths = [os.path.join(folder, n) for n in names][:limit]
        self.pulled = 0
        self.threads: set[str] = set()

    def __iter__(self):
        for p in self.paths:
            self.threads.add(threading.current_thread().name)
            self.pulled += 1
            yield np.array(Image.open(p).convert("RGB"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return make_frame_folder(tmp_path_factory.mktemp("track") / "clip", frames=FRAMES, width=WIDTH, height=HEIGHT,
                             ext="jpg", seed=5)


@pytest.fixture(scope="module")
def model(random_checkpoint):
    return load_model(ModelConfig(checkpoint=random_checkpoint, image_size=IMAGE_SIZE, device="cpu",
                                  threads=THREADS))


def _plain_sam2(folder: str, checkpoint: str, prompts: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
    """Masks (T, O, H, W) and object-score logits (T, O) from sam2's own predictor."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.set_num_threads(THREADS)
    predictor = build_sam2_video_predictor(MODEL_SPECS["sam2.1_hiera_tiny"].config_file, checkpoint, device="cpu",
                                           hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"])
    predictor.fill_hole_area = 0  # needs sam2's CUDA extension; our model builder turns it off on CPU too
    state = predictor.init_state(video_path=folder)
    for p in prompts:
        predictor.add_new_mask(state, frame_idx=p.frame, obj_id=p.object_id, mask=p.mask)
    masks, scores = {}, {}
    with torch.inference_mode():
        for t, obj_ids, video_res_masks in predictor.propagate_in_video(state):
            assert list(obj_ids) == [p.object_id for p in prompts]
            masks[t] = (video_res_masks[:, 0] > 0.0).numpy()
            per_obj = []
            for obj_idx in range(len(obj_ids)):
                outputs = state["output_dict_per_obj"][obj_idx]
                out = outputs["cond_frame_outputs"].get(t) or outputs["non_cond_frame_outputs"][t]
                per_obj.append(float(out["object_score_logits"].flatten()[0]))
            scores[t] = per_obj
    frames = sorted(masks)
    return np.stack([masks[t] for t in frames]), np.asarray([scores[t] for t in frames], dtype=np.float32)


def _run(model, folder: str, prompts: list[Prompt], options: TrackOptions, num_frames: int = FRAMES):
    frames = _CountingFrames(folder)
    stream = track(model, frames, num_frames, HEIGHT, WIDTH, prompts, list(range(num_frames)), options)
    got: list[FrameMasks] = []
    ahead = 0
    for fm in stream:
        ahead = max(ahead, frames.pulled - (len(got) + 1))
        got.append(fm)
    return got, stream.stats, frames, ahead


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def eight_objects() -> list[Prompt]:
    return _prompts([0] * OBJECTS)


@pytest.fixture(scope="module")
def plain(clip, random_checkpoint, eight_objects):
    return _plain_sam2(clip, random_checkpoint, eight_objects)


@pytest.fixture(scope="module")
def unbatched(model, clip, eight_objects):
    # decoding in the helper thread, whatever this machine's cores (the default depends on them)
    return _run(model, clip, eight_objects, TrackOptions(object_batch=1, prefetch=PREFETCH, decode_thread=True))


def test_unbatched_masks_are_identical_to_plain_sam2(plain, unbatched, eight_objects):
    plain_masks, plain_scores = plain
    got, stats, _, _ = unbatched
    assert plain_masks.shape == (FRAMES, OBJECTS, HEIGHT, WIDTH)
    assert 0.0 < plain_masks.mean() < 1.0, "the reference masks are all empty or all full: the test means nothing"
    assert [fm.frame for fm in got] == list(range(FRAMES))
    assert [fm.source_frame for fm in got] == list(range(FRAMES))
    for fm in got:
        assert fm.object_ids == tuple(p.object_id for p in eight_objects)
        assert fm.masks.dtype == bool and fm.object_scores.dtype == np.float32
        np.testing.assert_array_equal(fm.masks, plain_masks[fm.frame], err_msg=f"frame {fm.frame} differs")
        np.testing.assert_array_equal(fm.object_scores, plain_scores[fm.frame], err_msg=f"scores, frame {fm.frame}")
    assert stats.frames == FRAMES and stats.objects == OBJECTS and stats.object_batch == 1


def test_first_self_attention_runs_once_per_frame_not_per_object(model, unbatched):
    """Memory attention's first self-attention (the same input for every object) ran once per tracked frame
    for all eight objects, and the masks above are still sam2's bit for bit; the patch is gone afterwards."""
    _, stats, _, _ = unbatched
    assert stats.object_batch == 1 and stats.batches == OBJECTS
    assert stats.self_attention_runs == FRAMES - 1  # every frame after the prompt frame, not 8x that
    assert "_forward_sa" not in vars(model.predictor.memory_attention.layers[0])


def test_first_self_attention_is_not_shared_when_memory_attention_was_replaced(model):
    """A compiled (or otherwise replaced) memory attention is left alone: sharing would patch inside it."""
    assert track_mod._SharedFirstSelfAttention.usable(model.predictor)
    # an instance attribute, as torch.compile sets it
    with patched_method(model.predictor.memory_attention, "forward", lambda forward: forward):
        assert not track_mod._SharedFirstSelfAttention.usable(model.predictor)
    assert track_mod._SharedFirstSelfAttention.usable(model.predictor)


def _keyframe_features(model, folder: str, frame: int):
    """The prompt stage's encoding of `frame` (a small AMG grid; its prompts are not used here)."""
    from pipeline.config import PromptConfig
    from pipeline.stages.prompt import make_generator, prompt_and_encode_keyframe

    cfg = PromptConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=0)
    rgb = np.array(Image.open(os.path.join(folder, f"{frame:05d}.jpg")).convert("RGB"))
    _, features = prompt_and_encode_keyframe(make_generator(model, cfg), rgb, cfg, frame=0)
    assert features is not None and features.frame == 0
    return features


def test_keyframe_features_from_prompting_are_reused_not_recomputed(model, clip, eight_objects, plain):
    """With the prompt stage's features of frame 0, tracking encodes every frame but that one, and the masks
    are still sam2's bit for bit (the features are those of the very tensor tracking would encode)."""
    keyframe = _keyframe_features(model, clip, 0)
    calls = []
    counting = lambda encode: lambda image: calls.append(1) or encode(image)  # noqa: E731
    with patched_method(model.predictor, "forward_image", counting):
        stream = track(model, _CountingFrames(clip), FRAMES, HEIGHT, WIDTH, eight_objects[:2],
                       list(range(FRAMES)), TrackOptions(object_batch=1), keyframe=keyframe)
        got = list(stream)
    assert stream.stats.keyframe_reused and len(calls) == FRAMES - 1
    for fm in got:  # objects are tracked independently when unbatched: two of the eight suffice
        np.testing.assert_array_equal(fm.masks, plain[0][fm.frame, :2], err_msg=f"frame {fm.frame} differs")


def test_keyframe_features_of_another_image_are_refused(model, clip, eight_objects):
    keyframe = _keyframe_features(model, clip, 1)  # frame 1's image, labelled frame 0
    stream = track(model, _CountingFrames(clip), FRAMES, HEIGHT, WIDTH, eight_objects[:1], list(range(FRAMES)),
                   TrackOptions(), keyframe=keyframe)
    with pytest.raises(ValueError, match="computed on another image"):
        next(stream)
    stream.close()


def test_pruning_one_frame_more_changes_masks(model, clip, eight_objects, plain, monkeypatch):
    """The comparison above would catch a pruning rule that drops a frame the model can still read.
    (Objects are tracked independently when unbatched, so two of the eight suffice.)"""
    exact = track_mod.oldest_readable_frame
    monkeypatch.setattr(track_mod, "oldest_readable_frame", lambda m, f, n: exact(m, f, n) + 1)
    got, _, _, _ = _run(model, clip, eight_objects[:2], TrackOptions(object_batch=1))
    assert any(not np.array_equal(fm.masks, plain[0][fm.frame, :2]) for fm in got)


def test_batched_masks_match_plain_sam2(model, clip, eight_objects, plain):
    plain_masks, plain_scores = plain
    got, stats, _, _ = _run(model, clip, eight_objects, TrackOptions(object_batch=3))  # batches of 3, 3, 2
    assert stats.object_batch == 3 and stats.batches == 3
    assert [fm.frame for fm in got] == list(range(FRAMES))
    worst = min(_iou(fm.masks[o], plain_masks[fm.frame, o]) for fm in got for o in range(OBJECTS))
    assert worst >= 0.99, f"lowest per-object per-frame IoU against plain sam2: {worst:.4f}"
    scores = np.stack([fm.object_scores for fm in got])
    np.testing.assert_allclose(scores, plain_scores, rtol=1e-3, atol=1e-3)


def test_masks_are_upsampled_to_video_resolution_one_object_batch_at_a_time(model, clip, eight_objects):
    """At 4K the float32 logits of 64 objects at video resolution are 2.4 GB: only an object batch's exist at
    once. (That the masks keep their bits is test_unbatched_masks_are_identical_to_plain_sam2: plain sam2
    upsamples all objects in one call, the engine one at a time there.)"""
    calls: list[int] = []

    def spying(own):
        def spy(state, any_res_masks):
            calls.append(any_res_masks.shape[0])
            return own(state, any_res_masks)
        return spy

    with patched_method(model.predictor, "_get_orig_video_res_output", spying):
        got, stats, _, _ = _run(model, clip, eight_objects, TrackOptions(object_batch=3), num_frames=3)
    assert calls == [3, 3, 2] * 3 and stats.upsample_batch == 3
    assert all(fm.masks.shape == (OBJECTS, HEIGHT, WIDTH) for fm in got)


def test_state_and_frames_stay_bounded(model, unbatched):
    _, stats, frames, ahead = unbatched
    window = max(model.predictor.num_maskmem - 1, model.predictor.max_obj_ptrs_in_encoder - 1)
    assert stats.memory_window == window == memory_window(model.predictor, FRAMES)
    assert window < FRAMES - 8, "the clip must be well past the window for the bound to mean anything"
    # Non-conditioning outputs: never more than the window, and the window is reached (pruning is not eager).
    assert stats.max_non_cond_retained == window
    # Frames: decoded a few ahead, never the whole clip; every frame pulled exactly once, in the helper thread.
    assert frames.pulled == stats.frames_pulled == FRAMES
    assert ahead <= PREFETCH + 2 and stats.max_frames_ahead <= PREFETCH + 2
    assert 1 <= stats.max_frames_alive <= PREFETCH + 3
    assert stats.decode_thread and frames.threads == {"masklet-prefetch"}


def test_slimming_one_frame_early_breaks_tracking(model, clip, eight_objects, monkeypatch):
    """Past the memory window only object pointers are kept; keeping one frame's memory less than the model
    reads makes sam2 fail, so the comparisons above also prove the slimming rule exact."""
    exact = track_mod.oldest_memory_frame
    monkeypatch.setattr(track_mod, "oldest_memory_frame", lambda m, f: exact(m, f) + 1)
    with pytest.raises(KeyError, match="maskmem_features"):
        _run(model, clip, eight_objects[:1], TrackOptions(object_batch=1), num_frames=12)


RESUME_AT = 24  # past the 15-frame window: the saved state holds pruned and slimmed outputs


def _through_disk(state: TrackerState, path: Path) -> TrackerState:
    torch.save(state.payload(), path)
    return TrackerState.from_payload(torch.load(path, weights_only=True, map_location="cpu"))


@pytest.mark.parametrize("object_batch", [1, 2])
def test_resuming_from_a_saved_state_gives_the_same_masks(model, clip, eight_objects, tmp_path, object_batch):
    prompts = eight_objects[:3]  # object_batch 2: one batch of 2 and one of 1
    want, _, _, _ = _run(model, clip, prompts, TrackOptions(object_batch=object_batch))
    stream = track(model, _CountingFrames(clip), FRAMES, HEIGHT, WIDTH, prompts, list(range(FRAMES)),
                   TrackOptions(object_batch=object_batch))
    for fm in stream:
        if fm.frame == RESUME_AT - 1:
            saved = _through_disk(stream.snapshot(), tmp_path / "state.pt")
            break
    stream.close()
    assert saved.next_frame == RESUME_AT and len(saved.batches) == (3 if object_batch == 1 else 2)
    for b in saved.batches:  # bounded: the window's outputs, memories only within the memory window
        non_cond = b["output_dict"]["non_cond_frame_outputs"]
        assert len(non_cond) == memory_window(model.predictor, FRAMES)
        with_memory = [f for f, out in non_cond.items() if "maskmem_features" in out]
        assert len(with_memory) == model.predictor.num_maskmem - 1
        assert all("pred_masks" not in out for out in non_cond.values())
    frames = _CountingFrames(clip)
    resumed = track(model, frames, FRAMES, HEIGHT, WIDTH, prompts, list(range(FRAMES)),
                    TrackOptions(object_batch=object_batch), resume=saved)
    got = list(resumed)
    assert [fm.frame for fm in got] == list(range(RESUME_AT, FRAMES))
    for fm in got:
        np.testing.assert_array_equal(fm.masks, want[fm.frame].masks, err_msg=f"frame {fm.frame}")
        np.testing.assert_array_equal(fm.object_scores, want[fm.frame].object_scores)
    assert resumed.stats.frames == FRAMES - RESUME_AT and frames.pulled == FRAMES
    with pytest.raises(ValueError, match="another item or run"):
        track(model, iter(()), FRAMES, HEIGHT, WIDTH, eight_objects[:2], list(range(FRAMES)), resume=saved)


def test_decoding_in_the_models_thread_gives_the_same_masks(model, clip, eight_objects, unbatched):
    """Without a spare core frames are decoded between the model's frames: one frame ahead at most."""
    got, stats, frames, ahead = _run(model, clip, eight_objects[:1], TrackOptions(decode_thread=False),
                                     num_frames=20)
    assert not stats.decode_thread and frames.threads == {threading.current_thread().name}
    assert ahead <= 1 and stats.max_frames_alive <= 3
    for fm, reference in zip(got, unbatched[0]):
        np.testing.assert_array_equal(fm.masks, reference.masks[:1])


def test_helper_threads_only_where_a_core_is_free(monkeypatch):
    monkeypatch.setattr(track_mod, "usable_cores", lambda: torch.get_num_threads())
    assert not track_mod.spare_core(torch.device("cpu"))
    monkeypatch.setattr(track_mod, "usable_cores", lambda: torch.get_num_threads() + 1)
    assert track_mod.spare_core(torch.device("cpu"))
    assert track_mod.spare_core(torch.device("cuda"))


def test_objects_prompted_on_later_frames(model, clip, random_checkpoint):
    """Objects are grouped by prompt frame (batches out of object order) and put back in object order. An
    object has no mask and a NaN score before its prompt frame, and from there on the masks sam2 gives it
    when tracked from that frame (sam2 itself cannot track both groups in one state on CPU: see track.py)."""
    n = 6
    frames_of_objects = [0, 2, 0, 2, 0, 2]
    prompts = _prompts(frames_of_objects)
    folder = str(Path(clip).parent / "short")
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(clip))[:n]:
        target = os.path.join(folder, name)
        if not os.path.exists(target):
            os.symlink(os.path.join(clip, name), target)
    early = [i for i, f in enumerate(frames_of_objects) if f == 0]
    late = [i for i, f in enumerate(frames_of_objects) if f == 2]
    plain_early, scores_early = _plain_sam2(folder, random_checkpoint, [prompts[i] for i in early])
    plain_late, scores_late = _plain_sam2(folder, random_checkpoint, [prompts[i] for i in late])  # frames 2..5
    for options, identical in [(TrackOptions(object_batch=1), True), (TrackOptions(object_batch=3), False)]:
        got, stats, _, _ = _run(model, folder, prompts, options, num_frames=n)
        assert stats.batches == (6 if identical else 2)
        assert [fm.object_ids for fm in got] == [tuple(p.object_id for p in prompts)] * n
        for fm in got:
            expected = np.zeros((len(prompts), HEIGHT, WIDTH), bool)
            expected[early] = plain_early[fm.frame]
            if fm.frame >= 2:
                expected[late] = plain_late[fm.frame - 2]
            else:
                assert np.isnan(fm.object_scores[late]).all()
            if identical:
                np.testing.assert_array_equal(fm.masks, expected, err_msg=f"frame {fm.frame}")
                np.testing.assert_array_equal(fm.object_scores[early], scores_early[fm.frame])
            else:
                assert min(_iou(fm.masks[o], expected[o]) for o in range(len(prompts))) >= 0.99


def test_short_media_yields_every_frame_then_raises_media_ended(model, clip):
    prompts = _prompts([0])
    frames = _CountingFrames(clip, limit=5)
    stream = track(model, frames, 9, HEIGHT, WIDTH, prompts, list(range(9)), TrackOptions())
    got = []
    with pytest.raises(MediaEnded, match="ended at frame 5"):
        for fm in stream:
            got.append(fm.frame)
    assert got == [0, 1, 2, 3, 4]


def test_no_prompts_reads_no_frame(model):
    def frames():
        raise AssertionError("no frame should be read when there is nothing to track")
        yield  # pragma: no cover

    assert list(track(model, frames(), 10, HEIGHT, WIDTH, [], list(range(10)))) == []


def test_bad_prompts_are_refused_before_any_work(model):
    p = _prompts([0])[0]
    with pytest.raises(ValueError, match="two prompts on frame 0"):
        track(model, iter(()), 4, HEIGHT, WIDTH, [p, p], list(range(4)))
    with pytest.raises(ValueError, match="outside the item's frames"):
        track(model, iter(()), 4, HEIGHT, WIDTH, [Prompt(**{**p.__dict__, "frame": 4})], list(range(4)))
    with pytest.raises(ValueError, match="object_batch"):
        TrackOptions(object_batch=0)


def test_numpy_preprocessing_is_bit_identical_to_sam2s_loader(tmp_path):
    from sam2.utils.misc import load_video_frames_from_jpg_images

    for h, w, size in [(120, 160, 256), (481, 641, 512), (37, 53, 64)]:
        folder = make_frame_folder(tmp_path / f"{h}x{w}", frames=2, width=w, height=h, ext="jpg", seed=h)
        want, _, _ = load_video_frames_from_jpg_images(folder, size, offload_video_to_cpu=True,
                                                       compute_device=torch.device("cpu"))
        for t, name in enumerate(sorted(os.listdir(folder))):
            rgb = np.array(Image.open(os.path.join(folder, name)).convert("RGB"))
            got = preprocess_frame_numpy(rgb, size)
            assert got.dtype == want.dtype and got.shape == want[t].shape
            assert torch.equal(got, want[t]), (h, w, size, t)


def test_default_object_batch_rule():
    gib = 1 << 30
    # CPU: one object at a time, whatever the memory (batching measured to buy nothing there).
    for free in (0, 8 * gib, 512 * gib):
        assert default_object_batch("cpu", free, 1024) == 1
        assert default_object_batch(torch.device("cpu"), free, 256) == 1
    # CUDA: objects fitting in half the free memory at 160 bytes per model-input pixel, 1..64.
    assert default_object_batch("cuda", 1 * gib, 1024) == 3  # 0.5 GiB / 160 MiB
    assert default_object_batch("cuda:1", 8 * gib, 1024) == 25  # 4 GiB / 160 MiB
    assert default_object_batch("cuda", 20 * gib, 1024) == 64
    assert default_object_batch("cuda", 80 * gib, 1024) == 64  # capped
    assert default_object_batch("cuda", 8 * gib, 512) == 64  # 4 GiB / 40 MiB = 102, capped
    assert default_object_batch("cuda", 1 * gib, 512) == 12  # 0.5 GiB / 40 MiB
    assert default_object_batch("cuda", 0, 1024) == 1  # never zero
    # More memory never gives fewer objects; a bigger image never gives more.
    sizes = [default_object_batch("cuda", k * gib, 1024) for k in range(0, 64, 4)]
    assert sizes == sorted(sizes)
    assert default_object_batch("cuda", 4 * gib, 1024) <= default_object_batch("cuda", 4 * gib, 512)


@pytest.mark.parametrize("thread", [True, False])
def test_write_behind_writes_in_order(thread):
    written, threads = [], set()

    def stream():
        for t in range(6):
            yield FrameMasks(t, t, (0,), np.zeros((1, 2, 2), bool), np.zeros(1, np.float32))

    def write(fm):
        threads.add(threading.current_thread().name)
        written.append(fm.frame)

    assert write_behind(stream(), write, thread=thread) == 6
    assert written == list(range(6))
    assert threads == ({"masklet-writer"} if thread else {threading.current_thread().name})


@pytest.mark.parametrize("thread", [True, False])
def test_write_behind_raises_write_errors_and_stream_errors_after_earlier_writes(thread):
    def stream(fail_at=None):
        for t in range(6):
            if t == fail_at:
                raise MediaEnded(f"the media ended at frame {t}, expected 6 frames")
            yield FrameMasks(t, t, (0,), np.zeros((1, 2, 2), bool), np.zeros(1, np.float32))

    written = []
    with pytest.raises(MediaEnded):
        write_behind(stream(fail_at=4), lambda fm: written.append(fm.frame), thread=thread)
    assert written == [0, 1, 2, 3]

    def bad_write(fm):
        if fm.frame == 2:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_behind(stream(), bad_write, thread=thread)


def test_offloaded_state_is_placed_where_sam2_keeps_it():
    """With offload_state, a restored state puts memories and masks in host memory and the rest on the compute
    device (here the meta device stands in for a GPU, so the placement shows on a CPU-only machine)."""
    engine = object.__new__(track_mod._Engine)
    engine.device, engine.storage_device = torch.device("meta"), torch.device("cpu")
    out = {"maskmem_features": torch.zeros(2, 64, 4, 4), "pred_masks": torch.zeros(2, 1, 8, 8),
           "maskmem_pos_enc": [torch.zeros(2, 64, 4, 4)], "obj_ptr": torch.zeros(2, 256),
           "object_score_logits": torch.zeros(2, 1)}
    placed = engine._placed({"cond_frame_outputs": {0: out}, "non_cond_frame_outputs": {3: {"obj_ptr": out["obj_ptr"]}}})
    cond = placed["cond_frame_outputs"][0]
    assert {k: (v[0] if isinstance(v, list) else v).device.type for k, v in cond.items()} == {
        "maskmem_features": "cpu", "pred_masks": "cpu", "maskmem_pos_enc": "meta", "obj_ptr": "meta",
        "object_score_logits": "meta"}
    assert placed["non_cond_frame_outputs"][3]["obj_ptr"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (where the state would be offloaded)")
def test_offloaded_state_gives_the_same_masks_on_a_gpu(random_checkpoint, clip, eight_objects):
    gpu = load_model(ModelConfig(checkpoint=random_checkpoint, image_size=IMAGE_SIZE, device="cuda"))
    options = dict(object_batch=4, autocast="off", tf32=False)
    want, _, _, _ = _run(gpu, clip, eight_objects, TrackOptions(**options))
    stream = track(gpu, _CountingFrames(clip), FRAMES, HEIGHT, WIDTH, eight_objects, list(range(FRAMES)),
                   TrackOptions(**options, offload_state=True))
    got = []
    for fm in stream:
        got.append(fm)
        if fm.frame == 20:
            state, live, _ = stream._engine._live  # the live state (a snapshot would copy it to the CPU)
            assert state["storage_device"].type == "cpu"
            for b in live:
                for out in [*b.output_dict["cond_frame_outputs"].values(),
                            *b.output_dict["non_cond_frame_outputs"].values()]:
                    if "maskmem_features" in out:
                        assert out["maskmem_features"].device.type == "cpu"
                    assert out["obj_ptr"].device.type == "cuda"
            assert len(live) == 2
    assert stream.stats.storage_device == "cpu"
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.masks, b.masks, err_msg=f"frame {a.frame}")


def test_normalization_table_matches_sam2s_arithmetic_for_every_value():
    """The table behind preprocess_frame_numpy against sam2's loader's own steps, for all 256 values of each
    channel (the JPEG test above sees only the values its frames happen to hold)."""
    values = np.arange(256, dtype=np.uint8)
    image = torch.zeros(3, 1, 256, dtype=torch.float32)
    image[:] = torch.from_numpy(np.stack([values] * 3)[:, None, :] / 255.0)  # float64 into float32, as sam2
    image -= torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
    image /= torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
    assert torch.equal(torch.from_numpy(track_mod._NORMALIZED), image[:, 0])
