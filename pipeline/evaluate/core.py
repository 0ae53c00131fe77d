"""One video's evaluation, streamed a frame at a time: `evaluate_video(task)` (a module-level function of
plain arguments, so a process pool can run it).

Pass 1 reads each evaluated GT frame and every masklet on it and keeps only pixel counts: GT and masklet areas
and the intersections of every (object, masklet) pair (bit-packed AND + popcount: a hundred masklets of a
1080p frame take 26 MB, not the gigabytes whole stacks would). J of every pair on every frame follows from
those counts; matching runs on them. Pass 2 reads the matched masklet's plane and the GT object's plane again
and computes F (the dilations are the costly part, so only matched pairs pay them).

Frames: the GT's annotated frames of each object, without the first and the last (both references skip them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate.matching import hungarian, same_ids
from pipeline.evaluate.metrics import BOUND_TH, boundary_radius, disk, f_measure_frame
from pipeline.evaluate.semantics import ObjectScore, counted_frames, score_object
from pipeline.evaluate.sources import GtVideo, PredictionSpec


@dataclass(frozen=True)
class VideoTask:
    video: str
    gt_path: str
    gt_layout: str
    prediction: PredictionSpec
    semantics: str
    matched_ids: bool = False
    skip_first_and_last: bool = True
    bound_th: float = BOUND_TH


@dataclass
class ObjectResult:
    gt_object: int
    masklet: int | None  # None: unmatched (scored against an empty prediction)
    score: ObjectScore
    match_j: float | None  # the pair's mean J (percent) that matching maximised


@dataclass
class VideoResult:
    video: str
    objects: list[ObjectResult] = field(default_factory=list)
    masklets: int = 0
    unscored_gt_objects: list[int] = field(default_factory=list)  # sav: never present on evaluated frames


def _evaluated_frames(gt: GtVideo, skip: bool) -> dict[int, list[int]]:
    cut = (lambda fr: fr[1:-1]) if skip else (lambda fr: fr)
    if gt.layout == "davis":
        frames = cut(gt.frames)
        return {-1: frames}  # objects are found on the frames themselves
    return {k: cut(fr) for k, fr in gt.object_frames.items()}


def _popcount_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) counts of common set bits of bit-packed rows."""
    out = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    for i in range(a.shape[0]):
        out[i] = np.bitwise_count(a[i][None, :] & b).sum(axis=1, dtype=np.int64)
    return out


