"""Figure `healthcheck-docker`: the `docker exec` round trip of our check in a running agent
container, against `docker exec <c> true` in the same container, interleaved."""

from __future__ import annotations

import shutil
import subprocess

from ..harness import (BUSYBOX_IMAGE, Ctx, Row, Stats, health_toml, q, succeeded, timed_run,
                       verdict, wait_for, write_sut)

KEY = "healthcheck-docker"


def start_container(ctx: Ctx) -> str:
    """An agent (job-only, heartbeat 1 s, no broker) as entrypoint in the busybox image, the
    static binaries bind-mounted; removed at the end of the run if the figure fails."""
    d = ctx.work / KEY
    bins = d / "bin"
    bins.mkdir(parents=True)
    for b in (ctx.agent, ctx.healthcheck):
        shutil.copy2(b, bins / b.name)
    write_sut(d, "bench-docker", health_toml("1s", "10s"))
    name = f"{ctx.run_id}-hc"
    ctx.containers.append(name)
    mount = lambda src, dst: f"type=bind,source={src},target={dst},readonly"  # noqa: E731
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--label", ctx.label,
         "--mount", mount(bins, "/labvisor/bin"), "--mount", mount(d / "sut", "/labvisor/sut"),
         "-e", "LABVISOR_CONFIG=/labvisor/sut/bench-docker.toml",
         "--entrypoint", "/labvisor/bin/labvisor-agent", BUSYBOX_IMAGE],
        check=True, stdout=subprocess.DEVNULL)
    return name


def bench(ctx: Ctx) -> list[Row]:
    n = ctx.n(20, 40)  # docker exec is noisy: tens of ms with a spread as wide as the effect
    name = start_container(ctx)
    hc = ["docker", "exec", name, "/labvisor/bin/labvisor-healthcheck"]
    tr = ["docker", "exec", name, "true"]
    wait_for("a healthy verdict inside the container", 30,
             lambda: timed_run(hc)[1] == 0, every=0.2)
    for _ in range(2):  # warm-up
        timed_run(hc)
        timed_run(tr)
    a, b = [], []
    for _ in range(n):
        a.append(succeeded(timed_run(hc), "the healthcheck in the container exited {rc}"))
        b.append(succeeded(timed_run(tr), "`true` in the container exited {rc}"))
    version = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                             capture_output=True, text=True).stdout.strip()
    subprocess.run(["docker", "rm", "-f", "-v", name], stdout=subprocess.DEVNULL)
    ctx.containers.remove(name)
    sa, sb = Stats(a), Stats(b)
    ratio = sa.median / sb.median
    return [Row(
        key=KEY,
        figure="healthcheck through `docker exec`",
        value=sa.fmt("ms", 0, 1000),
        baseline=f"`docker exec <c> true`: {sb.fmt('ms', 0, 1000)}",
        ratio=f"{ratio:.2f}",
        target="ratio ≤ 1.1",
        verdict=verdict(ratio <= 1.1),
        measured=[f"labvisor: {q(hc)}", f"baseline: {q(tr)}",
                  f"container: agent (job-only, heartbeat 1 s, no broker) as entrypoint in "
                  f"{BUSYBOX_IMAGE}, static binaries bind-mounted; Docker {version}"],
        notes=["both go through the docker CLI, dockerd and containerd-shim; the difference "
               "is the exec of the program itself"],
    )]
