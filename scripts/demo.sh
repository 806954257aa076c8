#!/usr/bin/env bash
# Set up (if needed) and run the demo on built-in sample inputs: the kernel on a sample layout,
# then the Hugging Face drop-in on a tiny random Llama (CPU). On a GPU, `--model DIR` (a local
# Hugging Face model directory) also prints the prefill speed-up over sdpa at 32k tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m sparse_attn.demo "$@"
