#!/usr/bin/env bash
# GPU check for sparse_attn: the test suite, then the quick benchmark (bench/run.py --quick).
#
#   bash bench/gpu_check.sh            # from the repo root, on the CUDA machine
#
# Everything is tee'd into $OUT (default bench/results)/gpu_check_<gpu>_<date>.log next to the
# benchmark's JSON/CSV/markdown. The benchmark runs even when the tests fail; the script exits
# non-zero if the tests failed (or timed out) or the benchmark failed (crash, a failed
# correctness check, an error in our kernel). Budget: < 8 minutes on an H100
# (TEST_TIMEOUT + BENCH_TIMEOUT seconds at most).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONPATH=".${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-bench/results}"
TEST_TIMEOUT="${TEST_TIMEOUT:-210}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
mkdir -p "$OUT_DIR"

GPU_NAME="$(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
GPU_TAG="$(printf '%s' "${GPU_NAME:-unknown_gpu}" | sed -E 's/[^A-Za-z0-9._-]+/_/g; s/^_+//; s/_+$//')"
LOG="$OUT_DIR/gpu_check_${GPU_TAG:-unknown_gpu}_$(date +%Y%m%d-%H%M%S).log"

run_all() {
    echo "== gpu_check: $(date -Iseconds) in $(pwd), log $LOG"
    echo "== nvidia-smi -L"
    nvidia-smi -L || echo "(nvidia-smi -L failed)"
    echo "== versions"
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available()); print("triton", triton.__version__)' \
        || echo "(version check failed)"
    echo "== git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"

    echo "== tests: $PY -m pytest -q tests (timeout ${TEST_TIMEOUT}s)"
    local t0=$SECONDS test_rc=0 bench_rc=0
    timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q tests || test_rc=$?
    echo "== tests: rc=$test_rc in $((SECONDS - t0))s"

    echo "== bench: $PY bench/run.py --quick --out $OUT_DIR (timeout ${BENCH_TIMEOUT}s)"
    t0=$SECONDS
    timeout -k 10 "$BENCH_TIMEOUT" "$PY" bench/run.py --quick --out "$OUT_DIR" || bench_rc=$?
    echo "== bench: rc=$bench_rc in $((SECONDS - t0))s"

    echo "== gpu_check summary: tests rc=$test_rc, bench rc=$bench_rc (124 = timed out)"
    [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
}

run_all 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_check exit $rc (log: $LOG)" | tee -a "$LOG"
exit "$rc"
