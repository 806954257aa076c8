#!/usr/bin/env python
"""Benchmark runner: a thin wrapper around :func:`sparse_attn.benchmark.main` (``sparse-attn bench``).

Usage, from the repository root::

    python bench/run.py --quick                 # the gpu_check preset (< 5 min on an H100)
    python bench/run.py --suite s2              # S2 fwd/bwd vs SDPA-flash, 8k..128k
    python bench/run.py --cpu --out bench_smoke  # smoke run of the harness on CPU (not speed claims)
    python bench/run.py --decode                # decode: sparse_decode over a KV cache vs SDPA, flex, flash-attn
    python bench/run.py --decode --quick        # the decode targets' shape (B 16, 128k) + a small one
    TRITON_INTERPRET=1 python bench/run.py --decode --cpu --out bench_smoke   # decode smoke run on CPU

See bench/README.md for the options and the meaning of every column.
"""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from sparse_attn.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