def evaluate_video(task: VideoTask) -> VideoResult:
    gt = GtVideo(task.gt_path, task.gt_layout)
    pred = task.prediction.open()
    per_object = _evaluated_frames(gt, task.skip_first_and_last)
    timeline = sorted({f for fr in per_object.values() for f in fr})
    index = {f: i for i, f in enumerate(timeline)}
    n = len(timeline)

    gt_area: dict[int, np.ndarray] = {}
    gt_on: dict[int, np.ndarray] = {}  # which timeline frames are the object's evaluated frames
    pred_area: dict[int, np.ndarray] = {}
    inter: dict[tuple[int, int], np.ndarray] = {}
    if gt.layout == "davis":
        objects = gt.first_frame_objects() if task.semantics == "davis" else None
        for k in objects or []:
            gt_area[k], gt_on[k] = np.zeros(n, np.int64), np.ones(n, bool)
    else:
        for k, fr in per_object.items():
            gt_area[k], gt_on[k] = np.zeros(n, np.int64), np.zeros(n, bool)
            gt_on[k][[index[f] for f in fr]] = True

    for f in timeline:
        t = index[f]
        g = gt.read(f)
        if gt.layout == "davis":
            if objects is None:  # sav semantics: every id the GT shows on an evaluated frame is an object
                for k in g:
                    if k not in gt_area:
                        gt_area[k], gt_on[k] = np.zeros(n, np.int64), np.ones(n, bool)
            g = {k: m for k, m in g.items() if k in gt_area}
        p = pred.read(f)
        for k, m in p.items():
            pred_area.setdefault(k, np.zeros(n, np.int64))[t] = np.count_nonzero(m)
        for k, m in g.items():
            gt_area[k][t] = np.count_nonzero(m)
        gk = [k for k, m in g.items() if gt_area[k][t]]
        pk = [k for k in p if pred_area[k][t]]
        if gk and pk:
            if task.matched_ids:
                pairs = [(k, k) for k in gk if k in p]
                for a, b in pairs:
                    inter.setdefault((a, b), np.zeros(n, np.int64))[t] = np.count_nonzero(g[a] & p[b])
            else:
                ga = np.stack([np.packbits(g[k].ravel()) for k in gk])
                pa = np.stack([np.packbits(p[k].ravel()) for k in pk])
                counts = _popcount_rows(ga, pa)
                for i, a in enumerate(gk):
                    for j, b in enumerate(pk):
                        if counts[i, j]:
                            inter.setdefault((a, b), np.zeros(n, np.int64))[t] = counts[i, j]

    gt_keys = sorted(gt_area)
    pred_keys = sorted(set(pred.keys) | set(pred_area))
    zeros = np.zeros(n, np.int64)

    def pair_j(a: int, b: int | None) -> np.ndarray:
        ga = gt_area[a]
        pa = pred_area.get(b, zeros) if b is not None else zeros
        i = inter.get((a, b), zeros) if b is not None else zeros
        union = ga + pa - i
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union == 0, 1.0, i / np.maximum(union, 1))

    def counted(a: int, b: int | None) -> np.ndarray:
        pa = pred_area.get(b, zeros) if b is not None else zeros
        on = gt_on[a]
        c = np.zeros(n, bool)
        c[on] = counted_frames(task.semantics, gt_area[a][on] > 0, pa[on] > 0)
        return c

    result = VideoResult(task.video, masklets=len(pred_keys))
    scored = [a for a in gt_keys if counted(a, None).any() or task.semantics == "davis"]
    result.unscored_gt_objects = [a for a in gt_keys if a not in scored]
    if task.matched_ids:
        pairs = same_ids(scored, pred_keys)
    else:
        score = np.zeros((len(scored), len(pred_keys)))
        allowed = np.zeros_like(score, dtype=bool)
        col = {b: j for j, b in enumerate(pred_keys)}
        for (a, b), i in inter.items():
            if a in gt_on and a in scored and i.any():
                r, c = scored.index(a), col[b]
                cnt = counted(a, b)
                allowed[r, c] = True
                score[r, c] = float(np.mean(pair_j(a, b)[cnt])) if cnt.any() else 0.0
        pairs = hungarian(score, allowed)
    match = {scored[r]: pred_keys[c] for r, c in pairs}

    # Pass 2: F of each scored object against its masklet (or nothing), on the frames that count.
    h_w: tuple[int, int] | None = None
    structure = None
    f_vals = {a: np.ones(n) for a in scored}
    for f in timeline:
        t = index[f]
        wanted = [a for a in scored if gt_on[a][t]]
        if not wanted:
            continue
        g = gt.read(f)
        for a in wanted:
            gm = g.get(a)
            b = match.get(a)
            pm = pred.plane(b, f) if b is not None else None
            shape = (gm if gm is not None else pm if pm is not None else next(iter(g.values()), None))
            if gm is None and pm is None:
                continue  # both empty: F = 1
            if h_w != shape.shape:
                h_w = shape.shape
                structure = disk(boundary_radius(h_w[0], h_w[1], task.bound_th))
            if gm is None:
                gm = np.zeros(h_w, bool)
            if pm is None:
                pm = np.zeros(h_w, bool)
            f_vals[a][t] = f_measure_frame(pm, gm, structure)

    for a in scored:
        b = match.get(a)
        cnt = counted(a, b)
        s = score_object(task.semantics, pair_j(a, b), f_vals[a], cnt)
        if s is None:
            continue
        mj = float(np.mean(pair_j(a, b)[cnt])) * 100 if b is not None else None
        result.objects.append(ObjectResult(a, b, s, mj))
    return result
