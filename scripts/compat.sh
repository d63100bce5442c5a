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
    "numpy>=2.4" pytest einops setuptools wheel 2>&1 | quiet; then
  echo "[compat] pip install failed"; exit 1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
tar --exclude='./.venv*' --exclude='./build' --exclude='./.git' --exclude='*.so' -cf - . | tar -xf - -C "$WORK"
cd "$WORK"
VDIT_SKIP_BUILD=1 "$V/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
  --no-deps -e . 2>&1 | quiet
"$V/bin/python" -c "import torch, triton, numpy; print('[compat] torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
# --disable-warnings: the 3.6 interpreter warns thousands of times about numpy conversions
VDIT_SKIP_BUILD=1 "$V/bin/python" -m pytest tests -p no:cacheprovider --disable-warnings "$@"
