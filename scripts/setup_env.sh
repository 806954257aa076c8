#!/usr/bin/env bash
# Create ./.venv (once) with torch 2.13.0, triton and this package (editable).
#   * no NVIDIA GPU (`nvidia-smi -L` fails): torch's CPU build, from PyTorch's CPU index
#     (SPARSE_ATTN_TORCH_INDEX overrides it); if that index cannot be reached, whatever
#     `pip install torch==2.13.0` resolves (a local wheel where one is configured; from the public
#     PyPI that is the multi-GB CUDA build, which also runs on CPU);
#   * an NVIDIA GPU: `pip install torch==2.13.0` from the configured index (PyPI: the CUDA build).
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
if [ ! -x "$PY" ] || ! "$PY" -c "import torch, triton, pytest, transformers, safetensors, matplotlib, tqdm, ninja" \
    2>/dev/null \
    || ! "$PY" -m pip show -q sparse_attn >/dev/null 2>&1; then
  python3 -m venv .venv >&2
  # torch first, pinned: an unpinned `torch` would resolve to whatever is newest
  if nvidia-smi -L >/dev/null 2>&1; then
    echo "setup_env: NVIDIA GPU found: installing torch==2.13.0 from the configured index (CUDA build)" >&2
    "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" >&2
  else
    index="${SPARSE_ATTN_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    echo "setup_env: no NVIDIA GPU: installing the CPU build of torch==2.13.0 ($index)" >&2
    "$PY" -m pip install -q --disable-pip-version-check --timeout 15 --retries 1 --index-url "$index" \
        "torch==2.13.0" >&2 \
      || { echo "setup_env: $index not reachable; falling back to the configured index" >&2;
           "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" >&2; }
  fi
  # ninja: torch's JIT C++ builds (the CUDA C++ kernels, and their CPU emulation that the tests run)
  "$PY" -m pip install -q --disable-pip-version-check triton pytest numpy "ninja==1.13.2" >&2
  # the Hugging Face drop-in, gate files, plots and progress bars (pinned: CI tests this set)
  "$PY" -m pip install -q --disable-pip-version-check "transformers==5.23.0" "safetensors==0.8.0" \
    "matplotlib==3.11.2" "tqdm==4.70.1" >&2
  "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >&2
fi
echo "$PY"
