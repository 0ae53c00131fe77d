"""`masklet report` at scale: a committed run of 100,000 items and about 2,000,000 masklets (frames rows
few), fabricated through the store (benchmarks/fabricate_run.py), then `masklet report OUT --no-gallery` in a
child process, whose wall time, CPU time (os.wait4) and peak resident memory (its own VmHWM, which it reports)
are printed, with the health aggregation timed in this process too.

    python benchmarks/bench_report.py [--items 100000] [--masklets 2000000] [--shards 1000] [--quick] [--dir DIR]

`--quick` (2,000 items, 40,000 masklets, 20 shards) runs in seconds; tests/test_report.py runs it. The
target is a peak well under 2 GB at 2 million masklets (the masklets are scanned in batches, never held).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/bench_report.py` finds benchmarks.*

TARGET_PEAK_GB = 2.0


# The child reports its own peak: VmHWM of the memory map it ran in. (os.wait4's ru_maxrss is not that process
# alone: Linux carries the parent's high-water mark across fork and exec, so under pytest, with torch
# loaded in the parent, it read 2.4 GB for a report that peaks at a fifth of that.)
_CHILD = ("import sys\n"
          "from pipeline.cli import main\n"
          "rc = main(sys.argv[1:])\n"
          "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
          "sys.stderr.write(f'\\nVMHWM_KIB {hwm}\\n')\n"
          "sys.exit(rc)\n")


def child_report(out: Path, *extra: str) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS GB) of `masklet report OUT --no-gallery` run as a child process."""
    cmd = [sys.executable, "-c", _CHILD, "report", str(out), "--no-gallery", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out_text, err_text = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err_text.decode()[-2000:]}{out_text.decode()}")
    hwm = [line.split()[1] for line in err_text.decode().splitlines() if line.startswith("VMHWM_KIB ")]
    return wall, usage.ru_utime + usage.ru_stime, int(hwm[-1]) / 1024**2  # KiB -> GiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--masklets", type=int, default=2_000_000)
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2, help="processes writing the fabricated shards (setup)")
    ap.add_argument("--quick", action="store_true", help="2,000 items, 40,000 masklets, 20 shards (a test runs it)")
    ap.add_argument("--dir", default=None, help="where to make the run (default: a temporary folder, removed); "
                                                "a kept, complete run there is reused")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.masklets, args.shards, args.workers = 2_000, 40_000, 20, 1
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bench-report-"))
    try:
        return _run(args, tmp)
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, tmp: Path) -> int:
    from benchmarks.fabricate_run import Spec, fabricate_run
    from pipeline import open_run
    from pipeline.quality.health import run_health

    out = tmp / "run"
    load = os.getloadavg()
    print(f"{args.items:,} items, about {args.masklets:,} masklets, {args.shards:,} shards; {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} at start", flush=True)
    reuse = (out / "run.json").exists() and len(list((out / "meta").glob("shard-*"))) == args.shards
    t0 = time.perf_counter()
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
        fabricate_run(out, Spec(args.items, args.masklets, args.shards, drift=0.1), workers=args.workers)
    print(f"  (setup: fabricated and committed in {time.perf_counter() - t0:.0f} s"
          f"{', reused' if reuse else ''})", flush=True)
    open_run(out).items  # noqa: B018  (builds the items cache, as any earlier reader has: not what is timed)
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    health = run_health(open_run(out))
    t_health = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_health = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    wall, cpu, peak = child_report(out)
    size = (out / "report" / "report.json").stat().st_size
    print(f"  masklets read: {health['run']['masklets']:,}; items: {health['run']['items_committed']:,}")
    print(f"  {'step':<52} {'wall':>9} {'CPU':>9}")
    print(f"  {'health aggregation, in process (run_health)':<52} {t_health:8.2f}s {cpu_health:8.2f}s")
    print(f"  {'masklet report OUT --no-gallery (child, imports incl.)':<52} {wall:8.2f}s {cpu:8.2f}s")
    print(f"  peak RSS of the report process: {peak:.2f} GB (target < {TARGET_PEAK_GB:.0f} GB); "
          f"report.json {size / 1e6:.1f} MB")
    return 0 if peak < TARGET_PEAK_GB else 1


if __name__ == "__main__":
    sys.exit(main())
