"""The `masklet` command: manifest build, run, resume, status, cancel, sample."""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import warnings

import yaml

from pipeline.config import (ConfigError, config_from_dict, config_to_dict, load_config, merge_dicts, parse_overrides,
                             profile_path)

# Exit status when a shard was refused because another live worker owns it (sysexits.h EX_TEMPFAIL): the
# work is being done elsewhere; try again later.
EX_TEMPFAIL = 75


# Exit status of a run stopped by a fault of its environment (GPU, output file system, model; pipeline/faults.py):
# nothing is wrong with the items, `masklet resume OUT` later goes on. 2 is a usage or input error.
EXIT_ENVIRONMENT_FAULT = 3


def _cmd_manifest_build(args) -> int:
    from pipeline.manifest import build_manifest, update_manifest

    if args.update:
        update = update_manifest(args.paths, args.output, args.update, workers=args.workers)
        table = update.table
        print(f"updated {args.update}: {update.kept} items kept with their ids, {len(update.added)} added, "
              f"{len(update.removed)} removed")
        for gone in update.removed[:50]:
            why = "still on disk, but not under the paths given" if gone.on_disk else "no longer on disk"
            print(f"  removed: {gone.item_id} ({gone.path}: {why})")
        if len(update.removed) > 50:
            print(f"  ... and {len(update.removed) - 50} more removed")
    else:
        table = build_manifest(args.paths, args.output, workers=args.workers)
    errors = [e for e in table.column("error").to_pylist() if e]
    print(f"wrote {args.output}: {table.num_rows} items ({table.num_rows - len(errors)} probed, "
          f"{len(errors)} with errors)")
    for e in errors[:20]:
        print(f"  error: {e}")
    return 0


