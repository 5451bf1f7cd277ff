"""Figure `cold-start`: `labvisor supervise` on N SUT files from start until all containers run
(and until all are healthy); against a sequential `docker run -d` loop and a minimal parallel
create+start loop on the Engine API, interleaved in the same run.

[`cold_runs`] keeps its repetitions per size in the run's context, so the scaling curve reuses
the sizes measured here."""

from __future__ import annotations

from ..containers import SUP_MEASURED, agent_tar, cold_api, cold_cli, cold_supervisor, shown_argv
from ..harness import Ctx, Row, Stats, verdict

KEY = "cold-start"

CLI_MEASURED = ("CLI loop: `docker network create`, then for each SUT `{cmd}`, one after the "
                "other")
API_MEASURED = ("minimal loop: $BIN/examples/bollard_loop (supervisor/examples/bollard_loop.rs: "
                "bollard with a negotiated API version and two tokio workers, as the "
                "supervisor; 6 at a time, the supervisor's `--parallelism` default): "
                "`POST /containers/create` (same spec as the CLI loop: init, restart "
                "unless-stopped, labelled volume mount, network, hostname, labels, the agent "
                "as entrypoint with its exec-form healthcheck, the tools volume read-only, the "
                "SUT file inline in the environment, a tmpfs for the heartbeat) then "
                "`POST /containers/<id>/start`; network created first")
TIMING = ("timed from just before the first command until the last container's `start` event "
          "(the daemon's own timestamp, from `docker events`); every container, volume and "
          "network of a repetition is removed before the next")


def cold_runs(ctx: Ctx, n: int, reps: int, api: bool, healthy: int) -> dict:
    """Interleaved repetitions of supervisor / CLI loop / (API loops), cached per size. The
    supervisor's SUTs and the baselines' containers probe health every 30 s, so no probe runs
    during the start; in the first `healthy` repetitions, one more supervisor run with
    2 s probes is timed until all are healthy."""
    got = ctx.cold_cache.setdefault(n, {"sup": [], "healthy": [], "hrun": [], "cli": [],
                                        "api": [], "tar": []})
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


def bench(ctx: Ctx) -> list[Row]:
    n = ctx.n(20, 50)
    reps = ctx.n(1, 3)
    got = cold_runs(ctx, n, reps, api=True, healthy=ctx.n(1, reps))
    # Full runs only, once each after the interleaved ones: is 6 the engine's limit (the API
    # loop 12 at a time), and what does running the agent cost the engine (the API loop with
    # `sleep` and no healthcheck, as the baselines were first measured)?
    sweep = {} if ctx.quick else {
        "12": cold_api(ctx, n, f"c{n}p12", parallelism=12),
        "sleep": cold_api(ctx, n, f"c{n}sl", sleeper=True)}
    return [running_row(ctx, n, got, sweep), healthy_row(n, got)]


def running_row(ctx: Ctx, n: int, got: dict, sweep: dict[str, float]) -> Row:
    s, c, a, t = (Stats(got[k]) for k in ("sup", "cli", "api", "tar"))
    tar_mb = len(agent_tar(ctx)) / 1e6
    rc, ra = s.median / c.median, s.median / a.median
    cmd = shown_argv(ctx, "run", "$RUN-<trial>-sNNN", "sNNN", "$RUN-<trial>", "$RUN-<trial>-net")
    return Row(
        key=KEY, figure=f"cold start of {n} SUTs, until all running",
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
            f"starting compete with the engine for the 2 cores)"] if sweep else []))


def healthy_row(n: int, got: dict) -> Row:
    h, hr = Stats(got["healthy"]), Stats(got["hrun"])
    interval = "2s"
    return Row(
        key=KEY, figure=f"cold start of {n} SUTs, until all healthy",
        value=h.fmt("s", 2), baseline="none (Docker's first probe waits one interval)",
        ratio="-", target="-", verdict="-",
        measured=[f"a separate supervisor run per repetition ({h.n} in all), the same "
                  f"but with `[health] interval = \"{interval}\"` (retries 1, start period "
                  "0 s), until the last `health_status: healthy` event"],
        notes=[f"Docker 20.10 runs the first probe one interval ({interval}) after the "
               f"start; in these runs all were running after {hr.fmt('s', 2)} (the probes "
               f"of the first containers already compete with the later starts), and "
               f"healthy {h.median - hr.median:.2f} s later (medians)"])
