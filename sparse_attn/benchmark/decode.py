"""The decode family of the benchmark (``--decode``): ``sparse_decode`` over a KV cache, next to
SDPA, FlexAttention and flash-attn's ``flash_attn_with_kvcache``.

One case is ``batch x context x kept fraction x cache layout (contiguous / paged + page size) x
new rows Sq`` at a GQA shape (Llama-3-8B: Hq 32, Hkv 8, D 128, bf16). Every sequence holds
``context`` tokens (the ``Sq`` new ones included). Kept fraction ``keep``:

* ``1.0``: dense decode, ``kv_blocks=None``;
* ``< 1``: a list per (sequence, KV head) of ``round(keep * nblocks)`` key blocks: the last
  ``--recent-blocks`` (the recent window; it holds the rows' own blocks) and the rest either
  evenly spread over the older blocks (``--selection spread``, a per-list offset) or drawn at
  random (``random``); ids ascending, as ``sparse_decode`` takes them.

What a row reports (memory-bound, so bytes, not FLOPs; :mod:`.metrics`):

* ``kept_bytes``: the K and V bytes of the kept blocks (every visible token of a kept block,
  once per KV head: the GQA group shares it) plus the bytes of q and out; ``dense_bytes`` the same
  for the whole cache; ``bytes`` = what this kernel is counted for (kept for ours and flex, dense
  for the dense peers);
* ``gbps`` = bytes / time, ``bw_frac`` = gbps / the GPU's data-sheet HBM bandwidth;
  ``gbps_effective`` = dense_bytes / time (what a dense kernel would have to reach);
* ``model_ms_h100`` / ``model_ms_h200`` and ``model_gbps_*``: a MODEL (roofline over the
  data-sheet HBM bandwidth + a fixed launch cost, :func:`.metrics.decode_model_ms`) of the same
  bytes on an H100 SXM / H200, on every row, on any machine: the numbers to read without a GPU;
* ``speedup_vs_sdpa``: the SDPA baseline (dense, contiguous cache, same batch/context/Sq) / time;
  ``speedup_vs_triton`` (ours_cuda rows): ours_triton's time on the same case / time.

Kernels (:data:`DECODE_KERNELS`, same names as the prefill family): ``ours_triton``,
``ours_cuda`` (skipped with the library's reason when ``sparse_attn._cuda`` cannot load),
``ours_reference``; dense peers on the contiguous cache ``sdpa_*`` (``Sq = 1``: the GQA group folded
into the query rows, no mask; ``Sq > 1``: ``enable_gqa`` and ``causal_lower_right``) and
``flash_attn`` (``flash_attn_with_kvcache``, contiguous or paged, when importable); ``flex``
(FlexAttention with a block mask over the contiguous cache: kept blocks AND causal). Every
output is checked against ``sparse_decode(..., backend="reference")`` on the first
``--check-batch`` sequences.

The targets (checked on a GPU only; the run prints and writes whether they are met): at batch 16
and 128k context (Sq 1) both ``ours_triton`` and ``ours_cuda`` reach >= 80 % of the HBM peak on
the kept bytes, and ``ours_cuda`` is >= 1.1x ``ours_triton`` there.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import math
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import report
from .checks import TOLS, compare
from .metrics import DECODE_LAUNCH_US, MODEL_CHIPS, decode_model_ms, fill_per_second, peak_hbm_gbps
from .peers import _cached_probe, _flash_attn_missing, _reason
from .registry import DTYPES, head_grid
from .timing import FLEX_COMPILE_EST_S, Env

__all__ = ["DecodeCase", "DecodeKernel", "DECODE_KERNELS", "DECODE_PRESETS", "DECODE_CPU_OVERRIDES",
           "DECODE_COLUMNS", "DECODE_TARGETS", "build_decode_cases", "decode_lists", "decode_bytes",
           "decode_targets", "run_decode"]

LAYOUTS = ("contiguous", "paged")
SELECTIONS = ("spread", "random")
TARGET_SHAPE = dict(batch=16, context=131072, sq=1)
# (text, kernel, what, goal): checked on the rows of TARGET_SHAPE (every keep and layout).
DECODE_TARGETS = [
    ("ours_triton >= 80% of the HBM peak on the kept bytes", "ours_triton", "bw_frac", 0.8),
    ("ours_cuda >= 80% of the HBM peak on the kept bytes", "ours_cuda", "bw_frac", 0.8),
    ("ours_cuda >= 1.1x ours_triton (same case)", "ours_cuda", "speedup_vs_triton", 1.1),
]

DECODE_CUDA_KERNELS = ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn", "flex", "ours_triton",
                       "ours_cuda"]
DECODE_CPU_KERNELS = ["sdpa_math", "flash_attn", "flex", "ours_reference", "ours_triton", "ours_cuda"]

# Suites (see runner.PRESETS for the prefill ones). Unset options come from here.
DECODE_PRESETS: Dict[str, Dict[str, Any]] = {
    "decode": dict(batches=[1, 16, 64], contexts=[8192, 32768, 131072], keeps=[1.0, 0.25, 0.1],
                   layouts=["contiguous", "paged"], page_sizes=[64], sqs=[1, 4], heads=32, gqa=[4],
                   head_dims=[128], dtypes=["bf16"], block=64, selection="spread", recent_blocks=4,
                   kernels=DECODE_CUDA_KERNELS, passes=["fwd"], warmup=25, rep=100, budget_s=None, check_batch=2),
    # gpu_check.sh: the targets' shape (B 16, 128k) and a small one, our kernels, SDPA-flash and
    # flash-attn (no flex: its compiles cost more than the whole step).
    # The target shape runs first, so a run cut by its budget still has it.
    "decode_quick": dict(batches=[16, 1], contexts=[131072, 8192], keeps=[1.0, 0.25, 0.1],
                         layouts=["contiguous", "paged"], page_sizes=[64], sqs=[1], heads=32, gqa=[4],
                         head_dims=[128], dtypes=["bf16"], block=64, selection="spread", recent_blocks=4,
                         kernels=["sdpa_flash", "flash_attn", "ours_triton", "ours_cuda"], passes=["fwd"],
                         warmup=10, rep=30, budget_s=30.0, check_batch=2),
}
# --decode --cpu: a tiny case (an odd context: a partial last block and page), GQA, Sq 1 and 4, fp32.
DECODE_CPU_OVERRIDES: Dict[str, Any] = dict(
    batches=[2], contexts=[200], keeps=[1.0, 0.25], layouts=["contiguous", "paged"], page_sizes=[16], sqs=[1, 4],
    heads=4, gqa=[2], head_dims=[32], dtypes=["fp32"], block=16, recent_blocks=2, kernels=DECODE_CPU_KERNELS,
    warmup=1, rep=3, budget_s=None, check_batch=None)

DECODE_COLUMNS = [
    "suite", "family", "kernel", "pass", "status", "batch", "context", "keep", "layout", "page_size", "sq",
    "heads", "kv_heads", "head_dim", "block", "dtype", "selection", "kept_blocks", "total_blocks", "kept_frac",
    "kept_bytes", "dense_bytes", "bytes", "ms", "ms_p20", "ms_p80", "gbps", "gbps_effective", "hbm_peak_gbps",
    "bw_frac", "speedup_vs_sdpa", "speedup_vs_triton", "model_ms_h100", "model_gbps_h100", "model_ms_h200",
    "model_gbps_h200", "check", "check_ref", "max_err", "first_call_s", "error", "note",
]


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeCase:
    """One decode case; ``keep`` is the kept fraction of the key blocks (1.0 = dense).

    Example::

        >>> c = DecodeCase(16, 131072, 0.1, "paged", 64, 1, 32, 8, 128, 64, "bf16")
        >>> c.label
        'B=16 ctx=131072 keep=0.1 paged/64 Sq=1'
    """

    batch: int
    context: int
    keep: float
    layout: str
    page_size: Optional[int]
    sq: int
    heads: int
    kv_heads: int
    head_dim: int
    block: int
    dtype: str
    selection: str = "spread"
    recent_blocks: int = 4
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def paged(self) -> bool:
        return self.layout == "paged"

    @property
    def nblocks(self) -> int:
        return -(-self.context // self.block)

    @property
    def layout_label(self) -> str:
        return f"paged/{self.page_size}" if self.paged else "contiguous"

    @property
    def label(self) -> str:
        return f"B={self.batch} ctx={self.context} keep={self.keep:g} {self.layout_label} Sq={self.sq}"

    @property
    def group_key(self) -> tuple:
        """What the inputs depend on (every field but ``keep``)."""
        return (self.dtype, self.head_dim, self.heads, self.kv_heads, self.sq, self.batch, self.context, self.layout,
                self.page_size, self.block, self.selection, self.recent_blocks, self.seed)

    @property
    def dense_key(self) -> tuple:
        """What a dense peer's time depends on (the SDPA baseline of every layout and keep)."""
        return (self.batch, self.context, self.sq, self.heads, self.kv_heads, self.head_dim, self.dtype)


