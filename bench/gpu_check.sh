#!/usr/bin/env bash
# GPU check for sparse_attn: the GPU-tier tests, the GPU tile configurations compiled for real,
# the quick benchmark (table tiles and autotuned), then a trimmed S2 suite.
#
#   bash bench/gpu_check.sh                                 # from anywhere, on the CUDA machine
#   GPU_CHECK_STEPS="quick" bash bench/gpu_check.sh          # only some steps
#
# Steps (each under its own `timeout`; a step that fails or times out does not stop the next):
#   gputests  pytest -q -m gpu tests (real sizes, compiled)    (GPUTEST_TIMEOUT, default 80 s)
#   tiles     pytest -q tests/test_kernel_tiles.py -k hopper   (TILES_TIMEOUT,   default 60 s)
#             (every Hopper tile shape and the causal residue sweep, compiled on this GPU)
#   tests     pytest -q tests (everything; opt-in)             (TEST_TIMEOUT,    default 150 s)
#   quick     bench/run.py --quick (ours_triton and ours_triton_tuned) (QUICK_TIMEOUT, default 200 s)
#   s2        bench/run.py --suite s2 --seqs 8192 32768 131072 (S2_TIMEOUT,      default 100 s)
# Default steps: "gputests tiles quick s2", at most 80 + 60 + 200 + 100 s plus 4 x 10 s kill grace
# (480 s): under 8 minutes on an H100.
#
# Results (JSON/CSV/markdown/PNG) and the log go to $OUT if set, else bench/results/. The benchmark
# writes its files after every case and again on SIGTERM, so a step cut by its timeout still leaves
# its results. Exit status: non-zero if any step failed or timed out (124); 3 without a CUDA GPU
# (checked first: nothing runs).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONPATH=".${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-bench/results}"
STEPS="${GPU_CHECK_STEPS:-gputests tiles quick s2}"
GPUTEST_TIMEOUT="${GPUTEST_TIMEOUT:-80}"
TILES_TIMEOUT="${TILES_TIMEOUT:-60}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
QUICK_TIMEOUT="${QUICK_TIMEOUT:-200}"
S2_TIMEOUT="${S2_TIMEOUT:-100}"

# Nothing here means anything without a CUDA GPU: say so and stop before running anything.
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is false); nothing run." >&2
    echo "gpu_check: on a CPU machine run the CPU tier instead: bash scripts/test.sh" >&2
    exit 3
fi
mkdir -p "$OUT_DIR"

GPU_NAME="$(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
GPU_TAG="$(printf '%s' "${GPU_NAME:-unknown_gpu}" | sed -E 's/[^A-Za-z0-9._-]+/_/g; s/^_+//; s/_+$//')"
LOG="$OUT_DIR/gpu_check_${GPU_TAG:-unknown_gpu}_$(date +%Y%m%d-%H%M%S).log"

step() {  # step NAME TIMEOUT CMD...: run one step under its timeout, print and return its status
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    echo "== $name: $* (timeout ${limit}s)"
    timeout -k 10 "$limit" "$@" || rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0))s$([ "$rc" -eq 124 ] && echo ' (timed out)')"
    return "$rc"
}

run_all() {
    echo "== gpu_check: $(date -Iseconds) in $(pwd); steps: $STEPS; log $LOG"
    echo "== GPU: ${GPU_NAME:-unknown (nvidia-smi failed)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
        || echo "(nvidia-smi query failed)"
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print("triton", triton.__version__)' \
        || echo "(version check failed)"
    echo "== git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    local status=0 s
    for s in $STEPS; do
        case "$s" in
            gputests) step gputests "$GPUTEST_TIMEOUT" "$PY" -m pytest -q -m gpu tests || status=1 ;;
            tiles) step tiles "$TILES_TIMEOUT" "$PY" -m pytest -q -x tests/test_kernel_tiles.py -k hopper || status=1 ;;
            tests) step tests "$TEST_TIMEOUT" "$PY" -m pytest -q tests || status=1 ;;
            quick) step quick "$QUICK_TIMEOUT" "$PY" bench/run.py --quick --out "$OUT_DIR" || status=1 ;;
            s2) step s2 "$S2_TIMEOUT" "$PY" bench/run.py --suite s2 --seqs 8192 32768 131072 --budget-s 75 \
                    --out "$OUT_DIR" || status=1 ;;
            *) echo "== unknown step '$s' (known: gputests tiles tests quick s2)"; status=1 ;;
        esac
    done
    echo "== gpu_check summary: steps '$STEPS' -> $([ "$status" -eq 0 ] && echo ok || echo FAILED); results in $OUT_DIR"
    return "$status"
}

run_all 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_check exit $rc (log: $LOG)" | tee -a "$LOG"
exit "$rc"
