"""Figure group `scale-500` (full run only, or `--only scale-500`; `--scale-n N` sets the size):
one lab of N job-only SUTs under `labvisor supervise`, its agents on the group's own mosquitto
(lvbench.lab.LabBroker), measured in this order while it runs:

1. cold start until all running (the supervisor started on N files), then until all healthy;
2. idle, over 60 s: CPU of dockerd, containerd, the shims, the agents, the broker and the
   supervisor; the supervisor's RSS; the broker's CPU and its PUBLISH rate in and out;
3. memory per idle SUT (shim, docker-init, agent) from /proc/<pid>/smaps_rollup;
4. `labvisor status` against the broker, with the lab's real retained topics;
5. hot add of one more SUT with N running, against raw create+start (the hot-add method);
6. one agent SIGSTOPped: time until the supervisor acts on its container;
7. the Python baseline of memory: `bench/paho_heartbeat.py` in K containers of the same shape;

then, with the lab removed, the minimal bollard loop at the count the lab reached, at the
supervisor's parallelism, creating the same container. One repetition of each at this size.

When the machine cannot hold N (memory below a floor, no container started for a while, the
deadline), the harness stops adding: the SUT files not yet started are taken out, and every
figure is measured at the count reached, with what stopped it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import traceback
from pathlib import Path
from typing import Callable

from ..containers import baseline_volumes, cold_api
from ..docker import DockerEvents, Supervisor, docker_purge, make_network, trial
from ..harness import BUSYBOX_IMAGE, Ctx, FigureError, Row, clean_env, proc_status, wait_for
from ..lab import (LabBroker, SutProcs, comm, cpu_sum, inspect, mem_available_mib, memory,
                   pids_named, sut_procs)
from . import hot_add, scale_rows
from .scale_rows import MAX_AGE

KEY = "scale-500"
SUT_FILE = f'image = "{BUSYBOX_IMAGE}"\n'  # job-only; every health setting at its default
STALL = 90.0  # seconds without a new container start before the harness stops adding
PY_IMAGE = "labvisor/tf-style:local"
PY_COUNT = 20


def features(ctx: Ctx) -> dict:
    """What this supervisor has, from its `--help` (the harness runs before and after the
    flags of issue 16 exist): auto health interval, several networks, `status --problems`."""
    def helptext(*argv: str) -> str:
        return subprocess.run([str(ctx.supervisor), *argv, "--help"], capture_output=True,
                              text=True).stdout

    sup, status = helptext("supervise"), helptext("status")

    def default(flag: str) -> str:
        """The `[default: X]` in the flag's own help block (up to the next option)."""
        m = re.search(r"^\s+" + re.escape(flag) + r"\b(.*?)(?=^\s+-|\Z)", sup, re.M | re.S)
        d = re.search(r"\[default: ([^\]]+)\]", m.group(1)) if m else None
        return d.group(1) if d else ""

    return {"healthcheck_rate": default("--healthcheck-rate") if "--healthcheck-rate" in sup
            else None,
            "network_capacity": default("--network-capacity") if "--network-capacity" in sup
            else None,
            "problems": "--problems" in status,
            "parallelism": int(default("--parallelism") or 6),
            "driver": subprocess.run(["docker", "info", "--format", "{{.Driver}}"],
                                     capture_output=True, text=True).stdout.strip()}


def mem_floor_mib(ctx: Ctx) -> float:
    """MemAvailable below which the lab stops adding SUTs (`--scale-mem-floor`, else 1 GiB or
    5% of memory, whichever is more)."""
    if ctx.scale_mem_floor is not None:
        return ctx.scale_mem_floor
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) / 1024
    return max(1024.0, 0.05 * total)


