#!/usr/bin/env bash
# Set up (if needed) and run the demo on built-in sample inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
exec "$PY" -m sparse_attn.demo "$@"
