"""The command line (`bench/run.py`, run by tools/bench.sh) and the run: every figure asked for,
in `FIGURES` order (those in `FULL_ONLY` are left out of a quick run unless named with `--only`);
a figure whose harness fails is reported as an error row (or, for a group, its rows with the
failed ones marked) and the others go on; the results section of BENCHMARKS.md is rewritten
only by a complete, unrestricted run."""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
import traceback

from .figures import FIGURES, FULL_ONLY
from .harness import Ctx, FigureError, Row
from .report import (loadavg, machine, print_report, print_rows, results_section, rewrite)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="labvisor benchmarks (run via tools/bench.sh)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", choices=sorted(FIGURES),
                    help="run only these figures (repeatable); BENCHMARKS.md is left alone")
    ap.add_argument("--scale-n", type=positive, default=500,
                    help="SUTs of the scale-500 group (default 500); the group reports the "
                         "largest count it reached when the machine cannot hold them all")
    ap.add_argument("--scale-mem-floor", type=float, metavar="MIB",
                    help="the scale-500 group stops adding SUTs when MemAvailable falls below "
                         "this (default: 1 GiB or 5%% of memory, whichever is more)")
    ap.add_argument("--root", required=True)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--python", required=True, help="Python with paho-mqtt, for the baselines")
    ap.add_argument("--broker-port", type=int, required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--note", default="", help="a line added to the results section")
    return ap.parse_args()


def positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{s} is not a positive count")
    return n


def run_figures(ctx: Ctx, only: list[str] | None) -> tuple[list[Row], list[str]]:
    """Measures the figures asked for: their rows, and the keys of those that failed."""
    rows: list[Row] = []
    failed = []
    for key, f in FIGURES.items():
        if only and key not in only:
            continue
        if not only and ctx.quick and key in FULL_ONLY:
            print(f"bench: {key} runs in the full run only (or with --only {key})", flush=True)
            continue
        t = time.monotonic()
        print(f"bench: {key} ...", flush=True)
        try:
            got = f(ctx)
        except FigureError as e:  # a group: what it measured, the failed figures marked
            traceback.print_exc()
            failed.append(key)
            got = e.rows
        except Exception as e:  # the harness failed: report it, go on with the others
            traceback.print_exc()
            failed.append(key)
            got = [Row(key=key, figure=key, value="error", baseline="-", ratio="-",
                       target="-", verdict="error", notes=[f"harness error: {e}"])]
        rows += got
        print_rows(got)
        print(f"bench: {key} took {time.monotonic() - t:.0f}s", flush=True)
    return rows, failed


def main() -> int:
    a = parse_args()
    ctx = Ctx(a)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = loadavg()
    t0 = time.monotonic()
    m = machine(ctx)
    print(f"bench: {'quick' if ctx.quick else 'full'} run {ctx.run_id}, broker {ctx.broker}, "
          f"load {load0:.2f}", flush=True)
    try:
        rows, failed = run_figures(ctx, a.only)
    finally:
        ctx.cleanup()
    took = time.monotonic() - t0
    load1 = loadavg()
    print_report(ctx, rows, took, (load0, load1))
    if failed:
        print(f"bench: could not measure {', '.join(failed)}; BENCHMARKS.md left alone",
              file=sys.stderr)
        return 1
    if a.only or a.no_write:
        return 0
    rewrite(ctx.root / "BENCHMARKS.md",
            results_section(ctx, rows, m, started, (load0, load1), took, a.note))
    print("bench: BENCHMARKS.md rewritten")
    return 0
