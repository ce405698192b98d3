#!/usr/bin/env bash
# The kernel tests under Triton 3.6.0, the version on the GPU machine, in a venv of their own (.venv-triton36):
# interpreter tests of both kernels, their launchers' decisions, and the sm_90 compile with its SASS assertions.
#   bash .ci/kernel_tests_triton36.sh            (CI runs it after the main suite)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv-triton36
. .venv-triton36/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest -e .
python -m pip list 2>/dev/null | grep -iE "^(torch|triton|numpy) " || true
python -m pytest -q tests/test_kernel_attention.py tests/test_kernel_conv_projection.py tests/test_kernel_launch.py \
  tests/test_kernels_compile.py
