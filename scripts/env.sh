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
# what a build depends on besides its sources: a change of these rebuilds too (a .so built
# for another torch, or for other architectures, would otherwise be kept as "up to date")
stamp_file=.venv/vdit_build_stamp
stamp="torch=$(.venv/bin/python -c 'import torch; print(torch.__version__)') \
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-} CUDA_PATH=${CUDA_PATH:-} \
VDIT_SKIP_CUDA_BUILD=${VDIT_SKIP_CUDA_BUILD:-0} CXX=${CXX:-}"
skip_build=${VDIT_SKIP_BUILD:-0}
reason=""
if [ "$skip_build" != 0 ]; then reason="VDIT_SKIP_BUILD=$skip_build: no extension"
elif [ -z "$so" ]; then reason="no build yet"
elif [ "${VDIT_REBUILD:-0}" = 1 ]; then reason="VDIT_REBUILD=1"
elif [ -n "$(find setup.py csrc -newer "$so" -type f | head -n1)" ]; then reason="sources changed"
elif [ "$(cat "$stamp_file" 2>/dev/null || true)" != "$stamp" ]; then
  reason="build settings changed: $(cat "$stamp_file" 2>/dev/null || echo 'none recorded') -> $stamp"
fi
if [ -n "$reason" ]; then
  echo "[env] building vdit_kernels (compile step: vdit_kernels._C; $reason)"
  start=$(date +%s)
  log=$(mktemp /tmp/vdit-build.XXXXXX.log)
  # pip's own status decides (a failed rebuild leaves the earlier .so importable)
  if ! .venv/bin/python -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . \
      > "$log" 2>&1; then
    grep -E "^\s*\[vdit_kernels setup\]|error|Error" "$log" | awk '!seen[$0]++' | tail -n 40 || true
    echo "[env] the build of vdit_kernels._C failed (pip's whole log: $log)"; exit 1
  fi
  grep -E "^\s*\[vdit_kernels setup\]" "$log" | awk '!seen[$0]++' || true
  rm -f "$log"
  if [ "$skip_build" = 0 ]; then
    .venv/bin/python -c "import vdit_kernels._C" || { echo "[env] the build of vdit_kernels._C does not load"; exit 1; }
    echo "$stamp" > "$stamp_file"
  else
    rm -f "$stamp_file"
  fi
  echo "[env] build finished in $(( $(date +%s) - start )) s"
else
  echo "[env] vdit_kernels._C is up to date ($so)"
fi
if [ "$skip_build" = 0 ]; then
  .venv/bin/python -c "import torch, vdit_kernels.backend as b; b.extension(); print('[env] torch', torch.__version__, '|', torch.ops.vdit_C.build_info())"
else
  .venv/bin/python -c "import torch; print('[env] torch', torch.__version__, '| no vdit_kernels._C (VDIT_SKIP_BUILD)')"
fi
