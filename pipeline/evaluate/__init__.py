"""Ground truth in, J&F out: `evaluate(predictions, gt_root, semantics, ...)` scores a run folder or an export
folder against DAVIS or SA-V annotations, per object, per video and overall, and `write_results` writes the
Parquet table.

    metrics.py    J and F of one frame: the one definition (davis2017's arithmetic)
    semantics.py  `sav` vs `davis`: which frames count for an object, and the statistics reported
    matching.py   masklets to GT objects, one to one (Hungarian on mean J), or by id (--matched-ids)
    sources.py    GT layouts (DAVIS, SA-V) and predictions (run folder, sav-png, davis-png exports)
    core.py       one video, streamed a frame at a time (what a worker process runs)

Videos are evaluated in a process pool (concurrent.futures; spawn, so no zarr or thread state is forked).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from dataclasses import dataclass

import pyarrow as pa

from pipeline.evaluate.core import VideoResult, VideoTask, evaluate_video
from pipeline.evaluate.semantics import SEMANTICS
from pipeline.evaluate.sources import (
    EvaluateInputError,
    PredictionSpec,
    export_layout,
    export_metadata,
    find_gt_videos,
)

# What evaluate prints above the numbers of a random-weight run: the export seam's own wording, imported by
# name (a re-export under another name at the foot of sources.py was dropped by a lint fix, unnoticed because
# no test evaluated a random-weight run folder).
from pipeline.export.base import RANDOM_WEIGHTS_LABEL as RANDOM_WEIGHTS_TEXT

__all__ = [
    "RESULTS_SCHEMA",
    "SEMANTICS",
    "EvaluateInputError",
    "Evaluation",
    "evaluate",
    "format_results",
    "plan_tasks",
    "write_results",
]

RESULTS_SCHEMA = pa.schema([
    pa.field("level", pa.string(), nullable=False),  # object | video | overall
    pa.field("video", pa.string()),  # null on the overall row
    pa.field("gt_object", pa.int32()),  # 0-based key (SA-V folder number; DAVIS id - 1); object rows only
    pa.field("masklet", pa.int32()),  # matched masklet key (object_id); null when unmatched
    pa.field("J", pa.float64()),  # percent; object rows: mean over the frames that count; others: mean over objects
    pa.field("F", pa.float64()),
    pa.field("JF", pa.float64()),
    pa.field("J_recall", pa.float64()),  # davis semantics only (percent)
    pa.field("J_decay", pa.float64()),
    pa.field("F_recall", pa.float64()),
    pa.field("F_decay", pa.float64()),
    pa.field("frames", pa.int32()),  # object rows: frames that counted
    pa.field("match_J", pa.float64()),  # object rows: the pair's mean J that matching maximised
    pa.field("gt_objects", pa.int32()),  # video / overall rows: scored GT objects
    pa.field("matched_objects", pa.int32()),
    pa.field("masklets", pa.int32()),
    pa.field("recall", pa.float64()),  # matched_objects / gt_objects (percent)
    pa.field("precision", pa.float64()),  # matched masklets / masklets (percent)
    pa.field("semantics", pa.string(), nullable=False),
    pa.field("random_weights", pa.bool_()),
])


@dataclass
class Evaluation:
    semantics: str
    videos: list[VideoResult]
    random_weights: bool | None  # None: unknown (an export without export.json)
    label: str | None  # the RANDOM WEIGHTS text to print above the numbers, when so
    table: pa.Table


def _is_run(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "run.json")) and os.path.isfile(os.path.join(folder, "plan.json"))


def _run_gt_columns(out: str) -> dict[str, tuple[str | None, str | None, str]]:
    """{item_id: (gt_path, gt_layout, media path)} from the run's frozen manifest copy."""
    import pyarrow.parquet as pq

    from pipeline.paths import RunPaths

    table = pq.read_table(RunPaths.of(out).manifest)
    n = table.num_rows
    col = (lambda c: table.column(c).to_pylist() if c in table.column_names else [None] * n)
    return {i: (g, lay, p) for i, g, lay, p in zip(col("item_id"), col("gt_path"), col("gt_layout"), col("path"))}


