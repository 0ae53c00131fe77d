"""Where an item's masklets come from: the first frame's prompts, and masklets added while it is tracked.

`initial_prompts` runs the configured automatic mask generator (SAM 2's, or SAM 1's for phases 1 and 2) on the
first decoded frame. `Seeder` is re-seeding (issue 12): it is handed to the tracker as its `reseed` callback,
runs the generator on the frames `ReseedSchedule` picks, turns candidates into new masklets with
pipeline/stages/reseed.py's rule (`new_prompts`), and applies the duplicate rule (`Hotstart`) to every frame
the tracker yields (`watch`), telling the tracker which masklets to drop. Its state goes into the item's
checkpoint (`state`/`restore`), so a resumed item re-seeds exactly as an uninterrupted one.

The generator needs the frame's RGB pixels, which the tracker's decoder has already consumed: `FrameTee` keeps
the last few decoded frames (the decoder runs at most `propagate.prefetch` frames ahead of the model).
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import Iterable, Iterator

import numpy as np

from pipeline.config import RunConfig
from pipeline.records import Dropped, FrameMasks, Prompt
from pipeline.stages.reseed import Hotstart, ReseedSchedule, new_prompts, uncovered_share

log = logging.getLogger("masklet.seeding")


def initial_prompts(models, first: np.ndarray, cfg: RunConfig) -> tuple[list[Prompt], object | None]:
    """The masklets' seeds on the first decoded frame, from `prompt.generator`; with SAM 2's, also the frame's
    features for tracking (pipeline/stages/prompt.py's KeyframeFeatures; None otherwise)."""
    if cfg.prompt.generator == "sam1":
        from pipeline.stages.sam1 import sam1_prompts

        return sam1_prompts(models.generator, first, cfg.prompt, frame=0), None
    from pipeline.stages.prompt import prompt_and_encode_keyframe

    return prompt_and_encode_keyframe(models.generator, first, cfg.prompt, frame=0)


class FrameTee:
    """Passes decoded RGB frames through, keeping the last `keep` of them by frame index (thread-safe: the
    tracker's decoder may run in a helper thread)."""

    def __init__(self, frames: Iterable[np.ndarray], keep: int):
        self._frames = iter(frames)
        self._kept: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._keep = max(1, keep)
        self._next = 0
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[np.ndarray]:
        for rgb in self._frames:
            with self._lock:
                self._kept[self._next] = rgb
                self._next += 1
                while len(self._kept) > self._keep:
                    self._kept.popitem(last=False)
            yield rgb

    def frame(self, index: int) -> np.ndarray:
        with self._lock:
            rgb = self._kept.get(index)
        if rgb is None:
            raise RuntimeError(f"decoded frame {index} is no longer kept (frames {list(self._kept)} are): "
                               f"re-seeding needs it; this is a bug, please report it")
        return rgb


class Seeder:
    """Re-seeding of one item (see the module's docstring). `prompts` (the item's list, shared) grows as
    masklets are added, in the model's thread; the writer learns of them from the frames that carry them."""

    def __init__(self, cfg: RunConfig, generator, tee: FrameTee, prompts: list[Prompt]):
        self.cfg = cfg.prompt
        self.generator = generator
        self.tee = tee
        self.prompts = prompts
        self.schedule = ReseedSchedule(cfg.prompt)
        self.hotstart = Hotstart(cfg.prompt)
        self.dropped: dict[int, Dropped] = {}
        self.seconds = 0.0  # generator time on re-seed frames (part of the item's prompt time)
        self.seed_frames: list[int] = []
        self.capped = 0  # candidates that would have become masklets past prompt.max_objects

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.reseed_every or self.cfg.reseed_adaptive)

    def _live(self, fm: FrameMasks) -> tuple[list[int], np.ndarray]:
        keep = [k for k, o in enumerate(fm.object_ids) if o not in self.dropped]
        return [fm.object_ids[k] for k in keep], fm.masks[keep] if len(keep) != len(fm.object_ids) else fm.masks

    def __call__(self, fm: FrameMasks) -> list[Prompt]:
        """The tracker's `reseed` callback on frame `fm.frame` (its masklets' masks so far): new prompts."""
        if fm.frame and self.cfg.reseed_adaptive is None and fm.frame % self.cfg.reseed_every:
            return []  # periodic only, not a seed frame: the union of the masks is not needed (model's thread)
        ids, masks = self._live(fm)
        uncovered = uncovered_share(masks)
        if fm.frame == 0:  # the first prompting is the schedule's first seed
            self.schedule.seeded(0, uncovered)
            return []
        if not self.schedule.due(fm.frame, uncovered):
            return []
        t0 = time.perf_counter()
        records = self.generator.generate(self.tee.frame(fm.frame))
        room = self.cfg.max_objects - len(self.prompts)
        result = new_prompts(records, masks, self.cfg, fm.frame, self._next_id(), room)
        if result.prompts:  # the share once its new masklets are in (so a seed finding nothing is not re-fired)
            uncovered = uncovered_share(np.concatenate([masks, np.stack([p.mask for p in result.prompts])]))
        self.schedule.seeded(fm.frame, uncovered)
        self.seconds += time.perf_counter() - t0
        self.seed_frames.append(fm.frame)
        self.capped += result.rejected_cap
        added = list(result.prompts)
        for p in added:
            self.hotstart.watch(p.object_id, p.frame)
        self.prompts.extend(added)
        if added or result.rejected_cap:
            log.info("frame %d: re-seeding added %d masklets (%d candidates; %d past prompt.max_objects=%d)",
                     fm.frame, len(added), len(records), result.rejected_cap, self.cfg.max_objects)
        return added

    def _next_id(self) -> int:
        return max((p.object_id for p in self.prompts), default=-1) + 1

    def watch(self, stream) -> Iterator[FrameMasks]:
        """The tracker's frames, with the duplicate rule applied to each: a masklet it drops on frame t keeps
        its masks up to t and is not tracked after (dropped from the tracker before t is passed on, so that
        a checkpoint taken after t holds the drop)."""
        for fm in stream:
            ids, masks = self._live(fm)
            drops = self.hotstart.update(fm.frame, ids, masks)
            for d in drops:
                self.dropped[d.object_id] = d
                log.info("frame %d: masklet %d dropped (%s%s)", fm.frame, d.object_id, d.reason,
                         f" of {d.merged_into}" if d.merged_into is not None else "")
            if drops:
                stream.drop([d.object_id for d in drops])
            yield fm

    def live_rows(self, fm: FrameMasks) -> FrameMasks:
        """`fm` without the masklets dropped before its frame (their rows end where they were dropped)."""
        gone = [k for k, o in enumerate(fm.object_ids) if o in self.dropped and self.dropped[o].frame < fm.frame]
        if not gone:
            return fm
        keep = [k for k in range(len(fm.object_ids)) if k not in set(gone)]
        return FrameMasks(fm.frame, fm.source_frame, tuple(fm.object_ids[k] for k in keep), fm.masks[keep],
                          fm.object_scores[keep])

    def state(self) -> dict:
        """Plain JSON for the item's checkpoint (the prompts themselves are saved by the checkpoint)."""
        return json.loads(json.dumps({  # a copy: the model's thread goes on changing these
            "schedule": self.schedule.state(), "hotstart": self.hotstart.state(),
            "dropped": [[d.object_id, d.frame, d.reason, d.merged_into] for d in self.dropped.values()],
            "seconds": self.seconds, "seed_frames": self.seed_frames, "capped": self.capped}))

    def restore(self, state: dict) -> "Seeder":
        if not state:
            return self
        self.schedule.restore(state["schedule"])
        self.hotstart.restore(state["hotstart"])
        self.dropped = {int(o): Dropped(int(o), int(f), str(r), None if m is None else int(m))
                        for o, f, r, m in state["dropped"]}
        self.seconds = float(state["seconds"])
        self.seed_frames = [int(f) for f in state["seed_frames"]]
        self.capped = int(state["capped"])
        return self
