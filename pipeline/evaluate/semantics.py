"""From per-frame J and F to per-object scores: the two ways the references aggregate, named.

`sav` (sam2's SA-V evaluator, vos-benchmark): an object is scored from the first evaluated frame on which it
is present in GT or in the prediction; frames before that do not count at all. An object never present in GT
on the evaluated frames is not a GT object (vos-benchmark leaves it out; sam2's evaluator stops with an
assertion on it). Object score = mean over its counted frames.

`davis` (davis2017-evaluation, semi-supervised): every evaluated frame counts, both-empty frames score J = F = 1.
Besides the mean it reports recall (share of frames with a score above 0.5) and decay (mean of the first
quarter minus mean of the last quarter, quarters as davis2017's db_statistics cuts them: bin i holds values
ids[i] .. ids[i+1] inclusive, ids = round(linspace(1, N, 5) + 1e-10) - 1; the reference casts ids to uint8,
which wraps past 256 frames; here they stay ints).

Both: per-video and overall values are plain means over objects (object-weighted), in percent.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEMANTICS = ("sav", "davis")


@dataclass(frozen=True)
class ObjectScore:
    j: float  # percent
    f: float
    frames: int  # frames that counted
    j_recall: float | None = None  # davis only, percent
    j_decay: float | None = None
    f_recall: float | None = None
    f_decay: float | None = None

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2


def counted_frames(semantics: str, gt_present: np.ndarray, pred_present: np.ndarray) -> np.ndarray:
    """bool (T,): which evaluated frames count for one object. Under `sav`, none when GT never shows it."""
    if semantics == "davis":
        return np.ones(gt_present.shape, dtype=bool)
    if semantics != "sav":
        raise ValueError(f"unknown semantics {semantics!r}; use one of {', '.join(SEMANTICS)}")
    if not gt_present.any():
        return np.zeros(gt_present.shape, dtype=bool)
    seen = np.logical_or.accumulate(gt_present | pred_present)
    return seen


def recall_and_decay(values: np.ndarray) -> tuple[float, float]:
    recall = float(np.mean(values > 0.5))
    ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(int)
    first = values[ids[0]:ids[1] + 1]
    last = values[ids[3]:ids[4] + 1]
    return recall, float(np.mean(first) - np.mean(last))


def score_object(semantics: str, j: np.ndarray, f: np.ndarray, counted: np.ndarray) -> ObjectScore | None:
    """The object's score from its per-frame J and F (fractions) on the frames that count; None when none do."""
    if not counted.any():
        return None
    j, f = j[counted], f[counted]
    score = ObjectScore(float(np.mean(j)) * 100, float(np.mean(f)) * 100, int(counted.sum()))
    if semantics == "davis":
        jr, jd = recall_and_decay(j)
        fr, fd = recall_and_decay(f)
        score = ObjectScore(score.j, score.f, score.frames, jr * 100, jd * 100, fr * 100, fd * 100)
    return score