def build_decode_cases(args: Any) -> List[DecodeCase]:
    """The cases of a parsed ``--decode`` command line, grouped by input shape (``keep`` inner).

    Example::

        >>> a = argparse.Namespace(batches=[2], contexts=[200], keeps=[1.0, 0.25], layouts=["contiguous", "paged"],
        ...     page_sizes=[16], sqs=[1], heads=4, gqa=[2], head_dims=[32], dtypes=["fp32"], block=16,
        ...     selection="spread", recent_blocks=2, seed=0)
        >>> [c.label for c in build_decode_cases(a)][1:3]
        ['B=2 ctx=200 keep=0.25 contiguous Sq=1', 'B=2 ctx=200 keep=1 paged/16 Sq=1']
    """
    from ..decode import DECODE_MAX_SQ, PAGE_SIZES
    from ..layout import SUPPORTED_BLOCK_SIZES

    if args.block not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block: {args.block} is not one of {SUPPORTED_BLOCK_SIZES}")
    if args.selection not in SELECTIONS:
        raise ValueError(f"selection: {args.selection!r} is not one of {SELECTIONS}")
    if args.recent_blocks < 1:
        raise ValueError(f"recent-blocks: {args.recent_blocks} must be >= 1 (the window holds the rows' own blocks)")
    for name, values, ok in (("keeps", args.keeps, lambda x: 0.0 < x <= 1.0),
                             ("sqs", args.sqs, lambda x: 1 <= x <= DECODE_MAX_SQ),
                             ("batches", args.batches, lambda x: x >= 1),
                             ("contexts", args.contexts, lambda x: x >= 1),
                             ("layouts", args.layouts, lambda x: x in LAYOUTS),
                             ("page-sizes", args.page_sizes, lambda x: x in PAGE_SIZES)):
        bad = [v for v in values if not ok(v)]
        if bad:
            raise ValueError(f"{name}: {bad} out of range")
    cases: List[DecodeCase] = []
    for dtype, head_dim, ratio in head_grid(args):
        for sq in args.sqs:
            for batch in args.batches:
                for context in args.contexts:
                    if context < sq:
                        raise ValueError(f"contexts: {context} holds fewer tokens than Sq={sq}")
                    for layout in args.layouts:
                        for ps in (args.page_sizes if layout == "paged" else [None]):
                            for keep in args.keeps:
                                cases.append(DecodeCase(
                                    int(batch), int(context), float(keep), layout,
                                    None if ps is None else int(ps), int(sq), int(args.heads),
                                    int(args.heads) // int(ratio), int(head_dim), int(args.block), dtype,
                                    args.selection, int(args.recent_blocks), int(args.seed)))
    return cases


def _seed(case: DecodeCase, salt: int) -> int:
    return (case.seed * 1_000_003 + case.context * 101 + case.batch * 7 + case.sq * 13 + salt
            + int(round(case.keep * 1000)) * 17) % (2**62)


