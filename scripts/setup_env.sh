#!/usr/bin/env bash
# Create ./.venv (once) with a CPU build of torch, triton and this package (editable).
# On a machine with a CUDA-enabled torch already installed, set SPARSE_ATTN_PYTHON to that
# python instead and this script only installs the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SPARSE_ATTN_PYTHON:-}" ]; then
  "$SPARSE_ATTN_PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >&2
  echo "$SPARSE_ATTN_PYTHON"
  exit 0
fi
PY=.venv/bin/python
if [ ! -x "$PY" ] || ! "$PY" -c "import torch, triton, pytest, transformers, safetensors, matplotlib, tqdm" 2>/dev/null \
    || ! "$PY" -m pip show -q sparse_attn >/dev/null 2>&1; then
  python3 -m venv .venv >&2
  # Pin the CPU build first: an unpinned `torch` would pull a multi-GB CUDA build.
  "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" >&2
  "$PY" -m pip install -q --disable-pip-version-check triton pytest numpy >&2
  # the Hugging Face drop-in, gate files, plots and progress bars (pinned: CI tests this set)
  "$PY" -m pip install -q --disable-pip-version-check "transformers==5.23.0" "safetensors==0.8.0" \
    "matplotlib==3.11.2" "tqdm==4.70.1" >&2
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >&2
fi
echo "$PY"
