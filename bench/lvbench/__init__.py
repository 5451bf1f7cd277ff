"""labvisor's benchmark suite: every performance figure beside its baseline, in one run.

Run it through ``tools/bench.sh [--quick] [--only FIGURE]`` (its entry point is
``bench/run.py``), which builds the static binaries and the busybox image, prepares a Python venv
with paho-mqtt for the baselines, starts a private mosquitto on a free loopback port, and removes
every process, file and Docker object this run created (Docker objects carry the label
``io.labvisor.bench.run=<run id>``).

The package holds the shared harness and one module per figure:

- ``harness``: results (``Row``, ``Stats``), the run's context (``Ctx``: binaries, broker,
  scratch directory, processes to stop), process and timing helpers, the plain-process agent;
- ``docker``: Docker objects of a run (purge by label, ``docker events``, networks, trials) and
  ``labvisor supervise`` on a SUT directory of its own;
- ``containers``: the baseline container (the supervisor's spec as a CLI command and as an
  Engine API body) and the timed cold-start loops shared by the supervisor figures;
- ``lab``: the 500-SUT group's lab: its own broker, its processes from Docker and /proc, their
  CPU and memory;
- ``report``: the table, the details, the results section of BENCHMARKS.md;
- ``figures``: one module per figure, each ``bench(ctx) -> list[Row]``, listed in ``FIGURES``;
- ``cli``: the command line and the run loop.

A figure measures labvisor and its baseline in the same run, interleaved A B A B so that drift on
the machine hits both alike, and reports the median and the spread over the runs. The suite
reports; it never passes or fails on a figure. It exits non-zero only when a figure could not be
measured at all (the harness failed), and then it leaves BENCHMARKS.md alone.
"""