def plan_tasks(predictions: str, gt_root: str | None, semantics: str | None, matched_ids: bool = False,
               skip_first_and_last: bool = True) -> tuple[list[VideoTask], bool | None, str | None]:
    """The videos to evaluate, with where their GT and predictions are; (tasks, random_weights, label)."""
    predictions = os.path.abspath(predictions)
    if not os.path.isdir(predictions):
        raise EvaluateInputError(f"{predictions!r} is not a folder; pass a run folder (OUT) or an export folder")
    gt_videos = find_gt_videos(gt_root) if gt_root else None
    tasks: list[VideoTask] = []
    if _is_run(predictions):
        from pipeline.results import open_run

        run = open_run(predictions)
        random_weights = bool(run.random_weights)
        label = RANDOM_WEIGHTS_TEXT if random_weights else None
        done = set(run.item_ids("done"))
        items = _run_gt_columns(predictions)
        if gt_videos is None:
            wanted = {i: (g, lay) for i, (g, lay, _) in items.items() if g}
            if not wanted:
                raise EvaluateInputError(
                    f"{predictions}: its manifest names no ground truth (no gt_path column values); pass --gt "
                    f"DATASET_ROOT, or build the manifest on the dataset root (`masklet manifest build DAVIS ...`)")
        else:
            by_gt_path = {os.path.normpath(g): i for i, (g, _, _) in items.items() if g}
            wanted = {}
            for name, (path, layout) in gt_videos.items():
                item = name if name in items else by_gt_path.get(os.path.normpath(path))
                if item is None:
                    raise EvaluateInputError(
                        f"video {name!r} of the GT has no item in {predictions} (no item id {name!r}, no item whose "
                        f"gt_path is {path}); run it too, or evaluate without --gt to score the items the run's "
                        f"manifest links to GT")
                wanted[item] = (path, layout)
        for item_id, (path, layout) in sorted(wanted.items()):
            if item_id not in done:
                raise EvaluateInputError(
                    f"video {item_id!r} has no committed masks in {predictions} (see `masklet status "
                    f"{predictions}`); resume the run, or evaluate a GT that leaves it out")
            spec = PredictionSpec("run", predictions, item_id, items[item_id][2])
            tasks.append(VideoTask(item_id, path, layout, spec, semantics or layout, matched_ids, skip_first_and_last))
    else:
        if gt_videos is None:
            raise EvaluateInputError(f"{predictions} is an export folder: pass --gt DATASET_ROOT (only a run "
                                     f"folder's manifest can name its ground truth)")
        kind = export_layout(predictions)
        meta = export_metadata(predictions)
        random_weights = meta.get("random_weights")
        label = meta.get("label") if random_weights else None
        if random_weights and not label:
            label = RANDOM_WEIGHTS_TEXT
        for name, (path, layout) in gt_videos.items():
            if not os.path.isdir(os.path.join(predictions, name)):
                raise EvaluateInputError(
                    f"video {name!r} of the GT is missing in the export {predictions} (no folder {name}/); "
                    f"export every GT video (the item ids must be the video names) or pass a GT root without it")
            tasks.append(VideoTask(name, path, layout, PredictionSpec(kind, predictions, name),
                                   semantics or layout, matched_ids, skip_first_and_last))
    for task in tasks:
        if task.semantics not in SEMANTICS:
            raise EvaluateInputError(f"unknown semantics {task.semantics!r}; use --semantics sav or davis")
    return tasks, random_weights, label


def run_tasks(tasks: list[VideoTask], workers: int | None = None) -> list[VideoResult]:
    """Evaluate videos, in a process pool when there are several videos and workers."""
    workers = workers or min(len(tasks), os.cpu_count() or 1)
    if workers <= 1 or len(tasks) <= 1:
        return [evaluate_video(t) for t in tasks]
    chunk = max(1, len(tasks) // (workers * 8))
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(evaluate_video, tasks, chunksize=chunk))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary_row(level: str, video: str | None, objects, masklets: int, semantics: str, rw) -> dict:
    scores = [o.score for o in objects]
    matched = sum(o.masklet is not None for o in objects)
    row = {"level": level, "video": video, "semantics": semantics, "random_weights": rw,
           "J": _mean([s.j for s in scores]), "F": _mean([s.f for s in scores]),
           "gt_objects": len(objects), "matched_objects": matched, "masklets": masklets,
           "recall": 100.0 * matched / len(objects) if objects else None,
           "precision": 100.0 * matched / masklets if masklets else None}
    row["JF"] = (row["J"] + row["F"]) / 2 if scores else None
    if semantics == "davis":
        for name in ("j_recall", "j_decay", "f_recall", "f_decay"):
            row[name[0].upper() + name[1:]] = _mean([getattr(s, name) for s in scores])
    return row