class Lab:
    """The supervisor's lab: what it reached, and when."""

    def __init__(self, ctx: Ctx, broker: LabBroker, n: int):
        self.ctx, self.asked = ctx, n
        self.sup = Supervisor(ctx, ctx.work / KEY / "lab", "sc",
                              mqtt=(broker.local, broker.agents))
        self.sut = [f"s{i:03d}" for i in range(n)]
        self.t0 = time.time_ns()
        self.ev = DockerEvents(self.sup.trial, self.t0)
        self.names: list[str] = []  # the containers that run
        self.running_s = 0.0
        self.stopped = ""  # why fewer than asked
        self.min_avail = float("nan")  # lowest MemAvailable during the start, MiB
        self.first_create_s: float | None = None  # the supervisor's first container create

    def start(self) -> None:
        """Starts the supervisor on N files; waits until all have started, or stops adding."""
        self.sup.write(self.sut, "")  # it writes the `image` line
        full = [self.sup.prefix + x for x in self.sut]
        floor = mem_floor_mib(self.ctx)
        self.t0 = time.time_ns()
        self.sup.start()
        deadline = time.monotonic() + 120 + 2.0 * self.asked
        count, progress, low = 0, time.monotonic(), float("inf")
        while True:
            started = self.ev.first("start")
            got = [x for x in full if x in started]
            now, avail = time.monotonic(), mem_available_mib()
            low = min(low, avail)
            if len(got) == self.asked:
                break
            self.sup.check_alive()
            if len(got) > count:
                count, progress = len(got), now
            if avail < floor:
                self.stopped = (f"memory: MemAvailable fell to {avail:.0f} MiB (floor "
                                f"{floor:.0f} MiB) with {len(got)} started")
            elif now - progress > STALL:
                self.stopped = f"no container started for {STALL:.0f} s"
            elif now > deadline:
                self.stopped = f"not all started within {120 + 2.0 * self.asked:.0f} s"
            if self.stopped:
                break
            time.sleep(1.0)
        if self.stopped:
            self.hold(set(got))
            got = [x for x in got if x in set(self.live())]
        self.names = got
        self.min_avail = low
        created = [t for x, t in self.ev.first("create").items() if x in set(full)]
        self.first_create_s = (min(created) - self.t0) / 1e9 if created else None
        self.running_s = (max(started[x] for x in got) - self.t0) / 1e9 if got else 0.0
        if not got:
            raise RuntimeError(f"no SUT container started: {self.stopped}")

    def live(self) -> list[str]:
        return subprocess.run(["docker", "ps", "--filter", f"label={self.sup.trial}",
                               "--filter", "status=running", "--format", "{{.Names}}"],
                              capture_output=True, text=True).stdout.split()

    def hold(self, started: set[str]) -> None:
        """Stops adding: the files of SUTs not started leave the directory; waits until the
        supervisor has removed their containers."""
        held = self.sup.d / "held"
        held.mkdir(exist_ok=True)
        for x in self.sut:
            if self.sup.prefix + x not in started:
                os.rename(self.sup.sut_dir / f"{x}.toml", held / f"{x}.toml")
        tail = (self.sup.d / "supervisor.stderr").read_text(errors="replace").splitlines()[-3:]
        if tail:
            self.stopped += "; the supervisor's last log lines: " + " / ".join(tail)

        def settled() -> bool:
            self.sup.check_alive()
            left = subprocess.run(["docker", "ps", "-a", "--filter", f"label={self.sup.trial}",
                                   "--format", "{{.Names}}"], capture_output=True,
                                  text=True).stdout.split()
            return set(left) <= started

        wait_for("the supervisor to remove the SUTs not started", 300, settled, every=2.0)

    def healthcheck(self) -> dict:
        """The Docker health settings the supervisor gave the containers (seconds)."""
        hc = json.loads(inspect(self.names[:1], "{{json .Config.Healthcheck}}")[0])
        return {"raw": hc, "interval": hc.get("Interval", 0) / 1e9,
                "timeout": hc.get("Timeout", 0) / 1e9, "retries": hc.get("Retries", 0),
                "start_period": hc.get("StartPeriod", 0) / 1e9}


# ---------------------------------------------------------------------------------------------
# the measurements


def background(window: float) -> dict:
    """dockerd's and containerd's CPU (% of one core) before the lab, over `window` seconds:
    what the rest of the machine makes them do (other engineers' containers)."""
    groups = {k: pids_named(k) for k in ("dockerd", "containerd")}
    c0 = {k: cpu_sum(v) for k, v in groups.items()}
    time.sleep(window)
    c1 = {k: cpu_sum(v) for k, v in groups.items()}
    return {k: sum(c1[k].get(p, c) - c for p, c in c0[k].items()) / window * 100 for k in c0}


