#!/usr/bin/env python3
"""labvisor's benchmark suite, the entry point: `tools/bench.sh` runs this file with the
baselines' Python (see `--help`). The suite itself is the package beside it, `lvbench/`: the
shared harness and one module per figure (`lvbench/figures/`)."""

import sys
from pathlib import Path

# This file's directory holds the package; also when Python does not put it on the path itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lvbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
