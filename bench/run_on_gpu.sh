#!/usr/bin/env bash
# The GPU work of a session with a lent H100/H200, in as few device calls as possible (each call: 10 minutes max).
#   bash bench/run_on_gpu.sh tests     versions + every gpu-marked test
#   bash bench/run_on_gpu.sh kernels   bench/kernels.py (both fused ops against what they replace)
#   bash bench/run_on_gpu.sh models    cvt-fast bench (whole models against transformers)
# Logs, JSON and markdown go to $OUT (the device tool's output folder), else bench/results/latest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || cat "$OUT/install.log"

case "${1:-tests}" in
  tests)
    python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, triton, transformers
print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, torch.cuda.get_device_name())
PY
    python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log"
    ;;
  kernels)
    python3 bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels.log"
    ;;
  models)
    cvt-fast bench --models cvt-13 --sizes 224 --batches 1 8 64 256 --out "$OUT" 2>&1 | tee "$OUT/models.log"
    ;;
  *)
    echo "usage: $0 tests|kernels|models" >&2
    exit 2
    ;;
esac
