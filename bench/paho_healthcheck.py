#!/usr/bin/env python3
"""Baseline for the "healthcheck per exec" figure: the old stack's way of checking health.

Connects to the broker, subscribes to ``<sut>/agent`` and waits for a fresh status message: one
published live after the subscription (not the retained copy the broker replays at once).
Exits 0 when one arrives within ``--timeout`` seconds, 1 otherwise. A live agent must be
publishing, so the check takes up to one heartbeat period, plus the interpreter's start and the
MQTT connect.

It is our own code (bench/), used only as a baseline by bench/run.py.
"""

import argparse
import sys
import threading

import paho.mqtt.client as mqtt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sut", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()

    fresh = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)

    def on_connect(c, _userdata, _flags, reason, _props):
        if not reason.is_failure:
            c.subscribe(f"{a.sut}/agent", qos=0)

    def on_message(_c, _userdata, msg):
        if not msg.retain:
            fresh.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(a.host, a.port, keepalive=15)
    except OSError as e:
        print(f"unhealthy: cannot connect to the broker: {e}")
        return 1
    client.loop_start()
    ok = fresh.wait(a.timeout)
    client.disconnect()
    client.loop_stop()
    print("ok: fresh status" if ok else f"unhealthy: no fresh status within {a.timeout}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
