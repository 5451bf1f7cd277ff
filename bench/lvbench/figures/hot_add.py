"""Figure `hot-add`: an idle supervisor; one SUT file renamed into its directory, timed until
that container has started; against `docker create` + `docker start` of the same spec,
interleaved."""

from __future__ import annotations

import os
import subprocess
import time

from ..containers import SUP_MEASURED, baseline_volumes, shown_argv, sleeper_argv
from ..docker import DockerEvents, Supervisor, make_network, sut_health
from ..harness import BUSYBOX_IMAGE, Ctx, Row, Stats, verdict

KEY = "hot-add"


def trial_pair(sup: Supervisor, ev: DockerEvents, i: int, body: str, net: str) -> tuple:
    """One SUT file renamed in, then one raw create + start: (seconds until the SUT's container
    started, seconds until the raw one started, seconds the two raw CLI commands took)."""
    name = f"h{i:02d}"
    tmp = sup.d / "stage" / f"{name}.toml"
    tmp.write_text(body)
    t0 = time.time_ns()
    os.rename(tmp, sup.sut_dir / f"{name}.toml")
    ta = (ev.until("start", {sup.prefix + name}, 30, sup.check_alive) - t0) / 1e9
    time.sleep(0.5)
    raw = f"{sup.prefix}raw{i:02d}"
    t0 = time.time_ns()
    r1 = subprocess.run(sleeper_argv("create", raw, name, sup.labels, net),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r2 = subprocess.run(["docker", "start", raw], stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
    t_cli = (time.time_ns() - t0) / 1e9
    if r1.returncode or r2.returncode:
        raise RuntimeError(f"raw create/start failed: {r1.stderr}{r2.stderr}")
    tb = (ev.until("start", {raw}, 30) - t0) / 1e9
    return ta, tb, t_cli


def bench(ctx: Ctx) -> list[Row]:
    trials = ctx.n(6, 20)
    baseline_volumes(ctx)
    sup = Supervisor(ctx, ctx.work / KEY, "hot")
    sup.write(["base"], sut_health("30s"))
    body = f'image = "{BUSYBOX_IMAGE}"\n{sut_health("30s")}'
    (sup.d / "stage").mkdir(parents=True)
    net = sup.prefix + "rawnet"
    ev = DockerEvents(sup.trial, time.time_ns())
    a, b, cli = [], [], []
    try:
        sup.start()
        ev.until("start", {sup.prefix + "base"}, 60, sup.check_alive)
        make_network(net, sup.labels)
        time.sleep(1.0)
        for i in range(trials + 1):  # the first pair is a warm-up
            ta, tb, t_cli = trial_pair(sup, ev, i, body, net)
            if i > 0:
                a.append(ta)
                b.append(tb)
                cli.append(t_cli)
            time.sleep(0.5)
    finally:
        ev.close()
        sup.stop_and_purge()
    return [row(ctx, trials, Stats(a), Stats(b), Stats(cli))]


def row(ctx: Ctx, trials: int, sa: Stats, sb: Stats, sc: Stats) -> Row:
    p90a, p90b = sa.pct(90), sb.pct(90)
    over = sa.median - sb.median
    cmd = shown_argv(ctx, "create", "$RUN-hot-rawNN", "hNN", "$RUN-hot", "$RUN-hot-rawnet")
    return Row(
        key=KEY, figure="hot add, file renamed in to container started (p50; p90)",
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
    )
