"""The export runner: `export_run(OUT, format, DEST, filter, executor)` writes a run's masklets in one format
into DEST, item by item, resumable per item like a run.

- The work list is frozen at the first start (DEST/.masklet-export/items.parquet, then spec.json written last:
  run, format, filter, fingerprint). A rerun with the same arguments resumes; other arguments on the same
  DEST are refused, so one DEST never mixes two exports.
- Per item (`export_item`): skip it if its done marker exists; else build its `ItemExport` (the filter's
  masklets, lazy masks), let the format write into an empty staging folder DEST/.masklet-export/tmp/<item>,
  publish what it wrote into DEST (each entry renamed into place, fsynced first, pipeline/store/atomic.py;
  an entry whose folder DEST already has from a killed try is merged into it, file by file), then write the
  done marker DEST/.masklet-export/done/<item>.json (the item's summary) last. A kill at any instant leaves
  the item unmarked, and its rerun writes the same files again over whatever the kill left.
- Executors: `local` (this process, one item at a time), `dask` (a dask bag over local processes), `slurm`
  (array tasks of item chunks, submitted through pipeline/executors/slurm.py with the run's SLURM settings and
  an optional profile; the tasks need no GPU, so none is asked for). Every task gets plain arguments (DEST
  and item ids) and reads the rest from DEST's spec.
- Then `format.finish` with every item's summary in item order, and DEST/export.json (format, filter, run,
  fingerprint, model, the RANDOM WEIGHTS label when so, counts, the format's summary), written last.
Memory: one item's rows and one mask (object, frame) at a time, plus what the format holds for an item.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import uuid
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.export import filters
from pipeline.export.base import ItemExport, RunInfo
from pipeline.export.filters import (
    ExportFilter,
    ExportFilterError,
    select_items,
    select_masklets,
)
from pipeline.paths import check_component
from pipeline.store.atomic import fsync_dir, publish, write_atomic, write_text_atomic

log = logging.getLogger("masklet.export")
SPEC_VERSION = 1
EXECUTORS = ("local", "dask", "slurm")


class ExportError(ValueError):
    """Bad input to an export (unknown format, a DEST holding another export, an item a format cannot hold)."""


class ExportIncomplete(RuntimeError):
    """Some items were not exported (a task failed or was cancelled); rerunning the command resumes."""


@dataclasses.dataclass(frozen=True)
class ExportPaths:
    """Every path of an export under DEST (the formats' own files are theirs: what they stage)."""

    root: Path

    @classmethod
    def of(cls, dest: str | Path) -> ExportPaths:
        return cls(Path(dest).expanduser().resolve())

    @property
    def state(self) -> Path:
        return self.root / ".masklet-export"

    @property
    def spec(self) -> Path:
        return self.state / "spec.json"

    @property
    def items(self) -> Path:
        return self.state / "items.parquet"

    @property
    def done(self) -> Path:
        return self.state / "done"

    def done_marker(self, item_id: str) -> Path:
        return self.done / f"{check_component(item_id)}.json"

    @property
    def tmp(self) -> Path:
        return self.state / "tmp"

    def stage(self, item_id: str) -> Path:
        return self.tmp / check_component(item_id)

    @property
    def trash(self) -> Path:
        return self.tmp / ".trash"

    @property
    def submitit_folder(self) -> Path:
        return self.state / "slurm" / "%j"

    @property
    def record(self) -> Path:
        return self.root / "export.json"


# --- what the export is -------------------------------------------------------------------------------------

def get_format(name: str):
    from pipeline.export import FORMATS

    try:
        return FORMATS[name]
    except KeyError:
        raise ExportError(f"no export format {name!r}; the formats are {', '.join(sorted(FORMATS))}") from None


def run_info(run) -> RunInfo:
    items = run.items
    done = items.filter(pc.equal(items["status"], "done"))
    models = sorted({m for m in done["model"].to_pylist() if m})
    model = ", ".join(models) or run.plan.config.model.name
    return RunInfo(root=str(run.paths.root), model=model, random_weights=bool(run.random_weights),
                   fingerprint=run.plan.snapshot["config_fingerprint"])


def _spec(run, fmt_name: str, filt: ExportFilter) -> dict:
    return {"version": SPEC_VERSION, "format": fmt_name, "filter": filt.to_dict(), "run": str(run.paths.root),
            "fingerprint": run.plan.snapshot["config_fingerprint"]}


def prepare_export(out: str | Path, fmt_name: str, dest: str | Path, filt: ExportFilter) -> tuple[ExportPaths, list[str]]:
    """Freeze the export under DEST (its spec and item list), or reopen it; returns the item list."""
    from pipeline import open_run

    get_format(fmt_name)
    run = open_run(out)
    paths = ExportPaths.of(dest)
    spec = _spec(run, fmt_name, filt)
    if paths.spec.exists():
        old = json.loads(paths.spec.read_text())
        if old != spec:
            diff = [k for k in spec if old.get(k) != spec[k]]
            raise ExportError(f"{paths.root} holds another export ({', '.join(f'{k}: {old.get(k)!r}' for k in diff)}); "
                              f"rerun it with those arguments to resume it, or export to another -o")
        return paths, pq.read_table(paths.items).column("item_id").to_pylist()
    if paths.root.exists() and any(p.name != ".masklet-export" for p in paths.root.iterdir()):
        raise ExportError(f"{paths.root} is not empty and holds no masklet export: export to a new or empty folder")
    items = select_items(filt, run.item_ids("done"), str(run.paths.root))
    if filt.decision not in (None, "all") and filters.review_decisions(run) is None:
        raise ExportFilterError(f"--decision {filt.decision}: {run.paths.root} has no review decisions yet (nothing "
                                f"has been reviewed); drop --decision")
    paths.done.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.items, lambda p: pq.write_table(pa.table({"item_id": pa.array(items, pa.string())}), p))
    write_text_atomic(paths.spec, json.dumps(spec, indent=1))  # last: marks the export's plan complete
    return paths, items


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every item of an export needs, built once per process from DEST's spec."""

    paths: ExportPaths
    run: object
    fmt: object
    filt: ExportFilter
    info: RunInfo
    decisions: dict | None


