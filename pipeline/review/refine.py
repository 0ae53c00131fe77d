"""`masklet refine OUT`: replay the review's corrections with SAM 2 and publish a new version per corrected
masklet (pipeline/review/versions.py). The app's "propagate now" is `refine_masklet` on one masklet.

What a replay is, for one masklet (item I, object o) with pending corrections:
- Frames: the item decoded as the run decoded it (stride, max_frames, max_side of the run's config), the run's
  own number of frames (its Zarr time axis).
- Conditioning frames, in a fresh SAM2VideoPredictor state with o as its only object:
  * the run's prompt frame (masklets row `prompt_frame`) with version 0's mask on it (`add_new_mask`), unless
    a correction is on that frame;
  * every correction the masklet ever had (those of its newest version and the pending ones): on each frame
    the latest correction wins (a correction carries the whole prompt of its frame: points, labels, box). Its
    mask is the candidate the reviewer picked among SAM 2's three multimask outputs of the image predictor on
    that frame (SAM2ImagePredictor on the same model, `multimask_output=True`, index `candidate`), added with
    `add_new_mask`, so what refine replays is the mask the reviewer saw.
- Propagation forward from the earliest conditioning frame to the end, then backward from it to frame 0 when
  it is after frame 0 (a correction before the prompt frame, or a prompt frame after 0).
- The lock rule: a correction with `lock` on frame f locks frames f+1 .. g-1, g the next corrected frame after
  f (the end of the video when none); locked frames keep the base version's mask (the newest version before
  this replay; locks of earlier versions stay locked). Corrected frames take their correction's mask, exactly.
  Every other frame takes the propagated mask.
- The version row: masklet_type "manual", edited_frame_count = frames with a correction, corrections = every
  correction id replayed, locked_frames as above.

Why every correction from the start, each as a conditioning frame added before any propagation: a replay is
then a function of the masklet's corrections alone, whatever order refines ran in, so a rerun after a kill
gives the same masks. It also makes sam2's `add_all_frames_to_correct_as_cond` moot: that flag only changes
how a click on a frame *already tracked* in the same state is stored (conditioning or not); here no frame is
tracked before every prompt is in, so each is an initial conditioning frame either way. Measured in
tests/test_refine.py (test_add_all_frames_to_correct_as_cond_changes_nothing_here): the masks are identical
with it on and off. We keep sam2's default (off) and `clear_non_cond_mem_around_input` off (see
/work/shared/notes/sam2-on-this-machine.md).

New masklets: a correction with object_id -1 (a missed object) becomes its own masklet, the item's next
free object id in correction order, tracked forward only from its frame (Replayer.create_masklets); later
corrections on its new id replay the creating one too. The lock rule reaches forward only (a lock never
protects frames before its correction); see README "Reviewing and refining".

Resume: a masklet is done when a published version lists its corrections; `corrections(out,
pending_only=True)` is what remains, so a killed refine (kill -9, scancel) rerun does only the rest.
Determinism: the model's thread count is the run's (model.threads) and nothing samples; the same
corrections give bit-identical masks (tests/test_refine.py).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.paths import RunPaths
from pipeline.review import store, versions

log = logging.getLogger("masklet.refine")
Progress = Callable[[str, int, int], None]  # (stage, done, total): "decode" | "track" | "write"


@dataclass(frozen=True)
class Correction:
    correction_id: str
    frame: int
    points: list
    point_labels: list
    box: list | None
    candidate: int
    lock: bool


def pending_masklets(out: str | Path) -> list[tuple[str, int]]:
    """(item_id, object_id) of every masklet with a pending correction, in order; (item_id, -1) for an item
    with pending corrections on missed objects (each becomes a new masklet: Replayer.create_masklets)."""
    pending = store.corrections(out, pending_only=True)
    keys = sorted({(r["item_id"], max(-1, int(r["object_id"]))) for r in
                   pending.select(["item_id", "object_id"]).to_pylist()})
    return keys


def _correction(r: dict) -> Correction:
    return Correction(r["correction_id"], int(r["frame"]), r["points"] or [], r["point_labels"] or [],
                      r["box"], int(r["candidate"]), bool(r["lock"]))


def _masklet_corrections(out: str | Path, item_id: str, object_id: int) -> list[Correction]:
    """Every correction of one masklet, in order: those on its id, and (a new masklet) the correction on a
    missed object it was created from, which its versions list."""
    created_from = versions.version_corrections(out, item_id, object_id)
    rows = [r for r in store.corrections(out).to_pylist() if r["item_id"] == item_id and (
        r["object_id"] == object_id or (r["object_id"] < 0 and r["correction_id"] in created_from))]
    return [_correction(r) for r in rows]


def _prompt_point(c: Correction) -> tuple[float, float]:
    """Where a new masklet's prompt is: its first positive click, else its first click, else its box's centre."""
    pos = [p for p, lab in zip(c.points, c.point_labels) if lab == 1] or list(c.points)
    if pos:
        return float(pos[0][0]), float(pos[0][1])
    x0, y0, x1, y1 = c.box
    return (x0 + x1) / 2, (y0 + y1) / 2


class Replayer:
    """The run's model, built once, and one item's decoded frames at a time (the last item kept)."""

    def __init__(self, out: str | Path, add_all_frames_to_correct_as_cond: bool = False):
        from pipeline.plan import load_run
        from pipeline.stages.models import load_model

        self.plan = load_run(out)
        self.paths: RunPaths = self.plan.paths
        torch.manual_seed(self.plan.config.model.seed)
        self.model = load_model(self.plan.config.model)
        # The same as building with hydra's ++model.add_all_frames_to_correct_as_cond (a plain attribute that
        # sam2's __init__ sets from it); see the module docstring for why it is off.
        self.model.predictor.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self._frames: tuple[str, list[np.ndarray]] | None = None
        self._image_predictor = None

    def frames(self, item_id: str, num_frames: int) -> list[np.ndarray]:
        from pipeline.stages.decode import open_frames
        from pipeline.worker import _stride

        if self._frames is None or self._frames[0] != item_id:
            cfg = self.plan.config
            item = self.plan.items[item_id]
            source = open_frames(item, stride=_stride(item, cfg), max_frames=cfg.decode.max_frames,
                                 max_side=cfg.decode.max_side)
            rgb = []
            for _, frame in source:
                rgb.append(frame)
                if len(rgb) == num_frames:
                    break
            if len(rgb) != num_frames:
                raise ValueError(f"item {item_id}: decoded {len(rgb)} frames, the run stored {num_frames}; "
                                 f"the media changed since the run")
            self._frames = (item_id, rgb)
        return self._frames[1]

    def image_predictor(self):
        if self._image_predictor is None:
            from sam2.sam2_image_predictor import SAM2ImagePredictor

            p = SAM2ImagePredictor(self.model.predictor)
            s = self.model.image_size  # it assumes 1024's feature sizes otherwise (see sam2-on-this-machine.md)
            p._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
            self._image_predictor = p
        return self._image_predictor

    def candidate_mask(self, rgb: np.ndarray, c: Correction) -> np.ndarray:
        """The mask the reviewer picked: SAM 2's multimask candidate `c.candidate` for the prompt on rgb."""
        return self.candidate(rgb, c)[0]

    def candidate(self, rgb: np.ndarray, c: Correction) -> tuple[np.ndarray, float]:
        """The candidate's mask and SAM 2's predicted IoU for it."""
        p = self.image_predictor()
        with torch.inference_mode():
            p.set_image(rgb)
            masks, ious, _ = p.predict(
                point_coords=np.asarray(c.points, np.float32) if c.points else None,
                point_labels=np.asarray(c.point_labels, np.int32) if c.points else None,
                box=np.asarray(c.box, np.float32) if c.box is not None else None,
                multimask_output=True)
        return np.asarray(masks[c.candidate]).astype(bool), float(ious[c.candidate])

    def _state(self, rgb: list[np.ndarray]) -> dict:
        """sam2's init_state over frames already decoded (it would read a JPEG folder): the same keys, the
        same preprocessing (pipeline/stages/track.py preprocess_frame_numpy is sam2's loader bit for bit)."""
        from pipeline.stages.track import preprocess_frame_numpy

        pred = self.model.predictor
        device = self.model.device
        images = torch.stack([preprocess_frame_numpy(f, pred.image_size) for f in rgb]).to(device)
        h, w = rgb[0].shape[:2]
        state = {"images": images, "num_frames": len(rgb), "offload_video_to_cpu": False,
                 "offload_state_to_cpu": False, "video_height": h, "video_width": w, "device": device,
                 "storage_device": device, "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
                 "cached_features": {}, "constants": {}, "obj_id_to_idx": OrderedDict(),
                 "obj_idx_to_id": OrderedDict(), "obj_ids": [], "output_dict_per_obj": {},
                 "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {}}
        pred._get_image_feature(state, frame_idx=0, batch_size=1)
        return state

    def replay(self, item_id: str, object_id: int, progress: Progress | None = None) -> int | None:
        """Replay one masklet's corrections into a new version; returns it (None: nothing pending)."""
        out = self.paths.root
        corrections = _masklet_corrections(out, item_id, object_id)
        done = store.replayed_correction_ids(out)
        if not corrections or all(c.correction_id in done for c in corrections):
            return None
        from pipeline.store.masks import open_masks

        array = open_masks(self.paths, item_id)
        num_frames = array.shape[1]
        row = [r for r in self.plan_masklets(item_id) if r["object_id"] == object_id]
        is_new = not row  # a masklet an earlier refine created: no version 0, its prompt is its first version's
        if is_new:
            first = versions.published_versions(self.paths, item_id, object_id)[:1]
            if not first:
                raise KeyError(f"item {item_id!r} has no masklet {object_id} in {out}: correct one of its masklets, "
                               f"or use object id -1 for a missed object")
            row = versions.version_rows_of(out, item_id, object_id, first)
        prompt_frame = int(row[0]["prompt_frame"])
        base_version = versions.latest_version(out, item_id, object_id)
        base = versions.masklet_mask(out, item_id, object_id, base_version)
        old_locked: list[int] = []
        if base_version:
            old_locked = list(versions.version_rows_of(out, item_id, object_id, [base_version])[0]["locked_frames"]
                              or [])

        if progress:
            progress("decode", 0, num_frames)
        rgb = self.frames(item_id, num_frames)
        by_frame: dict[int, Correction] = {}
        for c in corrections:  # in time order: the latest on a frame wins
            if not 0 <= c.frame < num_frames:
                raise ValueError(f"correction {c.correction_id} of {item_id}/{object_id} is on frame {c.frame}, "
                                 f"outside 0..{num_frames - 1}")
            by_frame[c.frame] = c
        cond: dict[int, np.ndarray] = {f: self.candidate_mask(rgb[f], c) for f, c in sorted(by_frame.items())}
        if prompt_frame not in cond and not is_new:
            cond[prompt_frame] = np.asarray(array[object_id, prompt_frame]).astype(bool)

        masks, scores = self._propagate(rgb, cond, object_id, progress, backward=not is_new)
        corrected = sorted(by_frame)
        locked = set(old_locked)
        for f, c in by_frame.items():
            if c.lock:
                nxt = next((g for g in corrected if g > f), num_frames)
                locked.update(range(f + 1, nxt))
        locked -= set(corrected)
        for f in sorted(locked):
            masks[f] = base[f]
        for f in corrected:
            masks[f] = cond[f]
        fg = sum(int(sum(1 for v in c.point_labels if v == 1)) for c in by_frame.values())
        bg = sum(int(sum(1 for v in c.point_labels if v == 0)) for c in by_frame.values())
        if progress:
            progress("write", 0, 1)
        v = versions.write_version(out, item_id, object_id, masks, scores,
                                   [c.correction_id for c in corrections], corrected, sorted(locked), fg, bg)
        if progress:
            progress("write", 1, 1)
        return v

    def plan_masklets(self, item_id: str) -> list[dict]:
        from pipeline.results import open_run

        return open_run(self.paths.root).masklets_for(item_id).to_pylist()

    def create_masklets(self, item_id: str, progress: Progress | None = None) -> list[int]:
        """Turn each pending correction on a missed object of `item_id` (object_id -1) into a new masklet, in
        correction order: the next free object id of the item (the largest the run or a version has, plus
        one), SAM 2 tracking the picked candidate from the correction's frame forward (the frames before are
        empty: a reviewer adds an object where it appears), published as version 1, type manual. A correction
        always makes its own masklet; later clicks on it go to its new id. Returns the new object ids.
        Resumable: a killed run published some of them; the rest get the same ids on the rerun."""
        out = self.paths.root
        pending = [_correction(r) for r in store.corrections(out, pending_only=True).to_pylist()
                   if r["item_id"] == item_id and r["object_id"] < 0]
        if not pending:
            return []
        from pipeline.store.masks import open_masks

        num_frames = open_masks(self.paths, item_id).shape[1]
        rgb = self.frames(item_id, num_frames)
        created = []
        for c in pending:
            if not 0 <= c.frame < num_frames:
                raise ValueError(f"correction {c.correction_id} (a new masklet on {item_id}) is on frame {c.frame}, "
                                 f"outside 0..{num_frames - 1}")
            taken = [r["object_id"] for r in self.plan_masklets(item_id)] + versions.versioned_objects(out, item_id)
            object_id = max(taken, default=-1) + 1
            mask, iou = self.candidate(rgb[c.frame], c)
            masks, scores = self._propagate(rgb, {c.frame: mask}, object_id, progress, backward=False)
            masks[c.frame] = mask
            prompt = versions.new_masklet_prompt(object_id, c.frame, _prompt_point(c), iou, int(mask.sum()))
            fg = sum(1 for v in c.point_labels if v == 1)
            versions.write_version(out, item_id, object_id, masks, scores, [c.correction_id], [c.frame], (),
                                   fg, len(c.point_labels) - fg, prompt=prompt)
            created.append(object_id)
            log.info("%s: new masklet %d from correction %s", item_id, object_id, c.correction_id)
        return created

    def _propagate(self, rgb: list[np.ndarray], cond: dict[int, np.ndarray], object_id: int,
                   progress: Progress | None, backward: bool = True) -> tuple[np.ndarray, np.ndarray]:
        pred = self.model.predictor
        n = len(rgb)
        h, w = rgb[0].shape[:2]
        masks = np.zeros((n, h, w), dtype=bool)
        scores = np.full(n, np.nan, dtype=np.float32)
        with torch.inference_mode():
            state = self._state(rgb)
            for f in sorted(cond):
                pred.add_new_mask(state, frame_idx=f, obj_id=object_id, mask=torch.from_numpy(cond[f]))
            start = min(cond)
            done = 0
            passes = [False] + ([True] if start > 0 and backward else [])
            for reverse in passes:
                for t, _, video_masks in pred.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                    masks[t] = (video_masks[0, 0] > 0).cpu().numpy()
                    done += 1
                    if progress:
                        progress("track", min(done, n), n)
            out = state["output_dict_per_obj"][0]
            for t in range(n):
                o = out["cond_frame_outputs"].get(t) or out["non_cond_frame_outputs"].get(t)
                if o is not None:
                    scores[t] = float(o["object_score_logits"].reshape(-1)[0])
        return masks, scores


def refine_masklet(out: str | Path, item_id: str, object_id: int, progress: Progress | None = None,
                   replayer: Replayer | None = None) -> int | None:
    """Replay one masklet's corrections now (the app's "propagate now"); returns the new version, or None
    when it has no pending correction. `progress(stage, done, total)` is called as it goes."""
    if int(object_id) < 0:
        raise ValueError(f"{item_id}: object id {object_id} is a new masklet; use refine_new_masklets")
    replayer = replayer or Replayer(out)
    return replayer.replay(item_id, int(object_id), progress)


def refine_new_masklets(out: str | Path, item_id: str, progress: Progress | None = None,
                        replayer: Replayer | None = None) -> list[int]:
    """Create the new masklets of `item_id`'s pending corrections on missed objects now; their object ids."""
    replayer = replayer or Replayer(out)
    return replayer.create_masklets(item_id, progress)


def refine_masklets(out: str, keys: list[tuple[str, int]] | tuple) -> int:
    """Refine these masklets in order (one SLURM task's chunk, or a local refine); returns how many versions
    it wrote. Idempotent: a masklet already replayed is skipped."""
    keys = [(str(i), int(o)) for i, o in keys]
    if not keys:
        return 0
    replayer = Replayer(out)
    written = 0
    for n, (item_id, object_id) in enumerate(keys, 1):
        if object_id < 0:
            written += len(replayer.create_masklets(item_id))
        elif replayer.replay(item_id, object_id) is not None:
            written += 1
        log.info("refined %d of %d masklets", n, len(keys))
    return written


def _slurm_config(plan, profile: str | None):
    import dataclasses

    import yaml

    from pipeline.config import (
        config_from_dict,
        config_to_dict,
        merge_dicts,
        profile_path,
    )

    data = config_to_dict(plan.config)
    if profile:
        data = merge_dicts(data, yaml.safe_load(profile_path(profile).read_text()) or {})
    cfg = config_from_dict(data).slurm
    return dataclasses.replace(cfg, job_name=f"{cfg.job_name}-refine")


def refine_run(out: str | Path, executor: str = "local", profile: str | None = None,
               workers: int | None = None) -> dict:
    """Refine every masklet with a pending correction and create the new ones; returns {"masklets": n (re-tracked
    and new), "pending_after": m (keys still pending, pending_masklets)}."""
    from pipeline.plan import load_run

    out = str(RunPaths.of(out).root)
    keys = pending_masklets(out)
    if not keys:
        return {"masklets": 0, "pending_after": 0}
    # What the CLI reports: masklets re-tracked plus new masklets to create (one per correction on a missed
    # object; a key (item, -1) stands for all of an item's).
    pending = store.corrections(out, pending_only=True).select(["object_id"]).to_pylist()
    todo = sum(1 for _, o in keys if o >= 0) + sum(1 for r in pending if r["object_id"] < 0)
    if executor == "local":
        refine_masklets(out, keys)
    elif executor == "slurm":
        from pipeline.executors import slurm

        plan = load_run(out)
        cfg = _slurm_config(plan, profile)
        tasks_n = max(1, min(len(keys), workers or cfg.array_parallelism))
        step = math.ceil(len(keys) / tasks_n)
        chunks = [tuple(keys[i:i + step]) for i in range(0, len(keys), step)]
        tasks = [slurm.CallTask(__name__, "refine_masklets", (out, chunk)) for chunk in chunks]
        folder = plan.paths.refine_submitit_folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        task_ids = slurm.submit_array(folder, cfg, tasks)
        job_id = task_ids[0].split("_")[0]
        print(f"submitted SLURM job {job_id}: {len(tasks)} task(s) of up to {step} masklet(s); logs under "
              f"{folder.parent}/")
        slurm.wait(None, [job_id], lost_hint="run the same `masklet refine` command again: it resumes")
    else:
        raise ValueError(f"--executor {executor!r}: use local or slurm")
    return {"masklets": todo, "pending_after": len(pending_masklets(out))}
