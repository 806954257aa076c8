#!/usr/bin/env python
"""A few small ``sparse_decode`` calls for compute-sanitizer (``bench/gpu_check.sh`` step ``sanitize``).

Runs the ``small`` case set of ``bench/decode_check.py`` (ragged lengths incl. 0 and < Sq, NaN
past each length and in unused pages, lists with junk past ``kv_num``, paged 16 / 64, S2, Sq 1 /
4 / 5) on each backend, without the reference (only the kernels under the tool), synchronising
after every call; time-bounded (``--time-limit``, default 60 s). Usage::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python bench/decode_sanitize.py --backends cuda triton
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 9 \\
        python bench/decode_sanitize.py --backends cuda triton

(``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: one device allocation per tensor, so memcheck sees a read
past a tensor instead of into the caching allocator's pool.) Other options are passed on to
``decode_check.py`` (``--set tiny`` runs the CPU smoke of this script under TRITON_INTERPRET=1).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--set", "small", "--no-reference", "--time-limit", "60"] + sys.argv[1:]))
