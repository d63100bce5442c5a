#!/usr/bin/env bash
# The main command: build the environment (scripts/env.sh), then run the benchmark suite.
# Extra arguments go to benchmarks/run.py (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m benchmarks.run "$@"