def healthy(lab: Lab, hc: dict) -> dict:
    """Until every container of the lab has had `health_status: healthy` (or the deadline: one
    interval and two minutes after all were running)."""
    names = set(lab.names)
    limit = hc["interval"] + 120
    try:
        t = lab.ev.until("health_status: healthy", names, limit, lab.sup.check_alive)
        return {"s": (t - lab.t0) / 1e9, "count": len(names)}
    except RuntimeError:
        got = lab.ev.first("health_status: healthy")
        return {"s": None, "count": len([x for x in names if x in got]), "limit": limit}


def idle(ctx: Ctx, lab: Lab, broker: LabBroker, window: float) -> dict:
    """CPU of every process of the lab over `window` seconds, idle; the supervisor's RSS
    sampled every second; the broker's PUBLISH rate in and out."""
    time.sleep(5.0)  # settle: the last health events, a pass
    procs = sut_procs(lab.names)
    assert lab.sup.p is not None
    groups = {"dockerd": pids_named("dockerd"), "containerd": pids_named("containerd"),
              "shims": [sp.shim for sp in procs], "agents": [p for sp in procs
                                                             for p in [sp.init] + sp.inside],
              "broker": [broker.p.pid], "supervisor": [lab.sup.p.pid]}
    c0 = {k: cpu_sum(v) for k, v in groups.items()}
    m0, w0 = broker.mark(), time.monotonic()
    rss = []
    while time.monotonic() - w0 < window:
        rss.append(proc_status(lab.sup.p.pid)["VmRSS"] / 1024)
        time.sleep(1.0)
    c1 = {k: cpu_sum(v) for k, v in groups.items()}
    m1, w1 = broker.mark(), time.monotonic()
    lab.sup.check_alive()
    dt = w1 - w0
    cpu = {k: sum(c1[k].get(p, c) - c for p, c in c0[k].items()) / dt * 100 for k in c0}
    st = proc_status(lab.sup.p.pid)
    return {"cpu": cpu, "window": dt, "rss": rss, "status": st, "rates": broker.rates(m0, m1),
            "count": broker.count_in(10.0), "procs": len(procs),
            "shims": len(set(groups["shims"])), "agents": len(groups["agents"])}


def status(ctx: Ctx, broker: LabBroker, lab: Lab, problems: bool) -> dict:
    """Wall time of `labvisor status` (and `--json`, counting the SUTs it shows; and
    `--problems` where it exists), 5 times each, interleaved."""
    env = clean_env("LABVISOR_BROKER", "LABVISOR_MQTT_USERNAME", "LABVISOR_MQTT_PASSWORD",
                    "LABVISOR_TOPIC_PREFIX")
    env["LABVISOR_STATE_DIR"] = str(ctx.work / KEY / "no-state")  # no managed-broker login
    base = [str(ctx.supervisor), "status", "--broker", broker.local]
    variants = {"plain": base, "json": base + ["--json"]}
    if problems:
        variants["problems"] = base + ["--problems"]
    times: dict[str, list[float]] = {k: [] for k in variants}
    shown = 0
    for _ in range(ctx.n(3, 5)):
        for k, argv in variants.items():
            t0 = time.perf_counter()
            r = subprocess.run(argv, capture_output=True, text=True, env=env)
            times[k].append(time.perf_counter() - t0)
            if r.returncode not in (0, 1):
                raise RuntimeError(f"labvisor status exited {r.returncode}: {r.stderr[-500:]}")
            if k == "json":
                shown = count_suts(json.loads(r.stdout), lab.sup.prefix)
    return {"times": times, "shown": shown, "argv": base}


def count_suts(js, prefix: str) -> int:
    """SUT rows in `labvisor status --json` (a list of rows, or an object holding one)."""
    rows = js if isinstance(js, list) else next(
        (v for v in js.values() if isinstance(v, list) and v and "sut" in v[0]), [])
    return len([r for r in rows if isinstance(r, dict) and "sut" in r])


def hot(ctx: Ctx, lab: Lab, trials: int) -> dict:
    """The hot-add figure's trials with the lab running: a SUT file renamed in, then raw
    `docker create` + `docker start`, interleaved."""
    baseline_volumes(ctx)
    sup = lab.sup
    (sup.d / "stage").mkdir(exist_ok=True)
    net = sup.prefix + "rawnet"
    make_network(net, sup.labels)
    a, b, cli = [], [], []
    for i in range(trials + 1):  # the first pair is a warm-up
        ta, tb, t_cli = hot_add.trial_pair(sup, lab.ev, i, SUT_FILE, net)
        if i > 0:
            a.append(ta)
            b.append(tb)
            cli.append(t_cli)
        time.sleep(0.5)
    return {"a": a, "b": b, "cli": cli}


