"""One module per figure of BENCHMARKS.md, each with its `--only` name (`KEY`) and
`bench(ctx) -> list[Row]`, which measures labvisor and its baseline in the same run.

`FIGURES` is the run order: cold-start comes before scaling-curve, which reuses its sizes. Those
in `FULL_ONLY` are left out of a quick run unless named with `--only`.
"""

from __future__ import annotations

from typing import Callable

from ..harness import Ctx, Row
from . import (agent_idle_rss, broker_1000, cold_start, healthcheck_docker, healthcheck_exec,
               hot_add, job_dispatch, output_throughput, scale_500, scaling_curve,
               supervisor_footprint, swarm_50)

FIGURES: dict[str, Callable[[Ctx], list[Row]]] = {
    m.KEY: m.bench
    for m in (output_throughput, agent_idle_rss, healthcheck_exec, healthcheck_docker,
              job_dispatch, cold_start, hot_add, supervisor_footprint, scaling_curve, scale_500,
              broker_1000, swarm_50)
}

# The 500-SUT, broker-load and swarm groups take minutes: the quick run keeps its time.
FULL_ONLY = {scale_500.KEY, broker_1000.KEY, swarm_50.KEY}
