"""The rows of the `scale-500` group (figures/scale_500.py measures; this module words the
table): one row per figure of issue 16's table, each an error row when its measurement failed,
and a row saying how many SUTs were reached when that is fewer than asked."""

from __future__ import annotations

from typing import Callable

from ..harness import Ctx, Row, Stats, q, verdict

KEY = "scale-500"
MAX_AGE = 30.0  # health.max_age's default (README, config reference)


def rows(ctx: Ctx, m: dict, err: dict[str, str], lab) -> list[Row]:
    n, asked = len(lab.names), m["asked"]
    at = f"{n} SUTs" + ("" if n == asked else f" ({asked} asked)")
    out = [] if not lab.stopped else [reached_row(m, lab, at)]
    builders: list[tuple[str, tuple[str, ...], Callable[[], Row]]] = [
        (f"cold start of {at}, until all running", ("start", "api"),
         lambda: running_row(ctx, m, lab, at)),
        (f"cold start of {at}, until all healthy", ("start", "healthy"),
         lambda: healthy_row(m, lab, at)),
        (f"supervisor RSS at {at} idle", ("idle",), lambda: rss_row(m, at)),
        (f"idle cost of the whole lab at {at} (CPU over 60 s)", ("idle",),
         lambda: idle_row(ctx, m, at)),
        (f"hung agent (SIGSTOP) at {at}, until the supervisor acts", ("hang",),
         lambda: hang_row(m, at)),
        (f"memory per idle SUT at {at} (shim, docker-init, agent)", ("mem",),
         lambda: memory_row(m, at, err.get("py"))),
        (f"`labvisor status` at {at}", ("status",), lambda: status_row(m, at, n)),
        (f"hot add with {at} running (p50; p90)", ("hot",), lambda: hot_row(m, at)),
        (f"broker CPU at {at} idle agents", ("idle",), lambda: broker_row(m, at)),
    ]
    for figure, needs, build in builders:
        failed = [err.get(k, "") for k in needs if k in err or k not in m]
        if failed:
            out.append(Row(key=KEY, figure=figure, value="error", baseline="-", ratio="-",
                           target="-", verdict="error",
                           notes=[x for x in failed if x] or ["not measured"]))
        else:
            out.append(build())
    return out


def reached_row(m: dict, lab, at: str) -> Row:
    return Row(key=KEY, figure=f"SUTs reached on this machine ({m['asked']} asked)",
               value=f"{len(lab.names)}", baseline="-", ratio="-", target=f"{m['asked']}",
               verdict="missed",
               notes=[f"what stopped it: {lab.stopped}",
                      f"lowest MemAvailable during the start: {lab.min_avail:.0f} MiB; the "
                      "harness stopped adding (the SUT files not started left the directory, "
                      "the supervisor removed their containers) and measured every figure at "
                      "the count reached"])


def lab_measured(ctx: Ctx, m: dict, lab) -> str:
    b = m["broker"]
    argv = q(lab.sup.argv).replace(str(b["port"]), "$LABPORT").replace(b["gateway"], "$GW")
    return (f"lab: {argv}, on {m['asked']} job-only SUT files holding only `image = "
            "\"labvisor/busybox:local\"` (every health setting at its default); $LABPORT is the "
            "group's own mosquitto (anonymous; mosquitto/mosquitto.conf's persistence, queue "
            "and nodelay settings; `sys_interval 1`), listening on 127.0.0.1 and on $GW, the "
            "host's address on docker0, where the agents reach it")


def regime(m: dict) -> str:
    f, hc = m["features"], m.get("hc", {})
    rate = (f"`--healthcheck-rate` (default {f['healthcheck_rate']})"
            if f["healthcheck_rate"] is not None else "no `--healthcheck-rate` (fixed interval)")
    nets = (f"`--network-capacity` (default {f['network_capacity']})"
            if f["network_capacity"] is not None else "no `--network-capacity` (one network)")
    hc_s = (f"the containers' Docker health: interval {hc['interval']:.0f} s, timeout "
            f"{hc['timeout']:.0f} s, retries {hc['retries']}, start period "
            f"{hc['start_period']:.0f} s" if hc else "")
    return f"this supervisor has {rate} and {nets}; {hc_s}"


