"""How long `masklet review` takes to open a large run: the app's first script run (open_run, the queue's
ranking columns scanned and sorted, decisions and events read, the first item's view) under Streamlit's
AppTest, on a run fabricated through the store (benchmarks/fabricate_run.py), then a second run (what every
click costs once the caches are warm). The browser's own rendering is not included.

    python benchmarks/bench_review_open.py [--items 100000] [--masklets 1000000] [--shards 1000] [--dir DIR]

`--quick` (2,000 items, 20,000 masklets, 20 shards) runs in seconds; tests/test_review_app.py runs it.
The target: under 5 s at 100,000 items.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

TARGET_S = 5.0
APP = Path(__file__).resolve().parents[1] / "pipeline" / "review" / "app.py"


def open_seconds(out: Path) -> tuple[float, float]:
    """(first run s, second run s) of the app on `out` under AppTest."""
    from streamlit.testing.v1 import AppTest

    os.environ["MASKLET_REVIEW_OUT"] = str(out)
    os.environ["MASKLET_REVIEW_REVIEWER"] = "bench"
    at = AppTest.from_file(str(APP), default_timeout=600)
    t0 = time.perf_counter()
    at.run()
    first = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"the app failed on {out}: {[e.message for e in at.exception]}")
    t0 = time.perf_counter()
    at.run()
    return first, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--masklets", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=None, help="where to make the run (default: temporary, removed); a kept "
                                                "complete run there is reused")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.masklets, args.shards, args.workers = 2_000, 20_000, 20, 1
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bench-review-"))
    try:
        from benchmarks.fabricate_run import Spec, fabricate_run

        out = tmp / "run"
        reuse = (out / "run.json").exists() and len(list((out / "meta").glob("shard-*"))) == args.shards
        t0 = time.perf_counter()
        if not reuse:
            shutil.rmtree(out, ignore_errors=True)
            fabricate_run(out, Spec(args.items, args.masklets, args.shards), workers=args.workers)
        print(f"{args.items:,} items, about {args.masklets:,} masklets, {args.shards:,} shards "
              f"(setup {time.perf_counter() - t0:.0f} s{', reused' if reuse else ''})", flush=True)
        first, again = open_seconds(out)
        print(f"review app: first run {first:.2f} s (target < {TARGET_S:.0f} s), warm rerun {again:.2f} s")
        return 0 if first < TARGET_S else 1
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
