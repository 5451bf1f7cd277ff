"""Figure `job-dispatch` (two rows): a job-only agent on the private broker; jobs published one
at a time on `<sut>/submit` (paho-mqtt, MQTT 5, QoS 1), timed until the retained `running`
status on `<sut>/jobs/<id>` reaches the same client; then bursts of trivial jobs until all
passed. The headline broker is configured as labvisor ships it (`set_tcp_nodelay true`, as in
mosquitto/mosquitto.conf and the managed broker); interleaved with the same on the stock private
broker, to show what Nagle costs a lab that keeps its own broker's defaults."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from ..harness import (Ctx, Row, Stats, free_port, health_toml, port_open, proc_cpu_seconds, q,
                       start_agent, verdict, wait_connected, wait_for)

KEY = "job-dispatch"


class JobRig:
    """A job-only agent on a broker, and a paho-mqtt (MQTT 5) client subscribed to its
    `<sut>/jobs/+` that records when each job's statuses arrive."""

    def __init__(self, ctx: Ctx, d: Path, name: str, port: int):
        import paho.mqtt.client as mqtt  # the venv's, as for the Python baselines

        self.ctx, self.name = ctx, name
        body = health_toml("2s", "10s") + "[job]\nqueue_limit = 1000\n"
        self.p, hb, self.argv = start_agent(ctx, d, name, body,
                                            broker=f"mqtt://127.0.0.1:{port}")
        wait_connected(hb)
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


def nodelay_broker(ctx: Ctx, d: Path) -> tuple[subprocess.Popen, int]:
    """The headline broker: the same config as tools/bench.sh's, plus set_tcp_nodelay (as
    shipped); its process and port."""
    port = free_port()
    conf = d / "mosquitto-nodelay.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 10000\nset_tcp_nodelay true\n")
    mosq = ctx.spawn([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=open(d / "mosquitto-nodelay.log", "ab"))
    wait_for("the second mosquitto", 10, lambda: port_open(port))
    return mosq, port


def bench(ctx: Ctx) -> list[Row]:
    n = ctx.n(50, 200)
    n_burst = ctx.n(50, 200)
    bursts = ctx.n(2, 3)
    d = ctx.work / KEY
    d.mkdir(parents=True)
    mosq, port2 = nodelay_broker(ctx, d)
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
    return [dispatch_row(n, b.argv, res),
            throughput_row(n_burst, bursts, rates, Stats(run_ms), cpu)]


def ms(s: Stats) -> str:
    return (f"p50 {s.median * 1000:.1f} ms, p99 {s.pct(99) * 1000:.1f} ms "
            f"(p10–p90 {s.pct(10) * 1000:.1f}–{s.pct(90) * 1000:.1f}, n={s.n})")


def dispatch_row(n: int, argv: list, res: dict[str, list[tuple[float, float, float]]]) -> Row:
    la, lb = Stats([x[0] for x in res["a"]]), Stats([x[0] for x in res["b"]])
    acc_a, acc_b = Stats([x[1] for x in res["a"]]), Stats([x[1] for x in res["b"]])
    st_a = Stats([x[2] for x in res["a"]])
    p99 = lb.pct(99)
    return Row(
        key=KEY, figure=f"job dispatch, publish to running ({n} jobs, one at a time)",
        value=ms(lb), baseline="none (testflinger polls every 10 s)",
        ratio=f"{p99 / 10:.4f} of 10 s (p99)", target="p99 ≤ 20 ms",
        verdict=verdict(p99 <= 0.020),
        measured=[f"agent: {q(argv)} with `[job] queue_limit = 1000` and no `command` "
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
               "line shows: add `set_tcp_nodelay true` to a lab's own broker"])


def throughput_row(n_burst: int, bursts: int, rates: dict[str, list[float]], run_ms: Stats,
                   cpu: float) -> Row:
    sr, srb = Stats(rates["a"]), Stats(rates["b"])
    return Row(
        key=KEY, figure=f"trivial jobs per second through one agent (burst of {n_burst})",
        value=srb.fmt("jobs/s", 0), baseline="none", ratio="-", target="-", verdict="-",
        measured=[f"same agent and client: {n_burst} jobs `true` published back to back "
                  "(QoS 1), timed from the first publish until the last `passed` status "
                  f"arrives; {bursts} bursts, interleaved with the stock broker's"],
        notes=[f"diagnostic, stock mosquitto: {sr.fmt('jobs/s', 0)}",
               f"run time per job (`ended_ms` − `started_ms`, last burst, stock broker) "
               f"{run_ms.fmt('ms', 1)}; agent CPU over the whole figure "
               f"{cpu:.2f} s",
               "what limits it: per job, journal fsyncs (on accept, at start and at "
               "finish), a fork/exec of `/bin/sh`, and retained QoS 1 status publishes "
               "(queued, running, passed, last_job), one job at a time"])
