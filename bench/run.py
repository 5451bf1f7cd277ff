#!/usr/bin/env python3
"""labvisor's benchmark suite: every performance figure beside its baseline, in one run.

Run it through ``tools/bench.sh [--quick] [--only FIGURE]``, which builds the static binaries
and the busybox image, prepares a Python venv with paho-mqtt for the baselines, starts a private
mosquitto on a free loopback port, and removes every process, file and Docker object this run
created (Docker objects carry the label ``io.labvisor.bench.run=<run id>``).

Each figure is one function ``bench_<key>(ctx) -> list[Row]``, listed in ``FIGURES``. A figure
measures labvisor and its baseline in the same run, interleaved A B A B so that drift on the
machine hits both alike, and reports the median and the spread over the runs. Figures whose
subject does not exist yet are stubs that report "not measured yet" with the reason: they never
invent numbers.

The suite reports; it never passes or fails on a figure. It exits non-zero only when a figure
could not be measured at all (the harness failed), and then it leaves BENCHMARKS.md alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

BUSYBOX_IMAGE = "labvisor/busybox:local"
LABEL_KEY = "io.labvisor.bench.run"
GNU_TIME = "/usr/bin/time"
MARK_START = "<!-- results:start -->"
MARK_END = "<!-- results:end -->"


# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class Row:
    """One figure in the table."""

    key: str  # the --only name of the figure that produced it
    figure: str  # what is measured, for the table
    value: str  # labvisor: median (spread, n)
    baseline: str  # the baseline measured in the same run, or why there is none
    ratio: str  # labvisor / baseline, or "-"
    target: str
    verdict: str  # "met", "missed", "not measured yet", "-"
    measured: list[str] = dataclasses.field(default_factory=list)  # exact commands timed
    notes: list[str] = dataclasses.field(default_factory=list)


class Stats:
    """Median and spread of a sample: min–max for small samples, p10–p90 from 10 values on."""

    def __init__(self, xs: list[float]):
        if not xs:
            raise ValueError("no samples")
        self.xs = sorted(xs)
        self.n = len(xs)
        self.median = statistics.median(self.xs)
        self.min = self.xs[0]
        self.max = self.xs[-1]

    def pct(self, p: float) -> float:
        # Nearest-rank percentile.
        k = max(0, min(self.n - 1, int(round(p / 100 * self.n + 0.5)) - 1))
        return self.xs[k]

    def fmt(self, unit: str, digits: int = 1, scale: float = 1.0) -> str:
        f = lambda v: f"{v * scale:.{digits}f}"  # noqa: E731
        if self.n >= 10:
            lo, hi, what = self.pct(10), self.pct(90), "p10–p90"
        else:
            lo, hi, what = self.min, self.max, "min–max"
        return f"{f(self.median)} {unit} ({what} {f(lo)}–{f(hi)}, n={self.n})"


# ---------------------------------------------------------------------------------------------
# context and helpers


class Ctx:
    """What every figure needs: binaries, broker, scratch directory, run label, mode."""

    def __init__(self, a: argparse.Namespace):
        self.root = Path(a.root).resolve()
        self.quick = a.quick
        self.bin_dir = Path(a.bin_dir).resolve()
        self.agent = self.bin_dir / "labvisor-agent"
        self.healthcheck = self.bin_dir / "labvisor-healthcheck"
        self.python = a.python
        self.port = a.broker_port
        self.broker = f"mqtt://127.0.0.1:{a.broker_port}"
        self.run_id = a.run_id
        self.label = f"{LABEL_KEY}={a.run_id}"
        self.work = Path(a.work).resolve()
        self.bench_cmd = "tools/bench.sh" + (" --quick" if a.quick else "")
        self.procs: list[subprocess.Popen] = []
        self.containers: list[str] = []
        for b in (self.agent, self.healthcheck):
            if not os.access(b, os.X_OK):
                raise SystemExit(f"bench: {b} is missing (tools/bench.sh builds it)")

    def n(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def reproduce(self, key: str) -> str:
        return f"{self.bench_cmd} --only {key}"

    def spawn(self, argv: list, **kw) -> subprocess.Popen:
        """Starts a process that is stopped at the end of the run if still alive."""
        p = subprocess.Popen([str(x) for x in argv], **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 10) -> Optional[int]:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def cleanup(self) -> None:
        # TERM first: the agent stops its device process's group, the Python baseline its child.
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            self.stop(p, timeout=5)
        for c in self.containers:
            subprocess.run(["docker", "rm", "-f", "-v", c], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)


def wait_for(what: str, limit: float, f: Callable[[], object], every: float = 0.02):
    deadline = time.monotonic() + limit
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {limit}s waiting for {what}")
        time.sleep(every)


def write_sut(d: Path, name: str, body: str) -> Path:
    """Writes `<d>/sut/<name>.toml` and returns its path."""
    (d / "sut").mkdir(parents=True, exist_ok=True)
    p = d / "sut" / f"{name}.toml"
    p.write_text(f'image = "{BUSYBOX_IMAGE}"\n{body}')
    return p


def health_toml(heartbeat: str, max_age: str = "10s") -> str:
    return (f'[health]\nheartbeat = "{heartbeat}"\nmax_age = "{max_age}"\ninterval = "5s"\n'
            'timeout = "2s"\nretries = 1\nstart_period = "0s"\n')


def read_heartbeat(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return {}
    return dict(l.split("=", 1) for l in text.splitlines() if "=" in l and not l.startswith("#"))


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads"):
                out[k] = int(v.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn_wait(argv: list[str]) -> tuple[float, int]:
    """Runs argv with stdout and stderr on /dev/null: (wall seconds, exit status).

    posix_spawn plus wait4, so the only overhead on top of the program is the spawn itself,
    the same for the program and for its floor (`true`).
    """
    actions = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
               (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)]
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    _, status, _ = os.wait4(pid, 0)
    t1 = time.perf_counter()
    return t1 - t0, os.waitstatus_to_exitcode(status)


def max_rss_kib(argv: list[str], out: Path) -> tuple[int, int, float]:
    """(exit status, max RSS in KiB, wall seconds) of argv under GNU time (`/usr/bin/time -f %M`).

    Not wait4 from this process: a child forked from Python starts with Python's RSS as its
    high-water mark (exec records the old address space's), so every child would show ~18 MiB.
    GNU time is small, so its floor (what `true` shows) is about 1 MiB.
    """
    t0 = time.perf_counter()
    r = subprocess.run([GNU_TIME, "-f", "%M", "-o", str(out)] + argv,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    return r.returncode, int(out.read_text().split()[-1]), dt


def timed_run(argv: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, r.returncode


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def q(argv: list) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


# ---------------------------------------------------------------------------------------------
# agent figures


def start_agent(ctx: Ctx, d: Path, name: str, body: str, broker: bool = True,
                stdout=subprocess.DEVNULL) -> tuple[subprocess.Popen, Path, list]:
    """Starts labvisor-agent as a plain process on `<d>/sut/<name>.toml`."""
    cfg = write_sut(d, name, body)
    hb = d / "run" / "heartbeat"
    argv = [ctx.agent, "--config", cfg, "--data-dir", d / "data", "--heartbeat-file", hb,
            "--grace", "2s"]
    if broker:
        argv += ["--broker", ctx.broker]
    env = dict(os.environ, LABVISOR_LOG="warn")
    env.pop("LABVISOR_BROKER", None)
    p = ctx.spawn(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                  stderr=open(d / "agent.stderr", "ab"), env=env)
    return p, hb, argv


def bench_output_throughput(ctx: Ctx) -> list[Row]:
    """A child writes N bytes through the agent (stdout, file and MQTT sinks on, broker
    connected), timed from the agent's start until its log file holds all N bytes; against the
    same child command writing straight to a file."""
    key = "output-throughput"
    n_bytes = ctx.n(50_000_000, 200_000_000)
    runs = ctx.n(3, 7)
    line = "x" * 99  # `yes` adds the newline: 100-byte lines
    child = f"yes {line} | head -c {n_bytes}"
    d = ctx.work / key
    d.mkdir(parents=True)
    direct_file = d / "direct.out"
    name = "bench-output"
    # The child keeps running (sleeping) after its output, so the agent goes on writing
    # heartbeats and the drop counter can be read once the MQTT batcher has caught up.
    body = (f'command = ["/bin/sh", "-c", {json.dumps(child + "; exec sleep 3600")}]\n'
            + health_toml("500ms", "10s") + '[log]\nmax_size = "1GiB"\nkeep = 1\n')
    log = d / "data" / "log" / f"{name}.log"

    def through_agent(broker: bool = True) -> tuple[float, dict]:
        shutil.rmtree(d / "data", ignore_errors=True)
        shutil.rmtree(d / "run", ignore_errors=True)
        t0 = time.perf_counter()
        p, hb, argv = start_agent(ctx, d, name, body, broker=broker)
        seen = {}
        polls = 0
        while True:
            try:
                size = log.stat().st_size
            except FileNotFoundError:
                size = 0
            if size >= n_bytes:
                break
            if p.poll() is not None:
                raise RuntimeError(f"the agent exited {p.returncode} after {size} bytes: "
                                   f"{(d / 'agent.stderr').read_text()[-2000:]}")
            polls += 1
            if polls % 50 == 0:
                seen.update({k: v for k, v in read_heartbeat(hb).items()
                             if k == "broker_connected" and v == "true"})
            time.sleep(0.002)
        t1 = time.perf_counter()
        cpu = proc_cpu_seconds(p.pid)
        # Wait until the agent is idle again (the batcher has drained the tap: its CPU time
        # stops growing), then for two more heartbeats, so the drop counter is final.
        prev = [cpu]

        def settled() -> bool:
            now = proc_cpu_seconds(p.pid)
            done = now - prev[0] < 0.01
            prev[0] = now
            return done

        wait_for("the agent to go idle after the output", 60, settled, every=0.25)
        seq0 = int(read_heartbeat(hb).get("seq", "0") or 0)
        wait_for("two more heartbeats", 15,
                 lambda: int(read_heartbeat(hb).get("seq", "0") or 0) >= seq0 + 2)
        last = read_heartbeat(hb)
        rss = proc_status(p.pid)
        cpu_drained = proc_cpu_seconds(p.pid)
        ctx.stop(p)
        return t1 - t0, {
            "dropped": int(last.get("output_dropped", "0") or 0),
            "connected": seen.get("broker_connected") == "true"
            or last.get("broker_connected") == "true",
            "cpu": cpu,
            "cpu_drained": cpu_drained,
            "hwm": rss.get("VmHWM", 0),
            "rss": rss.get("VmRSS", 0),
            "argv": argv,
        }

    direct_argv = ["/bin/sh", "-c", f"{child} > {shlex.quote(str(direct_file))}"]

    def direct() -> float:
        direct_file.unlink(missing_ok=True)
        dt, rc = timed_run(direct_argv)
        if rc != 0 or direct_file.stat().st_size != n_bytes:
            raise RuntimeError(f"direct write failed: exit {rc}")
        direct_file.unlink()
        return dt

    # Warm-up: page cache, binaries, the broker's first connection.
    shutil.rmtree(d / "data", ignore_errors=True)
    direct()
    through_agent()
    a_rates, b_rates, c_rates, infos = [], [], [], []
    for _ in range(runs):
        dt, info = through_agent()
        a_rates.append(n_bytes / dt / 1e6)
        infos.append(info)
        b_rates.append(n_bytes / direct() / 1e6)
        # Diagnostic, same interleaving: the agent without a broker (stdout and file only).
        c_rates.append(n_bytes / through_agent(broker=False)[0] / 1e6)
    shutil.rmtree(d / "data", ignore_errors=True)
    a, b, c = Stats(a_rates), Stats(b_rates), Stats(c_rates)
    ratio = a.median / b.median
    dropped = [i["dropped"] for i in infos]
    cpu = Stats([i["cpu"] for i in infos])
    cpu_drained = Stats([i["cpu_drained"] for i in infos])
    hwm = Stats([i["hwm"] / 1024 for i in infos])
    rss = Stats([i["rss"] / 1024 for i in infos])
    return [Row(
        key=key,
        figure=f"output throughput ({n_bytes // 1_000_000} MB, stdout + file + MQTT)",
        value=a.fmt("MB/s", 0),
        baseline=f"direct to file: {b.fmt('MB/s', 0)}",
        ratio=f"{ratio:.2f}",
        target="ratio ≥ 0.9",
        verdict=verdict(ratio >= 0.9),
        measured=[
            f"labvisor: {q(infos[0]['argv'])} > /dev/null, with `command = [\"/bin/sh\", \"-c\", "
            f"\"{child}; exec sleep 3600\"]`, `[log] max_size = \"1GiB\"`; timed from the "
            f"agent's start until the log file holds {n_bytes} bytes",
            f"baseline: {q(direct_argv)}",
        ],
        notes=[
            f"diagnostic, interleaved in the same runs: the agent without `--broker` (stdout "
            f"and file sinks only): {c.fmt('MB/s', 0)}, ratio {c.median / b.median:.2f}",
            f"MQTT output drops per run (heartbeat `output_dropped`: chunks of up to 64 KiB "
            f"dropped at the tap plus 16 KiB batches dropped by the link; the output makes "
            f"about {n_bytes // 16384} batches): {dropped}; broker connected in every run: "
            f"{all(i['connected'] for i in infos)}; nobody subscribed to `<sut>/output`",
            f"agent CPU (user+sys, all threads, not the child) until the file was complete: "
            f"{cpu.fmt('s', 2)}; until MQTT had drained: {cpu_drained.fmt('s', 2)}",
            f"agent peak RSS (VmHWM): {hwm.fmt('MiB', 0)}; RSS once drained: "
            f"{rss.fmt('MiB', 0)}",
        ],
    )]


def bench_agent_idle_rss(ctx: Ctx) -> list[Row]:
    """Resident memory of an idle labvisor-agent (device process `sleep`, heartbeats every 2 s,
    broker connected) against bench/paho_heartbeat.py doing the same; both after settling."""
    key = "agent-idle-rss"
    runs = ctx.n(2, 5)
    settle = 5.0
    paho = ctx.root / "bench" / "paho_heartbeat.py"
    pairs = []
    for i in range(runs):
        d = ctx.work / key / f"labvisor-{i}"
        body = 'command = ["sleep", "3600"]\n' + health_toml("2s", "10s")
        p, hb, argv = start_agent(ctx, d, f"bench-idle-{i}", body)
        dp = ctx.work / key / f"python-{i}"
        dp.mkdir(parents=True)
        pargv = [ctx.python, paho, "--sut", f"bench-idle-py-{i}", "--port", ctx.port,
                 "--interval", "2", "--heartbeat-file", dp / "run" / "heartbeat",
                 "--log-file", dp / "data" / "log" / "out.log", "--child", "sleep", "3600"]
        pp = ctx.spawn(pargv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=open(dp / "stderr", "ab"))
        pairs.append((p, hb, argv, pp, dp / "run" / "heartbeat", pargv))
    time.sleep(settle)
    a, b, detail = [], [], []
    for p, hb, argv, pp, phb, pargv in pairs:
        wait_for("the agent's heartbeat with the broker connected", 15,
                 lambda: read_heartbeat(hb).get("broker_connected") == "true")
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
        key=key,
        figure="agent idle RSS (broker connected, heartbeat 2 s)",
        value=sa.fmt("MiB", 1),
        baseline=f"paho-mqtt {paho_version}: {sb.fmt('MiB', 1)}",
        ratio=f"{ratio:.2f}",
        target="≤ 5 MiB, ≈ 1/4 of Python",
        verdict=verdict(sa.median <= 5.0 and ratio <= 0.3),
        measured=[
            f"labvisor: {q(pairs[0][2])} with `command = [\"sleep\", \"3600\"]`, VmRSS of the "
            f"agent's pid (the child excluded) after {settle:.0f} s",
            f"baseline: {q(pairs[0][5])}, VmRSS of the Python pid after {settle:.0f} s",
        ],
        notes=[
            f"agent RSS split: anonymous {anon.fmt('MiB', 1)}, file-backed (its own static "
            f"binary's pages) {filed.fmt('MiB', 1)}; threads {detail[0][0].get('Threads')}",
            f"Python {platform.python_version()}, threads {detail[0][1].get('Threads')}",
        ],
    )]


def bench_healthcheck_exec(ctx: Ctx) -> list[Row]:
    """Wall time and max RSS of one `labvisor-healthcheck --file <fresh heartbeat>` exec, with
    the spawn floor (`true` through the same path) interleaved; against
    bench/paho_healthcheck.py, which waits for a fresh status on MQTT as the old stack did."""
    key = "healthcheck-exec"
    n = ctx.n(200, 500)  # wall-time samples of the healthcheck and of the floor
    n_rss = ctx.n(20, 50)  # max-RSS samples under GNU time
    n_py = ctx.n(8, 30)  # Python baseline runs (each waits up to one heartbeat, 2 s)
    d = ctx.work / key
    name = "bench-hc"
    p, hb, _ = start_agent(ctx, d, name, health_toml("2s", "10s"))
    wait_for("the agent's heartbeat with the broker connected", 15,
             lambda: read_heartbeat(hb).get("broker_connected") == "true")
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
        dt, rc = spawn_wait(hc)
        if rc != 0:
            raise RuntimeError(f"labvisor-healthcheck exited {rc} on a fresh heartbeat")
        hc_t.append(dt)
        fl_t.append(spawn_wait(floor_argv)[0])
        if i % max(1, n // n_rss) == 0 and len(hc_rss) < n_rss:
            hc_rss.append(max_rss_kib(hc, tmp)[1])
            fl_rss.append(max_rss_kib(floor_argv, tmp)[1])
        if i % max(1, n // n_py) == 0 and len(py_t) < n_py:
            rc, rss, dt = max_rss_kib(py, tmp)
            if rc != 0:
                raise RuntimeError(f"paho_healthcheck.py exited {rc}")
            py_t.append(dt)
            py_rss.append(rss)
    ctx.stop(p)
    a, f, b = Stats(hc_t), Stats(fl_t), Stats(py_t)
    ar, fr, br = (Stats([r / 1024 for r in xs]) for xs in (hc_rss, fl_rss, py_rss))
    return [
        Row(
            key=key,
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
            key=key,
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


def bench_healthcheck_docker(ctx: Ctx) -> list[Row]:
    """The `docker exec` round trip of our check in a running agent container, against
    `docker exec <c> true` in the same container, interleaved."""
    key = "healthcheck-docker"
    n = ctx.n(20, 40)  # docker exec is noisy: tens of ms with a spread as wide as the effect
    d = ctx.work / key
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
    hc = ["docker", "exec", name, "/labvisor/bin/labvisor-healthcheck"]
    tr = ["docker", "exec", name, "true"]
    wait_for("a healthy verdict inside the container", 30,
             lambda: timed_run(hc)[1] == 0, every=0.2)
    for _ in range(2):  # warm-up
        timed_run(hc)
        timed_run(tr)
    a, b = [], []
    for _ in range(n):
        dt, rc = timed_run(hc)
        if rc != 0:
            raise RuntimeError(f"the healthcheck in the container exited {rc}")
        a.append(dt)
        dt, rc = timed_run(tr)
        if rc != 0:
            raise RuntimeError(f"`true` in the container exited {rc}")
        b.append(dt)
    version = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                             capture_output=True, text=True).stdout.strip()
    subprocess.run(["docker", "rm", "-f", "-v", name], stdout=subprocess.DEVNULL)
    ctx.containers.remove(name)
    sa, sb = Stats(a), Stats(b)
    ratio = sa.median / sb.median
    return [Row(
        key=key,
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


# ---------------------------------------------------------------------------------------------
# figures whose subject does not exist yet: stubs that say so, never numbers


def not_measured(key: str, figure: str, baseline: str, target: str, reason: str) -> Row:
    return Row(key=key, figure=figure, value="not measured yet", baseline=baseline, ratio="-",
               target=target, verdict="not measured yet", notes=[f"not measured yet: {reason}"])


NO_SUPERVISOR = ("the supervisor has only `labvisor check` so far; it does not create or "
                 "watch containers yet")


def bench_job_dispatch(ctx: Ctx) -> list[Row]:
    """To do: publish 200 jobs to `<sut>/jobs/...` on the private broker, measure publish to
    `running` on the job's status topic; report p50/p99."""
    return [not_measured("job-dispatch", "job dispatch, publish to running (200 jobs)",
                         "none (testflinger polls every 10 s)", "p99 ≤ 20 ms",
                         "the agent does not run jobs yet (the jobs issue)")]


def bench_cold_start(ctx: Ctx) -> list[Row]:
    """To do: 50 SUT files, supervisor start until all containers run; baselines a sequential
    `docker run -d` loop with the same image and settings, and a minimal bollard create+start
    loop at the engine's own parallelism; all labelled with ctx.label."""
    return [not_measured("cold-start", "cold start of 50 SUTs",
                         "`docker run -d` loop; bollard create+start loop",
                         "≤ 0.5 of the CLI loop; ≤ 1.15 of the bollard loop", NO_SUPERVISOR)]


def bench_hot_add(ctx: Ctx) -> list[Row]:
    """To do: write one SUT file into a watched directory, time until the container runs
    (p50/p90); baseline raw `docker create` + `docker start` of the same spec."""
    return [not_measured("hot-add", "hot add, file written to container running",
                         "raw `docker create` + `docker start`",
                         "≤ raw + 300 ms (debounce included)", NO_SUPERVISOR)]


def bench_supervisor_footprint(ctx: Ctx) -> list[Row]:
    """To do: supervisor RSS and CPU% with 100 idle SUTs, sampled from /proc after settling."""
    return [not_measured("supervisor-footprint", "supervisor RSS and CPU at 100 idle SUTs",
                         "none", "≤ 30 MiB, ≈ 0% CPU idle", NO_SUPERVISOR)]


def bench_scaling_curve(ctx: Ctx) -> list[Row]:
    """To do: cold start at 10, 50 and 100 SUTs beside the CLI loop at the same sizes."""
    return [not_measured("scaling-curve", "cold start at 10, 50, 100 SUTs",
                         "the `docker run -d` loop at the same sizes", "linear, no worse",
                         NO_SUPERVISOR)]


FIGURES: dict[str, Callable[[Ctx], list[Row]]] = {
    "output-throughput": bench_output_throughput,
    "agent-idle-rss": bench_agent_idle_rss,
    "healthcheck-exec": bench_healthcheck_exec,
    "healthcheck-docker": bench_healthcheck_docker,
    "job-dispatch": bench_job_dispatch,
    "cold-start": bench_cold_start,
    "hot-add": bench_hot_add,
    "supervisor-footprint": bench_supervisor_footprint,
    "scaling-curve": bench_scaling_curve,
}


# ---------------------------------------------------------------------------------------------
# report


def sh(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def machine(ctx: Ctx) -> dict[str, str]:
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = sh(["git", "-C", str(ctx.root), "rev-parse", "--short", "HEAD"])
    if sh(["git", "-C", str(ctx.root), "status", "--porcelain", "--untracked-files=no", "--",
           ".", ":!BENCHMARKS.md"]):
        commit += " (with uncommitted changes)"
    return {
        "cpus": f"{os.cpu_count()} ({cpu})",
        "memory": mem,
        "kernel": platform.release(),
        "docker": sh(["docker", "version", "--format",
                      "{{.Server.Version}} (API {{.Server.APIVersion}})"]),
        "mosquitto": sh(["sh", "-c", "mosquitto -h 2>&1 | head -1"]).replace(
            "mosquitto version ", ""),
        "python": platform.python_version(),
        "commit": commit,
    }


def loadavg() -> float:
    return os.getloadavg()[0]


def table(rows: list[Row]) -> str:
    out = ["| figure | labvisor | baseline (same run) | ratio | target | verdict |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.figure} | {r.value} | {r.baseline} | {r.ratio} | {r.target} | "
                   f"{r.verdict} |")
    return "\n".join(out)


def shorten(ctx: Ctx, text: str) -> str:
    """Replaces this run's paths and port with the names the legend explains."""
    for long, short in ((str(ctx.work), "$SCRATCH"), (str(ctx.bin_dir), "$BIN"),
                        (str(Path(ctx.python).parent.parent), "$VENV"), (str(ctx.root) + "/", ""),
                        (f"127.0.0.1:{ctx.port}", "127.0.0.1:$PORT"),
                        (f"--port {ctx.port}", "--port $PORT"), (ctx.run_id, "$RUN")):
        text = text.replace(long, short)
    return text


LEGEND = ("In the measured commands, `$BIN` is `<cargo target dir>/x86_64-unknown-linux-gnu/"
          "release` (the static binaries), `$VENV` the baselines' venv, `$SCRATCH` the run's "
          "scratch directory, `$PORT` the private broker's port and `$RUN` the run id.")


def details(ctx: Ctx, rows: list[Row]) -> str:
    out = []
    for r in rows:
        out.append(f"- **{r.figure}** — reproduce: `{ctx.reproduce(r.key)}`")
        for m in r.measured:
            out.append(f"  - measured: {shorten(ctx, m)}")
        for n in r.notes:
            out.append(f"  - {shorten(ctx, n)}")
    return "\n".join(out)


def results_section(ctx: Ctx, rows: list[Row], m: dict[str, str], started: str,
                    load: tuple[float, float], took: float, note: str) -> str:
    busy = load[0] > 0.5 * (os.cpu_count() or 1) or load[1] > 0.5 * (os.cpu_count() or 1)
    lines = [
        MARK_START,
        "<!-- Written by tools/bench.sh (bench/run.py); edits between these markers are lost. -->",
        "",
        f"Run `{ctx.bench_cmd}` on {started} ({'quick' if ctx.quick else 'full'} mode, "
        f"{took / 60:.1f} min), commit {m['commit']}.",
        "",
        f"- machine: {m['cpus']} CPUs, {m['memory']} memory, kernel {m['kernel']}",
        f"- Docker {m['docker']}, mosquitto {m['mosquitto']}, Python {m['python']}",
        f"- load average (1 min) at start {load[0]:.2f}, at end {load[1]:.2f}",
    ]
    if busy:
        lines.append(
            "- **busy machine**: other work shared the CPUs during this run (load average "
            "above half the CPU count), so these figures are indicative; the ratios, measured "
            "interleaved in the same run, suffer less than the absolute values")
    if note:
        lines.append(f"- note: {note}")
    if ctx.quick:
        lines.append("- quick mode: smaller outputs and fewer runs than `tools/bench.sh`; "
                     "the full run is the reference")
    lines += ["", table(rows), "", LEGEND, "", details(ctx, rows), "", MARK_END]
    return "\n".join(lines)


def rewrite(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Results\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description="labvisor benchmarks (run via tools/bench.sh)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", choices=sorted(FIGURES),
                    help="run only these figures (repeatable); BENCHMARKS.md is left alone")
    ap.add_argument("--root", required=True)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--python", required=True, help="Python with paho-mqtt, for the baselines")
    ap.add_argument("--broker-port", type=int, required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--note", default="", help="a line added to the results section")
    a = ap.parse_args()

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
    rows: list[Row] = []
    failed = []
    try:
        for key, f in FIGURES.items():
            if a.only and key not in a.only:
                continue
            t = time.monotonic()
            print(f"bench: {key} ...", flush=True)
            try:
                got = f(ctx)
            except Exception as e:  # the harness failed: report it, go on with the others
                traceback.print_exc()
                failed.append(key)
                got = [Row(key=key, figure=key, value="error", baseline="-", ratio="-",
                           target="-", verdict="error", notes=[f"harness error: {e}"])]
            rows += got
            for r in got:
                print(f"bench:   {r.figure}: {r.value} | {r.baseline} | ratio {r.ratio} | "
                      f"target {r.target}: {r.verdict}", flush=True)
            print(f"bench: {key} took {time.monotonic() - t:.0f}s", flush=True)
    finally:
        ctx.cleanup()
    took = time.monotonic() - t0
    load1 = loadavg()
    print()
    print(table(rows))
    print()
    print(details(ctx, rows))
    print(f"\nbench: took {took / 60:.1f} min; load average {load0:.2f} at start, {load1:.2f} "
          f"at end")
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


if __name__ == "__main__":
    sys.exit(main())
