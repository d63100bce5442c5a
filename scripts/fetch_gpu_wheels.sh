#!/usr/bin/env bash
# Download the optional peers that the GPU machines lack into .whl/ (git-ignored), for
# benchmarks/gpu_check.sh to install there (no package registry on those machines):
# liger-kernel (a RoPE the benchmarks compare with) and diffusers (tests/test_diffusers.py
# on the GPU), plus the one dependency of diffusers their image does not hold.
# Pure-Python wheels for the GPU image's Python 3.12; about 8 MB. Run here, then name
# .whl in the device tool's carry list.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp -d .whl \
    liger-kernel==0.8.5 diffusers==0.42.1 importlib_metadata==10.2.0 2>&1 \
    | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
ls -la .whl
