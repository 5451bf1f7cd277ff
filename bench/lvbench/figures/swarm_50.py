"""Figure group `swarm-50` (full run, or `--only swarm-50`): the cold start of 50 SUTs under
`labvisor supervise --runtime swarm` on a simulated 3-node swarm, against a sequential loop of
`POST /services/create` with the same service spec, in the same run.

The driver is `<target dir>/debug/examples/swarm_cold_start`
(supervisor/examples/swarm_cold_start.rs, on the test kit's `labvisor_tests::Swarm`: node
containers on the machine's engine, each running its own Docker Engine 20.10, node1 the manager; the machine's engine never joins a swarm). It runs 3
rounds, labvisor and baseline alternating (L B, B L, L B), and prints one JSON line per trial;
this module turns them into rows. The driver's scope label is on every node container, volume
and network: this module removes them when the driver ends, also when it fails or is stopped.
"""

from __future__ import annotations

import json
import subprocess
from typing import Optional

from ..docker import docker_purge
from ..harness import Ctx, Row, Stats

KEY = "swarm-50"
N = 50
NODES = 3
ROUNDS = 3
INTERVAL = "10s"

MEASURED_L = ("labvisor: {n} job-only SUT files (busybox, `[health] interval = \"{interval}\"`, "
              "retries 1, start period 0 s; unconstrained placement), then `$BIN/labvisor "
              "supervise --runtime swarm --agent-listen <gateway> --boot-bin $BIN/labvisor-boot` "
              "with DOCKER_HOST=tcp://<manager>:2375 and a fresh state directory; timed from its "
              "spawn until each of its {n} services has a task in state `running` (`GET /tasks` on "
              "the manager every 100 ms), and until `labvisor status --json` shows all {n} idle and "
              "healthy; before it, every config and secret on the swarm is removed (the "
              "binaries' configs are made again: a cold start)")
MEASURED_B = ("baseline: {n} copies of one service spec labvisor made (`GET /services/<id>` "
              "after its trial; the SUT's name replaced by the copy's in the service name, "
              "labels, hostname, volume and environment), created one after the other through "
              "bollard (`POST /services/create`, as a script would) with the configs and the "
              "secret labvisor made still present (made once beforehand, as labvisor also makes "
              "them once); timed from just before the first create until each has a `running` "
              "task (same poll)")
TEARDOWN = ("after each trial: every service removed, until the manager lists no task and no "
            "node holds a container, and the SUTs' volumes removed on every node; rounds "
            "alternate the order (L B, B L, L B)")


def driver(ctx: Ctx) -> list:
    # A debug build (tools/bench.sh): it only drives and polls, and a release build's link
    # would add minutes.
    return [ctx.bin_dir.parent.parent / "debug" / "examples" / "swarm_cold_start",
            "--supervisor", ctx.supervisor, "--agent-bin", ctx.agent,
            "--healthcheck-bin", ctx.healthcheck, "--boot-bin", ctx.bin_dir / "labvisor-boot",
            "--n", str(N), "--rounds", str(ROUNDS), "--nodes", str(NODES),
            "--interval", INTERVAL]


def run_driver(ctx: Ctx) -> list[dict]:
    """Runs the driver; its JSON lines. Removes its Docker objects on the machine's engine when
    it ends, however it ends."""
    argv = driver(ctx)
    p = ctx.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    scope: Optional[str] = None
    lines: list[dict] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            v = json.loads(line)
            if "scope" in v:
                scope = v["scope"]
            lines.append(v)
            print(f"bench: {KEY}: {line.strip()}", flush=True)
        rc = p.wait()
        if rc != 0:
            raise RuntimeError(f"swarm_cold_start exited with {rc} (its panic is above)")
    finally:
        ctx.stop(p)
        if scope:
            docker_purge(scope)
    return lines


def bench(ctx: Ctx) -> list[Row]:
    lines = run_driver(ctx)
    lab = [v for v in lines if v.get("kind") == "labvisor"]
    base = [v for v in lines if v.get("kind") == "baseline"]
    swarm = next((v["swarm"] for v in lines if "swarm" in v), {})
    if not lab or not base:
        raise RuntimeError("swarm_cold_start reported no trial")
    lr = Stats([v["running_s"] for v in lab])
    short = [v for v in lab if v["healthy_s"] is None]
    lh = Stats([v["healthy_s"] for v in lab if v["healthy_s"] is not None] or [float("nan")])
    br = Stats([v["running_s"] for v in base])
    bc = Stats([v["created_s"] for v in base])
    cpu_r = Stats([v["cpu_running_s"] for v in lab])
    cpu_h = Stats([v["cpu_healthy_s"] for v in lab])
    rss = Stats([v["rss_peak_kib"] / 1024 for v in lab])
    by_round = {v["round"]: v for v in base}
    per_round = "; ".join(
        f"round {v['round']}: labvisor {v['running_s']:.1f} s, loop "
        f"{by_round[v['round']]['running_s']:.1f} s, "
        f"{v['running_s'] / by_round[v['round']]['running_s']:.2f}"
        for v in lab if v["round"] in by_round)
    measured = [MEASURED_L.format(n=N, interval=INTERVAL), MEASURED_B.format(n=N), TEARDOWN]
    sim = (f"the simulated swarm: {NODES} node containers (labvisor/swarm-node:local, Debian's "
           f"docker.io, Engine 20.10) on one machine's engine, sharing its CPUs; swarm ready "
           f"in {swarm.get('ready_s', 0):.1f} s, with the busybox image loaded on every node "
           f"after {swarm.get('with_image_s', 0):.1f} s (not timed); no network latency "
           f"between hosts, no image pull")
    return [
        Row(key=KEY, figure=f"cold start of {N} SUTs on a {NODES}-node simulated swarm, "
                            "until all running",
            value=lr.fmt("s", 1),
            baseline=f"`POST /services/create` loop of the same spec: {br.fmt('s', 1)}",
            ratio=f"{lr.median / br.median:.2f}", target="-", verdict="-",
            measured=measured,
            notes=[f"per round (labvisor, loop, ratio): {per_round}",
                   f"the loop's {N} creates alone took {bc.fmt('s', 1)}; the rest is Swarm "
                   "scheduling and the nodes starting the tasks",
                   sim]),
        Row(key=KEY, figure=f"cold start of {N} SUTs on a {NODES}-node simulated swarm, "
                            "until all idle and healthy (`labvisor status`)",
            value=lh.fmt("s", 1), baseline="none (the loop has no status)", ratio="-",
            target="-", verdict="-",
            notes=[f"not all idle and healthy within the driver's limit (240 s) in round(s) "
                   f"{', '.join(str(v['round']) for v in short)}: "
                   f"{', '.join(str(v['healthy_count']) for v in short)} of {N}"] * bool(short)
            + [f"healthy {lh.median - lr.median:.1f} s after all running (medians); "
                   f"Docker's first probe waits one interval ({INTERVAL}), and the status comes "
                   "over MQTT from agents on every node through the managed broker on the "
                   "swarm network's gateway"]),
        Row(key=KEY, figure=f"the supervisor during that cold start ({N} SUTs, swarm)",
            value=f"CPU {cpu_h.fmt('s', 2)} until all healthy; peak RSS {rss.fmt('MiB', 1)}",
            baseline="-", ratio="-", target="-", verdict="-",
            notes=[f"CPU until all running: {cpu_r.fmt('s', 2)}; utime + stime of the "
                   "supervisor process (not its managed mosquitto) from /proc/<pid>/stat, "
                   "peak RSS its VmHWM, read when all were healthy"]),
    ]
