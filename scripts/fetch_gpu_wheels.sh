#!/usr/bin/env bash
# Download what the GPU machine lacks into .whl/ (ignored by git), to carry to it with the device
# tool (`carry: [".whl"]`): flashinfer 0.5.3 (a pure-Python JIT wheel) and what it imports.
# Python 3.12, manylinux x86-64: the GPU machine's, whatever this machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."
for spec in flashinfer-python==0.5.3 "apache-tvm-ffi>=0.1,<0.2" nvidia-cudnn-frontend; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -la .whl
