"""The baseline container and the timed cold-start loops the supervisor figures share.

The baselines' containers run what the supervisor's run: the static agent (job-only, no broker)
with the same healthcheck, from a tools volume the harness fills once per run, before any timing
([`baseline_volumes`]); the SUT file inline in the environment and the heartbeat on a tmpfs, as
the supervisor does for a SUT without `files`. So the loops create and start the same container
as the supervisor: [`sleeper_argv`] as a `docker` command, [`api_body`] as an Engine API body.

Each loop ([`cold_supervisor`], [`cold_cli`], [`cold_api`]) is timed from just before its first
command until the last container's `start` event, and removes its trial's objects after.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from typing import Callable, Optional

from .docker import (DockerEvents, Supervisor, Trial, docker_purge, make_network, sut_health,
                     trial)
from .harness import BUSYBOX_IMAGE, Ctx, q

BASELINE: dict[str, str] = {}
BASELINE_SUT = "sut.toml"
RUN_TMPFS = ("/labvisor/run", "mode=1777,size=1m")

SUP_MEASURED = ("labvisor: {sup} supervise --sut-dir $SCRATCH/.../sut --id $RUN-<trial> "
                "--name-prefix $RUN-<trial>- --extra-label io.labvisor.bench.run=$RUN "
                "--extra-label io.labvisor.bench.trial=$RUN-<trial> --agent-broker none "
                "--broker none --metrics-listen none, on {n} job-only SUT files (`image = "
                "\"labvisor/busybox:local\"`, `[health] interval = \"{interval}\"`)")


def baseline_volumes(ctx: Ctx) -> None:
    """Fills `<run>-bl-tools` (the static agent and healthcheck) once per run, labelled with
    the run label."""
    if BASELINE:
        return
    tools = f"{ctx.run_id}-bl-tools"
    subprocess.run(["docker", "volume", "create", "--label", ctx.label, tools], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["docker", "run", "--rm", "--label", ctx.label, "--network", "none",
                    "-v", f"{tools}:/t", "-v", f"{ctx.bin_dir}:/b:ro",
                    "--entrypoint", "/bin/sh", BUSYBOX_IMAGE, "-c",
                    "cp /b/labvisor-agent /b/labvisor-healthcheck /t/ && "
                    "test -x /t/labvisor-agent"],
                   check=True, stdout=subprocess.DEVNULL)
    BASELINE.update(tools=tools)


def baseline_env(shown: bool = False) -> list[str]:
    """The baseline agent's environment: where its SUT file would be, and its contents."""
    toml = '"$(cat sut.toml)"' if shown else f'image = "{BUSYBOX_IMAGE}"\n{sut_health("30s")}'
    return [f"LABVISOR_CONFIG=/labvisor/sut/{BASELINE_SUT}", f"LABVISOR_CONFIG_TOML={toml}"]


def sleeper_argv(verb: str, name: str, host: str, labels: list[str], net: str,
                 shown: bool = False) -> list[str]:
    """`docker run -d` / `docker create` of the baseline container: the supervisor's settings
    (init, restart unless-stopped, a labelled named volume at /labvisor/data, a labelled bridge
    network, hostname, labels, the agent as entrypoint with the same exec-form healthcheck, the
    binaries from a read-only tools volume, the SUT file inline, a tmpfs for the heartbeat).
    `shown`: as documented (the SUT file as `$(cat sut.toml)`)."""
    argv = ["docker", verb] + (["-d"] if verb == "run" else [])
    argv += ["--name", name, "--hostname", host, "--init", "--restart", "unless-stopped",
             "--network", net]
    vol = f"type=volume,source={name}-data,target=/labvisor/data"
    for lab in labels:
        argv += ["--label", lab]
        vol += f",volume-label={lab}"
    for e in baseline_env(shown):
        argv += ["--env", e]
    return argv + [
        "--mount", vol,
        "--mount", f"type=volume,source={BASELINE.get('tools', '$RUN-bl-tools')},"
                   "target=/labvisor/bin,readonly",
        "--tmpfs", ":".join(RUN_TMPFS),
        "--health-cmd", "/labvisor/bin/labvisor-healthcheck", "--health-interval", "30s",
        "--health-timeout", "1s", "--health-retries", "1",
        "--entrypoint", "/labvisor/bin/labvisor-agent", BUSYBOX_IMAGE]


def shown_argv(ctx: Ctx, verb: str, name: str, host: str, trial_id: str, net: str) -> str:
    """[`sleeper_argv`] as a figure documents it: the SUT file as `$(cat sut.toml)`, names and the
    trial label as given (with `$RUN`)."""
    labels = [ctx.label, f"io.labvisor.bench.trial={trial_id}"]
    return q(sleeper_argv(verb, name, host, labels, net, shown=True))


def sleeper_body(host: str, labels: list[str], net: str, name: str) -> dict:
    """The minimal loop's first version: the same settings with `sleep` as the entrypoint and no
    healthcheck (a diagnostic: what running the agent costs the engine)."""
    lab = dict(x.split("=", 1) for x in labels)
    return {
        "Image": BUSYBOX_IMAGE, "Hostname": host, "Entrypoint": ["/bin/sh"],
        "Cmd": ["-c", "exec sleep 3600"], "Labels": lab,
        "HostConfig": {
            "Init": True, "RestartPolicy": {"Name": "unless-stopped"}, "NetworkMode": net,
            "Mounts": [{"Type": "volume", "Source": f"{name}-data", "Target": "/labvisor/data",
                        "VolumeOptions": {"Labels": lab}}],
        },
    }