def driver_note(m: dict) -> str:
    d = m["features"]["driver"]
    note = f"Docker's storage driver here: {d}"
    if d == "fuse-overlayfs":
        note += (" (each container's image files go through its own FUSE mount, so their "
                 "pages are not shared between containers: the Python interpreter counts in "
                 "full in every container; the agent's binary comes from the tools volume, a "
                 "host directory, and is shared)")
    return note


def running_row(ctx: Ctx, m: dict, lab, at: str) -> Row:
    n, s, a = len(lab.names), lab.running_s, m["api"]
    par = m["features"]["parallelism"]
    ratio = s / a
    first = lab.first_create_s
    notes = [f"per SUT: labvisor {s / n * 1000:.0f} ms, bollard loop {a / n * 1000:.0f} ms"
             + ("" if first is None else f"; the supervisor's first container was created "
                f"{first:.2f} s after its start (its tools volume, network and first pass)"),
             "one repetition of each at this size: the lab first (its figures below are "
             "measured while it runs), the loop after the lab was removed",
             regime(m), f"removing the lab took {m['took'].get('teardown', 0):.0f} s"]
    if lab.stopped:
        notes.append(f"the supervisor was given {m['asked']} files: its time is until the last "
                     f"of the {n} it started; the loop created {n}")
    return Row(
        key=KEY, figure=f"cold start of {at}, until all running", value=f"{s:.1f} s",
        baseline=f"bollard loop ×{par}: {a:.1f} s", ratio=f"{ratio:.2f}",
        target="≤ 1.1 of the minimal bollard loop", verdict=verdict(ratio <= 1.1),
        measured=[lab_measured(ctx, m, lab),
                  "timed from the supervisor's start until the last container's `start` "
                  "event (the daemon's timestamp)",
                  f"baseline: $BIN/examples/bollard_loop --parallelism {par} (the supervisor's "
                  "`--parallelism` default), the cold-start figure's container with the lab's "
                  "SUT file inline, its own SUT name, `LABVISOR_BROKER` of the lab's agents and "
                  "the Healthcheck the supervisor gave them (from `docker inspect`); timed "
                  "from before its network is made until the last `start` event"],
        notes=notes)


def healthy_row(m: dict, lab, at: str) -> Row:
    h, hc, r = m["healthy"], m["hc"], lab.running_s
    iv = hc["interval"]
    if h["s"] is None:
        return Row(key=KEY, figure=f"cold start of {at}, until all healthy",
                   value=f"{h['count']} of {len(lab.names)} healthy after {h['limit']:.0f} s",
                   baseline=f"all running at {r:.1f} s; health interval {iv:.0f} s", ratio="-",
                   target="≤ all running + one health interval", verdict="missed",
                   notes=[regime(m)])
    over = h["s"] - r
    return Row(
        key=KEY, figure=f"cold start of {at}, until all healthy", value=f"{h['s']:.1f} s",
        baseline=f"all running at {r:.1f} s; health interval {iv:.0f} s",
        ratio=f"{over:+.1f} s ({over / iv:.2f} intervals)" if iv else f"{over:+.1f} s",
        target="≤ all running + one health interval", verdict=verdict(over <= iv),
        measured=["the same run, until the last `health_status: healthy` event"],
        notes=["Docker 20.10 runs a container's first probe one interval after its start, so "
               "the last container started is healthy about one interval plus its probe after "
               "all are running", regime(m)])


def rss_row(m: dict, at: str) -> Row:
    i = m["idle"]
    rss = Stats(i["rss"])
    st = i["status"]
    cpu = i["cpu"]["supervisor"]
    return Row(
        key=KEY, figure=f"supervisor RSS at {at} idle",
        value=f"{rss.median:.1f} MiB RSS (peak {st['VmHWM'] / 1024:.1f}), {cpu:.2f}% CPU",
        baseline="none", ratio="-", target="≤ 60 MiB", verdict=verdict(rss.median <= 60),
        measured=[f"VmRSS of the supervisor sampled every second over the idle window "
                  f"({i['window']:.0f} s, after all were healthy and 5 s more); VmHWM at its "
                  "end"],
        notes=[f"RSS over the window: {rss.fmt('MiB', 1)}; RssAnon {st['RssAnon'] / 1024:.1f} "
               f"MiB, RssFile {st['RssFile'] / 1024:.1f} MiB, threads {st['Threads']}",
               "the peak is reached while the containers are created"])


