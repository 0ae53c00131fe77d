"""Which items and masklets an export keeps: `ExportFilter`, a frozen record the CLI fills and every export
task receives (it is written into the export's spec, so a resumed export filters exactly as it started).

Items are chosen by id (`--item`) or by a glob over ids (`--items`); masklets of a chosen item by their flags
(`--flag F`: keep masklets with any of these; `--no-flag F`: drop masklets with it), `--min-frames-visible`,
`--min-area-share` (area_share_mean), and review decisions (`--decision`) once a review has recorded any.
Masklet criteria are Arrow compute over one item's masklets rows (read from its shard's files only, never
the whole table): a million-item export filters item by item in bounded memory.

`review_decisions(run)` reads the review's decisions (pipeline/review/store.py): a lookup masklet_id ->
"accepted" | "rejected" (a duplicate counts as rejected), or None when the run has none; `--decision` on a
run without decisions is an error that says so (never a silent "keep everything").
"""
from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

DECISIONS = ("accepted", "not-rejected", "all")


class ExportFilterError(ValueError):
    """A filter that cannot apply to this run (unknown item, no review decisions); the message says the fix."""


@dataclasses.dataclass(frozen=True)
class ExportFilter:
    items: tuple[str, ...] = ()  # item ids to export (with `items_glob`: either matches); empty: all
    items_glob: str | None = None  # fnmatch pattern over item ids
    flags: tuple[str, ...] = ()  # keep masklets with any of these flags
    no_flags: tuple[str, ...] = ()  # drop masklets with any of these flags
    min_frames_visible: int | None = None
    min_area_share: float | None = None  # on area_share_mean (null: never passes)
    decision: str | None = None  # accepted | not-rejected | all; None: not-rejected once a review decided any
    include_dropped: bool = False  # re-seeded masklets the duplicate rule dropped (dropped_reason set): left out

    def __post_init__(self):
        from pipeline.quality.flags import FLAG_NAMES

        for name in (*self.flags, *self.no_flags):
            if name not in FLAG_NAMES:
                raise ExportFilterError(f"no flag {name!r}; the flags are {', '.join(FLAG_NAMES)}")
        if self.decision is not None and self.decision not in DECISIONS:
            raise ExportFilterError(f"--decision {self.decision!r}: use one of {', '.join(DECISIONS)}")
        if self.min_frames_visible is not None and self.min_frames_visible < 0:
            raise ExportFilterError(f"--min-frames-visible {self.min_frames_visible} must be >= 0")
        if self.min_area_share is not None and not 0 <= self.min_area_share <= 1:
            raise ExportFilterError(f"--min-area-share {self.min_area_share} must be in [0, 1]")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ExportFilter:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def selects_items(self) -> bool:
        return bool(self.items) or self.items_glob is not None


def select_items(filt: ExportFilter, done: list[str], run_root: str) -> list[str]:
    """The done items this filter exports, in the run's order. An id asked for by name that is not a done item
    of the run is an error naming it (a typo would otherwise export nothing, silently)."""
    if not filt.selects_items:
        return list(done)
    known = set(done)
    missing = [i for i in filt.items if i not in known]
    if missing:
        raise ExportFilterError(f"item {missing[0]!r} is not a done item of {run_root} (see `masklet status "
                                f"{run_root} --failed`); leave it out of --item" +
                                (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    wanted = set(filt.items)
    return [i for i in done if i in wanted or (filt.items_glob is not None and fnmatch.fnmatchcase(i, filt.items_glob))]


def _has_any_flag(flags: pa.ChunkedArray | pa.Array, names: tuple[str, ...]) -> pa.Array:
    """Per row: whether its list of flags holds any of `names` (a null list holds none)."""
    if isinstance(flags, pa.ChunkedArray):
        flags = flags.combine_chunks()
    n = len(flags)
    flat = pc.list_flatten(flags)
    parents = pc.list_parent_indices(flags)
    hit_rows = pc.unique(pc.filter(parents, pc.is_in(flat, value_set=pa.array(names, pa.string()))))
    return pc.is_in(pa.array(range(n), pa.int64()), value_set=hit_rows.cast(pa.int64()))


# The review hook: run -> {masklet_id: decision} or None when the run has no decisions.
DecisionReader = Callable[[object], "dict[str, str] | None"]
_EXPORT_DECISION = {"accept": "accepted", "reject": "rejected", "duplicate": "rejected"}


def _review_decisions(run) -> dict[str, str] | None:
    """The review's decisions (pipeline/review/store.py, latest per masklet over every session) as
    masklet_id -> accepted | rejected; a duplicate counts as rejected (exporting it would give one object
    twice). None when nothing has been decided (no status decision: labels alone decide nothing)."""
    from pipeline.review.store import decisions

    if not run.paths.review.exists():
        return None
    d = {r["masklet_id"]: _EXPORT_DECISION[r["decision"]] for r in decisions(run.paths.root).to_pylist()
         if r["decision"] is not None}
    return d or None


review_decisions: DecisionReader = _review_decisions


def masklet_mask(filt: ExportFilter, masklets: pa.Table, decisions: dict[str, str] | None = None) -> pa.Array:
    """Per row of one item's masklets table: whether the filter keeps it."""
    keep = pa.array([True] * masklets.num_rows, pa.bool_())
    if not filt.include_dropped and "dropped_reason" in masklets.column_names:
        # a duplicate the hotstart rule removed (pipeline/stages/reseed.py) would give one object twice
        keep = pc.and_(keep, pc.is_null(masklets["dropped_reason"]))
    if filt.flags:
        keep = pc.and_(keep, _has_any_flag(masklets["flags"], filt.flags))
    if filt.no_flags:
        keep = pc.and_(keep, pc.invert(_has_any_flag(masklets["flags"], filt.no_flags)))
    if filt.min_frames_visible is not None:
        keep = pc.and_(keep, pc.greater_equal(masklets["frames_visible"], filt.min_frames_visible))
    if filt.min_area_share is not None:
        keep = pc.and_kleene(keep, pc.greater_equal(masklets["area_share_mean"], filt.min_area_share))
    # By default a reviewed run exports what no decision rejects (the review's point); `all` keeps everything.
    mode = filt.decision or ("not-rejected" if decisions is not None else None)
    if mode is not None and mode != "all":
        if decisions is None:
            raise ExportFilterError(f"--decision {filt.decision}: this run has no review decisions yet (nothing "
                                    f"has been reviewed); drop --decision")
        got = [decisions.get(m) for m in masklets["masklet_id"].to_pylist()]
        wanted = [d == "accepted" if mode == "accepted" else d != "rejected" for d in got]
        keep = pc.and_(keep, pa.array(wanted, pa.bool_()))
    return pc.fill_null(keep, False)


def select_masklets(filt: ExportFilter, masklets: pa.Table, decisions: dict[str, str] | None = None) -> pa.Table:
    """The rows of one item's masklets table the filter keeps, in object_id order."""
    kept = masklets.filter(masklet_mask(filt, masklets, decisions))
    return kept.sort_by("object_id")