def hang(lab: Lab, hc: dict) -> dict:
    """SIGSTOPs one agent; seconds until Docker calls its container unhealthy, until the
    supervisor acts on it (its first kill, die, stop or destroy) and until it is started again."""
    name = lab.names[0]
    sp: SutProcs = sut_procs([name])[0]
    agent = next(p for p in sp.inside if comm(p) == "labvisor-agent")
    t0 = time.time_ns()
    os.kill(agent, signal.SIGSTOP)
    limit = MAX_AGE + (hc["interval"] + hc["timeout"]) * max(1, hc["retries"]) + 90

    def restarted() -> bool:
        lab.sup.check_alive()
        return any(a == "start" for _, a in lab.ev.after(name, t0))

    try:
        wait_for(f"{name} to be restarted", limit, restarted, every=0.5)
    except RuntimeError:
        if comm(agent) == "labvisor-agent":
            os.kill(agent, signal.SIGCONT)
        raise
    evs = [(t, a) for t, a in lab.ev.after(name, t0) if not a.startswith("exec_")]

    def first(*acts: str):
        return next(((t - t0) / 1e9 for t, a in evs if a in acts), None)

    return {"unhealthy": first("health_status: unhealthy"),
            "acted": first("kill", "die", "stop", "destroy"), "restarted": first("start"),
            "events": [a for _, a in evs], "limit": limit, "sut": name}


def python_baseline(ctx: Ctx, broker: LabBroker, k: int) -> dict:
    """`bench/paho_heartbeat.py` (heartbeat 5 s, the agent's default; no child, as the job-only
    agents) in `k` containers of the lab's shape (init, restart policy, a labelled volume at
    /labvisor/data, a tmpfs at /labvisor/run, a bridge network of their own) on
    labvisor/tf-style:local, paho-mqtt bind-mounted read-only from the bench venv; once all are
    connected and 10 s more, memory as for the lab."""
    import paho  # the venv's: pure Python, so the image's python3 can import it

    t = trial(ctx, "py")
    make_network(t.prefix + "net", t.labels)
    names = [f"{t.prefix}p{i:03d}" for i in range(k)]
    argv0 = py_argv(ctx, t.labels, t.prefix + "net", Path(paho.__file__).parent, broker)
    try:
        for i, name in enumerate(names):
            argv = argv0(name, f"p{i:03d}")
            r = subprocess.run(argv, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"docker run of the Python baseline failed: {r.stderr}")

        seen: set[str] = set()

        def connected() -> bool:
            for name in set(names) - seen:
                r = subprocess.run(["docker", "exec", name, "cat", "/labvisor/run/heartbeat"],
                                   capture_output=True, text=True)
                if '"broker_connected": true' in r.stdout:
                    seen.add(name)
            return len(seen) == len(names)

        try:
            wait_for("the Python baselines connected", 120, connected, every=1.0)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {len(names) - len(seen)} of {len(names)} not connected; "
                               + py_diagnosis(sorted(set(names) - seen)[:2])) from None
        time.sleep(10.0)
        procs = sut_procs(names)
        return {"mem": memory(procs), "count": len(procs), "argv": argv0("$NAME", "pNNN")}
    finally:
        docker_purge(t.label)


