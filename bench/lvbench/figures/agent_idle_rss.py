"""Figure `agent-idle-rss`: resident memory of an idle labvisor-agent (device process `sleep`,
heartbeats every 2 s, broker connected) against bench/paho_heartbeat.py doing the same; both
after settling."""

from __future__ import annotations

import platform
import subprocess
import time

from ..harness import (Ctx, Row, Stats, health_toml, proc_status, q, start_agent, verdict,
                       wait_connected, wait_for)

KEY = "agent-idle-rss"
SETTLE = 5.0


def start_pair(ctx: Ctx, i: int) -> tuple:
    """The agent and the Python baseline, side by side: (agent, its heartbeat, its argv,
    Python, its heartbeat, its argv)."""
    d = ctx.work / KEY / f"labvisor-{i}"
    body = 'command = ["sleep", "3600"]\n' + health_toml("2s", "10s")
    p, hb, argv = start_agent(ctx, d, f"bench-idle-{i}", body, broker=ctx.broker)
    dp = ctx.work / KEY / f"python-{i}"
    dp.mkdir(parents=True)
    pargv = [ctx.python, ctx.root / "bench" / "paho_heartbeat.py", "--sut", f"bench-idle-py-{i}",
             "--port", ctx.port, "--interval", "2", "--heartbeat-file", dp / "run" / "heartbeat",
             "--log-file", dp / "data" / "log" / "out.log", "--child", "sleep", "3600"]
    pp = ctx.spawn(pargv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=open(dp / "stderr", "ab"))
    return p, hb, argv, pp, dp / "run" / "heartbeat", pargv


def bench(ctx: Ctx) -> list[Row]:
    runs = ctx.n(2, 5)
    pairs = [start_pair(ctx, i) for i in range(runs)]
    time.sleep(SETTLE)
    a, b, detail = [], [], []
    for p, hb, argv, pp, phb, pargv in pairs:
        wait_connected(hb)
        wait_for("the Python heartbeat with the broker connected", 15,
                 lambda: '"broker_connected": true' in (phb.read_text() if phb.exists() else ""))
        if p.poll() is not None or pp.poll() is not None:
            raise RuntimeError("an idle process exited early")
        sa, sb = proc_status(p.pid), proc_status(pp.pid)
        a.append(sa["VmRSS"] / 1024)
        b.append(sb["VmRSS"] / 1024)
        detail.append((sa, sb))
    for p, _, _, pp, _, _ in pairs:
        ctx.stop(p)
        ctx.stop(pp)
    sa, sb = Stats(a), Stats(b)
    ratio = sa.median / sb.median
    paho_version = subprocess.run(
        [ctx.python, "-c", "import paho.mqtt; print(paho.mqtt.__version__)"],
        capture_output=True, text=True).stdout.strip()
    anon = Stats([x[0]["RssAnon"] / 1024 for x in detail])
    filed = Stats([x[0]["RssFile"] / 1024 for x in detail])
    return [Row(
        key=KEY,
        figure="agent idle RSS (broker connected, heartbeat 2 s)",
        value=sa.fmt("MiB", 1),
        baseline=f"paho-mqtt {paho_version}: {sb.fmt('MiB', 1)}",
        ratio=f"{ratio:.2f}",
        target="≤ 5 MiB, ≈ 1/4 of Python",
        verdict=verdict(sa.median <= 5.0 and ratio <= 0.3),
        measured=[
            f"labvisor: {q(pairs[0][2])} with `command = [\"sleep\", \"3600\"]`, VmRSS of the "
            f"agent's pid (the child excluded) after {SETTLE:.0f} s",
            f"baseline: {q(pairs[0][5])}, VmRSS of the Python pid after {SETTLE:.0f} s",
        ],
        notes=[
            f"agent RSS split: anonymous {anon.fmt('MiB', 1)}, file-backed (its own static "
            f"binary's pages) {filed.fmt('MiB', 1)}; threads {detail[0][0].get('Threads')}",
            f"Python {platform.python_version()}, threads {detail[0][1].get('Threads')}",
        ],
    )]