def decode_inputs(case: DecodeCase, device: torch.device) -> Dict[str, Any]:
    """``q [B, Hq, Sq, D]``, the cache (contiguous ``[B, Hkv, context, D]``, or paged pools
    ``[B * pages, page_size, Hkv, D]`` with a shuffled ``block_table [B, pages]`` and the unused
    rows of each last page set to NaN, so a kernel that lets them into a result shows it), and
    ``cache_seqlens`` (every sequence holds ``context`` tokens)."""
    gen = torch.Generator(device=device).manual_seed(_seed(case, 0))
    dt = dict(device=device, dtype=case.torch_dtype)
    b, hkv, d, s = case.batch, case.kv_heads, case.head_dim, case.context
    q = torch.randn(b, case.heads, case.sq, d, generator=gen, **dt)
    lens = torch.full((b,), s, dtype=torch.int32, device=device)
    if not case.paged:
        k = torch.randn(b, hkv, s, d, generator=gen, **dt)
        v = torch.randn(b, hkv, s, d, generator=gen, **dt)
        return dict(q=q, k=k, v=v, lens=lens, block_table=None)
    ps = case.page_size
    pages = -(-s // ps)
    k = torch.randn(b * pages, ps, hkv, d, generator=gen, **dt)
    v = torch.randn(b * pages, ps, hkv, d, generator=gen, **dt)
    table = torch.randperm(b * pages, generator=gen, device=device).to(torch.int32).view(b, pages)
    tail = s - (pages - 1) * ps
    if tail < ps:
        last = table[:, -1].long()
        k[last, tail:] = float("nan")
        v[last, tail:] = float("nan")
    return dict(q=q, k=k, v=v, lens=lens, block_table=table)


def decode_lists(case: DecodeCase, device: torch.device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(kv_num [B, Hkv], kv_idx [B, Hkv, n])`` int32 for ``keep < 1`` (``None`` for dense):
    ``n = max(1, round(keep * nblocks))`` ascending block ids per (sequence, KV head), the last
    ``min(recent_blocks, n)`` blocks and ``n - that`` of the older ones (spread or random).

    Example::

        >>> c = DecodeCase(1, 200, 0.25, "contiguous", None, 1, 2, 1, 16, 16, "fp32", recent_blocks=2)
        >>> kv_num, kv_idx = decode_lists(c, torch.device("cpu"))   # 13 blocks: keep 3, two recent
        >>> kv_num.tolist(), kv_idx[0, 0, 1:].tolist()
        ([[3]], [11, 12])
    """
    if case.keep >= 1.0:
        return None
    nb = case.nblocks
    n = min(nb, max(1, int(math.floor(case.keep * nb + 0.5))))
    w = min(case.recent_blocks, n)
    rest, older = n - w, nb - w
    b, h = case.batch, case.kv_heads
    gen = torch.Generator(device=device).manual_seed(_seed(case, 1))
    recent = torch.arange(older, nb, device=device, dtype=torch.int64).expand(b, h, w)
    if rest == 0:
        picked = torch.empty(b, h, 0, dtype=torch.int64, device=device)
    elif case.selection == "spread":  # floor((t + u) * older / rest), u in [0, 1): strictly ascending
        u = torch.rand(b, h, 1, generator=gen, device=device, dtype=torch.float64)
        t = torch.arange(rest, device=device, dtype=torch.float64)
        picked = torch.floor((t + u) * (older / rest)).to(torch.int64).clamp_(0, older - 1)
    else:
        scores = torch.rand(b, h, older, generator=gen, device=device)
        picked = scores.topk(rest, dim=-1).indices.sort(dim=-1).values
    kv_idx = torch.cat([picked, recent], dim=-1).to(torch.int32).contiguous()
    kv_num = torch.full((b, h), n, dtype=torch.int32, device=device)
    return kv_num, kv_idx


def kept_block_mask(case: DecodeCase, lists: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """bool ``[B, Hkv, nblocks]``: the blocks some new row of (sequence, KV head) reads: the
    listed ones and the rows' own blocks (``sparse_decode``'s rule; every block when dense)."""
    b, h, nb, bs = case.batch, case.kv_heads, case.nblocks, case.block
    if lists is None:
        return torch.ones(b, h, nb, dtype=torch.bool)
    kv_num, kv_idx = (t.cpu().long() for t in lists)
    valid = (torch.arange(kv_idx.shape[-1])[None, None, :] < kv_num[..., None]) & (kv_idx >= 0) & (kv_idx < nb)
    mask = torch.zeros(b, h, nb + 1, dtype=torch.bool)
    mask.scatter_(2, torch.where(valid, kv_idx, nb), True)
    mask = mask[..., :nb]
    for i in range(case.sq):
        p = case.context - case.sq + i
        if p >= 0:
            mask[..., p // bs] = True
    return mask


def decode_bytes(case: DecodeCase, lists: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, Any]:
    """The bytes a decode case must move: ``kept_bytes`` (K and V of every visible token of the
    kept blocks, per KV head, + q + out), ``dense_bytes`` (the whole cache + q + out), and the
    kept / total block counts over batch x KV heads.

    Example (blocks 0 and 6 of 100 tokens, 16 + 4 tokens, x 2 KV heads x (K, V) x D 8 x fp32, + q, out)::

        >>> c = DecodeCase(1, 100, 0.1, "contiguous", None, 1, 2, 2, 8, 16, "fp32", recent_blocks=1)
        >>> one = (torch.ones(1, 2, dtype=torch.int32), torch.zeros(1, 2, 1, dtype=torch.int32))
        >>> s = decode_bytes(c, one); s["kept_blocks"], s["kept_bytes"]   # block 0 + own block 6 (4 tokens)
        (4, 2688)
    """
    mask = kept_block_mask(case, lists)
    bs, nb, s = case.block, case.nblocks, case.context
    tokens = torch.full((nb,), bs, dtype=torch.int64)
    tokens[-1] = s - (nb - 1) * bs
    elem = torch.empty(0, dtype=case.torch_dtype).element_size()
    per_token = 2 * case.head_dim * elem  # K and V
    qo = 2 * case.batch * case.heads * case.sq * case.head_dim * elem
    kept_tokens = int((mask.to(torch.int64) * tokens).sum())
    dense_tokens = case.batch * case.kv_heads * s
    return dict(kept_blocks=int(mask.sum()), total_blocks=case.batch * case.kv_heads * nb,
                kept_frac=kept_tokens / dense_tokens, kept_bytes=kept_tokens * per_token + qo,
                dense_bytes=dense_tokens * per_token + qo)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
Fn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class DecodeKernel:
    """A kernel of the decode family.

    Attributes:
        name: the ``--kernels`` name and the ``kernel`` column.
        kind: ``"ours"`` (always runs), ``"masked"`` (a peer given the case's kept blocks, per
            case) or ``"dense"`` (a dense peer: once per input shape, rows with ``keep`` blank).
        probe: ``probe(env, case) -> None | reason`` (cached by the implementation).
        prepare: ``prepare(env, case, data) -> (fn, row fields)``; ``fn() -> out [B, Hq, Sq, D]``.
        compile_key: for kernels whose first call per key is an expensive compile.
        description: one line for the README.
    """

    name: str
    kind: str
    probe: Callable[[Env, DecodeCase], Optional[str]]
    prepare: Callable[[Env, DecodeCase, Dict[str, Any]], Tuple[Fn, Dict[str, Any]]]
    compile_key: Optional[Callable[[DecodeCase], Any]] = None
    description: str = ""


DECODE_KERNELS: Dict[str, DecodeKernel] = {}


def _register(spec: DecodeKernel) -> None:
    DECODE_KERNELS[spec.name] = spec


def _tiny(env: Env, case: DecodeCase, length: int = 40) -> Dict[str, Any]:
    """A small input of the case's kind (dtype, D, GQA, Sq, layout) for probes."""
    small = DecodeCase(1, max(length, case.sq), 1.0, case.layout, case.page_size, case.sq, case.heads,
                       case.kv_heads, case.head_dim, case.block, case.dtype)
    return decode_inputs(small, env.device)


def _ours(backend: str) -> DecodeKernel:
    def probe(env: Env, case: DecodeCase) -> Optional[str]:
        def run() -> Optional[str]:
            from ..decode import sparse_decode
            from ..ops import available_backends

            if backend != "cuda" and backend in available_backends(env.device):
                return None  # listed for this device; the first real call says the rest
            if backend == "cuda" and env.device.type == "cuda":
                try:  # the extension loads (or builds) here, or says why not
                    import importlib

                    ok, why = importlib.import_module("sparse_attn._cuda").cuda_available()
                    if not ok:
                        return f"sparse_attn._cuda cannot load the CUDA kernels: {why}"
                except Exception as exc:  # noqa: BLE001
                    return f"sparse_attn._cuda: {_reason(exc)}"
            try:
                t = _tiny(env, case)
                sparse_decode(t["q"], t["k"], t["v"], t["lens"], block_table=t["block_table"],
                              block_size=case.block, backend=backend)
                env.sync()
            except Exception as exc:  # noqa: BLE001
                return _reason(exc)
            return None

        return _cached_probe(env, ("decode", backend, case.dtype, case.head_dim, case.layout, case.page_size,
                                   case.sq, case.heads // case.kv_heads, case.block), run)

    def prepare(env: Env, case: DecodeCase, data: Dict[str, Any]) -> Tuple[Fn, Dict[str, Any]]:
        from ..decode import sparse_decode

        q, k, v, lens, table, lists = (data[x] for x in ("q", "k", "v", "lens", "block_table", "lists"))

        def fn() -> torch.Tensor:
            return sparse_decode(q, k, v, lens, block_table=table, kv_blocks=lists, block_size=case.block,
                                 backend=backend)

        return fn, dict(note=data["list_note"])

    return DecodeKernel(f"ours_{backend}", "ours", probe, prepare,
                        description=f'sparse_decode(..., backend="{backend}") with the case\'s kv_blocks lists')


# -- SDPA: dense over the contiguous cache -------------------------------------------------------
_SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                  "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}


def _sdpa_fn(name: str, case: DecodeCase, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[Fn, str]:
    """Dense decode with SDPA: ``Sq = 1`` folds the GQA group into the query rows (one row per
    query head, no mask: every cached key is visible); ``Sq > 1`` uses ``enable_gqa`` and the
    bottom-right causal mask ``causal_lower_right(Sq, context)``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA_BACKENDS[name])
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    if sq == 1:
        qf = q.reshape(b, hkv, hq // hkv, d)

        def fn() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qf, k, v).reshape(b, hq, 1, d)

        return fn, "GQA group folded into the query rows (Sq = 1, no mask)"
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(sq, k.shape[2])
    gqa = hq != hkv

    def fn2() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    return fn2, "enable_gqa, causal_lower_right(Sq, context)"


def _sdpa(name: str) -> DecodeKernel:
    def probe(env: Env, case: DecodeCase) -> Optional[str]:
        if case.paged:
            return "needs a contiguous cache (dense peer; it ran on the contiguous case of this shape)"

        def run() -> Optional[str]:
            try:
                t = _tiny(env, case, 256)
                _sdpa_fn(name, case, t["q"], t["k"], t["v"])[0]()
                env.sync()
            except Exception as exc:  # noqa: BLE001
                return _reason(exc)
            return None

        return _cached_probe(env, ("decode", name, case.dtype, case.head_dim, case.sq, case.heads // case.kv_heads),
                             run)

    def prepare(env: Env, case: DecodeCase, data: Dict[str, Any]) -> Tuple[Fn, Dict[str, Any]]:
        fn, note = _sdpa_fn(name, case, data["q"], data["k"], data["v"])
        return fn, dict(note=note)

    return DecodeKernel(name, "dense", probe, prepare,
                        description=f"F.scaled_dot_product_attention over the whole contiguous cache under "
                                    f"sdpa_kernel(SDPBackend.{_SDPA_BACKENDS[name]})")


# -- flash-attn: flash_attn_with_kvcache ---------------------------------------------------------
def _flash_fn(case: DecodeCase, data: Dict[str, Any]) -> Fn:
    from flash_attn import flash_attn_with_kvcache

    q = data["q"].transpose(1, 2)  # [B, Sq, Hq, D]
    if case.paged:
        k, v = data["k"], data["v"]  # [pages, page_size, Hkv, D]: flash-attn's paged layout
    else:
        k, v = data["k"].transpose(1, 2), data["v"].transpose(1, 2)  # [B, S, Hkv, D] views
    lens, table = data["lens"], data["block_table"]

    def fn() -> torch.Tensor:
        # cache_seqlens counts the cached tokens; causal is bottom-right aligned: row i at L - Sq + i
        out = flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, block_table=table, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return fn


def _flash_probe(env: Env, case: DecodeCase) -> Optional[str]:
    def run() -> Optional[str]:
        missing = _flash_attn_missing(env, case, "flash_attn_with_kvcache")
        if missing:
            return missing
        try:
            _flash_fn(case, _tiny(env, case, 2 * (case.page_size or 64) + 3))()
            env.sync()
        except Exception as exc:  # noqa: BLE001
            return _reason(exc)
        return None

    return _cached_probe(env, ("decode", "flash_attn", case.dtype, case.head_dim, case.layout, case.page_size,
                               case.sq, case.heads // case.kv_heads), run)


def _flash_prepare(env: Env, case: DecodeCase, data: Dict[str, Any]) -> Tuple[Fn, Dict[str, Any]]:
    return _flash_fn(case, data), dict(note="flash_attn_with_kvcache(causal=True)"
                                       + (f", paged ({case.page_size}-token pages)" if case.paged else ""))


# -- FlexAttention with the kept blocks ----------------------------------------------------------
def _flex_probe(env: Env, case: DecodeCase) -> Optional[str]:
    if case.paged:
        return "contiguous cache only here (FlexAttention's paged attention is not wired up)"

    def run() -> Optional[str]:
        try:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return _reason(exc)
        return None

    return _cached_probe(env, ("decode", "flex"), run)


def _flex_prepare(env: Env, case: DecodeCase, data: Dict[str, Any]) -> Tuple[Fn, Dict[str, Any]]:
    """A ``BlockMask`` (KV block = the case's block) over ``[B, Hq]`` from the kept-block mask
    (lists + own blocks): blocks wholly visible to every new row are "full", the others
    "partial"; the mask_mod (kept AND ``j <= context - Sq + i``) is exact on its own too. The
    buffer it reads is refilled per case, so the compiled flex is not recompiled per keep."""
    from torch.nn.attention.flex_attention import BlockMask

    b, hq, sq, s, bs, nb = case.batch, case.heads, case.sq, case.context, case.block, case.nblocks
    g = case.heads // case.kv_heads
    key = ("dflexmask", b, hq, nb, s, sq, bs)
    if key not in env.cache:
        for old in [x for x in env.cache if isinstance(x, tuple) and x and x[0] == "dflexmask"]:
            del env.cache[old]
        buf = torch.zeros(b, hq, nb, dtype=torch.bool, device=env.device)

        def mask_mod(bi, hi, q_idx, kv_idx):
            return buf[bi, hi, kv_idx // bs] & (kv_idx <= q_idx + (s - sq))

        env.cache[key] = (buf, mask_mod)
    buf, mask_mod = env.cache[key]
    kept = data["kept_mask"].to(env.device).repeat_interleave(g, dim=1)  # [B, Hq, nb]
    buf.copy_(kept)
    cols = torch.arange(nb, device=env.device)
    whole = (cols + 1) * bs - 1 <= s - sq  # every new row sees the whole block
    full = kept & whole
    partial = kept & ~whole

    def lists(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        num = m.sum(-1, dtype=torch.int32)[:, :, None]
        idx = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)[:, :, None, :]
        return num, idx

    p_num, p_idx = lists(partial)
    f_num, f_idx = lists(full)
    kwargs: Dict[str, Any] = dict(BLOCK_SIZE=(128, bs), mask_mod=mask_mod)
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (sq, s)
    bm = BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, **kwargs)
    flex = env.flex_fn()
    q, k, v = data["q"], data["k"], data["v"]
    gqa = g > 1

    def fn() -> torch.Tensor:
        return flex(q, k, v, block_mask=bm, enable_gqa=gqa)

    return fn, dict(note="flex_attention + BlockMask of the kept blocks" + ("" if env.cpu else " (compiled)"))


for _b in ("triton", "cuda", "reference"):
    _register(_ours(_b))
for _n in _SDPA_BACKENDS:
    _register(_sdpa(_n))
_register(DecodeKernel("flex", "masked", _flex_probe, _flex_prepare,
                       compile_key=lambda c: ("dflex", c.batch, c.heads, c.kv_heads, c.context, c.sq, c.head_dim,
                                              c.dtype, c.block),
                       description="flex_attention with a BlockMask of the kept blocks over the contiguous cache "
                                   "(compiled on CUDA: its decoding kernel; eager on CPU)"))
_register(DecodeKernel("flash_attn", "dense", _flash_probe, _flash_prepare,
                       description="flash_attn.flash_attn_with_kvcache(causal=True), contiguous or paged, "
                                   "when importable"))


# ------------------------------------------------------------------------------------------------
# Rows, rates, targets
# ------------------------------------------------------------------------------------------------
def fill_decode_rates(row: Dict[str, Any], peak_gbps: Optional[float]) -> None:
    """``gbps``, ``gbps_effective``, ``bw_frac`` (measured) and ``model_*`` (MODELLED) of a row
    with ``bytes``, ``dense_bytes`` and ``ms``, in place.

    Example::

        >>> row = dict(bytes=4.8e9, dense_bytes=9.6e9, ms=2.0)
        >>> fill_decode_rates(row, 4800.0); row["gbps"], row["bw_frac"], row["gbps_effective"]
        (2400.0, 0.5, 4800.0)
    """
    for key, (_, tbs) in MODEL_CHIPS.items():
        m = decode_model_ms(row["bytes"], tbs * 1e3)
        row[f"model_ms_{key}"] = m
        row[f"model_gbps_{key}"] = row["bytes"] / (m * 1e-3) / 1e9
    row["hbm_peak_gbps"] = peak_gbps
    timed = fill_per_second(row, {"gbps": row["bytes"], "gbps_effective": row["dense_bytes"]}, 1e9)
    row["bw_frac"] = row["gbps"] / peak_gbps if timed and peak_gbps else None


def _case_key(r: Dict[str, Any]) -> tuple:
    return tuple(r[k] for k in ("batch", "context", "keep", "layout", "page_size", "sq", "heads", "kv_heads",
                                "head_dim", "block", "dtype", "selection"))


def _dense_key(r: Dict[str, Any]) -> tuple:
    return tuple(r[k] for k in ("batch", "context", "sq", "heads", "kv_heads", "head_dim", "dtype"))


def decode_speedups(rows: List[Dict[str, Any]], baseline: str) -> None:
    """``speedup_vs_sdpa`` (the baseline's time on the same batch/context/Sq/shape, any layout and
    keep) and ``speedup_vs_triton`` (ours_cuda rows: ours_triton's time on the same case), in place.

    Example::

        >>> base = dict(batch=1, context=8, sq=1, heads=2, kv_heads=1, head_dim=4, dtype="bf16", keep=None,
        ...             layout="contiguous", page_size=None, block=16, selection="spread")
        >>> rows = [dict(base, kernel="sdpa_flash", ms=3.0), dict(base, kernel="ours_triton", ms=2.0, keep=0.1),
        ...         dict(base, kernel="ours_cuda", ms=1.0, keep=0.1)]
        >>> decode_speedups(rows, "sdpa_flash"); rows[2]["speedup_vs_sdpa"], rows[2]["speedup_vs_triton"]
        (3.0, 2.0)
    """
    base = {_dense_key(r): r["ms"] for r in rows if r["kernel"] == baseline and r.get("ms")}
    triton = {_case_key(r): r["ms"] for r in rows if r["kernel"] == "ours_triton" and r.get("ms")}
    for r in rows:
        ms = r.get("ms")
        ok = ms is not None and ms > 0
        b = base.get(_dense_key(r))
        t = triton.get(_case_key(r)) if r["kernel"] == "ours_cuda" else None
        r["speedup_vs_sdpa"] = b / ms if (ok and b) else None
        r["speedup_vs_triton"] = t / ms if (ok and t) else None


def decode_targets(rows: List[Dict[str, Any]], cpu: bool = False) -> Tuple[List[str], List[Dict[str, Any]]]:
    """One line per target (worst value over the target shape's rows: every keep and layout), and
    the same as records ``{target, kernel, goal, worst, where, rows, met}`` (``met`` None: no data).

    Example::

        >>> decode_targets([])[0][0].endswith("no data")
        True
    """
    lines, recs = [], []
    shape = f"B={TARGET_SHAPE['batch']}, ctx={TARGET_SHAPE['context']}, Sq={TARGET_SHAPE['sq']}"
    for text, kernel, what, goal in DECODE_TARGETS:
        vals = []
        for r in rows:
            if r["kernel"] != kernel or r.get("status") != "ok" or r.get(what) is None:
                continue
            if any(r.get(k) != v for k, v in TARGET_SHAPE.items()):
                continue
            where = f"keep {r['keep']:g} {r['layout']}" + (f"/{r['page_size']}" if r["page_size"] else "")
            vals.append((r[what], where))
        rec: Dict[str, Any] = dict(target=text, kernel=kernel, goal=goal, worst=None, where=None, rows=len(vals),
                                   met=None)
        if not vals:
            why = " (CPU run: not speed claims)" if cpu else ""
            lines.append(f"- {text} ({shape}): no data{why}")
        else:
            worst = min(vals)
            rec.update(worst=worst[0], where=worst[1], met=worst[0] >= goal)
            shown = f"{100 * worst[0]:.1f}%" if what == "bw_frac" else f"{worst[0]:.2f}x"
            lines.append(f"- {text} ({shape}): worst {shown} ({worst[1]}; {len(vals)} rows) -> "
                         f"{'met' if rec['met'] else 'NOT met'}")
        recs.append(rec)
    ratios = [r["speedup_vs_triton"] for r in rows if r.get("speedup_vs_triton")]
    if ratios:
        gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        lines.append(f"- (info) ours_cuda / ours_triton over every case: geomean {gm:.2f}x, "
                     f"min {min(ratios):.2f}x, max {max(ratios):.2f}x ({len(ratios)} cases)")
    return lines, recs


def _fmt(x: Any, nd: int = 3) -> str:
    return report._fmt(x, nd)


DECODE_TABLE_HEAD = ["B", "context", "keep", "layout", "Sq", "kernel", "ms (p20-p80)", "MB moved", "GB/s",
                     "% HBM peak", "eff. GB/s", "vs SDPA", "cuda/triton", "model ms H100", "model ms H200",
                     "check", "max err", "note"]


def decode_table(rows: List[Dict[str, Any]]) -> str:
    """The markdown table of the timed and failed rows (skipped rows are listed apart).

    Example::

        >>> decode_table([]).splitlines()[0].startswith("| B | context |")
        True
    """
    lines = ["| " + " | ".join(DECODE_TABLE_HEAD) + " |", "|" + "|".join("---" for _ in DECODE_TABLE_HEAD) + "|"]
    for r in rows:
        if r.get("status") == "skipped":
            continue
        ms = f"{_fmt(r['ms'])} ({_fmt(r['ms_p20'])}-{_fmt(r['ms_p80'])})" if r.get("ms") is not None else "ERROR"
        layout = r["layout"] + (f"/{r['page_size']}" if r.get("page_size") else "")
        check = "-" if r.get("check") is None else f"{r['check']} vs {r['check_ref']}"
        note = str(r.get("error") or r.get("note") or "").replace("|", "/").replace("\n", " ")
        cells = [str(r["batch"]), str(r["context"]), "dense" if r.get("keep") is None else f"{r['keep']:g}", layout,
                 str(r["sq"]), r["kernel"], ms, _fmt(r["bytes"] / 1e6, 3), _fmt(r.get("gbps"), 1),
                 "-" if r.get("bw_frac") is None else f"{100 * r['bw_frac']:.1f}%", _fmt(r.get("gbps_effective"), 1),
                 "-" if r.get("speedup_vs_sdpa") is None else f"{r['speedup_vs_sdpa']:.2f}x",
                 "-" if r.get("speedup_vs_triton") is None else f"{r['speedup_vs_triton']:.2f}x",
                 _fmt(r.get("model_ms_h100"), 3), _fmt(r.get("model_ms_h200"), 3), check, _fmt(r.get("max_err"), 3),
                 note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(rows: List[Dict[str, Any]]) -> str:
    """MODELLED time and bandwidth per case (not measured): the kept bytes (and, for comparison,
    the dense bytes) at the data-sheet HBM bandwidth of an H100 SXM and an H200 plus the fixed
    launch cost.

    Example::

        >>> model_table([]).splitlines()[0].startswith("| B | context |")
        True
    """
    head = ["B", "context", "keep", "layout", "Sq", "kept MB", "dense MB"]
    for key, (name, tbs) in MODEL_CHIPS.items():
        head += [f"{name} ms", f"{name} GB/s", f"{name} dense ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    seen = set()
    for r in rows:
        if r.get("keep") is None:
            continue
        key = _case_key(r)
        if key in seen:
            continue
        seen.add(key)
        layout = r["layout"] + (f"/{r['page_size']}" if r.get("page_size") else "")
        cells = [str(r["batch"]), str(r["context"]), f"{r['keep']:g}", layout, str(r["sq"]),
                 _fmt(r["kept_bytes"] / 1e6, 3), _fmt(r["dense_bytes"] / 1e6, 3)]
        for _, (_, tbs) in MODEL_CHIPS.items():
            m = decode_model_ms(r["kept_bytes"], tbs * 1e3)
            cells += [f"{m:.4f}", f"{r['kept_bytes'] / (m * 1e-3) / 1e9:.0f}",
                      f"{decode_model_ms(r['dense_bytes'], tbs * 1e3):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MODEL_DOC = (f"MODEL, not a measurement: time = {DECODE_LAUNCH_US:g} us (two launches) + bytes / data-sheet HBM "
             "bandwidth (" + ", ".join(f"{n} {t:g} TB/s" for n, t in MODEL_CHIPS.values()) + "); bytes = K and V "
             "of the kept blocks' visible tokens per KV head + q + out")


def _status(r: Dict[str, Any]) -> str:
    text = f"{r['ms']:.4f} ms  {_fmt(r.get('gbps'), 1)} GB/s"
    if r.get("bw_frac") is not None:
        text += f" ({100 * r['bw_frac']:.1f}% of HBM peak)"
    return text + f"  [model H200 {r['model_ms_h200']:.4f} ms]"


def write_decode_plot(out_dir: str, stem: str, rows: List[Dict[str, Any]],
                      meta: Dict[str, Any]) -> Tuple[List[str], str]:
    """``<stem>_decode_bw.png``: achieved GB/s against the bytes a call moves, one series per
    kernel, with the MODELLED H100 / H200 curves and this GPU's HBM peak. Optional matplotlib.

    Example::

        >>> import tempfile
        >>> write_decode_plot(tempfile.mkdtemp(), "x", [], {})[0]
        []
    """
    timed = [r for r in rows if r.get("status") == "ok" and r.get("gbps")]
    if not timed:
        return [], "no timed rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return [], f"matplotlib is not available ({type(exc).__name__}); PNG plot skipped"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for kernel in sorted({r["kernel"] for r in timed}):
        pts = sorted((r["bytes"] / 1e6, r["gbps"]) for r in timed if r["kernel"] == kernel)
        ax.plot(*zip(*pts), "o" if kernel.startswith("ours") else "x", label=kernel, alpha=0.8)
    lo, hi = min(r["bytes"] for r in timed), max(r["bytes"] for r in timed)
    xs = [lo * (hi / lo) ** (i / 40) for i in range(41)] if hi > lo else [lo]
    for key, (name, tbs) in MODEL_CHIPS.items():
        ax.plot([x / 1e6 for x in xs], [x / (decode_model_ms(x, tbs * 1e3) * 1e-3) / 1e9 for x in xs], "--",
                lw=0.9, label=f"MODEL {name} ({tbs:g} TB/s + launch)")
    if meta.get("hbm_peak_gbps"):
        ax.axhline(meta["hbm_peak_gbps"], color="red", lw=0.8, ls=":", label="this GPU's HBM peak")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MB moved per call (kept K/V + q + out; dense peers: the whole cache)")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=6)
    path = os.path.join(out_dir, f"{stem}_decode_bw.png")
    title = f"decode bandwidth: {meta.get('gpu')} ({meta.get('mode')})"
    return [report._save_figure(plt, fig, title, path)], f"wrote {path}"


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def _base_row(case: DecodeCase, spec: DecodeKernel, suite: str, stats: Dict[str, Any]) -> Dict[str, Any]:
    row: Dict[str, Any] = {c: None for c in DECODE_COLUMNS}
    dense = spec.kind == "dense"
    row.update(suite=suite, family="decode", kernel=spec.name, batch=case.batch, context=case.context,
               keep=None if dense else case.keep, layout=case.layout, page_size=case.page_size, sq=case.sq,
               heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
               block=None if dense else case.block, dtype=case.dtype, selection=None if dense else case.selection,
               kept_blocks=stats["total_blocks"] if dense else stats["kept_blocks"],
               total_blocks=stats["total_blocks"], kept_frac=1.0 if dense else stats["kept_frac"],
               kept_bytes=stats["dense_bytes"] if dense else stats["kept_bytes"], dense_bytes=stats["dense_bytes"],
               **{"pass": "fwd"})
    row["bytes"] = row["kept_bytes"]
    return row


def _run_one(spec: DecodeKernel, case: DecodeCase, data: Dict[str, Any], env: Env, always: bool,
             n_check: int) -> Tuple[Dict[str, Any], Optional[torch.Tensor]]:
    """``(row fields, out[:n_check] or None)``; never raises except on an interrupt."""
    from .runner import _error_fields, _gate, _Interrupted, _settle_cuda

    gate = _gate(spec, case, env, always)
    if gate is not None:
        return dict({"status": "error"}, **gate), None
    key = spec.compile_key(case) if spec.compile_key else None
    out = None
    try:
        fn, extra = spec.prepare(env, case, data)
        t = time.perf_counter()
        out = fn()
        env.sync()
        first = time.perf_counter() - t
        out = out[:n_check].detach().clone()
        if key is not None:
            env.compiled.add(key)
        ms, p20, p80 = env.bench(fn)
        res = dict(extra, status="ok", ms=ms, ms_p20=p20, ms_p80=p80, first_call_s=first)
    except _Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - a failing kernel is a row, not the end of the run
        res = dict(status="error", **_error_fields(exc))
        if str(res["error"]).startswith("NotImplementedError"):
            res.update(status="skipped", error=f"skipped: not available on {env.device.type}: {res['error']}"[:300])
            res.pop("traceback")
        out = None
    _settle_cuda(env, out is None)
    return res, out


def _oracle(case: DecodeCase, data: Dict[str, Any], lists, n: int) -> torch.Tensor:
    """``sparse_decode(..., backend="reference")`` on the first ``n`` sequences."""
    from ..decode import sparse_decode

    table = data["block_table"]
    k, v = (data["k"], data["v"]) if case.paged else (data["k"][:n], data["v"][:n])
    sub = None if lists is None else (lists[0][:n], lists[1][:n])
    return sparse_decode(data["q"][:n], k, v, data["lens"][:n], block_table=None if table is None else table[:n],
                         kv_blocks=sub, block_size=case.block, backend="reference")


def _check(rows: List[Dict[str, Any]], outs: Dict[str, torch.Tensor], ref: torch.Tensor, n: int, batch: int,
           tol: Dict[str, float]) -> None:
    what = "reference" if n >= batch else f"reference (first {n} of {batch} sequences)"
    for r in rows:
        if r.get("status") != "ok" or r["kernel"] not in outs:
            continue
        err, ok = compare(outs[r["kernel"]], ref, tol, grad=False)
        r.update(check="ok" if ok else "FAIL", check_ref=what, max_err=err)


def copy_bandwidth_gbps(env: Env, nbytes: int = 1 << 30) -> Optional[float]:
    """Measured device-to-device copy bandwidth (read + write bytes / time) on CUDA, as a sanity
    reference next to the data-sheet peak; ``None`` on CPU or on failure."""
    if env.device.type != "cuda":
        return None
    try:
        src = torch.empty(nbytes // 2, dtype=torch.float16, device=env.device)
        dst = torch.empty_like(src)
        ms = env.bench(lambda: dst.copy_(src))[0]
        return 2 * nbytes / (ms * 1e-3) / 1e9
    except Exception:  # noqa: BLE001
        return None


def estimate_seconds(cases: Sequence[DecodeCase], specs: Sequence[DecodeKernel], args: Any, env: Env) -> float:
    """Rough wall clock of a CUDA run: per timed kernel ``warmup + rep`` ms (or ~20 calls at an
    assumed 3 TB/s) + 0.3 s, ~2 s per input shape (allocation, reference check), compiles (flex
    ~45 s per shape, ours ~15 s per cache layout)."""
    total, groups, flex_keys = 0.0, set(), set()
    for c in cases:
        st = c.batch * c.kv_heads * c.context * 2 * c.head_dim * torch.empty(0, dtype=c.torch_dtype).element_size()
        for spec in specs:
            if spec.kind == "dense" and c.group_key in groups:
                continue
            per = (args.warmup + args.rep) / 1e3
            total += max(per, 20 * st * (1.0 if spec.kind == "dense" else c.keep) / 3e12) + 0.3
            if spec.compile_key:
                flex_keys.add(spec.compile_key(c))
        groups.add(c.group_key)
    layouts = {(c.layout, c.dtype, c.head_dim) for c in cases}
    return total + 2.0 * len(groups) + FLEX_COMPILE_EST_S * len(flex_keys) * ("flex" in [s.name for s in specs]) \
        + 15.0 * len(layouts)


def run_decode(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """The ``--decode`` run (called by :func:`sparse_attn.benchmark.runner.main`); same exit
    statuses: 0 ok, 1 a failed check or an error in one of ours, 3 interrupted."""
    from .runner import HARD_STOP, run_groups

    cases = build_decode_cases(args)
    specs = [DECODE_KERNELS[n] for n in args.kernels]
    baseline = "sdpa_math" if args.cpu else "sdpa_flash"
    env = Env(cpu=args.cpu, warmup=args.warmup, rep=args.rep, budget_s=args.budget_s)
    gpu = "cpu" if args.cpu else torch.cuda.get_device_name(env.device)
    peak = args.hbm_tbs * 1e3 if args.hbm_tbs else peak_hbm_gbps(None if args.cpu else gpu)
    peak_source = ("--hbm-tbs" if args.hbm_tbs else "built-in table by GPU name" if peak else
                   "unknown for this GPU: bw_frac blank (--hbm-tbs sets it)")
    timer = (f"time.perf_counter ({args.warmup} warm-up, {args.rep} timed calls)" if args.cpu else
             f"triton.testing.do_bench(warmup={args.warmup}ms, rep={args.rep}ms), median + 20/80% quantiles")
    copy_gbps = copy_bandwidth_gbps(env)
    checked = "every sequence" if args.cpu or not args.check_batch else f"the first {args.check_batch} sequences"
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    meta = report.metadata(
        cpu=args.cpu, suite=args.suite, argv=list(argv), baseline=baseline, peaks={}, peak_source=peak_source,
        timer=timer,
        extra=dict(family="decode", kernels=args.kernels, budget_s=args.budget_s, hbm_peak_gbps=peak,
                   copy_gbps_measured=copy_gbps, model=MODEL_DOC,
                   bytes="kept_bytes = K and V bytes of every visible token of the kept blocks (lists + the rows' "
                         "own blocks) per KV head + q + out; dense peers are counted for the whole cache",
                   check=f"sparse_decode(backend='reference') on {checked}; "
                         f"tolerances {({str(k).replace('torch.', ''): v for k, v in TOLS.items()})}",
                   targets_doc="at B=16, 128k, Sq=1: ours_triton and ours_cuda >= 80% of the HBM peak on the kept "
                               "bytes; ours_cuda >= 1.1x ours_triton"))
    for k in ("flops", "roofline", "peak_tflops"):
        meta.pop(k, None)
    stem = f"bench_{report.sanitize(gpu)}_{args.suite}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    print(f"# sparse_attn bench (decode): {gpu} | torch {meta['torch']} | triton {meta['triton']} | commit "
          f"{str(meta['git_commit'])[:12]} | suite {args.suite} | {len(cases)} cases x {len(specs)} kernels",
          flush=True)
    print(f"# HBM peak: {'-' if peak is None else f'{peak:.0f} GB/s'} ({peak_source})"
          + ("" if copy_gbps is None else f"; measured device copy {copy_gbps:.0f} GB/s"), flush=True)
    if args.cpu:
        print("# CPU smoke run: harness check only, numbers are NOT speed claims; the model_* columns are a "
              "MODEL of an H100 / H200", flush=True)
    else:
        est = estimate_seconds(cases, specs, args, env)
        meta["estimated_s"] = round(est)
        print(f"# estimated ~{est:.0f}s (rough; budget {'none' if args.budget_s is None else f'{args.budget_s:.0f}s'})",
              flush=True)

    rows: List[Dict[str, Any]] = []
    interrupted = run_groups(
        cases, lambda c: c.group_key,
        lambda group: _run_group(group, specs, args, env, rows, baseline, peak, meta, stem, HARD_STOP),
        meta, cpu=args.cpu)
    meta["total_s"] = round(env.elapsed(), 1)
    decode_speedups(rows, baseline)
    lines, recs = decode_targets(rows, cpu=args.cpu)
    meta["targets"] = recs
    paths = _write(args.out, stem, meta, rows, lines)
    plots, plot_msg = write_decode_plot(args.out, stem, rows, meta)
    print()
    print("targets (decode):")
    print("\n".join(lines))
    print()
    print(decode_table(rows))
    print()
    print(f"MODELLED (not measured; {MODEL_DOC}):")
    print(model_table(rows))
    print()
    for p in paths.values():
        print(f"wrote {p}")
    print(plot_msg)
    ours = {n for n, s in DECODE_KERNELS.items() if s.kind == "ours"}
    failed = [r for r in rows if r.get("check") == "FAIL" and r["kernel"] in ours]
    ours_err = [r for r in rows if r["kernel"] in ours and r.get("status") == "error"]
    peer_bad = [r for r in rows if r["kernel"] not in ours and (r.get("check") == "FAIL" or r.get("status") == "error")]
    skipped = [r for r in rows if r.get("status") == "skipped"]
    print(f"summary: {len(rows)} rows, {len(failed)} failed checks in ours, {len(ours_err)} errors in ours, "
          f"{len(peer_bad)} failed/error peer rows, {len(skipped)} skipped, {meta['total_s']}s", flush=True)
    if interrupted:
        return 3
    return 1 if (failed or ours_err) else 0


def _write(out_dir: str, stem: str, meta: Dict[str, Any], rows: List[Dict[str, Any]],
           target_lines: Optional[List[str]] = None) -> Dict[str, str]:
    if target_lines is None:
        target_lines = decode_targets(rows, cpu=meta.get("mode") == "cpu-smoke")[0]
    sections = [("Targets (decode; checked on a GPU only)", "\n".join(target_lines)),
                (f"Modelled (NOT measured): {MODEL_DOC}", model_table(rows))]
    return report.write_outputs(out_dir, stem, meta, rows, columns=DECODE_COLUMNS, sections=sections,
                                table=decode_table)


def _run_group(group: List[DecodeCase], specs: List[DecodeKernel], args: argparse.Namespace, env: Env,
               rows: List[Dict[str, Any]], baseline: str, peak: Optional[float], meta: Dict[str, Any], stem: str,
               hard_stop: float) -> None:
    """All keeps of one input shape: the inputs once, the dense peers once, then per keep the lists,
    ours and the masked peers; every output checked against the reference."""
    first = group[0]
    tol = TOLS[first.torch_dtype]
    n_check = first.batch if (args.cpu or not args.check_batch) else min(first.batch, int(args.check_batch))
    tag = (f"B={first.batch} ctx={first.context} {first.layout_label} Sq={first.sq} "
           f"H={first.heads}/{first.kv_heads} D={first.head_dim} {first.dtype}")
    dense_specs = [s for s in specs if s.kind == "dense"]
    case_specs = [s for s in specs if s.kind != "dense"]

    def blank(case: DecodeCase, todo: List[DecodeKernel], status: str, why: str) -> List[Dict[str, Any]]:
        out = []
        stats = decode_bytes(case, decode_lists(case, torch.device("cpu")))
        for spec in todo:
            r = _base_row(case, spec, args.suite, stats)
            r.update(status=status, error=why)
            fill_decode_rates(r, peak)
            out.append(r)
        return out

    def measure(case: DecodeCase, todo: List[DecodeKernel], data: Dict[str, Any], stats: Dict[str, Any],
                always: Callable[[DecodeKernel], bool]) -> Tuple[List[Dict[str, Any]], Dict[str, torch.Tensor]]:
        """Each kernel of ``todo`` on ``case``: its rows, and the outputs of those that ran."""
        out_rows: List[Dict[str, Any]] = []
        outs: Dict[str, torch.Tensor] = {}
        for spec in todo:
            res, out = _run_one(spec, case, data, env, always(spec), n_check)
            r = _base_row(case, spec, args.suite, stats)
            r.update(res)
            fill_decode_rates(r, peak)
            out_rows.append(r)
            if out is not None:
                outs[spec.name] = out
        return out_rows, outs

    if env.over_budget(factor=hard_stop):
        why = f"skipped: time budget ({env.budget_s:.0f}s x {hard_stop}) spent"
        print(f"[{tag}] {why}: {len(group)} cases not run", flush=True)
        rows += blank(first, dense_specs, "skipped", why)
        for case in group:
            rows += blank(case, case_specs, "skipped", why)
        return
    t_group = time.perf_counter()
    try:
        data = decode_inputs(first, env.device)
    except Exception as exc:  # noqa: BLE001
        why = f"inputs failed: {type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
        rows += blank(first, dense_specs, "error", why)
        for case in group:
            rows += blank(case, case_specs, "error", why)
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        return
    try:
        dense_ref: Optional[torch.Tensor] = None
        data.update(lists=None, list_note="kv_blocks=None (dense decode)",
                    kept_mask=kept_block_mask(first, None))
        dense_rows, dense_outs = measure(first, sorted(dense_specs, key=lambda s: s.name != baseline), data,
                                         decode_bytes(first, None), lambda s: s.name == baseline)
        if dense_outs and not args.no_check:
            dense_ref = _oracle(first, data, None, n_check)
            _check(dense_rows, dense_outs, dense_ref, n_check, first.batch, tol)
        del dense_outs
        rows += dense_rows
        report.print_rows(dense_rows, tag, _status)

        for case in group:
            ctag = f"{tag} keep={case.keep:g}"
            t_case = time.perf_counter()
            if env.over_budget(factor=hard_stop):
                why = f"skipped: time budget ({env.budget_s:.0f}s x {hard_stop}) spent"
                rows += blank(case, case_specs, "skipped", why)
                continue
            lists = decode_lists(case, env.device)
            stats = decode_bytes(case, lists)
            nb = case.nblocks
            if lists is None:
                note = "kv_blocks=None (dense decode)"
            else:
                n = int(lists[1].shape[-1])
                note = f"{n}/{nb} blocks per (b, h): last {min(case.recent_blocks, n)} + {case.selection}"
            data.update(lists=lists, list_note=note, kept_mask=kept_block_mask(case, lists))
            case_rows, outs = measure(case, case_specs, data, stats, lambda s: s.kind == "ours")
            if outs and not args.no_check:
                try:
                    reuse = lists is None and dense_ref is not None
                    ref = dense_ref if reuse else _oracle(case, data, lists, n_check)
                    _check(case_rows, outs, ref, n_check, case.batch, tol)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    for r in case_rows:
                        if r["status"] == "ok":
                            r.update(check="FAIL", check_ref=f"check crashed: {type(exc).__name__}: {exc}"[:200])
            rows += case_rows
            del outs
            decode_speedups(rows, baseline)
            report.print_rows(case_rows, ctag, _status)
            print(f"[{ctag}] case took {time.perf_counter() - t_case:.1f}s (total {env.elapsed():.1f}s)", flush=True)
            _write(args.out, stem, meta, rows)
    finally:
        del data
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"[{tag}] shape took {time.perf_counter() - t_group:.1f}s", flush=True)