def _context(dest: str) -> _Context:
    # Keyed by the spec's text too: a DEST removed and exported anew in one process gets a fresh context.
    return _context_for(dest, ExportPaths.of(dest).spec.read_text())


@lru_cache(maxsize=4)
def _context_for(dest: str, spec_text: str) -> _Context:
    from pipeline import open_run

    paths = ExportPaths.of(dest)
    spec = json.loads(spec_text)
    run = open_run(spec["run"])
    filt = ExportFilter.from_dict(spec["filter"])
    decisions = filters.review_decisions(run)  # None without a review: then nothing is filtered by decision
    return _Context(paths, run, get_format(spec["format"]), filt, run_info(run), decisions)


def build_item(run, item_id: str, filt: ExportFilter, info: RunInfo, decisions: dict | None = None) -> ItemExport:
    """One item as a format sees it: the filter's masklets, their frame rows, and masks read on demand. A
    reviewed run's masklets are their newest versions (`masklet refine`), new masklets included, and the
    filter (flags, frames visible, area share, decision) applies to those rows: what is exported is what is
    filtered."""
    item = run.item_rows("items", item_id).to_pylist()[0]
    masklets, newest = _item_masklets(run, item_id)
    masklets = select_masklets(filt, masklets, decisions)
    object_ids = [int(o) for o in masklets["object_id"].to_pylist()]
    newest = {o: v for o, v in newest.items() if o in object_ids}
    frames = run.frames_for(item_id)
    frames = frames.filter(pc.is_in(frames["object_id"], value_set=pa.array(
        [o for o in object_ids if o not in newest], pa.int32())))
    array = run.masks(item_id)
    _, num_frames, height, width = array.shape
    source_frames = [int(s) for s in array.attrs["source_frames"]][:num_frames]
    planes = list(object_ids)  # a masklet without versions is the plane object_id of the item's mask array
    readers = {}
    if newest:  # a re-tracked or new masklet is exported at its newest version: frame rows and masks
        from pipeline.review.versions import frame_reader, version_frames

        frames = pa.concat_tables([frames, *(version_frames(run.paths.root, item_id, o, v).select(frames.column_names)
                                             for o, v in newest.items())])
        readers = {object_ids.index(o): frame_reader(run.paths.root, item_id, o, v) for o, v in newest.items()}
    frames = frames.sort_by([("object_id", "ascending"), ("frame", "ascending")])

    def mask(k: int, t: int):
        if k in readers:
            return readers[k](t)
        return array[planes[k], t]

    return ItemExport(item_id=item_id, item=item, object_ids=object_ids, masklets=masklets, frames=frames,
                      source_frames=source_frames, height=int(height), width=int(width), run=info, mask=mask)


