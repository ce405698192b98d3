#!/usr/bin/env bash
# The GPU session: everything a lent H100/H200 has to show, in one device call of at most --budget-s seconds.
#
#   bash bench/gpu_session.sh                 on the GPU machine (writes under $OUT, else bench/results/latest)
#   bash bench/gpu_session.sh --rehearse      the same stages on the CPU at tiny sizes, in about a minute (CI runs it)
#
# Stages, each with its own share of the budget and a hard timeout (a hang in one leaves the others' results):
#   install   pip install -e . without dependencies (the GPU machine has torch, triton, transformers, no network)
#   env       device, driver, versions, SM count, L2; measured copy bandwidth and bf16 matmul rate  -> env.json
#   tests     every gpu-marked test                                                               -> tests.log
#   parity    the whole model, backend "triton", against transformers on the device              -> parity.json
#   kernels   bench/kernel_bench.py --sweep: every candidate configuration beside the baselines      -> kernels.jsonl
#   models    cvt-13 224 px bf16, batch 256 and 1, every contender of `cvt-fast bench`        -> models.jsonl
#   train     a fine-tuning step against transformers': speed, memory, gradients       -> models.jsonl ("train")
#   resolution memory and time against image size, 224 to 2048 px                           -> resolution.jsonl
#   summary   a short table of everything against the targets, last on stdout                 -> summary.md
# Every stage appends its results as they come; session.log has everything printed. 8 files in all, one folder.
# Exit status 1 when any stage failed or ran out of time (the others still ran, and the summary says which).
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE=0
BUDGET=480
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) REHEARSE=1 ;;
    --budget-s) BUDGET=${2:?--budget-s needs a number of seconds}; shift ;;
    *) echo "usage: bash bench/gpu_session.sh [--rehearse] [--budget-s SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 60 ]; then
  echo "gpu_session.sh: --budget-s must be a whole number of seconds, at least 60; got '$BUDGET'" >&2
  exit 2
fi

OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
MODE=()
if [ "$REHEARSE" = 1 ]; then
  MODE=(--rehearse)
  export TRITON_INTERPRET=1  # before anything imports triton: the kernels run on CPU tensors
fi
: >"$OUT/session.log"
START=$(date +%s)
FAILED_STAGES=()

log() { echo "[gpu_session $(($(date +%s) - START))s] $*" | tee -a "$OUT/session.log"; }

# stage NAME SHARE_PERCENT COMMAND...: runs COMMAND with SHARE_PERCENT of the budget as a hard limit.
stage() {
  local name=$1 share=$2
  shift 2
  local limit=$((BUDGET * share / 100))
  log "stage $name: up to ${limit}s"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/session.log"
  local rc=${PIPESTATUS[0]}
  local status="ok"
  [ "$rc" = 124 ] && status="TIMED OUT after ${limit}s"
  [ "$rc" != 0 ] && [ "$rc" != 124 ] && status="exit status $rc"
  [ "$rc" != 0 ] && FAILED_STAGES+=("$name")
  log "stage $name: $status in $(($(date +%s) - t0))s"
}

if [ "$REHEARSE" = 0 ]; then
  log "install"
  python3 -m pip install --quiet --no-deps --no-build-isolation -e . >>"$OUT/session.log" 2>&1 || log "install failed"
fi
stage env 4 python3 bench/gpu_session.py env --out "$OUT" "${MODE[@]}"
# The tests' own output goes to tests.log whole, a line per test as it ends (-v: a stage cut short by its time limit
# still shows which passed and which failed), with the slowest listed at the end; session.log keeps the tail. The
# kernels' own tests go first, the slow compile-and-capture ones last, so that a time limit cuts the latter.
FIRST="tests/test_kernel_attention.py tests/test_kernel_conv_projection.py tests/test_kernel_launch.py
tests/test_custom_ops.py tests/test_model_triton.py"
REST=$(ls tests/test_*.py | grep -v -x -F "$FIRST")
TEST_FILES=$(echo $FIRST $REST)
stage tests 26 bash -c "python3 -m pytest -v -rfE --durations=15 -m gpu $TEST_FILES -p no:cacheprovider >'$OUT/tests.log' 2>&1; rc=\$?; tail -n 25 '$OUT/tests.log'; exit \$rc"
stage parity 6 python3 bench/gpu_session.py parity --out "$OUT" "${MODE[@]}"
KERNELS_LIMIT=$((BUDGET * 25 / 100))
stage kernels 25 python3 bench/kernel_bench.py --sweep --out "$OUT" --no-markdown --budget-s $((KERNELS_LIMIT - 30)) \
  "${MODE[@]}"
MODELS_LIMIT=$((BUDGET * 22 / 100))
stage models 22 python3 bench/gpu_session.py models --out "$OUT" --budget-s $((MODELS_LIMIT - 30)) "${MODE[@]}"
stage train 6 python3 bench/gpu_session.py train --out "$OUT" "${MODE[@]}"
stage resolution 9 python3 bench/gpu_session.py resolution --out "$OUT" "${MODE[@]}"
log "summary (whole session $(($(date +%s) - START))s)"
python3 bench/gpu_session.py summary --out "$OUT" 2>&1 | tee -a "$OUT/session.log"
[ "${PIPESTATUS[0]}" = 0 ] || FAILED_STAGES+=(summary)
if [ ${#FAILED_STAGES[@]} -gt 0 ]; then
  log "stages that failed or timed out: ${FAILED_STAGES[*]}"
  exit 1
fi
