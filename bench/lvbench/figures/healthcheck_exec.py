"""Figure `healthcheck-exec`: wall time and max RSS of one `labvisor-healthcheck --file <fresh
heartbeat>` exec, with the spawn floor (`true` through the same path) interleaved; against
bench/paho_healthcheck.py, which waits for a fresh status on MQTT as the old stack did."""

from __future__ import annotations

import shutil

from ..harness import (GNU_TIME, Ctx, Row, Stats, health_toml, max_rss_kib, q, spawn_wait,
                       start_agent, succeeded, verdict, wait_connected)

KEY = "healthcheck-exec"


def bench(ctx: Ctx) -> list[Row]:
    n = ctx.n(200, 500)  # wall-time samples of the healthcheck and of the floor
    n_rss = ctx.n(20, 50)  # max-RSS samples under GNU time
    n_py = ctx.n(8, 30)  # Python baseline runs (each waits up to one heartbeat, 2 s)
    d = ctx.work / KEY
    name = "bench-hc"
    p, hb, _ = start_agent(ctx, d, name, health_toml("2s", "10s"), broker=ctx.broker)
    wait_connected(hb)
    hc = [str(ctx.healthcheck), "--file", str(hb)]
    floor_argv = [shutil.which("true") or "/bin/true"]
    py = [ctx.python, str(ctx.root / "bench" / "paho_healthcheck.py"), "--sut", name,
          "--port", str(ctx.port), "--timeout", "10"]
    tmp = d / "time.out"
    for _ in range(20):  # warm-up
        spawn_wait(hc)
        spawn_wait(floor_argv)
    hc_t, fl_t, hc_rss, fl_rss, py_t, py_rss = [], [], [], [], [], []
    for i in range(n):
        hc_t.append(succeeded(spawn_wait(hc),
                              "labvisor-healthcheck exited {rc} on a fresh heartbeat"))
        fl_t.append(spawn_wait(floor_argv)[0])
        if i % max(1, n // n_rss) == 0 and len(hc_rss) < n_rss:
            hc_rss.append(max_rss_kib(hc, tmp)[1])
            fl_rss.append(max_rss_kib(floor_argv, tmp)[1])
        if i % max(1, n // n_py) == 0 and len(py_t) < n_py:
            rc, rss, dt = max_rss_kib(py, tmp)
            py_t.append(succeeded((dt, rc), "paho_healthcheck.py exited {rc}"))
            py_rss.append(rss)
    ctx.stop(p)
    a, f, b = Stats(hc_t), Stats(fl_t), Stats(py_t)
    ar, fr, br = (Stats([r / 1024 for r in xs]) for xs in (hc_rss, fl_rss, py_rss))
    return [
        Row(
            key=KEY,
            figure="healthcheck per exec: wall time",
            value=a.fmt("ms", 2, 1000),
            baseline=f"Python MQTT check: {b.fmt('ms', 0, 1000)}",
            ratio=f"{a.median / b.median:.4f}",
            target="≤ 2 ms",
            verdict=verdict(a.median <= 0.002),
            measured=[f"labvisor: {q(hc)} (heartbeat 2 s, written by a running agent), "
                      "started with posix_spawn and reaped with wait4 from the harness",
                      f"baseline: {q(py)} (a live agent publishes every 2 s), under "
                      f"`{GNU_TIME} -f %M`",
                      f"spawn floor: {q(floor_argv)}, same path as labvisor"],
            notes=[f"spawn floor (`{floor_argv[0]}`): {f.fmt('ms', 2, 1000)}; "
                   f"labvisor-healthcheck above the floor: "
                   f"{(a.median - f.median) * 1000:.2f} ms (medians); the Python check "
                   "waits for the next status message, on average half a heartbeat period"],
        ),
        Row(
            key=KEY,
            figure="healthcheck per exec: max RSS",
            value=ar.fmt("MiB", 2),
            baseline=f"Python MQTT check: {br.fmt('MiB', 1)}",
            ratio=f"{ar.median / br.median:.3f}",
            target="≤ 2 MiB",
            verdict=verdict(ar.median <= 2.0),
            measured=[f"`{GNU_TIME} -f %M` (ru_maxrss) around {q(hc)} and around the baseline"],
            notes=[f"floor of the method, `{GNU_TIME} -f %M {floor_argv[0]}`: "
                   f"{fr.fmt('MiB', 2)}: the healthcheck's own peak is at most the figure"],
        ),
    ]