def _progress(plan, stop: threading.Event, interval: float = 1.0) -> None:
    """One bar for the whole run, read from disk, so it works the same for any executor."""
    from tqdm import tqdm

    from pipeline.status import StatusCache

    total_items = plan.num_items
    cache = StatusCache(plan)  # re-reads only the shards whose folder changed since the last second
    # Off a terminal (logs, CI) a line every 10 s is enough.
    bar = tqdm(total=total_items, unit="item", desc="masklet", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    while True:
        stopped = stop.wait(interval)
        states = cache.refresh()
        done = sum(s.done + s.failed for s in states)
        bar.set_postfix(frames=sum(s.frames_done for s in states), failed=sum(s.failed for s in states))
        bar.update(done - bar.n)
        if stopped:
            bar.close()
            return


class _ProgressBar:
    """The run's progress bar while a block runs (a thread reading the disk)."""

    def __init__(self, plan):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=_progress, args=(plan, self.stop), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False


def _status_text(out, show_shards: bool = False, show_failed: bool = False) -> str:
    from pipeline.paths import RunPaths
    from pipeline.status import format_status, run_status

    plan, shards = run_status(out)
    scheduler = None
    if RunPaths.of(out).slurm_jobs.exists():
        from pipeline.executors.slurm import scheduler_view

        scheduler = scheduler_view(plan.paths)
    return format_status(plan, shards, scheduler, show_shards=show_shards, show_failed=show_failed)


def _launch(plan, cfg, shard_ids: list[int], *, redo_failed: bool, wait: bool, command: str) -> int:
    """Run or submit `shard_ids` of a prepared run with the executor of `cfg` (the settings of this launch:
    executor settings may differ from the run's first launch; what decides the masks may not)."""
    root = str(plan.paths.root)
    busy, owner_ended = {}, None
    if plan.paths.slurm_jobs.exists():  # never start a shard twice: two workers on one item would collide
        from pipeline.executors.slurm import busy_shards, lease_owner_ended

        busy, owner_ended = busy_shards(plan.paths, shard_ids), lease_owner_ended
    skipped = sorted(s for s, (_, lease) in busy.items() if lease is None)
    todo = [s for s in shard_ids if s not in busy]
    if skipped:
        tasks = sorted({busy[s][0].task_id for s in skipped})
        print(f"shards {skipped} are still queued or running as SLURM task(s) {tasks}: not started again "
              f"(`masklet cancel {root}` stops them)")
    for s, (job, lease) in sorted(busy.items()):
        if lease is not None:
            print(f"shard {s}: SLURM cannot say whether task {job.task_id} runs ({job.state}), but its lease is held "
                  f"by {lease.owner.describe()} (heartbeat {lease.age_s:.0f}s ago): not started again")
    if not todo:
        print(_status_text(root))
        return 0
    if cfg.executor == "local":
        from pipeline.executors.local import LocalExecutor

        with _ProgressBar(plan):
            refusals = LocalExecutor(cfg.local.workers).launch(root, todo, redo_failed=redo_failed,
                                                               owner_ended=owner_ended)
        print(_status_text(root))
        for line in refusals:
            print(f"masklet: refused: {line}", file=sys.stderr)
        return EX_TEMPFAIL if refusals else 0
    from pipeline.executors.slurm import SlurmExecutor
    from pipeline.executors.slurm import wait as wait_for_jobs

    sub = SlurmExecutor(cfg.slurm).submit(root, todo, redo_failed=redo_failed, command=command)
    print(f"submitted SLURM job {sub.job_id}: {len(sub.tasks)} task(s) for {len(todo)} shard(s) "
          f"({cfg.slurm.shards_per_task} per task, gres {cfg.slurm.gres or 'none'}, "
          f"partition {cfg.slurm.partition or 'default'})")
    print(f"  follow it: masklet status {root}    (worker logs: {plan.paths.logs}/, job logs: {plan.paths.slurm}/)")
    print(f"  stop it:   masklet cancel {root}    then `masklet resume {root}` runs what is left")
    if not wait:
        return 0
    with _ProgressBar(plan):
        wait_for_jobs(plan.paths, [sub.job_id])
    text = _status_text(root)
    print(text)
    from pipeline.status import run_status

    shards = run_status(root)[1]
    pending = sum(s.pending for s in shards)
    if pending:
        print(f"masklet: {pending} item(s) still pending after the jobs ended; see the failed tasks above, then "
              f"`masklet resume {root}`", file=sys.stderr)
        return EXIT_ENVIRONMENT_FAULT if any(s.fault for s in shards if s.pending) else 1
    return 0


def _cmd_run(args) -> int:
    from pipeline.manifest import read_manifest
    from pipeline.plan import prepare_run
    from pipeline.status import shard_status

    executor = [f"executor={args.executor}"] if args.executor else []
    cfg = load_config(args.config, [*args.overrides, *executor], profile=args.profile)
    items = read_manifest(args.manifest)
    plan = prepare_run(args.out, items, cfg)
    if plan.config.model.random_weights:
        print("WARNING: model.random_weights=true: the real SAM 2 architecture with random weights. "
              "Its masks test the plumbing and are NOT segmentation results.", file=sys.stderr)
    check_launch_numerics(plan.paths, cfg, args.allow_mixed_numerics, "run")
    pending = [s for s in plan.shard_ids if shard_status(plan, s).pending]
    untidy = _untidy(plan, pending)
    print(f"run {plan.paths.root}: {plan.num_items} items in {len(plan.shard_ids)} shards, "
          f"{len(pending)} shards with pending items" + (f", {len(untidy)} to tidy after a kill" if untidy else ""))
    return _launch(plan, cfg, sorted(pending + untidy), redo_failed=False, wait=args.wait, command="run")


def _untidy(plan, launched: list[int]) -> list[int]:
    """Shards not otherwise launched that a killed owner left untidy (lease, staging, uncompacted items):
    running them processes nothing, it only clears and compacts."""
    from pipeline.store.commit import needs_tidy

    launched_set = set(launched)
    return [s for s in plan.shard_ids if s not in launched_set and needs_tidy(plan.paths, s)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mask_changes(old, new) -> list[str]:
    """The keys whose change alone would change the masks (the run's config fingerprint), 'key: old -> new'."""
    from pipeline.plan import config_fingerprint

    base = config_fingerprint(old)
    old_flat, new_flat = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    changes = []
    for key in sorted(k for k in new_flat if new_flat[k] != old_flat.get(k)):
        one = config_to_dict(old)
        node = one
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = new_flat[key]
        if config_fingerprint(config_from_dict(one)) != base:
            changes.append(f"{key}: {old_flat.get(key)!r} -> {new_flat[key]!r}")
    return changes


def _cmd_resume(args) -> int:
    from pipeline.manifest import read_manifest
    from pipeline.plan import RunMismatchError, load_run, prepare_run
    from pipeline.status import run_status

    plan = load_run(args.out)
    # The run's own config, then this launch's profile and overrides (executor settings may change).
    data = config_to_dict(plan.config)
    if args.profile:
        data = merge_dicts(data, yaml.safe_load(profile_path(args.profile).read_text()) or {})
    data = merge_dicts(data, parse_overrides(args.overrides))
    if args.executor:
        data["executor"] = args.executor
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{e} (resuming {plan.paths.root})") from None
    changes = _mask_changes(plan.config, cfg)
    if changes:
        raise RunMismatchError(
            f"{plan.paths.root} was made with another config; resuming with {'; '.join(changes)} would mix masks "
            f"of two configs in one run. Resume without those settings, or start a new run in another folder: "
            f"masklet run --manifest {plan.paths.manifest} --out NEW_OUT [--config ...] [overrides]")
    # Refuses a manifest copy or plan that no longer matches the run's fingerprints (edited by hand).
    plan = prepare_run(args.out, read_manifest(str(plan.paths.manifest)), cfg)
    check_launch_numerics(plan.paths, cfg, args.allow_mixed_numerics, "resume")
    _, shards = run_status(args.out)
    todo = [s.shard_id for s in shards if s.pending or (args.retry_failed and s.failed)]
    pending = sum(s.pending for s in shards)
    failed = sum(s.failed for s in shards)
    untidy = _untidy(plan, todo)
    if untidy:
        print(f"resume {plan.paths.root}: {len(untidy)} finished shard(s) to tidy after a kill")
        todo = sorted(todo + untidy)
    if not todo:
        hint = f" ({failed} failed: --retry-failed runs them again)" if failed else ""
        print(f"nothing to resume in {plan.paths.root}: every item is committed{hint}")
        return 0
    what = f"{pending} pending item(s)" + (f" and {failed} failed item(s)" if args.retry_failed and failed else "")
    if pending or (args.retry_failed and failed):
        print(f"resume {plan.paths.root}: {what} in {len(todo)} shard(s)")
    return _launch(plan, cfg, todo, redo_failed=args.retry_failed, wait=args.wait, command="resume")


def check_launch_numerics(paths, cfg, allow_mixed: bool, command: str) -> None:
    """Refuse a launch whose numerics differ from the run's (pipeline/numerics.py), before any work."""
    from pipeline.numerics import check_launch

    check_launch(paths, cfg, allow_mixed, command)
    if allow_mixed:
        print(f"WARNING: --allow-mixed-numerics: {paths.root} may now hold items computed with other numerics "
              f"(device, dtype, versions); run.json records it and items.parquet says each item's",
              file=sys.stderr)


def _cmd_status(args) -> int:
    print(_status_text(args.out, show_shards=args.shards, show_failed=args.failed))
    return 0


def _cmd_cancel(args) -> int:
    from pipeline.paths import RunPaths
    from pipeline.plan import load_run

    plan = load_run(args.out)
    if not RunPaths.of(args.out).slurm_jobs.exists():
        print(f"{plan.paths.root} has no SLURM jobs (a local run stops with Ctrl-C)")
        return 0
    from pipeline.executors.slurm import cancel

    jobs = cancel(plan.paths)
    if not jobs:
        print(f"no queued or running SLURM jobs for {plan.paths.root}")
        return 0
    print(f"cancelled SLURM job(s) {', '.join(jobs)}; committed items stay. `masklet resume {plan.paths.root}` "
          f"runs the rest")
    return 0


def _cmd_report(args) -> int:
    from pipeline.report import write_report

    html_path, json_path = write_report(args.out, args.output, top=args.top, gallery=not args.no_gallery)
    print(f"wrote {html_path} (open it in a browser; it needs no network) and {json_path}")
    return 0


def review_command(out: str, port: int, reviewer: str) -> list[str]:
    """The `streamlit run` command line of `masklet review` (headless, on localhost only)."""
    from pathlib import Path

    app = Path(__file__).parent / "review" / "app.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
            "--server.address", "localhost", "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--", "--out", str(Path(out).resolve()), "--reviewer", reviewer]


def _cmd_review(args) -> int:
    import getpass
    import os

    from pipeline.plan import load_run

    load_run(args.out)  # a clear error before a server starts on something that is not a run
    reviewer = args.reviewer or getpass.getuser()
    print(f"masklet review: http://localhost:{args.port} (reviewer {reviewer}; Ctrl-C stops it)", flush=True)
    # exec, not a child: a signal to `masklet review` (Ctrl-C, a test's terminate) reaches the server itself.
    cmd = review_command(args.out, args.port, reviewer)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate, format_results, write_results

    evaluation = evaluate(args.predictions, args.gt, semantics=args.semantics, matched_ids=args.matched_ids,
                          workers=args.workers)
    print(format_results(evaluation))
    if args.output:
        write_results(evaluation, args.output)
        print(f"wrote {args.output}")
    return 0


def _cmd_qa(args) -> int:
    from dataclasses import asdict

    from pipeline.plan import load_run
    from pipeline.quality.reflag import current_qa, reflag_run

    if args.set:
        summary = reflag_run(args.out, args.set)
        print("\n".join(summary.lines()))
        qa = summary.qa
    else:
        plan = load_run(args.out)
        qa = current_qa(plan.paths, plan.config)
    print("thresholds in force: " + ", ".join(f"qa.{k}={v}" for k, v in asdict(qa).items()))
    return 0


def _cmd_sample(args) -> int:
    from pipeline.samples import make_sample_dataset

    folder = make_sample_dataset(args.folder)
    print(f"wrote synthetic sample media to {folder}")
    return 0


def _cmd_export(args) -> int:
    from pipeline.export.filters import ExportFilter
    from pipeline.export.runner import ExportIncomplete, export_run

    filt = ExportFilter(items=tuple(args.item), items_glob=args.items, flags=tuple(args.flag),
                        no_flags=tuple(args.no_flag), min_frames_visible=args.min_frames_visible,
                        min_area_share=args.min_area_share, decision=args.decision,
                        include_dropped=args.include_dropped)
    try:
        record = export_run(args.out, args.format, args.output, filt, executor=args.executor, workers=args.workers,
                            profile=args.profile)
    except ExportIncomplete as e:
        print(f"masklet: {e}", file=sys.stderr)
        return 1
    counts = record["counts"]
    print(f"exported {args.out} as {record['format']} into {args.output}: {counts['items']} items, "
          f"{counts['masklets']} masklets, {counts['frames']} frames (see export.json)")
    if record.get("summary", {}).get("overwritten_pixels"):
        print(f"  overlaps: {record['summary']['overwritten_pixels']} pixels overwritten (lower id wins)")
    if record.get("label"):
        print(f"WARNING: {record['label']}", file=sys.stderr)
    return 0


def _cmd_refine(args) -> int:
    from pipeline.review.refine import refine_run

    result = refine_run(args.out, executor=args.executor, profile=args.profile, workers=args.workers)
    print(f"refined {result['masklets']} masklet(s) of {args.out}; {result['pending_after']} still with pending "
          f"corrections" + (" (run the same command again: it resumes)" if result["pending_after"] else ""))
    return 0 if not result["pending_after"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masklet", description=__doc__)
    from pipeline import __version__

    parser.add_argument("--version", action="version", version=f"masklet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    manifest = sub.add_parser("manifest", help="describe media").add_subparsers(dest="manifest_command", required=True)
    build = manifest.add_parser("build", help="scan folders/globs, probe media in parallel, write a manifest")
    build.add_argument("paths", nargs="+", help="folders, files or globs of videos, frame folders and images")
    build.add_argument("-o", "--output", required=True, help="manifest file to write (.parquet)")
    build.add_argument("--workers", type=int, default=None, help="probing threads (default: CPU count)")
    build.add_argument("--update", metavar="OLD", default=None,
                       help="an earlier manifest: its items keep their ids and probes, only new files are probed "
                            "and get new ids, files no longer found are listed and left out (OUTPUT may be OLD)")
    build.set_defaults(func=_cmd_manifest_build)

    def launch_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--executor", choices=["local", "slurm"], default=None,
                       help="where shards run (default: the config's `executor`)")
        p.add_argument("--profile", default=None,
                       help="cluster profile: a name under configs/clusters/ (a100, h100, mig-1g.10gb, ...) or a YAML")
        p.add_argument("--wait", action="store_true", help="with SLURM: wait for the jobs and print the status")
        p.add_argument("--allow-mixed-numerics", action="store_true",
                       help="let this run hold items computed with other numerics than its first ones (another "
                            "device class, dtype, object batch, torch or sam2 version); recorded in run.json")
        p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. slurm.time_min=60")

    run = sub.add_parser("run", help="plan and run a manifest into OUT (resumes if OUT exists)")
    run.add_argument("--manifest", required=True, help="manifest (.parquet, .csv or .jsonl with a path column)")
    run.add_argument("--out", required=True, help="run folder")
    run.add_argument("--config", default=None, help="YAML config (default: the embedded default)")
    launch_options(run)
    run.set_defaults(func=_cmd_run)

    resume = sub.add_parser("resume", help="run the unfinished shards of OUT again, with OUT's own plan and config")
    resume.add_argument("out", help="run folder")
    resume.add_argument("--retry-failed", action="store_true", help="also run items committed as failed again")
    launch_options(resume)
    resume.set_defaults(func=_cmd_resume)

    status = sub.add_parser("status", help="items, shards and jobs: done / running / failed, rate, ETA, errors")
    status.add_argument("out", help="run folder")
    status.add_argument("--shards", action="store_true", help="a line per shard (shown anyway for up to 10 shards)")
    status.add_argument("--failed", action="store_true", help="every failed item and task (else the first 10)")
    status.set_defaults(func=_cmd_status)

    cancel = sub.add_parser("cancel", help="cancel the run's queued and running SLURM jobs")
    cancel.add_argument("out", help="run folder")
    cancel.set_defaults(func=_cmd_cancel)

    report = sub.add_parser("report", help="run health in one self-contained HTML page, report.json beside it")
    report.add_argument("out", help="run folder (a run in flight shows what it has committed)")
    report.add_argument("-o", "--output", default=None, help="HTML file to write (default OUT/report/report.html)")
    report.add_argument("--top", type=int, default=12, help="masklets of highest review priority in the gallery")
    report.add_argument("--no-gallery", action="store_true", help="leave out the gallery (no media decoded)")
    report.set_defaults(func=_cmd_report)

    review = sub.add_parser("review", help="the review app (Streamlit, on localhost): queue by review priority, "
                                           "decisions, click-to-correct with SAM 2, monitoring")
    review.add_argument("out", help="run folder")
    review.add_argument("--port", type=int, default=8501, help="port on localhost (default 8501)")
    review.add_argument("--reviewer", default=None, help="who decides (default: the login name)")
    review.set_defaults(func=_cmd_review)

    ev = sub.add_parser("evaluate", help="J, F and J&F of a run or an export against DAVIS or SA-V ground truth")
    ev.add_argument("predictions", metavar="OUT|EXPORT_DIR", help="run folder, or an export in sav-png or davis-png "
                                                                  "layout")
    ev.add_argument("--gt", default=None, metavar="GT_ROOT",
                    help="dataset root (DAVIS: Annotations/480p; SA-V: Annotations_6fps) or a folder of annotated "
                         "videos; optional for a run whose manifest was built on the dataset (column gt_path)")
    ev.add_argument("--semantics", choices=["sav", "davis"], default=None,
                    help="sav: an object counts from its first appearance (SA-V evaluator); davis: every frame "
                         "(davis2017). Default: the GT layout's own")
    ev.add_argument("-o", "--output", default=None, help="Parquet file of per-object, per-video and overall rows")
    ev.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU, at most one "
                                                               "per video)")
    ev.add_argument("--matched-ids", action="store_true",
                    help="masklet k is GT object k (a run prompted from GT); default: one-to-one matching on mean J")
    ev.set_defaults(func=_cmd_evaluate)

    qa = sub.add_parser("qa", help="show the run's qa.* thresholds, or set them and re-flag every committed "
                                   "masklet from its stored signals (no model; the fingerprint is unchanged)")
    qa.add_argument("out", help="run folder")
    qa.add_argument("--set", nargs="+", metavar="qa.KEY=VALUE", default=[],
                    help="new thresholds, e.g. qa.fragmented_components=3 qa.low_score=0.8")
    qa.set_defaults(func=_cmd_qa)

    sample = sub.add_parser("sample", help="write a small synthetic media set (two videos, frames, an image)")
    sample.add_argument("folder")
    sample.set_defaults(func=_cmd_sample)

    # Formats are not imported here (their libraries would slow every command): an unknown one is an input error.
    export = sub.add_parser("export", help="write a run's masklets in a dataset format (resumes per item)")
    export.add_argument("out", help="run folder")
    export.add_argument("--format", required=True,
                        help="sav-json, sav-png, davis-png, ... (pipeline/export/__init__.py FORMATS; an unknown "
                             "name lists them)")
    export.add_argument("-o", "--output", required=True, help="export folder (new or empty; the same to resume)")
    export.add_argument("--item", action="append", default=[], metavar="ID", help="export this item (repeatable)")
    export.add_argument("--items", default=None, metavar="GLOB", help="export the items whose id matches this glob")
    export.add_argument("--flag", action="append", default=[], metavar="F",
                        help="keep only masklets with any of these flags (repeatable)")
    export.add_argument("--no-flag", action="append", default=[], metavar="F",
                        help="drop masklets with this flag (repeatable)")
    export.add_argument("--min-frames-visible", type=int, default=None, metavar="N")
    export.add_argument("--min-area-share", type=float, default=None, metavar="X",
                        help="keep masklets whose mean share of the frame is at least X")
    export.add_argument("--decision", choices=["accepted", "not-rejected", "all"], default=None,
                        help="keep masklets by review decision (default on a reviewed run: not-rejected; "
                             "`all` keeps rejected ones too)")
    export.add_argument("--include-dropped", action="store_true",
                        help="also export re-seeded masklets the duplicate rule dropped (dropped_reason set)")
    export.add_argument("--executor", choices=["local", "dask", "slurm"], default="local",
                        help="local: this process; dask: --workers local processes; slurm: array tasks")
    export.add_argument("--workers", type=int, default=None,
                        help="dask: processes (default 1); slurm: array tasks (default slurm.array_parallelism)")
    export.add_argument("--profile", default=None, help="with --executor slurm: cluster profile (as for `run`)")
    export.set_defaults(func=_cmd_export)

    refine = sub.add_parser("refine", help="replay review corrections with SAM 2 into new masklet versions "
                                           "(resumes per masklet)")
    refine.add_argument("out", help="run folder")
    refine.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: this process; slurm: array tasks of masklet chunks")
    refine.add_argument("--profile", default=None, help="with --executor slurm: cluster profile (as for `run`)")
    refine.add_argument("--workers", type=int, default=None,
                        help="slurm: array tasks (default slurm.array_parallelism)")
    refine.set_defaults(func=_cmd_refine)
    return parser


def _input_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input. Those of modules this command never imported cannot have been raised:
    looking them up in sys.modules spares `masklet status` the imports of torch and submitit (seconds)."""
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError, ValueError]
    for module, name in (("pipeline.plan", "RunMismatchError"), ("pipeline.stages.models", "CheckpointError"),
                         ("pipeline.executors.slurm", "SlurmError"), ("pipeline.numerics", "NumericsMismatchError"),
                         ("pipeline.stages.sam2_pin", "Sam2VersionError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a `*` positional only the words before the first option: overrides after an option
    # (`resume OUT --retry-failed slurm.time_min=60`) arrive here.
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # The worker logs INFO to each shard's log file; the terminal shows it only with -v.
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    # sam2 builds its position encodings with torch.jit.script, which torch now warns about at every build.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from pipeline.faults import EnvironmentFault

    try:
        return args.func(args)
    except EnvironmentFault as e:
        # Not the items' fault: they stay pending. One line (the shard log has the traceback); exit 3.
        print(f"masklet: {e}; `masklet resume {getattr(args, 'out', 'OUT')}` once that is fixed", file=sys.stderr)
        return EXIT_ENVIRONMENT_FAULT
    except _input_errors() as e:
        # Input problems: one clear line (the message says the fix); -v shows the traceback too.
        if args.verbose:
            raise
        print(f"masklet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