def py_diagnosis(names: list[str]) -> str:
    """What a Python baseline container that did not connect shows: its state, heartbeat and
    last log lines."""
    out = []
    for name in names:
        def run(*argv: str) -> str:
            r = subprocess.run(argv, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().replace("\n", " | ")[-400:]
        out.append(f"{name}: state {run('docker', 'inspect', '-f', '{{.State.Status}} exit {{.State.ExitCode}}', name)}; "
                   f"heartbeat {run('docker', 'exec', name, 'cat', '/labvisor/run/heartbeat')}; "
                   f"logs {run('docker', 'logs', '--tail', '5', name)}")
    return "; ".join(out)


def py_argv(ctx: Ctx, labels: list[str], net: str, paho_dir: Path,
            broker: LabBroker) -> Callable[[str, str], list[str]]:
    def argv(name: str, host: str) -> list[str]:
        out = ["docker", "run", "-d", "--name", name, "--hostname", host, "--init",
               "--restart", "unless-stopped", "--network", net]
        vol = f"type=volume,source={name}-data,target=/labvisor/data"
        for lab in labels:
            out += ["--label", lab]
            vol += f",volume-label={lab}"
        return out + [
            "--mount", vol, "--tmpfs", "/labvisor/run:mode=1777,size=1m",
            "--mount", f"type=bind,source={paho_dir},target=/opt/bench/site/paho,readonly",
            "--mount", f"type=bind,source={ctx.root / 'bench' / 'paho_heartbeat.py'},"
                       "target=/opt/bench/paho_heartbeat.py,readonly",
            "--env", "PYTHONPATH=/opt/bench/site", "--env", "PYTHONDONTWRITEBYTECODE=1",
            "--entrypoint", "python3", PY_IMAGE, "/opt/bench/paho_heartbeat.py",
            "--sut", host, "--host", broker.gateway, "--port", str(broker.port),
            "--interval", "5", "--heartbeat-file", "/labvisor/run/heartbeat",
            "--log-file", "/labvisor/data/log/out.log"]
    return argv


def api_loop(ctx: Ctx, lab: Lab, broker: LabBroker, hc: dict, parallelism: int) -> float:
    """The minimal bollard loop at the count the lab reached, creating the lab's container: the
    cold-start baseline's body with the lab's SUT file, its own SUT name, the agents' broker and
    the health settings the supervisor gave (from `docker inspect`)."""
    def patch(body: dict) -> None:
        host = body["Hostname"]
        body["Env"] = [f"LABVISOR_CONFIG=/labvisor/sut/{host}.toml",
                       f"LABVISOR_CONFIG_TOML={SUT_FILE}", f"LABVISOR_BROKER={broker.agents}"]
        body["Healthcheck"] = hc["raw"]

    return cold_api(ctx, len(lab.names), "sca", parallelism=parallelism, patch=patch)


# ---------------------------------------------------------------------------------------------
# the group


def bench(ctx: Ctx) -> list[Row]:
    feats = features(ctx)
    m: dict = {"asked": ctx.scale_n, "features": feats}
    err: dict[str, str] = {}

    def step(key: str, f: Callable[[], object]) -> None:
        t = time.monotonic()
        try:
            m[key] = f()
        except Exception as e:  # this figure fails, the others are still measured
            traceback.print_exc()
            err[key] = f"harness error: {e}"
        m.setdefault("took", {})[key] = time.monotonic() - t
        print(f"bench:   {KEY}: {key} took {m['took'][key]:.0f}s", flush=True)

    broker = LabBroker(ctx, ctx.work / KEY / "broker")
    m["broker"] = {"port": broker.port, "gateway": broker.gateway}
    broker.follow()
    step("background", lambda: background(ctx.n(10.0, 15.0)))
    lab = Lab(ctx, broker, ctx.scale_n)
    try:
        step("start", lab.start)
        if "start" in err:
            raise FigureError(err["start"], scale_rows.rows(ctx, m, err, lab))
        hc = lab.healthcheck()
        m["hc"] = hc
        step("healthy", lambda: healthy(lab, hc))
        step("idle", lambda: idle(ctx, lab, broker, ctx.n(20.0, 60.0)))
        step("mem", lambda: memory(sut_procs(lab.names)))
        step("status", lambda: status(ctx, broker, lab, feats["problems"]))
        step("hot", lambda: hot(ctx, lab, ctx.n(4, 10)))
        step("hang", lambda: hang(lab, hc))
        step("py", lambda: python_baseline(ctx, broker, min(PY_COUNT, len(lab.names))))
    finally:
        lab.ev.close()
        step("teardown", lab.sup.stop_and_purge)
    step("api", lambda: api_loop(ctx, lab, broker, m.get("hc", {"raw": {}}),
                                 feats["parallelism"]))
    broker.close()
    rows = scale_rows.rows(ctx, m, err, lab)
    if err:
        raise FigureError(f"{KEY}: could not measure {', '.join(sorted(err))}", rows)
    return rows
