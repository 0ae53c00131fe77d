"""Which masklet answers which GT object.

Automatic masklets share no identity with GT objects, so each GT object is paired with at most one masklet
and each masklet with at most one object, maximising the sum of the pairs' mean J over the video (the J the
chosen semantics scores, on the frames it counts): the Hungarian algorithm, scipy's linear_sum_assignment.
A pair that never overlaps on any evaluated frame is never matched: an object left unmatched is scored
against an empty prediction, which scores at least as well as a masklet elsewhere in the frame.
`--matched-ids` (a run prompted from GT) pairs object k with masklet k instead.
"""
from __future__ import annotations

import numpy as np


def hungarian(score: np.ndarray, allowed: np.ndarray) -> list[tuple[int, int]]:
    """(row, col) pairs maximising the total `score` over `allowed` pairs, one to one."""
    if score.size == 0 or not allowed.any():
        return []
    from scipy.optimize import linear_sum_assignment

    # A disallowed pair gains nothing (an allowed one always gains something: it overlaps somewhere), so the
    # total of the allowed pairs is what is maximised; disallowed ones the solver had to fill in are dropped.
    cost = np.where(allowed, -score, 0.0)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if allowed[r, c]]


def same_ids(gt_keys: list[int], pred_keys: list[int]) -> list[tuple[int, int]]:
    """(row, col) pairs of equal keys."""
    col = {k: i for i, k in enumerate(pred_keys)}
    return [(r, col[k]) for r, k in enumerate(gt_keys) if k in col]
