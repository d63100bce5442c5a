#!/usr/bin/env bash
# Create or refresh the project environment in .venv and install vdit_kernels with its
# compile step. Run by scripts/test.sh and scripts/bench.sh (bash scripts/env.sh); safe to run again.
# PYTHON picks the interpreter (default python3). VDIT_REBUILD=1 forces a rebuild of _C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "[env] installing requirements.txt"
# pip names every local mirror folder that lacks a package (one line per package and
# folder); those lines say nothing about the install, so they are dropped
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
    | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }; then
  echo "[env] pip install -r requirements.txt failed"; exit 1
fi
so=$(ls vdit_kernels/_C*.so 2>/dev/null | head -n1 || true)
if [ -z "$so" ] || [ "${VDIT_REBUILD:-0}" = 1 ] || [ -n "$(find setup.py csrc -newer "$so" -type f | head -n1)" ]; then
  echo "[env] building vdit_kernels (compile step: vdit_kernels._C)"
  start=$(date +%s)
  .venv/bin/python -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . 2>&1 \
    | grep -E "^\s*\[vdit_kernels setup\]|error|Error" | awk '!seen[$0]++' || true
  .venv/bin/python -c "import vdit_kernels._C" || { echo "[env] the build of vdit_kernels._C failed"; exit 1; }
  echo "[env] build finished in $(( $(date +%s) - start )) s"
else
  echo "[env] vdit_kernels._C is up to date ($so)"
fi
.venv/bin/python -c "import torch, vdit_kernels.backend as b; b.extension(); print('[env] torch', torch.__version__, '|', torch.ops.vdit_C.build_info())"
