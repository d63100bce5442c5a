#!/usr/bin/env bash
# The test command: build the environment (scripts/env.sh), then run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k rope).
# TEST_WORKERS: pytest-xdist processes (default 2, as CI's 2 cores; 1: none). The suite is
# mostly single-threaded Python (the Triton interpreter), so two processes take about a
# fifth less time than one on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
workers=${TEST_WORKERS:-2}
par=()
[ "$workers" = 1 ] || par=(-n "$workers")
exec .venv/bin/python -m pytest tests "${par[@]}" "$@"
