"""The sam2 internals masklet relies on, checked against the installed sam2 itself.

pipeline/stages/track.py prunes and slims the tracking state with a copy of sam2's memory-window rule
(`oldest_memory_frame`, `oldest_readable_frame`). Here sam2's own `_prepare_memory_conditioned_features` runs,
instrumented, over many (frame, num_maskmem, memory stride, object pointers, prompt frames, video length)
settings: every earlier output it hands is a dict that records which of its fields sam2 reads, and the call
stops at memory attention (everything the rule is about is chosen by then). The frames sam2 read must lie in
the copy's window, and the window's oldest frame must be one sam2 reads (the copy is exact, not just safe).
If a sam2 release changes the rule, this test fails and names the setting.

And the version pin: `require_sam2()` refuses another sam2 unless MASKLET_ALLOW_SAM2_VERSION names it.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.stages import sam2_pin
from pipeline.stages.models import load_model, patched_method
from pipeline.stages.track import oldest_memory_frame, oldest_readable_frame


class _Stop(Exception):
    """Raised by memory attention: sam2 has chosen every memory and pointer by then."""


class _Output(dict):
    """A frame's output that records which of its fields sam2 reads."""

    def __init__(self, frame: int, reads: set, **fields):
        super().__init__(**fields)
        self.frame, self.reads = frame, reads

    def __getitem__(self, key):
        self.reads.add((self.frame, key))
        return super().__getitem__(key)


@pytest.fixture(scope="module")
def model():
    # sam2's own model (the random-weight tiny; weights do not matter: only which frames are read)
    return load_model(ModelConfig(random_weights=True, image_size=128, device="cpu")).predictor


def _frames_sam2_reads(pred, frame: int, num_frames: int, cond_frames: tuple[int, ...]) -> tuple[set, set]:
    """(frames whose memory sam2 reads, frames whose object pointer it reads) among non-conditioning outputs
    of every earlier frame that is not a prompt frame, when tracking `frame` forward."""
    b, h, w = 1, 2, 2
    reads: set = set()

    def output(f: int, recorded: bool) -> dict:
        fields = dict(maskmem_features=torch.zeros(b, pred.mem_dim, h, w),
                      maskmem_pos_enc=[torch.zeros(b, pred.mem_dim, h, w)], obj_ptr=torch.zeros(b, pred.hidden_dim))
        return _Output(f, reads, **fields) if recorded else fields

    output_dict = {"cond_frame_outputs": {c: output(c, False) for c in cond_frames},
                   "non_cond_frame_outputs": {f: output(f, True) for f in range(frame) if f not in cond_frames}}
    feats = [torch.zeros(h * w, b, pred.hidden_dim)]

    def stop(_forward):
        def raise_stop(*args, **kwargs):
            raise _Stop
        return raise_stop

    with torch.inference_mode(), patched_method(pred.memory_attention, "forward", stop):
        try:
            pred._prepare_memory_conditioned_features(
                frame_idx=frame, is_init_cond_frame=False, current_vision_feats=feats,
                current_vision_pos_embeds=feats, feat_sizes=[(h, w)], output_dict=output_dict,
                num_frames=num_frames, track_in_reverse=False)
        except _Stop:
            pass
    memory = {f for f, key in reads if key == "maskmem_features"}
    pointers = {f for f, key in reads if key == "obj_ptr"}
    return memory, pointers


@pytest.fixture
def settable(model):
    """Set num_maskmem, the memory stride and the pointer count on sam2's model, restored afterwards."""
    saved = {k: getattr(model, k) for k in ("num_maskmem", "memory_temporal_stride_for_eval",
                                            "max_obj_ptrs_in_encoder", "maskmem_tpos_enc")}

    def set_(num_maskmem: int, stride: int, max_ptrs: int) -> None:
        model.num_maskmem, model.memory_temporal_stride_for_eval = num_maskmem, stride
        model.max_obj_ptrs_in_encoder = max_ptrs
        # one temporal encoding per memory slot (sam2 sizes it by num_maskmem)
        model.maskmem_tpos_enc = torch.nn.Parameter(torch.zeros(max(1, num_maskmem), 1, 1, model.mem_dim))

    yield set_
    for k, v in saved.items():
        setattr(model, k, v)


