#!/usr/bin/env python3
"""Baseline for the "agent idle RSS" figure: the heartbeat part of the old Python stack.

A paho-mqtt client doing what labvisor-agent does when idle, written as plainly as the old
per-device Python process did it:

- runs the device process (``--child CMD...``) and drains its output to stdout and a log file;
- connects to the broker with a retained last will "lost" on ``<sut>/agent``;
- publishes a retained birth status on every connect;
- every ``--interval`` seconds publishes a retained JSON status on ``<sut>/agent`` and writes a
  heartbeat file atomically (temporary file plus rename).

It is our own code (bench/), used only as a baseline by bench/run.py.
"""

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sut", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--heartbeat-file", required=True)
    ap.add_argument("--log-file", required=True)
    ap.add_argument("--child", nargs=argparse.REMAINDER, default=[])
    a = ap.parse_args()

    topic = f"{a.sut}/agent"
    boot_id = secrets.token_hex(8)
    state = {"seq": 0, "connected": False}

    child = None
    if a.child:
        child = subprocess.Popen(a.child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        os.makedirs(os.path.dirname(a.log_file) or ".", exist_ok=True)

        def pump():
            with open(a.log_file, "ab") as log:
                for chunk in iter(lambda: child.stdout.read1(65536), b""):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                    log.write(chunk)
                    log.flush()

        threading.Thread(target=pump, daemon=True).start()

    def status(st: str) -> str:
        now = time.time()
        return json.dumps({
            "v": 1,
            "sut": a.sut,
            "state": st,
            "time_ms": int(now * 1000),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "seq": state["seq"],
            "boot_id": boot_id,
            "child": None if child is None else {
                "pid": child.pid, "alive": child.poll() is None, "restarts": 0},
            "broker_connected": state["connected"],
            "output_dropped": 0,
        })

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-heartbeat-{a.sut}")
    client.will_set(topic, json.dumps({"sut": a.sut, "state": "lost"}), qos=1, retain=True)

    def on_connect(c, _userdata, _flags, reason, _props):
        if not reason.is_failure:
            state["connected"] = True
            c.publish(topic, status("idle"), qos=1, retain=True)  # birth

    def on_disconnect(_c, _userdata, _flags, _reason, _props):
        state["connected"] = False

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.reconnect_delay_set(1, 30)
    client.connect_async(a.host, a.port, keepalive=15)
    client.loop_start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    hb_dir = os.path.dirname(a.heartbeat_file) or "."
    os.makedirs(hb_dir, exist_ok=True)
    while not stop.is_set():
        text = status("idle")
        tmp = a.heartbeat_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.heartbeat_file)
        client.publish(topic, text, qos=1, retain=True)
        state["seq"] += 1
        stop.wait(a.interval)

    client.publish(topic, status("offline"), qos=1, retain=True).wait_for_publish(2)
    client.disconnect()
    client.loop_stop()
    if child is not None and child.poll() is None:
        child.terminate()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
