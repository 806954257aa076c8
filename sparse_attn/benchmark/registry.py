"""Benchmark cases and the pattern registry.

A :class:`Case` is one point of the grid ``pattern (+ its arguments) x sequence length x
density x head dim x GQA ratio x dtype``; the kernels and passes are run for every case by
``runner``. A pattern is a :class:`PatternSpec` in :data:`PATTERNS`: adding a method (SEA,
routing, ...) to the benchmark is one :func:`register_pattern` call with a function that builds
its layout (and times that build).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..layout import BlockSparseLayout
from .metrics import causal_blocks
from .timing import time_host

__all__ = ["DTYPES", "Case", "PatternBuild", "PatternSpec", "PATTERNS", "register_pattern", "build_cases", "head_grid"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One benchmark case (queries and keys have the same length ``seq``; causal).

    Attributes:
        pattern: a key of :data:`PATTERNS`.
        seq: ``Sq = Sk``.
        density: requested fraction of the causal blocks (``None`` for patterns that set their own).
        batch, heads, kv_heads, head_dim: ``B``, ``Hq``, ``Hkv`` (``Hq % Hkv == 0``), ``D``.
        block: layout block size (square).
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        pattern_args: the pattern's own arguments, as sorted ``(name, value)`` pairs.
        seed: for random masks, scores and inputs.

    Example::

        >>> c = Case("s2", 8192, None, 1, 8, 8, 128, 64, "bf16", (("local_blocks", 16), ("vert_stride", 8)))
        >>> c.label, c.args_str
        ('s2[local_blocks=16,vert_stride=8]', 'local_blocks=16,vert_stride=8')
    """

    pattern: str
    seq: int
    density: Optional[float]
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    block: int
    dtype: str
    pattern_args: Tuple[Tuple[str, Any], ...] = ()
    seed: int = 0

    @property
    def args(self) -> Dict[str, Any]:
        return dict(self.pattern_args)

    @property
    def args_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.pattern_args)

    @property
    def label(self) -> str:
        s = self.pattern + (f"[{self.args_str}]" if self.pattern_args else "")
        return s + (f"@{self.density:g}" if self.density is not None else "")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_key(self) -> Tuple[int, int, int, int, int, str]:
        """What the inputs (and the dense peers' timings) depend on."""
        return (self.seq, self.batch, self.heads, self.kv_heads, self.head_dim, self.dtype)


@dataclass
class PatternBuild:
    """A pattern's layout for one case and what building it cost.

    ``layout_ms``: the build as a user calls it (for cached producers, a cache hit);
    ``layout_uncached_ms``: the build with the producer's caches cleared (``None`` when not cached).
    """

    layout: BlockSparseLayout
    layout_ms: float
    layout_uncached_ms: Optional[float] = None
    note: str = ""


@dataclass(frozen=True)
class PatternSpec:
    """A sparsity pattern the benchmark knows.

    Attributes:
        name: the ``--patterns`` name.
        build: ``build(case, device, sync) -> PatternBuild``; may raise (the case becomes error rows).
        uses_density: one case per ``--densities`` value; else one case with ``density=None``.
        variants: ``variants(args) -> [pattern_args dict, ...]`` from the parsed command line
            (e.g. one S2 case per vertical stride); default one variant without arguments.
        description: one line for the README / ``--help``.
    """

    name: str
    build: Callable[[Case, torch.device, Callable[[], None]], PatternBuild]
    uses_density: bool
    variants: Callable[[Any], List[Dict[str, Any]]] = field(default=lambda args: [{}])
    description: str = ""


PATTERNS: Dict[str, PatternSpec] = {}


def register_pattern(spec: PatternSpec) -> PatternSpec:
    """Add (or replace) a pattern in :data:`PATTERNS`; returns it.

    Example::

        >>> spec = PATTERNS["dense"]
        >>> register_pattern(spec) is spec
        True
    """
    if not isinstance(spec, PatternSpec):
        raise TypeError(f"spec must be a PatternSpec, got {type(spec).__name__}")
    PATTERNS[spec.name] = spec
    return spec


