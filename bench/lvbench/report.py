"""The report: the table, the details of every figure (what was timed, notes), the machine,
and the results section of BENCHMARKS.md between its markers."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .harness import Ctx, Row

MARK_START = "<!-- results:start -->"
MARK_END = "<!-- results:end -->"


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


def print_rows(rows: list[Row]) -> None:
    """A figure's rows as progress lines, as soon as it is measured."""
    for r in rows:
        print(f"bench:   {r.figure}: {r.value} | {r.baseline} | ratio {r.ratio} | "
              f"target {r.target}: {r.verdict}", flush=True)


def print_report(ctx: Ctx, rows: list[Row], took: float, load: tuple[float, float]) -> None:
    """The table and the details on stdout, at the end of a run."""
    print()
    print(table(rows))
    print()
    print(details(ctx, rows))
    print(f"\nbench: took {took / 60:.1f} min; load average {load[0]:.2f} at start, {load[1]:.2f} "
          f"at end")
