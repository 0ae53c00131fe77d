"""Re-seeded masklets tracked backwards from their seed frame (`propagate.reverse`).

An object found by re-seeding on frame t was usually visible for a while before t (it was too small, hidden
behind another mask, or between two re-seed frames). After the forward pass, each re-seeded masklet that the
duplicate rule kept is tracked backwards over at most `propagate.reverse_frames` frames before t: the item's
frames are decoded again, the last ones before each seed frame kept (never more than reverse_frames + 1
frames in memory), and pipeline/stages/track.py's `track_backward` runs over them in reverse order (frame t,
t-1, ...) with the masklet's seed mask as the prompt on the first of them: bit-identical to sam2's
`propagate_in_video(reverse=True)` from that prompt (tests/test_track_reseed.py says when). Masklets seeded
on the same frame go together, batched as usual.

The masks land in the staged array on frames where the masklet had none (before its seed frame); then the
item's frame rows and quality signals are recomputed from the staged array, so they describe the masks that
are published. A masklet's `prompt_frame` stays its seed frame; its `first_frame` moves back to where it was
first visible.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np

from pipeline.quality.signals import MaskletSignals, PromptSignals
from pipeline.records import Dropped, Prompt
from pipeline.store import metadata

log = logging.getLogger("masklet.reverse")


@dataclasses.dataclass
class Backwards:
    """What the backward pass found: per masklet, the first frame it now starts on and its new masks/scores."""

    start: dict[int, int]  # object id -> first frame it is tracked on (its seed frame when nothing was added)
    scores: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)  # (object, frame) -> logit
    frames_added: int = 0  # object-frames with a mask before their seed frame


def targets(prompts: list[Prompt], dropped: dict[int, Dropped]) -> dict[int, list[Prompt]]:
    """Re-seeded masklets to track backwards, by seed frame (those the duplicate rule dropped are not)."""
    out: dict[int, list[Prompt]] = collections.defaultdict(list)
    for p in prompts:
        if p.source == "reseed" and p.frame > 0 and p.object_id not in dropped:
            out[p.frame].append(p)
    return dict(sorted(out.items()))


def track_backwards(model, frames, num_frames: int, height: int, width: int, prompts: list[Prompt],
                    dropped: dict[int, Dropped], array, reverse_frames: int, options,
                    source_frames: list[int]) -> Backwards:
    """Track the `targets` backwards over the decoded `frames` (an iterator from frame 0) and write their
    masks into `array` (the item's staged Zarr array, objects in `prompts` order) before their seed frames."""
    from pipeline.stages.track import track_backward

    by_frame = targets(prompts, dropped)
    position = {p.object_id: k for k, p in enumerate(prompts)}
    result = Backwards(start={p.object_id: (0 if p.source != "reseed" else p.frame) for p in prompts})
    if not by_frame:
        return result
    window: collections.deque = collections.deque(maxlen=reverse_frames + 1)
    last_seed = max(by_frame)
    for t, rgb in enumerate(frames):
        if t > last_seed or t >= num_frames:
            break
        window.append(rgb)
        group = by_frame.get(t)
        if not group or len(window) < 2:
            continue
        first = t - len(window) + 1
        back: dict[int, dict[int, np.ndarray]] = {p.object_id: {} for p in group}
        for fm in track_backward(model, reversed(list(window)), t, height, width, group, source_frames, num_frames,
                                 options, first_frame=first):
            for k, o in enumerate(fm.object_ids):
                back[o][fm.frame] = fm.masks[k]
                result.scores[(o, fm.frame)] = float(fm.object_scores[k])
        for o, by in back.items():
            if not by:
                continue
            stack = np.stack([by[f] for f in range(first, t)])
            array[position[o], first:t] = stack
            result.start[o] = first
            result.frames_added += int(np.count_nonzero(stack.any(axis=(1, 2))))
    return result


def recompute_rows(item_id: str, array, prompts: list[Prompt], source_frames: list[int], start: dict[int, int],
                   dropped: dict[int, Dropped], scores: dict[tuple[int, int], float],
                   height: int, width: int) -> tuple[metadata.FrameRows, MaskletSignals]:
    """The item's frame rows and signals from the staged array: each masklet from its `start` frame to the
    end (or to the frame it was dropped on), scores from the forward pass's rows (NaN where it had none)."""
    signals = MaskletSignals([PromptSignals.from_prompt(p) for p in prompts], height, width, keep_rows=False)
    rows = metadata.FrameRows(item_id, signals)
    num_frames = array.shape[1]
    for t in range(num_frames):
        plane = array[:, t]
        keep = [k for k, p in enumerate(prompts) if start[p.object_id] <= t
                and not (p.object_id in dropped and dropped[p.object_id].frame < t)]
        ids = [prompts[k].object_id for k in keep]
        obj_scores = np.array([scores.get((o, t), np.nan) for o in ids], dtype=np.float32)
        rows.add(t, source_frames[t], ids, np.asarray(plane[keep], dtype=bool), obj_scores)
    return rows, signals