# ------------------------------------------------------------------------------------------------
# The patterns
# ------------------------------------------------------------------------------------------------
def _from_mask(case: Case, mask: torch.Tensor, sync: Callable[[], None]) -> PatternBuild:
    build = lambda: BlockSparseLayout.from_block_mask(mask, case.block, case.seq, case.seq)  # noqa: E731
    layout = build()
    return PatternBuild(layout, time_host(build, sync))


def _build_dense(case: Case, device: torch.device, sync: Callable[[], None]) -> PatternBuild:
    """Every causal block: the dense-equivalent layout (compare with SDPA-flash)."""
    mask = causal_blocks(case.seq, case.seq, case.block, case.block, device)[None, None]
    return _from_mask(case, mask, sync)


def _seed(case: Case, salt: int) -> int:
    return (case.seed * 1_000_003 + case.seq * 101 + int(round((case.density or 1.0) * 1000)) * 7 + salt) % (2**62)


def _build_random(case: Case, device: torch.device, sync: Callable[[], None]) -> PatternBuild:
    """Bernoulli(density) over the causal blocks of each query head; every query block keeps its
    diagonal block, so no row is left without keys."""
    m = -(-case.seq // case.block)
    gen = torch.Generator().manual_seed(_seed(case, 1))
    causal = causal_blocks(case.seq, case.seq, case.block, case.block)
    mask = (torch.rand(case.batch, case.heads, m, m, generator=gen) < float(case.density)) & causal
    rows = torch.arange(m)
    mask[:, :, rows, rows] = True
    return _from_mask(case, mask.to(device), sync)


def _clear_caches(fn: Callable) -> int:
    """Clear the caches (``functools`` caches, objects with ``cache_clear``) of ``fn`` and of its
    module; how many."""
    mod = sys.modules.get(getattr(fn, "__module__", ""), None)
    objs = [fn] + (list(vars(mod).values()) if mod is not None else [])
    n = 0
    for obj in objs:
        if isinstance(obj, type):  # a cache class, not a cache
            continue
        clear = getattr(obj, "cache_clear", None)
        if callable(clear):
            clear()
            n += 1
    return n


def _build_s2(case: Case, device: torch.device, sync: Callable[[], None]) -> PatternBuild:
    """S2-Attention (``sparse_attn.patterns.strided``): local blocks + per-head vertical stride."""
    from ..patterns import strided

    kw = dict(block_size=case.block, device=device, **case.args)
    build = lambda: strided(case.heads, case.seq, case.seq, **kw)  # noqa: E731
    cleared = _clear_caches(strided)
    if cleared:
        uncached = time_host(build, sync, reps=3, before=lambda: _clear_caches(strided))
        note = ""
    else:  # no functools cache to clear: the first call is the uncached one
        sync()
        t = time.perf_counter()
        build()
        sync()
        uncached = (time.perf_counter() - t) * 1e3
        note = "layout_uncached_ms = first call (no cache_clear found)"
    layout = build()
    return PatternBuild(layout, time_host(build, sync), uncached, note)


def _build_seer_topk(case: Case, device: torch.device, sync: Callable[[], None]) -> PatternBuild:
    """Seer-style selection (``sparse_attn.patterns.select_blocks``) from random block scores, at
    the requested density of the causal triangle (or ``topk`` blocks per row when given). The
    build time is the selection only; a real gate's forward is not included."""
    from ..patterns import select_blocks

    m = -(-case.seq // case.block)
    gen = torch.Generator(device=device).manual_seed(_seed(case, 2))
    logits = torch.randn(case.batch, case.heads, m, m, generator=gen, device=device, dtype=torch.float32)
    args = case.args
    sel = dict(topk=int(args["topk"])) if "topk" in args else dict(density=float(case.density))
    kw = dict(block_size=case.block, seq_q=case.seq, seq_k=case.seq, causal=True, **sel,
              **{k: v for k, v in args.items() if k != "topk"})
    build = lambda: select_blocks(logits, **kw)  # noqa: E731
    layout = build()
    return PatternBuild(layout, time_host(build, sync), note="selection from random scores (gate not timed)")


def _s2_variants(args: Any) -> List[Dict[str, Any]]:
    return [dict(local_blocks=int(args.s2_local_blocks), vert_stride=int(s)) for s in args.s2_strides]


register_pattern(PatternSpec("dense", _build_dense, False, description="every causal block (dense-equivalent)"))
register_pattern(PatternSpec("random", _build_random, True,
                             description="Bernoulli(density) causal blocks per head, diagonal kept"))
register_pattern(PatternSpec("s2", _build_s2, False, _s2_variants,
                             description="S2-Attention strided: --s2-local-blocks, one case per --s2-strides"))
register_pattern(PatternSpec("seer_topk", _build_seer_topk, True,
                             description="select_blocks(random scores, density=...): SeerAttention-style"))


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
def build_cases(args: Any) -> List[Case]:
    """All cases of a parsed command line, grouped by input shape (dtype, D, GQA, seq outer;
    patterns inner) so inputs, dense peers and compiles are shared.

    ``args`` needs ``seqs, patterns, densities, heads, gqa, head_dims, dtypes, block, batch,
    seed`` and what the patterns' ``variants`` read (``s2_local_blocks``, ``s2_strides``).

    Example::

        >>> import argparse
        >>> a = argparse.Namespace(seqs=[256], patterns=["dense", "random"], densities=[0.5, 0.2],
        ...     heads=4, gqa=[2], head_dims=[32], dtypes=["fp32"], block=32, batch=1, seed=0)
        >>> [c.label for c in build_cases(a)]
        ['dense', 'random@0.5', 'random@0.2']
    """
    unknown = [p for p in args.patterns if p not in PATTERNS]
    if unknown:
        raise ValueError(f"patterns: unknown {unknown}; known: {sorted(PATTERNS)}")
    cases: List[Case] = []
    for dtype, head_dim, ratio in head_grid(args):
        for seq in args.seqs:
            if seq < 1:
                raise ValueError(f"seqs: {seq} must be positive")
            for name in args.patterns:
                spec = PATTERNS[name]
                densities: Sequence[Optional[float]] = args.densities if spec.uses_density else [None]
                for pargs in spec.variants(args):
                    for d in densities:
                        if d is not None and not 0.0 < d <= 1.0:
                            raise ValueError(f"densities: {d} must be in (0, 1]")
                        cases.append(Case(
                            pattern=name, seq=int(seq), density=None if d is None else float(d),
                            batch=int(args.batch), heads=int(args.heads),
                            kv_heads=int(args.heads) // int(ratio), head_dim=int(head_dim),
                            block=int(args.block), dtype=dtype,
                            pattern_args=tuple(sorted(pargs.items())), seed=int(args.seed)))
    return cases


def head_grid(args: Any) -> Iterator[Tuple[str, int, int]]:
    """``(dtype, head_dim, gqa ratio)`` over ``args.dtypes x args.head_dims x args.gqa``, the outer
    loops of the prefill and decode case grids, each checked as it is reached (a ``ValueError``
    names a dtype not in :data:`DTYPES`, or a ratio below 1 or not dividing ``args.heads``).

    Example::

        >>> import argparse
        >>> list(head_grid(argparse.Namespace(dtypes=["fp32"], head_dims=[32, 64], gqa=[1, 2], heads=4)))
        [('fp32', 32, 1), ('fp32', 32, 2), ('fp32', 64, 1), ('fp32', 64, 2)]
    """
    for dtype in args.dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtypes: {dtype!r} is not one of {sorted(DTYPES)}")
        for head_dim in args.head_dims:
            for ratio in args.gqa:
                if ratio < 1 or args.heads % ratio:
                    raise ValueError(f"gqa: ratio {ratio} must be >= 1 and divide heads={args.heads}")
                yield dtype, head_dim, ratio
