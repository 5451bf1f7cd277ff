"""A lab at scale, for the `scale-500` group: a broker the agents reach from their containers,
the lab's processes found through Docker and /proc, and what they cost (CPU, memory).

The broker is the group's own mosquitto (not the run's shared one, so that its CPU and message
counts are the lab's alone), configured as mosquitto/mosquitto.conf ships it but anonymous: on
127.0.0.1 for the supervisor, `labvisor status` and the harness, and on the host's address on
Docker's default bridge (docker0, what `host-gateway` names) for the agents. A container on any
bridge network reaches that address through the host's INPUT chain, whichever labvisor network
(`labvisor.net`, `labvisor.net.2`, ...) it is on.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

from .harness import Ctx, free_port, port_open, wait_for

CLK = os.sysconf("SC_CLK_TCK")


def host_gateway() -> str:
    """The host's IPv4 address on docker0 (Docker's `host-gateway`)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True,
                         text=True).stdout.split()
    if "inet" in out:
        return out[out.index("inet") + 1].split("/")[0]
    gw = subprocess.run(["docker", "network", "inspect", "bridge", "--format",
                         "{{range .IPAM.Config}}{{.Gateway}}{{end}}"], capture_output=True,
                        text=True).stdout.strip()
    if not gw:
        raise RuntimeError("cannot find the host's address on docker0")
    return gw


def _raise_nofile() -> None:
    """In the broker's child: as many descriptors as the hard limit allows (one per client)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class LabBroker:
    """The group's mosquitto, and a harness client that follows its `$SYS` publish counters.

    mosquitto 2.0.11 never counts PUBLISH packets received (`$SYS/broker/publish/messages/
    received` stays 0), so messages in are counted on a subscriber to `#` ([`count_in`]);
    messages out and bytes both ways come from `$SYS`, which publishes a value when it changes."""

    SYS = ("$SYS/broker/publish/messages/sent", "$SYS/broker/publish/bytes/received",
           "$SYS/broker/publish/bytes/sent")

    def __init__(self, ctx: Ctx, d: Path):
        self.d = d
        d.mkdir(parents=True, exist_ok=True)
        self.gateway = host_gateway()
        self.port = free_port()
        (d / "data").mkdir(exist_ok=True)
        self.conf = d / "mosquitto.conf"
        self.conf.write_text(
            "per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            f"listener {self.port} {self.gateway}\n"
            "allow_anonymous true\n"
            f"persistence true\npersistence_location {d / 'data'}/\nautosave_interval 60\n"
            "max_packet_size 8454144\nmax_queued_messages 10000\nmax_inflight_messages 100\n"
            "set_tcp_nodelay true\nsys_interval 1\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n")
        exe = subprocess.run(["sh", "-c", "command -v mosquitto || echo /usr/sbin/mosquitto"],
                             capture_output=True, text=True).stdout.strip()
        self.p = ctx.spawn([exe, "-c", self.conf], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=open(d / "mosquitto.log", "ab"),
                           preexec_fn=_raise_nofile)
        wait_for("the lab's mosquitto", 10,
                 lambda: self.p.poll() is not None or port_open(self.port))
        if self.p.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(d / 'mosquitto.log').read_text()[-1000:]}")
        self.local = f"mqtt://127.0.0.1:{self.port}"
        self.agents = f"mqtt://{self.gateway}:{self.port}"
        self.lock = threading.Lock()
        self.latest: dict[str, int] = {}
        self.own = [0, 0]  # $SYS messages and payload bytes delivered to the harness
        self.client = None

    def _client(self, name: str, on_message):
        import paho.mqtt.client as mqtt  # the venv's, as for the Python baselines

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{self.port}")
        c.on_message = on_message
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        return c

    def follow(self) -> None:
        """Subscribes the harness to the `$SYS` counters (updated every second)."""
        def on_message(_c, _u, msg) -> None:
            with self.lock:
                self.own[0] += 1
                self.own[1] += len(msg.payload)
                try:
                    self.latest[msg.topic] = int(msg.payload)
                except ValueError:
                    pass

        self.client = self._client("sys", on_message)
        for t in self.SYS:
            self.client.subscribe(t, qos=0)
        wait_for("the broker's $SYS counters", 15,
                 lambda: all(t in self.latest for t in self.SYS), every=0.2)

    def mark(self) -> tuple[float, dict[str, int], list[int]]:
        """(now, the latest value of each counter, what the harness has had of `$SYS`)."""
        with self.lock:
            return time.monotonic(), dict(self.latest), list(self.own)

    def rates(self, a: tuple, b: tuple) -> dict[str, float]:
        """Per second between two marks: PUBLISH messages out, payload bytes in and out; out
        without the `$SYS` messages the harness itself received."""
        dt = b[0] - a[0]
        d = {t: b[1][t] - a[1][t] for t in self.SYS}
        return {"out": (d[self.SYS[0]] - (b[2][0] - a[2][0])) / dt,
                "in_bytes": d[self.SYS[1]] / dt,
                "out_bytes": (d[self.SYS[2]] - (b[2][1] - a[2][1])) / dt}

    def count_in(self, window: float) -> dict[str, float]:
        """PUBLISH messages (and payload bytes) into the broker per second, counted on a
        subscriber to `#` over `window` seconds: every message published reaches it once, live
        (retain flag clear); the retained ones replayed at its subscription are not counted."""
        got = [0, 0]
        lock = threading.Lock()

        def on_message(_c, _u, msg) -> None:
            if not msg.retain:
                with lock:
                    got[0] += 1
                    got[1] += len(msg.payload)

        c = self._client("count", on_message)
        try:
            c.subscribe("#", qos=0)
            time.sleep(1.0)  # the retained replay
            with lock:
                g0 = list(got)
            t0 = time.monotonic()
            time.sleep(window)
            with lock:
                g1 = list(got)
            dt = time.monotonic() - t0
        finally:
            c.loop_stop()
            c.disconnect()
        return {"in": (g1[0] - g0[0]) / dt, "in_bytes": (g1[1] - g0[1]) / dt, "window": dt}

    def close(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()


# ---------------------------------------------------------------------------------------------
# processes


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pids_named(name: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and comm(int(p)) == name]


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            out += [int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cpu_with_children(pid: int) -> Optional[float]:
    """utime+stime+cutime+cstime of a process in seconds (its reaped children's included: for a
    shim, the runc processes and health probes it reaped), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            x = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(v) for v in x[11:15]) / CLK


