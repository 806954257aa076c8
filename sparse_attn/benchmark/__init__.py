"""Kernel microbenchmarks: our block-sparse kernels next to SDPA, FlexAttention and flash-attn.

One runner (``sparse-attn bench``, ``python bench/run.py``, ``python -m sparse_attn.benchmark``)
over a registry of cases (pattern x sequence length x density x head dim x GQA ratio x dtype)
and kernels, timing forward, backward and forward+backward, checking every kernel's outputs,
and writing JSON + CSV + markdown + PNG plots. See ``bench/README.md``.

Modules: ``registry`` (cases, patterns), ``peers`` (kernels), ``timing``, ``metrics`` (FLOPs,
roofline, speed-ups; HBM bandwidths and the decode model), ``checks``, ``report`` (outputs), ``runner``
(command line, main loop), ``decode`` (the decode family, ``--decode``: ``sparse_decode`` over a KV
cache, bytes and bandwidth instead of FLOPs), ``static`` (the compile-only report: ``--static``).

Example::

    >>> from sparse_attn.benchmark import main
    >>> main(["--cpu", "--out", "bench_smoke"])  # doctest: +SKIP
    0
"""

from .runner import main

__all__ = ["main"]