def api_body(host: str, labels: list[str], net: str, name: str) -> dict:
    """The baseline container on the Engine API, as [`sleeper_argv`] (healthcheck in exec form,
    as the supervisor sets it)."""
    body = sleeper_body(host, labels, net, name)
    body.update({
        "Entrypoint": ["/labvisor/bin/labvisor-agent"], "Cmd": [],
        "Env": baseline_env(),
        "Healthcheck": {"Test": ["CMD", "/labvisor/bin/labvisor-healthcheck"],
                        "Interval": 30_000_000_000, "Timeout": 1_000_000_000, "Retries": 1},
    })
    body["HostConfig"]["Mounts"] += [
        {"Type": "volume", "Source": BASELINE["tools"], "Target": "/labvisor/bin",
         "ReadOnly": True},
    ]
    body["HostConfig"]["Tmpfs"] = dict([RUN_TMPFS])
    return body


def agent_tar(ctx: Ctx) -> bytes:
    """What the supervisor uploads before the start of a SUT with `files` (a SUT without them
    gets its file inline and nothing is uploaded): the SUT file and a listed file. It goes to
    /labvisor/upload/, beside the baseline's own inline config."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for d in ("labvisor", "labvisor/upload"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        sut = f'image = "{BUSYBOX_IMAGE}"\nfiles = ["sut.yaml"]\n{sut_health("30s")}'
        for name, data in (("sut.toml", sut.encode()), ("sut.yaml", b"device_ip: 10.0.0.1\n")):
            ti = tarfile.TarInfo(f"labvisor/upload/{name}")
            ti.size, ti.mode = len(data), 0o644
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the timed loops


def cold_supervisor(ctx: Ctx, n: int, tag: str, interval: str = "30s",
                    healthy: bool = False) -> tuple[float, Optional[float]]:
    """Supervisor start until all n containers have started (and, if asked, are healthy)."""
    sup = Supervisor(ctx, ctx.work / "cold" / tag, tag)
    names = [f"s{i:03d}" for i in range(n)]
    sup.write(names, sut_health(interval))
    full = {sup.prefix + x for x in names}
    t0 = time.time_ns()
    ev = DockerEvents(sup.trial, t0)
    try:
        sup.start()
        started = ev.until("start", full, 300, sup.check_alive)
        t_healthy = None
        if healthy:
            t_healthy = (ev.until("health_status: healthy", full, 300, sup.check_alive)
                         - t0) / 1e9
        return (started - t0) / 1e9, t_healthy
    finally:
        ev.close()
        sup.stop_and_purge()


def timed_loop(t: Trial, names: set[str], create: Callable[[], None]) -> float:
    """Seconds from just before the trial's network is made and `create` runs until every one of
    `names` has started; the trial's objects are removed after."""
    t0 = time.time_ns()
    ev = DockerEvents(t.label, t0)
    try:
        make_network(t.prefix + "net", t.labels)
        create()
        return (ev.until("start", names, 60) - t0) / 1e9
    finally:
        ev.close()
        docker_purge(t.label)


def cold_cli(ctx: Ctx, n: int, tag: str) -> float:
    """A sequential `docker run -d` loop (network created first), until all n have started."""
    baseline_volumes(ctx)
    t = trial(ctx, tag)

    def create() -> None:
        for i in range(n):
            r = subprocess.run(sleeper_argv("run", f"{t.prefix}s{i:03d}", f"s{i:03d}", t.labels,
                                            t.prefix + "net"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"docker run failed: {r.stderr.strip()}")

    return timed_loop(t, {f"{t.prefix}s{i:03d}" for i in range(n)}, create)


def cold_api(ctx: Ctx, n: int, tag: str, parallelism: int = 6,
             tar: Optional[bytes] = None, sleeper: bool = False,
             patch: Optional[Callable[[dict], None]] = None) -> float:
    """The minimal loop: `bollard_loop` (supervisor/examples/bollard_loop.rs: bollard, as the
    supervisor uses it) creating and starting the containers, at most `parallelism` at a time
    (network created first, volumes created by the mounts). With `tar`, also the archive upload
    the supervisor makes for a SUT with `files`; with `sleeper`, the containers run `sleep`
    without a healthcheck (both diagnostics); `patch` changes each create body in place."""
    baseline_volumes(ctx)
    make_body = sleeper_body if sleeper else api_body
    t = trial(ctx, tag)
    names = [f"{t.prefix}s{i:03d}" for i in range(n)]
    jobs = ctx.work / "cold" / f"{tag}.json"
    jobs.parent.mkdir(parents=True, exist_ok=True)
    bodies = [make_body(f"s{i:03d}", t.labels, t.prefix + "net", name)
              for i, name in enumerate(names)]
    for body in bodies if patch else []:
        patch(body)
    jobs.write_text(json.dumps([{"name": name, "body": body}
                                for name, body in zip(names, bodies)]))
    argv = [str(ctx.bollard_loop), "--jobs", str(jobs), "--parallelism", str(parallelism)]
    if tar is not None:
        tar_file = jobs.with_suffix(".tar")
        tar_file.write_bytes(tar)
        argv += ["--upload", str(tar_file)]

    def create() -> None:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"bollard_loop failed ({r.returncode}): {r.stderr[-2000:]}")

    return timed_loop(t, set(names), create)