def cpu_sum(pids: Iterable[int]) -> dict[int, float]:
    return {p: c for p in pids if (c := cpu_with_children(p)) is not None}


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Private_Clean, Private_Dirty of a process, in KiB (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    out[k] = int(v.split()[0])
    except OSError:
        return {}
    return out


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def inspect(names: list[str], fmt: str) -> list[str]:
    """`docker inspect --format FMT` of containers, 100 names per call, one line each."""
    out: list[str] = []
    for i in range(0, len(names), 100):
        r = subprocess.run(["docker", "inspect", "--format", fmt] + names[i:i + 100],
                           capture_output=True, text=True)
        out += [line for line in r.stdout.splitlines() if line.strip()]
    return out


class SutProcs:
    """One container's processes: its shim, its init (docker-init, the container's pid 1) and
    what runs under the init (the agent, or the Python baseline)."""

    def __init__(self, name: str, init: int):
        self.name, self.init = name, init
        self.shim = ppid(init)
        self.inside = descendants(init)

    def all(self) -> list[int]:
        return [self.shim, self.init] + self.inside


def sut_procs(names: list[str]) -> list[SutProcs]:
    """The processes of each running container of `names`."""
    out = []
    for line in inspect(names, "{{.Name}} {{.State.Pid}}"):
        name, pid = line.split()
        if int(pid) > 0:
            out.append(SutProcs(name.lstrip("/"), int(pid)))
    return out


def memory(procs: list[SutProcs]) -> dict[str, dict[str, float]]:
    """Mean KiB per container of Rss, Pss and USS (Private_Clean + Private_Dirty), in all and
    for each kind of process: `shim`, `init`, `inside`."""
    tot: dict[str, dict[str, float]] = {k: {"Rss": 0, "Pss": 0, "Uss": 0}
                                        for k in ("all", "shim", "init", "inside")}
    for sp in procs:
        for kind, pids in (("shim", [sp.shim]), ("init", [sp.init]), ("inside", sp.inside)):
            for pid in pids:
                m = smaps_rollup(pid)
                if not m:
                    continue
                uss = m["Private_Clean"] + m["Private_Dirty"]
                for k, v in (("Rss", m["Rss"]), ("Pss", m["Pss"]), ("Uss", uss)):
                    tot[kind][k] += v
                    tot["all"][k] += v
    n = max(1, len(procs))
    return {kind: {k: v / n for k, v in d.items()} for kind, d in tot.items()}
