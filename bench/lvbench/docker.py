"""Docker objects of a run: removal by label, `docker events` as a clock, networks, trials, and
`labvisor supervise` on a SUT directory of its own.

Every container, volume and network the figures make carries the run's label and a
per-repetition (trial) label, so that a repetition, and the whole run, can be removed by label.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .harness import BUSYBOX_IMAGE, LABEL_KEY, Ctx, clean_env


def docker_purge(label: str, tries: int = 5) -> list[str]:
    """Removes every container (with its anonymous volumes), volume and network labelled so;
    retries, since a network can still hold a removed container's endpoint for a moment.
    Returns what is left (nothing, normally)."""
    def ids(kind: list[str]) -> list[str]:
        out = subprocess.run(["docker"] + kind + ["-q", "--filter", f"label={label}"],
                             capture_output=True, text=True).stdout.split()
        return sorted(set(out))

    def quietly(argv: list[str]) -> None:
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    left: list[str] = []
    for attempt in range(tries):
        c = ids(["ps", "-a"])
        # Ten at a time: Engine 20.10 under load has left a network with a phantom endpoint
        # ("has active endpoints", removable only by a daemon restart) after one `docker rm -f`
        # of 100 running containers, which the CLI removes 50 at a time.
        for i in range(0, len(c), 10):
            quietly(["docker", "rm", "-f", "-v"] + c[i:i + 10])
        v = ids(["volume", "ls"])
        if v:
            quietly(["docker", "volume", "rm", "-f"] + v)
        n = ids(["network", "ls"])
        if n:
            quietly(["docker", "network", "rm"] + n)
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
        with self.cv:
            return self._first_locked(action)

    def _first_locked(self, action: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, a, _, name in self.events:
            if a == action and name not in out:
                out[name] = t
        return out

    def after(self, name: str, t_ns: int) -> list[tuple[int, str]]:
        """The events of container `name` from `t_ns` on: (time in ns, action), in order."""
        with self.cv:
            return [(t, a) for t, a, _, n in self.events if n == name and t >= t_ns]

    def wait(self, action: str, names: set[str], limit: float) -> dict[str, int]:
        deadline = time.monotonic() + limit
        with self.cv:
            while True:
                got = {n: t for n, t in self._first_locked(action).items() if n in names}
                if len(got) == len(names):
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out after {limit:.0f}s: {len(got)} of "
                                       f"{len(names)} containers had `{action}`")
                self.cv.wait(min(left, 0.5))

    def until(self, action: str, names: set[str], limit: float,
              check: Optional[Callable[[], None]] = None) -> int:
        """Waits until every one of `names` has had `action` (calling `check`, which may raise,
        every 2 s at the most); returns the time (ns) of the last of those first events."""
        deadline = time.monotonic() + limit
        while True:
            if check is not None:
                check()
            try:
                self.wait(action, names, min(2.0, max(0.1, deadline - time.monotonic())))
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        first = self.first(action)
        return max(first[x] for x in names)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@dataclasses.dataclass
class Trial:
    """One repetition's Docker objects: its own label beside the run's, and its name prefix."""

    label: str  # io.labvisor.bench.trial=<run id>-<tag>
    prefix: str  # <run id>-<tag>-
    labels: list[str]  # the run's label and the trial's


def trial(ctx: Ctx, tag: str) -> Trial:
    label = f"{LABEL_KEY.rsplit('.', 1)[0]}.trial={ctx.run_id}-{tag}"
    return Trial(label, f"{ctx.run_id}-{tag}-", [ctx.label, label])


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
    """`labvisor supervise` on a SUT directory of its own, labelled for this run and trial;
    without MQTT, or with `mqtt` = (the supervisor's broker URL, the agents' broker URL)."""

    def __init__(self, ctx: Ctx, d: Path, tag: str, mqtt: Optional[tuple[str, str]] = None):
        self.ctx = ctx
        self.d = d
        self.sut_dir = d / "sut"
        self.sut_dir.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        t = trial(ctx, tag)
        self.trial, self.prefix, self.labels = t.label, t.prefix, t.labels
        self.argv = [ctx.supervisor, "supervise", "--sut-dir", self.sut_dir,
                     "--id", f"{ctx.run_id}-{tag}", "--name-prefix", self.prefix,
                     "--extra-label", ctx.label, "--extra-label", self.trial,
                     "--agent-broker", mqtt[1] if mqtt else "none",
                     "--broker", mqtt[0] if mqtt else "none", "--metrics-listen", "none"]
        self.p: Optional[subprocess.Popen] = None

    def write(self, names: list[str], body: str) -> None:
        for n in names:
            (self.sut_dir / f"{n}.toml").write_text(f'image = "{BUSYBOX_IMAGE}"\n{body}')

    def start(self) -> None:
        env = clean_env("LABVISOR_BROKER", "LABVISOR_SUT_DIR", "LABVISOR_ID",
                        "LABVISOR_NAME_PREFIX", "LABVISOR_METRICS_LISTEN", "LABVISOR_AGENT_BROKER")
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
