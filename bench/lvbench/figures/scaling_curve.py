"""Figure `scaling-curve`: cold start at 10, 50, 100 SUTs (quick: 10, 20) beside the CLI loop at
the same sizes; sizes the cold-start figure measured in the same run are reused there."""

from __future__ import annotations

from ..containers import SUP_MEASURED
from ..harness import Ctx, Row, Stats, verdict
from .cold_start import TIMING, cold_runs

KEY = "scaling-curve"


def bench(ctx: Ctx) -> list[Row]:
    sizes = [10, 20] if ctx.quick else [10, 50, 100]
    reps = {10: 1, 20: 1} if ctx.quick else {10: 2, 50: 2, 100: 1}
    pts = []
    for n in sizes:
        have = len(ctx.cold_cache.get(n, {}).get("cli", []))
        got = cold_runs(ctx, n, max(0, reps[n] - have), api=False, healthy=0)
        pts.append((n, Stats(got["sup"]), Stats(got["cli"])))
    per = [(n, s.median / n * 1000, c.median / n * 1000) for n, s, c in pts]
    # Linear: the per-SUT time at the largest size is within 1.25× of the smallest's.
    grow_s = per[-1][1] / per[0][1]
    grow_c = per[-1][2] / per[0][2]
    ratios = [s.median / c.median for _, s, c in pts]
    value = "; ".join(f"{n}: {s.fmt('s', 2)}" for n, s, _ in pts)
    base = "; ".join(f"{n}: {c.fmt('s', 2)}" for n, _, c in pts)
    linear = grow_s <= 1.25
    return [Row(
        key=KEY, figure=f"cold start at {', '.join(map(str, sizes))} SUTs, until all running",
        value=value, baseline=f"`docker run -d` loop: {base}",
        ratio=" / ".join(f"{r:.2f}" for r in ratios), target="linear, no worse than the loop",
        verdict=verdict(linear and all(r <= 1.0 for r in ratios)),
        measured=[SUP_MEASURED.format(sup=ctx.supervisor, n="N", interval="30s"),
                  "CLI loop as in the cold-start figure", TIMING,
                  "sizes measured in the cold-start figure of the same run (same settings) "
                  "are reused there, topped up to the repetitions below"],
        notes=["per SUT (medians): " + "; ".join(f"{n}: labvisor {a:.0f} ms, CLI {b:.0f} ms"
                                                 for n, a, b in per),
               f"per-SUT time from {sizes[0]} to {sizes[-1]} SUTs: labvisor ×{grow_s:.2f}, "
               f"CLI loop ×{grow_c:.2f} (linear growth keeps it near ×1; "
               f"counted linear up to ×1.25): {'linear' if linear else 'worse than linear'}",
               "repetitions: " + ", ".join(f"{n}: {s.n}" for n, s, _ in pts)
               + ("" if ctx.quick else " (each repetition of 100 SUTs costs about two minutes "
                  "with the loop and the removals, so the full run does one)")],
    )]
