#!/usr/bin/env bash
# Download the optional peers that the GPU machines lack into .whl/ (git-ignored), for
# benchmarks/gpu_check.sh to install there (no package registry on those machines):
# liger-kernel (a RoPE the benchmarks compare with) and diffusers (tests/test_diffusers.py
# on the GPU), plus the one dependency of diffusers their image does not hold, and
# flash-attn's Triton rotary module. Pure-Python wheels for the GPU image's Python 3.12
# (about 8 MB) and one .py file. Run here, then name
# .whl in the device tool's carry list.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp -d .whl \
    liger-kernel==0.8.5 diffusers==0.42.1 importlib_metadata==10.2.0 2>&1 \
    | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
# flash-attn's Triton rotary kernel, a RoPE peer the issue names: flash-attn's wheels need
# a CUDA build, but flash_attn/ops/triton/rotary.py is pure Triton; taken from the sdist
# (checked against PyPI's sha256) as .whl/flash_attn_rotary.py, which gpu_check.sh puts on
# the peers' path
FA=2.8.3
url=$(curl -fsS https://pypi.org/simple/flash-attn/ | grep -o "https://[^\"]*/flash_attn-$FA\.tar\.gz#sha256=[0-9a-f]*" | head -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsS -o "$tmp/fa.tar.gz" "${url%%#*}"
echo "${url##*sha256=}  $tmp/fa.tar.gz" | sha256sum -c --quiet
tar -xzf "$tmp/fa.tar.gz" -O "flash_attn-$FA/flash_attn/ops/triton/rotary.py" > .whl/flash_attn_rotary.py
ls -la .whl
