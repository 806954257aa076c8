#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Without a GPU the Triton kernels run under
# TRITON_INTERPRET=1 on small shapes; with one, the same tests plus the `gpu` tier run compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh)
# the environment's own tools (ninja, for the JIT C++ builds the tests make) come first on PATH
PATH="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
export PATH
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
exec "$PY" -m pytest -q tests "$@"
