"""The shared harness: results (`Row`, `Stats`), the run's context (`Ctx`), and the process,
timing and agent helpers every figure uses.

`Ctx` owns what a run starts: every process spawned through it is stopped at the end, and its
cleanup removes every Docker object carrying the run's label (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

BUSYBOX_IMAGE = "labvisor/busybox:local"
LABEL_KEY = "io.labvisor.bench.run"
GNU_TIME = "/usr/bin/time"


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


class FigureError(Exception):
    """A group of figures in which some could not be measured: `rows` holds what was measured,
    the failed ones as error rows. The run reports them and leaves BENCHMARKS.md alone."""

    def __init__(self, msg: str, rows: list[Row]):
        super().__init__(msg)
        self.rows = rows


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def q(argv: list) -> str:
    """`argv` as a shell command; an argument holding a `"$(...)"` substitution stays as is."""
    return " ".join(str(a) if '"$(' in str(a) else shlex.quote(str(a)) for a in argv)


# ---------------------------------------------------------------------------------------------
# the run's context


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
        self.scale_n: int = a.scale_n  # SUTs of the scale-500 group
        self.scale_mem_floor: Optional[float] = a.scale_mem_floor  # MiB, or the default
        self.procs: list[subprocess.Popen] = []
        self.containers: list[str] = []
        # Cold-start repetitions per size, shared by the cold-start and scaling-curve figures.
        self.cold_cache: dict[int, dict[str, list]] = {}
        for b in (self.agent, self.healthcheck, self.supervisor):
            if not os.access(b, os.X_OK):
                raise SystemExit(f"bench: {b} is missing (tools/bench.sh builds it)")

    def n(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def reproduce(self, key: str) -> str:
        extra = ""
        if key == "scale-500" and self.scale_n != 500:
            extra = f" --scale-n {self.scale_n}"
        return f"{self.bench_cmd} --only {key}{extra}"

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
        from .docker import docker_purge  # here: the docker module builds on this one

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


# ---------------------------------------------------------------------------------------------
# processes and timing


def wait_for(what: str, limit: float, f: Callable[[], object], every: float = 0.02):
    deadline = time.monotonic() + limit
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {limit}s waiting for {what}")
        time.sleep(every)


def clean_env(*drop: str) -> dict[str, str]:
    """This process's environment for a labvisor binary: warnings only, without `drop`."""
    env = dict(os.environ, LABVISOR_LOG="warn")
    for k in drop:
        env.pop(k, None)
    return env


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


def succeeded(timed: tuple[float, int], what: str) -> float:
    """The wall time of a `(seconds, exit status)` pair; raises "`what` exited N" on failure."""
    dt, rc = timed
    if rc != 0:
        raise RuntimeError(what.format(rc=rc))
    return dt


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


# ---------------------------------------------------------------------------------------------
# the agent as a plain process


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


def wait_connected(hb: Path) -> None:
    """Waits until the agent's heartbeat file says its broker is connected."""
    wait_for("the agent's heartbeat with the broker connected", 15,
             lambda: read_heartbeat(hb).get("broker_connected") == "true")


def start_agent(ctx: Ctx, d: Path, name: str, body: str, broker: Optional[str],
                stdout=subprocess.DEVNULL) -> tuple[subprocess.Popen, Path, list]:
    """Starts labvisor-agent as a plain process on `<d>/sut/<name>.toml`, on `broker` (a URL)
    or on none. Returns the process, its heartbeat file and its argv."""
    cfg = write_sut(d, name, body)
    hb = d / "run" / "heartbeat"
    argv = [ctx.agent, "--config", cfg, "--data-dir", d / "data", "--heartbeat-file", hb,
            "--grace", "2s"]
    if broker is not None:
        argv += ["--broker", broker]
    p = ctx.spawn(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                  stderr=open(d / "agent.stderr", "ab"), env=clean_env("LABVISOR_BROKER"))
    return p, hb, argv
