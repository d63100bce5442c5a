#!/usr/bin/env bash
# The test command: build the environment (scripts/env.sh), then run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k rope).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest tests "$@"