def _item_masklets(run, item_id: str) -> tuple[pa.Table, dict[int, int]]:
    """One item's masklet rows as they are now, in the run's columns (each masklet's newest version in place
    of the run's row, new masklets added), and object_id -> newest version for those with one (none without
    an OUT/versions folder: one stat)."""
    rows = run.masklets_for(item_id)
    if not run.paths.versions.exists():
        return rows, {}
    from pipeline.review.versions import item_masklets

    latest = item_masklets(run.paths.root, item_id, rows)
    newest = {r["object_id"]: r["version"] for r in latest.select(["object_id", "version"]).to_pylist()
              if r["version"]}
    return latest.select(rows.column_names).cast(rows.schema), newest


# --- one item ------------------------------------------------------------------------------------------------

def _merge_publish(stage: Path, dest: Path, trash: Path) -> None:
    """Move every entry of `stage` into `dest`: a name `dest` lacks is renamed in whole (one rename); a folder
    `dest` already has (left by a killed try, or shared by every item such as .parts/) is merged into."""
    for entry in sorted(stage.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and target.is_dir() and not target.is_symlink():
            _merge_publish(entry, target, trash)
            continue
        if target.is_dir() and not target.is_symlink():
            trash.mkdir(parents=True, exist_ok=True)
            target.rename(trash / f"{target.name}.{uuid.uuid4().hex[:8]}")
        publish(entry, target)


def export_item(dest: str, item_id: str) -> bool:
    """Export one item of the export frozen in DEST (a module-level function of plain arguments: what every
    executor runs). Returns False when it was done already."""
    ctx = _context(str(dest))
    paths = ctx.paths
    if paths.done_marker(item_id).exists():
        return False
    stage = paths.stage(item_id)
    shutil.rmtree(stage, ignore_errors=True)  # what a killed try left
    stage.mkdir(parents=True)
    try:
        item = build_item(ctx.run, item_id, ctx.filt, ctx.info, ctx.decisions)
        summary = ctx.fmt.write_item(item, stage)
        _merge_publish(stage, paths.root, paths.trash)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    marker = {"item_id": item_id, "masklets": len(item.object_ids), "frames": item.num_frames, "summary": summary}
    write_text_atomic(paths.done_marker(item_id), json.dumps(marker, sort_keys=True))
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(paths.trash, ignore_errors=True)
    return True


def export_items(dest: str, item_ids: list[str] | tuple[str, ...]) -> int:
    """Export these items in order (a SLURM task's or a dask partition's work); returns how many it wrote."""
    return sum(export_item(dest, i) for i in item_ids)


def _export_one(item_id: str, dest: str) -> bool:
    return export_item(dest, item_id)


# --- executors -----------------------------------------------------------------------------------------------

def _run_local(dest: str, todo: list[str]) -> None:
    for n, item_id in enumerate(todo, 1):
        export_item(dest, item_id)
        if n % 100 == 0:
            log.info("exported %d of %d items", n, len(todo))


def _run_dask(dest: str, todo: list[str], workers: int) -> None:
    import dask.bag as db

    # Partitions of a few items: a process exports one item at a time, and a partition's results are booleans.
    partition = max(1, min(64, math.ceil(len(todo) / (workers * 4))))
    db.from_sequence(todo, partition_size=partition).map(_export_one, dest).count().compute(
        scheduler="processes", num_workers=workers)


def _slurm_config(run, profile: str | None):
    """The run's own SLURM settings, with this launch's profile on top (as `masklet resume --profile` reads it),
    less the GPU: exporting reads Zarr and writes files."""
    import yaml

    from pipeline.config import (
        config_from_dict,
        config_to_dict,
        merge_dicts,
        profile_path,
    )

    data = config_to_dict(run.plan.config)
    if profile:
        data = merge_dicts(data, yaml.safe_load(profile_path(profile).read_text()) or {})
    slurm_cfg = config_from_dict(data).slurm
    return dataclasses.replace(slurm_cfg, gres=None, gpu_memory_gb=None,
                               job_name=f"{slurm_cfg.job_name}-export")


def _run_slurm(dest: str, todo: list[str], run, profile: str | None, workers: int | None) -> None:
    from pipeline.executors import slurm

    cfg = _slurm_config(run, profile)
    tasks_n = max(1, min(len(todo), workers or cfg.array_parallelism))
    step = math.ceil(len(todo) / tasks_n)
    chunks = [tuple(todo[i:i + step]) for i in range(0, len(todo), step)]
    tasks = [slurm.CallTask(__name__, "export_items", (dest, chunk)) for chunk in chunks]
    paths = ExportPaths.of(dest)
    paths.submitit_folder.parent.mkdir(parents=True, exist_ok=True)
    task_ids = slurm.submit_array(paths.submitit_folder, cfg, tasks)
    job_id = task_ids[0].split("_")[0]
    print(f"submitted SLURM job {job_id}: {len(tasks)} task(s) of up to {step} item(s); logs under "
          f"{paths.submitit_folder.parent}/")
    slurm.wait(None, [job_id], lost_hint="run the same `masklet export` command again: it resumes")


# --- the export ------------------------------------------------------------------------------------------------

def export_run(out: str | Path, fmt_name: str, dest: str | Path, filt: ExportFilter | None = None,
               executor: str = "local", workers: int | None = None, profile: str | None = None) -> dict:
    """Export run OUT as `fmt_name` into DEST (see the module docstring); returns export.json's content."""
    from pipeline import open_run

    if executor not in EXECUTORS:
        raise ExportError(f"--executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ExportError(f"--workers {workers} must be >= 1")
    filt = filt or ExportFilter()
    paths, items = prepare_export(out, fmt_name, dest, filt)
    dest_s = str(paths.root)
    if paths.record.exists():
        return json.loads(paths.record.read_text())  # finished before: nothing to redo
    todo = [i for i in items if not paths.done_marker(i).exists()]
    log.info("export %s: %d items, %d to do", dest_s, len(items), len(todo))
    if todo:
        if executor == "local":
            _run_local(dest_s, todo)
        elif executor == "dask":
            _run_dask(dest_s, todo, workers or 1)
        else:
            _run_slurm(dest_s, todo, open_run(out), profile, workers)
    missing = [i for i in items if not paths.done_marker(i).exists()]
    if missing:
        raise ExportIncomplete(f"{len(missing)} of {len(items)} items were not exported (first: {missing[0]}); "
                               f"see the task logs under {paths.state / 'slurm'}/ if SLURM ran them, then run the "
                               f"same command again: it resumes")
    return finish_export(paths)


# The temporary names of pipeline/store/atomic.py's write_atomic: `.{name}.{8 hex}.tmp` beside the final file.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def _clear_temporaries(root: Path) -> None:
    """Remove what a killed `finish` (or export.json's write) left at DEST's top: write_atomic's temporaries."""
    for p in root.iterdir():
        if p.is_file() and _TEMPORARY.fullmatch(p.name):
            p.unlink(missing_ok=True)


def finish_export(paths: ExportPaths) -> dict:
    ctx = _context(str(paths.root))
    _clear_temporaries(paths.root)
    items = pq.read_table(paths.items).column("item_id").to_pylist()
    markers = [json.loads(paths.done_marker(i).read_text()) for i in items]
    summary = ctx.fmt.finish(paths.root, [m["summary"] for m in markers], ctx.info)
    spec = json.loads(paths.spec.read_text())
    info = ctx.info
    record = {
        "format": spec["format"],
        "description": ctx.fmt.description,
        "filter": spec["filter"],
        "run": info.root,
        "fingerprint": info.fingerprint,
        "model": info.model,
        "random_weights": info.random_weights,
        **({"label": info.label} if info.label else {}),
        "counts": {"items": len(markers), "masklets": sum(m["masklets"] for m in markers),
                   "frames": sum(m["frames"] for m in markers),
                   "items_without_masklets": sum(1 for m in markers if not m["masklets"])},
        "summary": summary,
    }
    shutil.rmtree(paths.tmp, ignore_errors=True)
    write_text_atomic(paths.record, json.dumps(record, indent=1))
    fsync_dir(paths.root)
    return record