def idle_row(ctx: Ctx, m: dict, at: str) -> Row:
    i, bg = m["idle"], m.get("background", {})
    total = sum(i["cpu"].values())
    split = ", ".join(f"{k} {v:.1f}%" for k, v in i["cpu"].items())
    base = ("before the lab: " + ", ".join(f"{k} {v:.1f}%" for k, v in bg.items())
            + " (the rest of the machine)") if bg else "none"
    return Row(
        key=KEY, figure=f"idle cost of the whole lab at {at} (CPU over 60 s)",
        value=f"{total:.1f}% of one core", baseline=base, ratio="-",
        target="≤ 50% of one core (half a core)", verdict=verdict(total <= 50),
        measured=[f"utime+stime+cutime+cstime from /proc/<pid>/stat over {i['window']:.0f} s, "
                  f"idle (all healthy, 5 s settled): dockerd, containerd, the {i['shims']} "
                  "containerd-shims (with the runc processes and health probes they reap), "
                  f"docker-init and the agent of each container ({i['agents']} processes), "
                  "the lab's mosquitto, the supervisor"],
        notes=[f"split, % of one core: {split}",
               "dockerd and containerd serve every container on the machine: other work in "
               "the window counts here too (the baseline column: the same two over "
               f"{ctx.n(10, 15)} s before the lab started)"])


def hang_row(m: dict, at: str) -> Row:
    h, hc = m["hang"], m["hc"]
    docker_bound = MAX_AGE + hc["interval"] * hc["retries"]
    fmt = lambda v: "-" if v is None else f"{v:.1f} s"  # noqa: E731
    acted = h["acted"]
    return Row(
        key=KEY, figure=f"hung agent (SIGSTOP) at {at}, until the supervisor acts",
        value=f"{fmt(acted)} (started again after {fmt(h['restarted'])})",
        baseline=(f"Docker unhealthy after {fmt(h['unhealthy'])}" if h["unhealthy"] is not None
                  else "Docker had not called it unhealthy")
                 + f"; its bound max_age + interval × retries = {docker_bound:.0f} s",
        ratio="-", target=f"≤ max_age + 5 s = {MAX_AGE + 5:.0f} s",
        verdict=verdict(acted is not None and acted <= MAX_AGE + 5),
        measured=[f"SIGSTOP to the agent (labvisor-agent under docker-init) of {h['sut']}, "
                  "timed until the first `kill`, `die`, `stop` or `destroy` event of its "
                  "container (the supervisor acting), and until its next `start`"],
        notes=[f"events of the container after the SIGSTOP (probes left out): "
               f"{', '.join(h['events'])}", regime(m),
               "the restart stops the container with the supervisor's `--stop-timeout` "
               "(10 s): a stopped agent does not act on SIGTERM, so it is killed"])


def mib(d: dict) -> str:
    return (f"PSS {d['Pss'] / 1024:.2f} MiB (USS {d['Uss'] / 1024:.2f}, RSS "
            f"{d['Rss'] / 1024:.2f})")


def memory_row(m: dict, at: str, py_error: str | None) -> Row:
    lab = m["mem"]
    if "py" not in m:
        return Row(
            key=KEY, figure=f"memory per idle SUT at {at} (shim, docker-init, agent)",
            value=mib(lab["all"]), baseline=f"Python: not measured ({py_error})", ratio="-",
            target="measured and reported, beside the Python baseline", verdict="-",
            notes=["labvisor per kind, per SUT: " + "; ".join(
                f"{k}: {mib(lab[k])}" for k in ("shim", "init", "inside")), driver_note(m)])
    py = m["py"]
    ratio = lab["all"]["Pss"] / py["mem"]["all"]["Pss"]
    return Row(
        key=KEY, figure=f"memory per idle SUT at {at} (shim, docker-init, agent)",
        value=mib(lab["all"]),
        baseline=f"Python (paho-mqtt) ×{py['count']}: {mib(py['mem']['all'])}",
        ratio=f"{ratio:.2f} (PSS)", target="measured and reported, beside the Python baseline",
        verdict="-",
        measured=["per container: its containerd-shim, docker-init and what runs under it, "
                  "each from /proc/<pid>/smaps_rollup; PSS (shared pages divided among the "
                  "processes sharing them), USS (Private_Clean + Private_Dirty: what removing "
                  "the SUT frees) and RSS; the mean over the containers; no device process "
                  "(job-only SUTs)",
                  "baseline: " + q(py["argv"]).replace(str(m["broker"]["port"]), "$LABPORT")
                  .replace(m["broker"]["gateway"], "$GW") + " (labvisor/tf-style:local: "
                  "Debian's python3; paho-mqtt bind-mounted read-only from the bench venv), "
                  "the same for each container, measured once all were connected and 10 s "
                  "more"],
        notes=["labvisor per kind, per SUT: " + "; ".join(
                   f"{k}: {mib(lab[k])}" for k in ("shim", "init", "inside")),
               "Python per kind, per SUT: " + "; ".join(
                   f"{k}: {mib(py['mem'][k])}" for k in ("shim", "init", "inside")),
               "PSS of shared pages falls as more containers share them (the shim binary, the "
               "static agent, the interpreter); USS does not depend on the count",
               driver_note(m)])


