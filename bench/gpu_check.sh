#!/usr/bin/env bash
# GPU check for sparse_attn: decode correctness at real sizes (with the CUDA C++ build), the GPU-tier
# tests, the GPU tile configurations compiled for real, the quick prefill benchmark, the quick decode
# benchmark, a trimmed S2 suite, and compute-sanitizer over a few small decode calls.
#
#   bash bench/gpu_check.sh                                 # from anywhere, on the CUDA machine
#   GPU_CHECK_STEPS="quick decodebench" bash bench/gpu_check.sh   # only some steps
#
# Steps (each under its own `timeout`; a step that fails or times out does not stop the next):
#   decode      bench/decode_check.py: the CUDA C++ extension built (JIT, sparse_attn._cuda, in the
#               background) and sparse_decode's triton and cuda backends vs the reference at real
#               sizes (128k, Llama-3-8B GQA, contiguous + paged, dense / lists / S2, Sq 1..16)
#               (--time-limit: the timeout - 15 s)             (DECODE_TIMEOUT,      default 90 s)
#   gputests    pytest -q -m gpu tests (real sizes, compiled)  (GPUTEST_TIMEOUT,     default 65 s)
#   tiles       pytest -q tests/test_kernel_tiles.py -k hopper (TILES_TIMEOUT,       default 40 s)
#               (every Hopper tile shape and the causal residue sweep, compiled on this GPU)
#   tests       pytest -q tests (everything; opt-in)           (TEST_TIMEOUT,        default 150 s)
#   quick       bench/run.py --quick --budget-s 64 (ours_triton and ours_triton_tuned)
#                                                              (QUICK_TIMEOUT,       default 90 s)
#   decodebench bench/run.py --decode --quick --budget-s 33 (B 16/1, 128k/8k, keep 1/0.25/0.1,
#               contiguous + paged/64; prints whether the decode targets are met)
#                                                              (DECODEBENCH_TIMEOUT, default 55 s)
#   s2          bench/run.py --suite s2 --seqs 32768 131072 --budget-s 28
#                                                              (S2_TIMEOUT,          default 40 s)
#   sanitize    compute-sanitizer memcheck, then racecheck (half the time each), over
#               bench/decode_sanitize.py (a few small cuda + triton decode calls; --error-exitcode 9);
#               skipped (rc 0) when compute-sanitizer is not on PATH
#                                                              (SANITIZE_TIMEOUT,    default 40 s in all)
# Default steps: "decode gputests tiles quick decodebench s2 sanitize", at most
# 90 + 65 + 40 + 90 + 55 + 40 + 40 = 420 s plus 8 x 5 s kill grace (460 s): under 8 minutes on an
# H100/H200. (The quick prefill budget went from 150 s to 64 s and S2 from 100 s to 40 s to make room
# for the decode steps; run those steps alone with larger *_TIMEOUT values for the full picture.)
#
# Results (JSON/CSV/markdown/PNG) and the log go to $OUT if set, else bench/results/, named with the
# GPU. The benchmark writes its files after every case and again on SIGTERM, so a step cut by its
# timeout still leaves its results. Exit status: non-zero if any step failed or timed out (124); 3
# without a CUDA GPU (checked first: nothing runs).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export PYTHONPATH=".${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-bench/results}"
STEPS="${GPU_CHECK_STEPS:-decode gputests tiles quick decodebench s2 sanitize}"
DECODE_TIMEOUT="${DECODE_TIMEOUT:-90}"
GPUTEST_TIMEOUT="${GPUTEST_TIMEOUT:-65}"
TILES_TIMEOUT="${TILES_TIMEOUT:-40}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
QUICK_TIMEOUT="${QUICK_TIMEOUT:-90}"
DECODEBENCH_TIMEOUT="${DECODEBENCH_TIMEOUT:-55}"
S2_TIMEOUT="${S2_TIMEOUT:-40}"
SANITIZE_TIMEOUT="${SANITIZE_TIMEOUT:-40}"

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
    timeout -k 5 "$limit" "$@" || rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0))s$([ "$rc" -eq 124 ] && echo ' (timed out)')"
    return "$rc"
}

sanitize() {  # memcheck, then racecheck, each with half of SANITIZE_TIMEOUT; rc 0 without the tool
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        echo "== sanitize: skipped: compute-sanitizer is not on PATH"
        return 0
    fi
    local half=$((SANITIZE_TIMEOUT / 2)) tool rc=0
    for tool in memcheck racecheck; do
        step "sanitize-$tool" "$half" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
            --error-exitcode 9 --report-api-errors no "$PY" bench/decode_sanitize.py --backends cuda triton \
            --time-limit $((half - 10)) || rc=1
    done
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
    echo "== nvcc: $(command -v nvcc || echo 'not on PATH'); compute-sanitizer: $(command -v compute-sanitizer || echo 'not on PATH')"
    local status=0 s
    for s in $STEPS; do
        case "$s" in
            decode) step decode "$DECODE_TIMEOUT" "$PY" bench/decode_check.py --time-limit $((DECODE_TIMEOUT - 15)) \
                    --out "$OUT_DIR" || status=1 ;;
            gputests) step gputests "$GPUTEST_TIMEOUT" "$PY" -m pytest -q -m gpu tests || status=1 ;;
            tiles) step tiles "$TILES_TIMEOUT" "$PY" -m pytest -q -x tests/test_kernel_tiles.py -k hopper || status=1 ;;
            tests) step tests "$TEST_TIMEOUT" "$PY" -m pytest -q tests || status=1 ;;
            quick) step quick "$QUICK_TIMEOUT" "$PY" bench/run.py --quick --budget-s $((QUICK_TIMEOUT * 72 / 100)) \
                    --out "$OUT_DIR" || status=1 ;;
            decodebench) step decodebench "$DECODEBENCH_TIMEOUT" "$PY" bench/run.py --decode --quick \
                    --budget-s $((DECODEBENCH_TIMEOUT * 6 / 10)) --out "$OUT_DIR" || status=1 ;;
            s2) step s2 "$S2_TIMEOUT" "$PY" bench/run.py --suite s2 --seqs 32768 131072 \
                    --budget-s $((S2_TIMEOUT * 7 / 10)) --out "$OUT_DIR" || status=1 ;;
            sanitize) sanitize || status=1 ;;
            *) echo "== unknown step '$s' (known: decode gputests tiles tests quick decodebench s2 sanitize)"
               status=1 ;;
        esac
    done
    echo "== gpu_check summary: steps '$STEPS' -> $([ "$status" -eq 0 ] && echo ok || echo FAILED); results in $OUT_DIR"
    return "$status"
}

run_all 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_check exit $rc (log: $LOG)" | tee -a "$LOG"
exit "$rc"