def results_table(videos: list[VideoResult], semantics: str, random_weights: bool | None) -> pa.Table:
    rows: list[dict] = []
    for v in videos:
        for o in v.objects:
            s = o.score
            rows.append({"level": "object", "video": v.video, "gt_object": o.gt_object, "masklet": o.masklet,
                         "J": s.j, "F": s.f, "JF": s.jf, "J_recall": s.j_recall, "J_decay": s.j_decay,
                         "F_recall": s.f_recall, "F_decay": s.f_decay, "frames": s.frames, "match_J": o.match_j,
                         "semantics": semantics, "random_weights": random_weights})
        rows.append(_summary_row("video", v.video, v.objects, v.masklets, semantics, random_weights))
    everything = [o for v in videos for o in v.objects]
    rows.append(_summary_row("overall", None, everything, sum(v.masklets for v in videos), semantics, random_weights))
    columns = {f.name: [r.get(f.name) for r in rows] for f in RESULTS_SCHEMA}
    return pa.Table.from_pydict(columns, schema=RESULTS_SCHEMA)


def evaluate(predictions: str, gt_root: str | None = None, semantics: str | None = None,
             matched_ids: bool = False, workers: int | None = None, skip_first_and_last: bool = True) -> Evaluation:
    """Score a run folder or an export folder against GT. `semantics` None: the GT layout's own (DAVIS GT:
    davis, SA-V GT: sav). EvaluateInputError on bad input (the message names the item and the fix)."""
    tasks, random_weights, label = plan_tasks(predictions, gt_root, semantics, matched_ids, skip_first_and_last)
    if not tasks:
        raise EvaluateInputError(f"no video to evaluate in {predictions}; check --gt and the run's items")
    kinds = {t.semantics for t in tasks}
    if len(kinds) > 1:
        raise EvaluateInputError(f"the videos mix GT layouts ({', '.join(sorted(kinds))}); pass --semantics sav or "
                                 f"davis to score them one way")
    sem = kinds.pop()
    videos = run_tasks(tasks, workers)
    return Evaluation(sem, videos, random_weights, label, results_table(videos, sem, random_weights))


def write_results(evaluation: Evaluation, path: str) -> None:
    from pipeline.manifest.table import write_table_atomic

    write_table_atomic(evaluation.table, path)


def format_results(evaluation: Evaluation, max_objects: int = 50) -> str:
    """The text `masklet evaluate` prints: the label, overall line, per-video lines, the first objects."""
    t = evaluation.table.to_pylist()
    davis = evaluation.semantics == "davis"
    lines = []
    if evaluation.label:
        lines.append(evaluation.label)
    overall = t[-1]

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

    lines.append(f"semantics: {evaluation.semantics} (values in percent; first and last annotated frames skipped)")
    head = f"J&F {fmt(overall['JF'])}  J {fmt(overall['J'])}  F {fmt(overall['F'])}"
    if davis:
        head += (f"  J-recall {fmt(overall['J_recall'])}  J-decay {fmt(overall['J_decay'])}  "
                 f"F-recall {fmt(overall['F_recall'])}  F-decay {fmt(overall['F_decay'])}")
    lines.append(f"overall: {head}")
    lines.append(f"objects: {overall['matched_objects']} of {overall['gt_objects']} GT objects matched "
                 f"(recall {fmt(overall['recall'])}%), {overall['masklets']} masklets "
                 f"(precision {fmt(overall['precision'])}%)")
    lines.append(f"{'video':<32} {'J&F':>6} {'J':>6} {'F':>6} {'matched':>9} {'masklets':>8}")
    for r in t:
        if r["level"] == "video":
            lines.append(f"{r['video']:<32} {fmt(r['JF']):>6} {fmt(r['J']):>6} {fmt(r['F']):>6} "
                         f"{r['matched_objects']:>4}/{r['gt_objects']:<4} {r['masklets']:>8}")
    objects = [r for r in t if r["level"] == "object"]
    if objects:
        lines.append(f"{'video':<32} {'object':>6} {'masklet':>7} {'J&F':>6} {'J':>6} {'F':>6}")
        for r in objects[:max_objects]:
            m = "-" if r["masklet"] is None else str(r["masklet"])
            lines.append(f"{r['video']:<32} {r['gt_object']:>6} {m:>7} {fmt(r['JF']):>6} {fmt(r['J']):>6} "
                         f"{fmt(r['F']):>6}")
        if len(objects) > max_objects:
            lines.append(f"... {len(objects) - max_objects} more object rows in the Parquet output (-o)")
    return "\n".join(lines)