def status_row(m: dict, at: str, n: int) -> Row:
    s = m["status"]
    t = {k: Stats(v) for k, v in s["times"].items()}
    extra = "; ".join(f"`--{k}`: {v.fmt('ms', 0, 1000)}" for k, v in t.items() if k != "plain")
    return Row(
        key=KEY, figure=f"`labvisor status` at {at}", value=t["plain"].fmt("ms", 0, 1000),
        baseline="none", ratio="-", target="< 1 s",
        verdict=verdict(t["plain"].median < 1.0),
        measured=["wall time of `$BIN/labvisor status --broker mqtt://127.0.0.1:$LABPORT` "
                  "against the lab's broker (its real retained topics: agent statuses, "
                  "supervisor views, the supervisor's status), interleaved with the variants "
                  "below"],
        notes=[f"variants: {extra}",
               f"`--json` showed {s['shown']} SUTs ({n} in the lab, plus any hot-added later)"])


def hot_row(m: dict, at: str) -> Row:
    h = m["hot"]
    sa, sb, sc = Stats(h["a"]), Stats(h["b"]), Stats(h["cli"])
    p90a, p90b = sa.pct(90), sb.pct(90)
    over = sa.median - sb.median
    return Row(
        key=KEY, figure=f"hot add with {at} running (p50; p90)",
        value=f"{sa.median * 1000:.0f} ms; p90 {p90a * 1000:.0f} ms (n={sa.n})",
        baseline=f"`docker create` + `docker start`: {sb.median * 1000:.0f} ms; p90 "
                 f"{p90b * 1000:.0f} ms (n={sb.n})",
        ratio=f"{over * 1000:+.0f} ms (p90 {(p90a - p90b) * 1000:+.0f} ms)",
        target="≤ raw + 300 ms, as at 1 SUT", verdict=verdict(over <= 0.3 and p90a - p90b <= 0.3),
        measured=["the hot-add figure's method with the lab running: a SUT file renamed into "
                  "its directory, timed to the container's `start` event; interleaved with "
                  "the same raw `docker create` + `docker start` as that figure, "
                  f"{sa.n} pairs after one warm-up pair"],
        notes=[f"the two baseline CLI commands themselves: {sc.fmt('ms', 0, 1000)}"])


def broker_row(m: dict, at: str) -> Row:
    i = m["idle"]
    r, c = i["rates"], i["count"]
    return Row(
        key=KEY, figure=f"broker CPU at {at} idle agents",
        value=f"{i['cpu']['broker']:.2f}% of one core; {c['in']:.1f} msg/s in, "
              f"{r['out']:.1f} msg/s out",
        baseline="none", ratio="-", target="measured, with the message rate", verdict="-",
        measured=["the lab's mosquitto over the idle window: utime+stime from /proc; PUBLISH "
                  "messages out and payload bytes both ways from its `$SYS/broker/publish/...` "
                  "counters (every second; the harness's own `$SYS` messages taken out); "
                  "messages in counted on a subscriber to `#` over "
                  f"{c['window']:.0f} s right after the window (mosquitto 2.0.11 does not count "
                  "them in `$SYS`; the retained ones replayed at its subscription not counted)"],
        notes=[f"payload bytes: in {r['in_bytes'] / 1024:.1f} KiB/s (the subscriber saw "
               f"{c['in_bytes'] / 1024:.1f} KiB/s), out {r['out_bytes'] / 1024:.1f} KiB/s"])
