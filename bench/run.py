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
import io
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import tarfile
import subprocess
import sys
import threading
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
        self.supervisor = self.bin_dir / "labvisor"
        self.bollard_loop = self.bin_dir / "examples" / "bollard_loop"
        self.python = a.python
        self.port = a.broker_port
        self.broker = f"mqtt://127.0.0.1:{a.broker_port}"
        self.run_id = a.run_id
        self.label = f"{LABEL_KEY}={a.run_id}"
        self.work = Path(a.work).resolve()
        self.bench_cmd = "tools/bench.sh" + (" --quick" if a.quick else "")
        self.procs: list[subprocess.Popen] = []
        self.containers: list[str] = []
        for b in (self.agent, self.healthcheck, self.supervisor):
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
        # Whatever the supervisors and the loops left (also on Ctrl-C): containers, volumes,
        # networks with this run's label. tools/bench.sh does the same once more on exit.
        docker_purge(self.label)


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
    """`argv` as a shell command; an argument holding a `"$(...)"` substitution stays as is."""
    return " ".join(str(a) if '"$(' in str(a) else shlex.quote(str(a)) for a in argv)


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
    # Diagnostic: the same with MQTT output effectively unlimited (the default is 1 MiB/s).
    body_unlimited = body + 'mqtt_rate = "1GiB"\n'
    log = d / "data" / "log" / f"{name}.log"

    def through_agent(broker: bool = True, unlimited: bool = False) -> tuple[float, dict]:
        shutil.rmtree(d / "data", ignore_errors=True)
        shutil.rmtree(d / "run", ignore_errors=True)
        t0 = time.perf_counter()
        p, hb, argv = start_agent(ctx, d, name, body_unlimited if unlimited else body,
                                  broker=broker)
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
    a_rates, b_rates, c_rates, u_rates, infos = [], [], [], [], []
    for _ in range(runs):
        dt, info = through_agent()
        a_rates.append(n_bytes / dt / 1e6)
        infos.append(info)
        b_rates.append(n_bytes / direct() / 1e6)
        # Diagnostic, same interleaving: the agent without a broker (stdout and file only).
        c_rates.append(n_bytes / through_agent(broker=False)[0] / 1e6)
        # Diagnostic: MQTT output not rate-limited (`[log] mqtt_rate = "1GiB"`).
        u_rates.append(n_bytes / through_agent(unlimited=True)[0] / 1e6)
    shutil.rmtree(d / "data", ignore_errors=True)
    a, b, c, u = Stats(a_rates), Stats(b_rates), Stats(c_rates), Stats(u_rates)
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
            f"\"{child}; exec sleep 3600\"]`, `[log] max_size = \"1GiB\"` (and the default "
            f"`mqtt_rate`, 1 MiB/s); timed from the agent's start until the log file holds "
            f"{n_bytes} bytes",
            f"baseline: {q(direct_argv)}",
        ],
        notes=[
            "a ratio above 1 is possible: `head` writes the file 4–8 KiB at a time (strace), "
            "the agent's pump reads the pipe up to 64 KiB at a time and writes the file in "
            "those larger pieces, so it makes fewer syscalls than the baseline",
            f"diagnostic, interleaved in the same runs: the agent without `--broker` (stdout "
            f"and file sinks only): {c.fmt('MB/s', 0)}, ratio {c.median / b.median:.2f}",
            f"diagnostic, interleaved in the same runs: MQTT output not rate-limited "
            f"(`[log] mqtt_rate = \"1GiB\"`): {u.fmt('MB/s', 0)}, ratio "
            f"{u.median / b.median:.2f}; the agent and the broker then spend CPU on a flood "
            f"that mostly cannot be delivered anyway, which the default 1 MiB/s cap drops at "
            f"the tap before any copy",
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
# Docker helpers for the supervisor figures


def docker_purge(label: str, tries: int = 5) -> list[str]:
    """Removes every container (with its anonymous volumes), volume and network labelled so;
    retries, since a network can still hold a removed container's endpoint for a moment.
    Returns what is left (nothing, normally)."""
    def ids(kind: list[str]) -> list[str]:
        out = subprocess.run(["docker"] + kind + ["-q", "--filter", f"label={label}"],
                             capture_output=True, text=True).stdout.split()
        return sorted(set(out))

    left: list[str] = []
    for attempt in range(tries):
        c = ids(["ps", "-a"])
        # Ten at a time: Engine 20.10 under load has left a network with a phantom endpoint
        # ("has active endpoints", removable only by a daemon restart) after one `docker rm -f`
        # of 100 running containers, which the CLI removes 50 at a time.
        for i in range(0, len(c), 10):
            subprocess.run(["docker", "rm", "-f", "-v"] + c[i:i + 10], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        v = ids(["volume", "ls"])
        if v:
            subprocess.run(["docker", "volume", "rm", "-f"] + v, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        n = ids(["network", "ls"])
        if n:
            subprocess.run(["docker", "network", "rm"] + n, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        left = ids(["ps", "-a"]) + ids(["volume", "ls"]) + ids(["network", "ls"])
        if not left:
            return []
        time.sleep(0.5 * (attempt + 1))
    print(f"bench: could not remove {len(left)} Docker objects labelled {label}: {left}",
          file=sys.stderr, flush=True)
    return left


class DockerEvents:
    """`docker events` for the containers carrying a label, read on a thread. Times are the
    daemon's own event timestamps (TimeNano, the same clock as time.time_ns()), so the reader's
    latency does not count; `--since` makes it replay anything emitted before it connected."""

    def __init__(self, label: str, since_ns: int):
        self.p = subprocess.Popen(
            ["docker", "events", "--since", f"{since_ns // 1_000_000_000}."
             f"{since_ns % 1_000_000_000:09d}", "--filter", "type=container", "--filter",
             f"label={label}", "--format",
             "{{.TimeNano}}|{{.Action}}|{{.Actor.ID}}|{{.Actor.Attributes.name}}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.events: list[tuple[int, str, str, str]] = []
        self.cv = threading.Condition()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            parts = line.rstrip("\n").split("|")
            if len(parts) != 4:
                continue
            with self.cv:
                self.events.append((int(parts[0]), parts[1], parts[2], parts[3]))
                self.cv.notify_all()

    def first(self, action: str) -> dict[str, int]:
        """Container name -> time (ns) of its first `action` event."""
        out: dict[str, int] = {}
        with self.cv:
            for t, a, _, name in self.events:
                if a == action and name not in out:
                    out[name] = t
        return out

    def wait(self, action: str, names: set[str], limit: float) -> dict[str, int]:
        deadline = time.monotonic() + limit
        with self.cv:
            while True:
                got = {n: t for n, t in self.first_locked(action).items() if n in names}
                if len(got) == len(names):
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out after {limit:.0f}s: {len(got)} of "
                                       f"{len(names)} containers had `{action}`")
                self.cv.wait(min(left, 0.5))

    def first_locked(self, action: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, a, _, name in self.events:
            if a == action and name not in out:
                out[name] = t
        return out

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


# The baselines' containers run what the supervisor's run: the static agent (job-only, no broker)
# with the same healthcheck, from a tools volume the harness fills once per run, before any
# timing ([`baseline_volumes`]); the SUT file inline in the environment and the heartbeat on a
# tmpfs, as the supervisor does for a SUT without `files`. So the loops create and start the
# same container as the supervisor.
BASELINE: dict[str, str] = {}
BASELINE_SUT = "sut.toml"
RUN_TMPFS = ("/labvisor/run", "mode=1777,size=1m")


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


def make_network(name: str, labels: list[str]) -> None:
    argv = ["docker", "network", "create"]
    for lab in labels:
        argv += ["--label", lab]
    subprocess.run(argv + [name], check=True, stdout=subprocess.DEVNULL)


def sut_health(interval: str) -> str:
    """A job-only SUT's file body: busybox, Docker health probes every `interval`."""
    return (f'[health]\nheartbeat = "1s"\nmax_age = "60s"\ninterval = "{interval}"\n'
            'timeout = "1s"\nretries = 1\nstart_period = "0s"\n')


class Supervisor:
    """`labvisor supervise` on a SUT directory of its own, labelled for this run and trial."""

    def __init__(self, ctx: Ctx, d: Path, tag: str):
        self.ctx = ctx
        self.d = d
        self.sut_dir = d / "sut"
        self.sut_dir.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.trial = f"{LABEL_KEY.rsplit('.', 1)[0]}.trial={ctx.run_id}-{tag}"
        self.prefix = f"{ctx.run_id}-{tag}-"
        self.argv = [ctx.supervisor, "supervise", "--sut-dir", self.sut_dir,
                     "--id", f"{ctx.run_id}-{tag}", "--name-prefix", self.prefix,
                     "--extra-label", ctx.label, "--extra-label", self.trial,
                     "--agent-broker", "none", "--broker", "none", "--metrics-listen", "none"]
        self.p: Optional[subprocess.Popen] = None

    def write(self, names: list[str], body: str) -> None:
        for n in names:
            (self.sut_dir / f"{n}.toml").write_text(f'image = "{BUSYBOX_IMAGE}"\n{body}')

    def start(self) -> None:
        env = dict(os.environ, LABVISOR_LOG="warn")
        for k in ("LABVISOR_BROKER", "LABVISOR_SUT_DIR", "LABVISOR_ID", "LABVISOR_NAME_PREFIX",
                  "LABVISOR_METRICS_LISTEN", "LABVISOR_AGENT_BROKER"):
            env.pop(k, None)
        self.p = self.ctx.spawn(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(self.d / "supervisor.stderr", "ab"), env=env,
                                cwd=self.d)

    def check_alive(self) -> None:
        if self.p is not None and self.p.poll() is not None:
            raise RuntimeError(f"the supervisor exited {self.p.returncode}: "
                               f"{(self.d / 'supervisor.stderr').read_text()[-2000:]}")

    def stop_and_purge(self) -> None:
        if self.p is not None:
            self.ctx.stop(self.p)
        docker_purge(self.trial)


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
        wait_for_events(ev, "start", full, 300, sup)
        started = max(ev.first("start")[x] for x in full)
        t_healthy = None
        if healthy:
            wait_for_events(ev, "health_status: healthy", full, 300, sup)
            t_healthy = (max(ev.first("health_status: healthy")[x] for x in full) - t0) / 1e9
        return (started - t0) / 1e9, t_healthy
    finally:
        ev.close()
        sup.stop_and_purge()


def wait_for_events(ev: DockerEvents, action: str, names: set[str], limit: float,
                    sup: Optional[Supervisor] = None) -> None:
    deadline = time.monotonic() + limit
    while True:
        if sup is not None:
            sup.check_alive()
        try:
            ev.wait(action, names, min(2.0, max(0.1, deadline - time.monotonic())))
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise


def cold_cli(ctx: Ctx, n: int, tag: str) -> float:
    """A sequential `docker run -d` loop (network created first), until all n have started."""
    baseline_volumes(ctx)
    trial = f"{LABEL_KEY.rsplit('.', 1)[0]}.trial={ctx.run_id}-{tag}"
    labels = [ctx.label, trial]
    prefix = f"{ctx.run_id}-{tag}-"
    t0 = time.time_ns()
    ev = DockerEvents(trial, t0)
    try:
        make_network(prefix + "net", labels)
        for i in range(n):
            r = subprocess.run(sleeper_argv("run", f"{prefix}s{i:03d}", f"s{i:03d}", labels,
                                            prefix + "net"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"docker run failed: {r.stderr.strip()}")
        full = {f"{prefix}s{i:03d}" for i in range(n)}
        wait_for_events(ev, "start", full, 60)
        return (max(ev.first("start")[x] for x in full) - t0) / 1e9
    finally:
        ev.close()
        docker_purge(trial)


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


def cold_api(ctx: Ctx, n: int, tag: str, parallelism: int = 6,
             tar: Optional[bytes] = None, sleeper: bool = False) -> float:
    """The minimal loop: `bollard_loop` (supervisor/examples/bollard_loop.rs: bollard, as the
    supervisor uses it) creating and starting the containers, at most `parallelism` at a time
    (network created first, volumes created by the mounts). With `tar`, also the archive upload
    the supervisor makes for a SUT with `files`; with `sleeper`, the containers run `sleep`
    without a healthcheck (both diagnostics)."""
    baseline_volumes(ctx)
    make_body = sleeper_body if sleeper else api_body
    trial = f"{LABEL_KEY.rsplit('.', 1)[0]}.trial={ctx.run_id}-{tag}"
    labels = [ctx.label, trial]
    prefix = f"{ctx.run_id}-{tag}-"
    names = [f"{prefix}s{i:03d}" for i in range(n)]
    jobs = ctx.work / "cold" / f"{tag}.json"
    jobs.parent.mkdir(parents=True, exist_ok=True)
    jobs.write_text(json.dumps([
        {"name": name, "body": make_body(f"s{i:03d}", labels, prefix + "net", name)}
        for i, name in enumerate(names)]))
    argv = [str(ctx.bollard_loop), "--jobs", str(jobs), "--parallelism", str(parallelism)]
    if tar is not None:
        tar_file = jobs.with_suffix(".tar")
        tar_file.write_bytes(tar)
        argv += ["--upload", str(tar_file)]

    t0 = time.time_ns()
    ev = DockerEvents(trial, t0)
    try:
        make_network(prefix + "net", labels)
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"bollard_loop failed ({r.returncode}): {r.stderr[-2000:]}")
        wait_for_events(ev, "start", set(names), 60)
        return (max(ev.first("start")[x] for x in names) - t0) / 1e9
    finally:
        ev.close()
        docker_purge(trial)


SUP_MEASURED = ("labvisor: {sup} supervise --sut-dir $SCRATCH/.../sut --id $RUN-<trial> "
                "--name-prefix $RUN-<trial>- --extra-label io.labvisor.bench.run=$RUN "
                "--extra-label io.labvisor.bench.trial=$RUN-<trial> --agent-broker none "
                "--broker none --metrics-listen none, on {n} job-only SUT files (`image = "
                "\"labvisor/busybox:local\"`, `[health] interval = \"{interval}\"`)")
CLI_MEASURED = ("CLI loop: `docker network create`, then for each SUT `{cmd}`, one after the "
                "other")
API_MEASURED = ("minimal loop: $BIN/examples/bollard_loop (supervisor/examples/bollard_loop.rs: "
                "bollard with a negotiated API version and two tokio workers, as the "
                "supervisor; 6 at a time, the supervisor's `--parallelism` default): "
                "`POST /containers/create` (same spec as the CLI loop: init, restart "
                "unless-stopped, labelled volume mount, network, hostname, labels, the agent "
                "as entrypoint with its exec-form healthcheck, the tools volume read-only, the SUT "
                "file inline in the environment, a tmpfs for the heartbeat) then `POST /containers/<id>/start`; network created first")
TIMING = ("timed from just before the first command until the last container's `start` event "
          "(the daemon's own timestamp, from `docker events`); every container, volume and "
          "network of a repetition is removed before the next")


def cold_runs(ctx: Ctx, n: int, reps: int, api: bool, healthy: int) -> dict:
    """Interleaved repetitions of supervisor / CLI loop / (API loops), cached per size. The
    supervisor's SUTs and the baselines' containers probe health every 30 s, so no probe runs
    during the start; in the first `healthy` repetitions, one more supervisor run with
    2 s probes is timed until all are healthy."""
    cache = getattr(ctx, "cold_cache", None)
    if cache is None:
        cache = ctx.cold_cache = {}
    got = cache.setdefault(n, {"sup": [], "healthy": [], "hrun": [], "cli": [], "api": [],
                               "tar": []})
    tar = agent_tar(ctx) if api else None
    for r in range(reps):
        tag = f"c{n}r{len(got['cli'])}"
        got["sup"].append(cold_supervisor(ctx, n, tag + "s", interval="30s")[0])
        got["cli"].append(cold_cli(ctx, n, tag + "c"))
        if api:
            got["api"].append(cold_api(ctx, n, tag + "a"))
            if not ctx.quick or not got["tar"]:  # quick: the diagnostic once
                got["tar"].append(cold_api(ctx, n, tag + "t", tar=tar))
        if r < healthy:
            s, h = cold_supervisor(ctx, n, tag + "h", interval="2s", healthy=True)
            got["hrun"].append(s)
            got["healthy"].append(h)
    return got


def bench_cold_start(ctx: Ctx) -> list[Row]:
    """`labvisor supervise` on N SUT files from start until all containers run (and until all
    are healthy); against a sequential `docker run -d` loop and a minimal parallel
    create+start loop on the Engine API, interleaved in the same run."""
    key = "cold-start"
    n = ctx.n(20, 50)
    reps = ctx.n(1, 3)
    interval = "2s"
    got = cold_runs(ctx, n, reps, api=True, healthy=ctx.n(1, reps))
    s, c, a, h, t, hr = (Stats(got[k]) for k in ("sup", "cli", "api", "healthy", "tar", "hrun"))
    # Full runs only, once each after the interleaved ones: is 6 the engine's limit (the API
    # loop 12 at a time), and what does running the agent cost the engine (the API loop with
    # `sleep` and no healthcheck, as the baselines were first measured)?
    sweep = {} if ctx.quick else {
        "12": cold_api(ctx, n, f"c{n}p12", parallelism=12),
        "sleep": cold_api(ctx, n, f"c{n}sl", sleeper=True)}
    tar_mb = len(agent_tar(ctx)) / 1e6
    rc, ra = s.median / c.median, s.median / a.median
    cmd = q(sleeper_argv("run", "$RUN-<trial>-sNNN", "sNNN", [ctx.label, "io.labvisor.bench."
                                                              "trial=$RUN-<trial>"],
                         "$RUN-<trial>-net", shown=True))
    return [
        Row(key=key, figure=f"cold start of {n} SUTs, until all running",
            value=s.fmt("s", 2),
            baseline=f"`docker run -d` loop: {c.fmt('s', 2)}; API create+start ×6: "
                     f"{a.fmt('s', 2)}",
            ratio=f"{rc:.2f} of CLI; {ra:.2f} of API",
            target="≤ 0.5 of the CLI loop; ≤ 1.15 of the API loop",
            verdict=f"{verdict(ra <= 1.15)} (API); {verdict(rc <= 0.5)} (CLI)",
            measured=[SUP_MEASURED.format(sup=ctx.supervisor, n=n, interval="30s"),
                      CLI_MEASURED.format(cmd=cmd), API_MEASURED, TIMING],
            notes=[f"per SUT: labvisor {s.median / n * 1000:.0f} ms, CLI loop "
                   f"{c.median / n * 1000:.0f} ms, API loop {a.median / n * 1000:.0f} ms",
                   "the baselines create and start the same container as the supervisor "
                   "(image, settings, agent, healthcheck, tools volume, the SUT file inline in "
                   "the environment, the heartbeat tmpfs); nothing is uploaded per container "
                   "by either (the static agent and healthcheck binaries, 7 MB, are put once "
                   "into a shared read-only tools volume by both)",
                   f"diagnostic, interleaved in the same runs: the API loop plus the archive "
                   f"upload the supervisor makes between create and start for a SUT with "
                   f"`files` (`PUT /containers/<id>/archive?path=/`, a "
                   f"{tar_mb * 1000:.0f} kB tar of a SUT file and one listed file): "
                   f"{t.fmt('s', 2)}, {t.median / a.median:.2f} of the bare API loop"]
            + ([f"diagnostic: the API loop 12 at a time (one run, after the interleaved "
                f"ones): {sweep['12']:.2f} s, {sweep['12'] / c.median:.2f} of the CLI loop, "
                f"{sweep['12'] / a.median:.2f} of the loop 6 at a time (dockerd, containerd "
                f"and runc share the CPUs: the engine's own limit, not the client, bounds "
                f"the ratio to the CLI loop)",
                f"diagnostic: the API loop with `sleep` as entrypoint and no healthcheck (one "
                f"run): {sweep['sleep']:.2f} s, {sweep['sleep'] / c.median:.2f} of the CLI "
                f"loop; labvisor / that loop: {s.median / sweep['sleep']:.2f} ({n} agents "
                f"starting compete with the engine for the 2 cores)"] if sweep else [])),
        Row(key=key, figure=f"cold start of {n} SUTs, until all healthy",
            value=h.fmt("s", 2), baseline="none (Docker's first probe waits one interval)",
            ratio="-", target="-", verdict="-",
            measured=[f"a separate supervisor run per repetition ({h.n} in all), the same "
                      f"but with `[health] interval = \"{interval}\"` (retries 1, start period "
                      "0 s), until the last `health_status: healthy` event"],
            notes=[f"Docker 20.10 runs the first probe one interval ({interval}) after the "
                   f"start; in these runs all were running after {hr.fmt('s', 2)} (the probes "
                   f"of the first containers already compete with the later starts), and "
                   f"healthy {h.median - hr.median:.2f} s later (medians)"]),
    ]


def bench_scaling_curve(ctx: Ctx) -> list[Row]:
    """Cold start at 10, 50, 100 SUTs (quick: 10, 20) beside the CLI loop at the same sizes."""
    key = "scaling-curve"
    sizes = [10, 20] if ctx.quick else [10, 50, 100]
    reps = {10: 1, 20: 1} if ctx.quick else {10: 2, 50: 2, 100: 1}
    pts = []
    for n in sizes:
        have = len(getattr(ctx, "cold_cache", {}).get(n, {}).get("cli", []))
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
        key=key, figure=f"cold start at {', '.join(map(str, sizes))} SUTs, until all running",
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
               + " (each repetition of 100 SUTs costs about two minutes with the loop and the "
               "removals, so the full run does one)" if not ctx.quick else
               "repetitions: " + ", ".join(f"{n}: {s.n}" for n, s, _ in pts)],
    )]


def bench_hot_add(ctx: Ctx) -> list[Row]:
    """An idle supervisor; one SUT file renamed into its directory, timed until that container
    has started; against `docker create` + `docker start` of the same spec, interleaved."""
    key = "hot-add"
    trials = ctx.n(6, 20)
    baseline_volumes(ctx)
    sup = Supervisor(ctx, ctx.work / key, "hot")
    sup.write(["base"], sut_health("30s"))
    body = f'image = "{BUSYBOX_IMAGE}"\n{sut_health("30s")}'
    stage = ctx.work / key / "stage"
    stage.mkdir(parents=True)
    labels = [ctx.label, sup.trial]
    net = sup.prefix + "rawnet"
    ev = DockerEvents(sup.trial, time.time_ns())
    a, b, cli = [], [], []
    try:
        sup.start()
        wait_for_events(ev, "start", {sup.prefix + "base"}, 60, sup)
        make_network(net, labels)
        time.sleep(1.0)
        for i in range(trials + 1):  # the first pair is a warm-up
            name = f"h{i:02d}"
            tmp = stage / f"{name}.toml"
            tmp.write_text(body)
            t0 = time.time_ns()
            os.rename(tmp, sup.sut_dir / f"{name}.toml")
            wait_for_events(ev, "start", {sup.prefix + name}, 30, sup)
            ta = (ev.first("start")[sup.prefix + name] - t0) / 1e9
            time.sleep(0.5)
            raw = f"{sup.prefix}raw{i:02d}"
            t0 = time.time_ns()
            r1 = subprocess.run(sleeper_argv("create", raw, name, labels, net),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            r2 = subprocess.run(["docker", "start", raw], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
            t_cli = (time.time_ns() - t0) / 1e9
            if r1.returncode or r2.returncode:
                raise RuntimeError(f"raw create/start failed: {r1.stderr}{r2.stderr}")
            wait_for_events(ev, "start", {raw}, 30)
            tb = (ev.first("start")[raw] - t0) / 1e9
            if i > 0:
                a.append(ta)
                b.append(tb)
                cli.append(t_cli)
            time.sleep(0.5)
    finally:
        ev.close()
        sup.stop_and_purge()
    sa, sb, sc = Stats(a), Stats(b), Stats(cli)
    p90a, p90b = sa.pct(90), sb.pct(90)
    over = sa.median - sb.median
    cmd = q(sleeper_argv("create", "$RUN-hot-rawNN", "hNN", [ctx.label, "io.labvisor.bench."
                                                             "trial=$RUN-hot"], "$RUN-hot-rawnet",
                         shown=True))
    return [Row(
        key=key, figure="hot add, file renamed in to container started (p50; p90)",
        value=f"{sa.median * 1000:.0f} ms; p90 {p90a * 1000:.0f} ms (n={sa.n})",
        baseline=f"`docker create` + `docker start`: {sb.median * 1000:.0f} ms; p90 "
                 f"{p90b * 1000:.0f} ms (n={sb.n})",
        ratio=f"+{over * 1000:.0f} ms (p90 +{(p90a - p90b) * 1000:.0f} ms)",
        target="≤ raw + 300 ms (debounce included)",
        verdict=verdict(over <= 0.3 and p90a - p90b <= 0.3),
        measured=[SUP_MEASURED.format(sup=ctx.supervisor, n="1 (then one more per trial)",
                                      interval="30s")
                  + "; each trial writes `hNN.toml` in a staging directory on the same "
                  "filesystem and renames it into the SUT directory, timed from the rename to "
                  "the container's `start` event",
                  f"baseline: `{cmd}` then `docker start $RUN-hot-rawNN`, timed from before "
                  "the create to the container's `start` event",
                  f"interleaved, {trials} pairs after one warm-up pair; the containers of "
                  "earlier trials stay up (idle) until the end"],
        notes=[f"the two baseline CLI commands themselves: {sc.fmt('ms', 0, 1000)}",
               "includes the supervisor's 150 ms trailing debounce and its full rescan; like "
               "the baseline, the SUT file goes inline in the environment and the binaries "
               "come from the tools volume"],
    )]


def bench_supervisor_footprint(ctx: Ctx) -> list[Row]:
    """Supervisor VmRSS and CPU over 20 s idle with 100 SUTs running (quick: 20)."""
    key = "supervisor-footprint"
    n = ctx.n(20, 100)
    window = ctx.n(10.0, 20.0)
    sup = Supervisor(ctx, ctx.work / key, "fp")
    names = [f"s{i:03d}" for i in range(n)]
    sup.write(names, sut_health("10s"))  # the default probe interval
    full = {sup.prefix + x for x in names}
    ev = DockerEvents(sup.trial, time.time_ns())
    try:
        sup.start()
        wait_for_events(ev, "start", full, 600, sup)
        # Idle means after the first probes: each container's turn to healthy is a change
        # the supervisor acts on (a pass, a status), the probes after it are not.
        wait_for_events(ev, "health_status: healthy", full, 120, sup)
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
        key=key, figure=f"supervisor RSS and CPU at {n} idle SUTs",
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


class JobRig:
    """A job-only agent on a broker, and a paho-mqtt (MQTT 5) client subscribed to its
    `<sut>/jobs/+` that records when each job's statuses arrive."""

    def __init__(self, ctx: Ctx, d: Path, name: str, port: int):
        import paho.mqtt.client as mqtt  # the venv's, as for the Python baselines

        self.ctx, self.name = ctx, name
        body = health_toml("2s", "10s") + "[job]\nqueue_limit = 1000\n"
        broker = ctx.broker
        ctx.broker = f"mqtt://127.0.0.1:{port}"
        try:
            self.p, hb, self.argv = start_agent(ctx, d, name, body)
        finally:
            ctx.broker = broker
        wait_for("the agent's heartbeat with the broker connected", 15,
                 lambda: read_heartbeat(hb).get("broker_connected") == "true")
        self.lock = threading.Condition()
        self.status: dict[str, dict[str, tuple[float, dict]]] = {}
        subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{ctx.run_id}-{name}",
                        protocol=mqtt.MQTTv5)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: subscribed.set()
        c.connect("127.0.0.1", port)
        # paho leaves Nagle on; the client must not add its own delayed-ACK stalls.
        c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.loop_start()
        self.c = c
        c.subscribe(f"{name}/jobs/+", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK")

    def _on_message(self, _c, _u, msg) -> None:
        t = time.perf_counter()
        try:
            js = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.status.setdefault(js.get("id", ""), {}).setdefault(js.get("state", ""),
                                                                     (t, js))
            self.lock.notify_all()

    def submit(self, jid: str) -> float:
        t0 = time.perf_counter()
        self.c.publish(f"{self.name}/submit", json.dumps({"id": jid, "script": "true"}), qos=1)
        return t0

    def wait(self, jid: str, state: str, limit: float = 10) -> tuple[float, dict]:
        deadline = time.monotonic() + limit
        with self.lock:
            while state not in self.status.get(jid, {}):
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise RuntimeError(f"job {jid} never reached {state}")
                self.lock.wait(left)
            return self.status[jid][state]

    def one(self, jid: str) -> tuple[float, float, float]:
        """(publish to running arriving, publish to queued_ms, queued_ms to started_ms)."""
        wall0 = time.time()
        t0 = self.submit(jid)
        t1, js = self.wait(jid, "running")
        self.wait(jid, "passed")
        return t1 - t0, js["queued_ms"] - wall0 * 1000, float(js["started_ms"] - js["queued_ms"])

    def burst(self, ids: list[str]) -> float:
        t0 = time.perf_counter()
        for jid in ids:
            self.submit(jid)
        return max(self.wait(jid, "passed", 120)[0] for jid in ids) - t0

    def close(self) -> float:
        self.c.loop_stop()
        self.c.disconnect()
        cpu = proc_cpu_seconds(self.p.pid) if self.p.poll() is None else 0.0
        self.ctx.stop(self.p)
        return cpu


def bench_job_dispatch(ctx: Ctx) -> list[Row]:
    """A job-only agent on the private broker; jobs published one at a time on `<sut>/submit`
    (paho-mqtt, MQTT 5, QoS 1), timed until the retained `running` status on `<sut>/jobs/<id>`
    reaches the same client; then bursts of trivial jobs until all passed. The headline broker
    is configured as labvisor ships it (`set_tcp_nodelay true`, as in mosquitto/mosquitto.conf
    and the managed broker); interleaved with the same on the stock private broker, to show what
    Nagle costs a lab that keeps its own broker's defaults."""
    key = "job-dispatch"
    n = ctx.n(50, 200)
    n_burst = ctx.n(50, 200)
    bursts = ctx.n(2, 3)
    d = ctx.work / key
    d.mkdir(parents=True)
    # The headline broker: the same config as tools/bench.sh's, plus set_tcp_nodelay (as shipped).
    port2 = free_port()
    conf = d / "mosquitto-nodelay.conf"
    conf.write_text(f"listener {port2} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 10000\nset_tcp_nodelay true\n")
    mosq = ctx.spawn([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=open(d / "mosquitto-nodelay.log", "ab"))
    wait_for("the second mosquitto", 10, lambda: port_open(port2))
    a = b = None
    try:
        a = JobRig(ctx, d / "default", "bench-jobs", ctx.port)
        b = JobRig(ctx, d / "nodelay", "bench-jobs-nd", port2)
        res: dict[str, list[tuple[float, float, float]]] = {"a": [], "b": []}
        for i in range(n + 5):  # five warm-up jobs each, interleaved A B A B
            ra, rb = a.one(f"d{i:04d}"), b.one(f"d{i:04d}")
            if i >= 5:
                res["a"].append(ra)
                res["b"].append(rb)
        rates: dict[str, list[float]] = {"a": [], "b": []}
        for k in range(bursts):
            ids = [f"b{k}x{i:04d}" for i in range(n_burst)]
            rates["a"].append(n_burst / a.burst(ids))
            rates["b"].append(n_burst / b.burst(ids))
        with a.lock:
            run_ms = [float(a.status[j]["passed"][1].get("ended_ms", 0)
                            - a.status[j]["passed"][1].get("started_ms", 0)) for j in ids]
    finally:
        cpu = a.close() if a else 0.0
        if b:
            b.close()
        ctx.stop(mosq)
    la, lb = Stats([x[0] for x in res["a"]]), Stats([x[0] for x in res["b"]])
    acc_a, acc_b = Stats([x[1] for x in res["a"]]), Stats([x[1] for x in res["b"]])
    st_a = Stats([x[2] for x in res["a"]])
    sr, srb = Stats(rates["a"]), Stats(rates["b"])
    p99 = lb.pct(99)
    ms = lambda s: (f"p50 {s.median * 1000:.1f} ms, p99 {s.pct(99) * 1000:.1f} ms "  # noqa: E731
                    f"(p10–p90 {s.pct(10) * 1000:.1f}–{s.pct(90) * 1000:.1f}, n={s.n})")
    return [
        Row(key=key, figure=f"job dispatch, publish to running ({n} jobs, one at a time)",
            value=ms(lb), baseline="none (testflinger polls every 10 s)",
            ratio=f"{p99 / 10:.4f} of 10 s (p99)", target="p99 ≤ 20 ms",
            verdict=verdict(p99 <= 0.020),
            measured=[f"agent: {q(a.argv)} with `[job] queue_limit = 1000` and no `command` "
                      "(job-only), on a mosquitto with `set_tcp_nodelay true` (the line "
                      "labvisor ships in mosquitto/mosquitto.conf and the managed broker)",
                      f"client: paho-mqtt (MQTT 5, TCP_NODELAY set on its socket) in the "
                      f"harness, subscribed to `bench-jobs/jobs/+` (QoS 1) before; publishes "
                      f"`{{\"id\": \"dNNNN\", \"script\": \"true\"}}` (QoS 1) to "
                      "`bench-jobs/submit`, timed until the `running` status of that id "
                      "arrives; the next job after `passed`; 5 warm-up jobs not counted",
                      "interleaved job by job with the same on the run's stock mosquitto "
                      "(its own agent and client)"],
            notes=[f"diagnostic, stock mosquitto (`set_tcp_nodelay` off, its default): "
                   f"{ms(la)}",
                   f"split from the statuses' own timestamps (ms resolution), stock broker: "
                   f"publish to `queued_ms` (delivery, accept, journal fsync) "
                   f"{acc_a.fmt('ms', 1)}; `queued_ms` to `started_ms` (start: journal "
                   f"fsync, job dir, fork/exec) {st_a.fmt('ms', 1)}; with the nodelay "
                   f"broker, publish to `queued_ms`: {acc_b.fmt('ms', 1)}",
                   "what limits it: the accept (journal fsync) and start (fork/exec) take about "
                   "a millisecond each; the rest is MQTT round trips. Every labvisor client "
                   "sets TCP_NODELAY; a broker that does not (mosquitto's default) makes small "
                   "packets wait for the 40 ms delayed ACK on loopback, as the stock-broker "
                   "line shows: add `set_tcp_nodelay true` to a lab's own broker"]),
        Row(key=key, figure=f"trivial jobs per second through one agent (burst of {n_burst})",
            value=srb.fmt("jobs/s", 0), baseline="none", ratio="-", target="-", verdict="-",
            measured=[f"same agent and client: {n_burst} jobs `true` published back to back "
                      "(QoS 1), timed from the first publish until the last `passed` status "
                      f"arrives; {bursts} bursts, interleaved with the stock broker's"],
            notes=[f"diagnostic, stock mosquitto: {sr.fmt('jobs/s', 0)}",
                   f"run time per job (`ended_ms` − `started_ms`, last burst, stock broker) "
                   f"{Stats(run_ms).fmt('ms', 1)}; agent CPU over the whole figure "
                   f"{cpu:.2f} s",
                   "what limits it: per job, journal fsyncs (on accept, at start and at "
                   "finish), a fork/exec of `/bin/sh`, and retained QoS 1 status publishes "
                   "(queued, running, passed, last_job), one job at a time"]),
    ]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


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