def _check_window_rule(model, settable, num_maskmems, strides, max_ptrs_options, videos) -> int:
    assert not model.training and model.use_obj_ptrs_in_encoder  # the rule is sam2's eval-time one
    checked, mismatches = 0, []
    for num_maskmem, stride, max_ptrs in itertools.product(num_maskmems, strides, max_ptrs_options):
        settable(num_maskmem, stride, max_ptrs)
        for num_frames, cond in videos:
            for frame in range(1, num_frames):
                if frame in cond:
                    continue
                memory, pointers = _frames_sam2_reads(model, frame, num_frames, cond)
                oldest_mem = oldest_memory_frame(model, frame)
                oldest = oldest_readable_frame(model, frame, num_frames)
                setting = (f"num_maskmem={num_maskmem} stride={stride} max_obj_ptrs={max_ptrs} frames={num_frames} "
                           f"prompts on {cond}, tracking frame {frame}: sam2 read memories {sorted(memory)}, "
                           f"pointers {sorted(pointers)}; track.py: memories from {oldest_mem}, outputs from {oldest}")
                checked += 1
                # safe: nothing sam2 reads is pruned (outputs) or slimmed (memories)
                if any(f < oldest_mem for f in memory) or any(f < oldest for f in memory | pointers):
                    mismatches.append("reads outside the window: " + setting)
                # exact: the window's oldest frame is read, when there is an output there to read
                if 0 <= oldest_mem < frame and oldest_mem not in cond and oldest_mem not in memory:
                    mismatches.append("memory window too wide: " + setting)
                if 0 <= oldest < frame and oldest not in cond and oldest not in memory | pointers:
                    mismatches.append("output window too wide: " + setting)
                # pruning after frame t is for frame t+1 and later: the window's start may never move back
                if oldest_memory_frame(model, frame + 1) < oldest_mem or \
                        oldest_readable_frame(model, frame + 1, num_frames) < oldest:
                    mismatches.append("window moves back: " + setting)
    assert not mismatches, f"{len(mismatches)} of {checked} settings differ, e.g.:\n" + "\n".join(mismatches[:8])
    return checked


def test_window_rule_matches_sam2(model, settable):
    """A representative sweep: no memory past the prompt (num_maskmem 1, where the copy once differed), a short
    and sam2.1's memory, unit and wider strides, a pointer window shorter and longer than the memory window, and
    a video shorter than the pointer window (sam2 caps the pointers at the video's length)."""
    assert _check_window_rule(model, settable, (1, 3, 7), (1, 3), (2, 16), ((30, (0, 6)), (9, (0,)))) > 400


@pytest.mark.slow
def test_window_rule_matches_sam2_everywhere(model, settable):
    assert _check_window_rule(model, settable, (0, 1, 2, 3, 4, 7, 9), (1, 2, 3, 5), (1, 2, 5, 16),
                              ((40, (0,)), (40, (0, 6)), (9, (0,)))) > 9000


def test_require_sam2_refuses_other_versions():
    assert sam2_pin.require_sam2() == sam2_pin.SAM2_VERSION  # what is installed here is the pin
    assert sam2_pin.require_sam2(installed=sam2_pin.SAM2_VERSION, env={}) == sam2_pin.SAM2_VERSION
    with pytest.raises(sam2_pin.Sam2VersionError, match=r"sam2 1\.2\.0 is installed.*MASKLET_ALLOW_SAM2_VERSION=1\.2\.0"):
        sam2_pin.require_sam2(installed="1.2.0", env={})
    with pytest.raises(sam2_pin.Sam2VersionError, match="names another version"):
        sam2_pin.require_sam2(installed="1.2.0", env={sam2_pin.ALLOW_ENV: "1.3.0"})
    assert sam2_pin.require_sam2(installed="1.2.0", env={sam2_pin.ALLOW_ENV: "1.2.0"}) == "1.2.0"


def test_require_sam2_without_sam2(monkeypatch):
    monkeypatch.setattr(sam2_pin, "installed_sam2_version", lambda: None)
    with pytest.raises(sam2_pin.Sam2VersionError, match="not installed"):
        sam2_pin.require_sam2(env={})


def test_model_building_checks_the_pin(monkeypatch):
    monkeypatch.setattr(sam2_pin, "installed_sam2_version", lambda: "9.9.9")
    monkeypatch.delenv(sam2_pin.ALLOW_ENV, raising=False)
    with pytest.raises(sam2_pin.Sam2VersionError, match="9.9.9"):
        load_model(ModelConfig(random_weights=True, image_size=128, device="cpu"))


def test_pin_equals_pyproject():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"sam2==([^"]+)"', text).group(1) == sam2_pin.SAM2_VERSION
