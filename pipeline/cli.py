"""The `masklet` command: manifest build, run, status, sample."""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from pipeline.config import ConfigError, load_config


def _cmd_manifest_build(args) -> int:
    from pipeline.manifest import build_manifest

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

    from pipeline.status import shard_status

    total_items = sum(len(s.item_ids) for s in plan.shards)
    bar = tqdm(total=total_items, unit="item", desc="masklet", dynamic_ncols=True)
    while True:
        stopped = stop.wait(interval)
        states = [shard_status(plan, s.shard_id) for s in plan.shards]
        done = sum(s.done + s.failed for s in states)
        bar.set_postfix(frames=sum(s.frames_done for s in states), failed=sum(s.failed for s in states))
        bar.update(done - bar.n)
        if stopped:
            bar.close()
            return


def _cmd_run(args) -> int:
    from pipeline.executors.local import LocalExecutor
    from pipeline.manifest import read_manifest
    from pipeline.plan import prepare_run
    from pipeline.status import format_status, run_status, shard_status

    cfg = load_config(args.config, args.overrides)
    if args.executor:
        cfg = load_config(args.config, [*args.overrides, f"executor={args.executor}"])
    items = read_manifest(args.manifest)
    plan = prepare_run(args.out, items, cfg)
    if plan.config.model.random_weights:
        print("WARNING: model.random_weights=true: the real SAM 2 architecture with random weights. "
              "Its masks test the plumbing and are NOT segmentation results.", file=sys.stderr)
    pending = [s.shard_id for s in plan.shards if shard_status(plan, s.shard_id).pending]
    print(f"run {plan.paths.root}: {len(plan.items)} items in {len(plan.shards)} shards, "
          f"{len(pending)} shards with pending items")
    if plan.config.executor != "local":
        raise ConfigError(f"executor={plan.config.executor!r} is not available in this version; use local")
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(plan, stop), daemon=True)
    bar.start()
    try:
        LocalExecutor(plan.config.local.workers).launch(str(plan.paths.root), pending)
    finally:
        stop.set()
        bar.join()
    print(format_status(*run_status(args.out)))
    return 0


def _cmd_status(args) -> int:
    from pipeline.status import format_status, run_status

    print(format_status(*run_status(args.out)))
    return 0


def _cmd_sample(args) -> int:
    from pipeline.samples import make_sample_dataset

    folder = make_sample_dataset(args.folder)
    print(f"wrote synthetic sample media to {folder}")
    return 0


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
    build.set_defaults(func=_cmd_manifest_build)

    run = sub.add_parser("run", help="plan and run a manifest into OUT (resumes if OUT exists)")
    run.add_argument("--manifest", required=True, help="manifest (.parquet, .csv or .jsonl with a path column)")
    run.add_argument("--out", required=True, help="run folder")
    run.add_argument("--config", default=None, help="YAML config (default: the embedded default)")
    run.add_argument("--executor", choices=["local", "slurm"], default=None)
    run.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. prompt.points_per_side=16")
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="items done / failed / pending per shard, with errors")
    status.add_argument("out", help="run folder")
    status.set_defaults(func=_cmd_status)

    sample = sub.add_parser("sample", help="write a small synthetic media set (two videos, frames, an image)")
    sample.add_argument("folder")
    sample.set_defaults(func=_cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pipeline.plan import RunMismatchError
    from pipeline.stages.models import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError, RunMismatchError) as e:
        # Input problems: one clear line (the message says the fix); -v shows the traceback too.
        if args.verbose:
            raise
        print(f"masklet: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
