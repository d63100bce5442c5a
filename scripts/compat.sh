#!/usr/bin/env bash
# Compatibility job: the test suite (without the compile step) and the sm_90a static report
# under the Triton the GPU machines run (3.6, with torch 2.13 CPU from the local mirror),
# next to the CI environment's newer Triton. Kernel tiles, autotuning and the torch.compile
# path have differed between the two (register spills, dynamo's ContextVar support), so
# both are checked. Own venv (.venv-compat); runs on a copy of the tree without the built
# extension (it belongs to the other torch). Extra arguments go to pytest.
# COMPAT_TORCH / COMPAT_TRITON pick other releases (own venv each), e.g. the newest:
#   COMPAT_TORCH=2.15.0 COMPAT_TRITON=3.9.0 PIP_CONSTRAINT=/dev/null bash scripts/compat.sh
# (PIP_CONSTRAINT: where a pip constraints file caps torch at the local mirror's release;
# torch releases without a local CPU wheel come from PyPI as the CUDA build, ~4 GB).
# COMPAT_BUILD=1 also builds the extension (CUDA kernels for TORCH_CUDA_ARCH_LIST, default
# 9.0a) against that torch's headers and runs the tests with it: with a CUDA build of torch
# this is the GPU machines' own build, e.g. their exact versions (PyPI, ~4.7 GB, ~1 min):
#   COMPAT_TORCH=2.11.0 COMPAT_BUILD=1 bash scripts/compat.sh
# (2026-11-27: 590 passed, 217 skipped, the build 33 s on 2 cores.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TORCH_VERSION=${COMPAT_TORCH:-2.13.0}
TRITON_VERSION=${COMPAT_TRITON:-3.6.0}
V=$ROOT/.venv-compat
if [ "$TORCH_VERSION/$TRITON_VERSION" != 2.13.0/3.6.0 ]; then
  V=$ROOT/.venv-compat-torch$TORCH_VERSION-triton$TRITON_VERSION
fi
if [ ! -x "$V/bin/python" ]; then
  echo "[compat] creating $(basename "$V") with $($PY --version)"
  "$PY" -m venv "$V"
fi
quiet() { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
echo "[compat] installing torch $TORCH_VERSION, triton $TRITON_VERSION in $(basename "$V")"
# numpy >= 2.4, as the GPU machines have: it refuses int() of a 1-element array, which the
# Triton 3.6 interpreter applies to range() bounds (our kernels pass them through
# vdit_kernels.triton.loop_bound; later Triton releases squeeze first)
if ! "$V/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" \
    "numpy>=2.4" pytest pytest-xdist einops setuptools wheel ninja 2>&1 | quiet; then
  echo "[compat] pip install failed"; exit 1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar --exclude='./.venv*' --exclude='./build' --exclude='./.git' --exclude='*.so' -cf - . | tar -xf - -C "$WORK"
cd "$WORK"
if [ "${COMPAT_BUILD:-0}" = 1 ]; then
  echo "[compat] building the extension against this torch (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0a})"
  export TORCH_CUDA_ARCH_LIST
  if ! "$V/bin/python" -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . \
      > "$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"; echo "[compat] build failed"; exit 1
  fi
  grep -h "\[vdit_kernels setup\]" "$WORK/build.log" | sort -u || true
else
  export VDIT_SKIP_BUILD=1
  "$V/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    --no-deps -e . 2>&1 | quiet
fi
"$V/bin/python" -c "import torch, triton, numpy; print('[compat] torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
# --disable-warnings: the 3.6 interpreter warns thousands of times about numpy conversions;
# TEST_WORKERS: pytest-xdist processes, as in scripts/test.sh
workers=${TEST_WORKERS:-2}
par=()
[ "$workers" = 1 ] || par=(-n "$workers")
"$V/bin/python" -m pytest tests -p no:cacheprovider --disable-warnings "${par[@]}" "$@"
