"""Figure `supervisor-footprint`: supervisor VmRSS and CPU over 20 s idle with 100 SUTs running
(quick: 20 SUTs, 10 s)."""

from __future__ import annotations

import time

from ..containers import SUP_MEASURED
from ..docker import DockerEvents, Supervisor, sut_health
from ..harness import Ctx, Row, Stats, proc_cpu_seconds, proc_status, verdict

KEY = "supervisor-footprint"


def bench(ctx: Ctx) -> list[Row]:
    n = ctx.n(20, 100)
    window = ctx.n(10.0, 20.0)
    sup = Supervisor(ctx, ctx.work / KEY, "fp")
    names = [f"s{i:03d}" for i in range(n)]
    sup.write(names, sut_health("10s"))  # the default probe interval
    full = {sup.prefix + x for x in names}
    ev = DockerEvents(sup.trial, time.time_ns())
    try:
        sup.start()
        ev.until("start", full, 600, sup.check_alive)
        # Idle means after the first probes: each container's turn to healthy is a change
        # the supervisor acts on (a pass, a status), the probes after it are not.
        ev.until("health_status: healthy", full, 120, sup.check_alive)
        time.sleep(ctx.n(2.0, 5.0))  # settle: the last events, a rescan
        assert sup.p is not None
        pid = sup.p.pid
        c0, w0 = proc_cpu_seconds(pid), time.monotonic()
        samples = []
        while time.monotonic() - w0 < window:
            samples.append(proc_status(pid)["VmRSS"] / 1024)
            time.sleep(1.0)
        c1, w1 = proc_cpu_seconds(pid), time.monotonic()
        sup.check_alive()
        st = proc_status(pid)
    finally:
        ev.close()
        sup.stop_and_purge()
    rss = Stats(samples)
    cpu = (c1 - c0) / (w1 - w0) * 100
    hwm = st["VmHWM"] / 1024
    return [Row(
        key=KEY, figure=f"supervisor RSS and CPU at {n} idle SUTs",
        value=f"{rss.median:.1f} MiB RSS (peak {hwm:.1f}), {cpu:.2f}% CPU",
        baseline="none", ratio="-", target="≤ 30 MiB, ≈ 0% CPU idle",
        verdict=verdict(rss.median <= 30 and cpu <= 1.0),
        measured=[SUP_MEASURED.format(sup=ctx.supervisor, n=n, interval="10s"),
                  f"after all {n} containers had started and turned healthy (first probe 10 s "
                  f"after the start; then {n // 10} probes a second in all, each a Docker event), "
                  f"and {ctx.n(2, 5)} s more: VmRSS sampled every "
                  f"second for {window:.0f} s, CPU = (utime+stime from /proc/<pid>/stat) over "
                  "the window, VmHWM at its end"],
        notes=[f"RSS over the window: {rss.fmt('MiB', 1)}; RssAnon {st['RssAnon'] / 1024:.1f} "
               f"MiB, RssFile {st['RssFile'] / 1024:.1f} MiB, threads {st['Threads']}",
               "the verdict is on the idle RSS and CPU; the peak (VmHWM) is reached while the "
               "containers are created, six at a time",
               "\"≈ 0%\" counted as ≤ 1% of one CPU; the 30 s resync may or may not fall "
               "in the window"],
    )]
