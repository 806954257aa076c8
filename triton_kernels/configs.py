"""Tile configurations for the block-sparse attention kernels, and how a launch picks one.

The kernel tile is a property of the GPU, not of the layout. One table gives, per GPU family,
kernel and head-dim bucket, the tile the tensor cores like (``TileConfig``); a layout block may
be smaller (the tile then covers several layout blocks and the kernel walks a tile plan, see
``sparse_attn.tiling``) or larger (the tile splits it). Per launch these *shapes* compete:

* ``wide``: the table's tile on both sides;
* ``rows``: the table's tile on the query side, the key side clipped to the layout block
  (every kernel's products keep M >= 64, see ``block_sparse_bwd``), so only query blocks are
  unioned;
* ``wide64`` / ``rows64``: the same with 64 query rows, where the table's tile is taller (fewer
  layout rows unioned, still wgmma);
* ``exact``: both sides clipped to the layout block (v1's row-sized tiles: no union).

The launcher builds each shape's plan on the device and models each walk (:func:`model_ms`, a
roofline over the plan's actual steps). Among the shapes the model puts no slower than ``exact``
it takes the cheapest whose work ratio (computed / kept pairs) is at most
:data:`MAX_WORK_RATIO`, else the cheapest: a layout where the union wastes too much (random masks
at low density) falls back to narrower tiles, and no choice is slower than v1 *by the model*.
The choice needs one host read of the plans' sizes; it is cached on the layout's index tensor, so
a layout reused across layers and steps pays it once. While a CUDA graph is being captured no host
read is possible: ``rows`` is taken. ``SPARSE_ATTN_TILES`` = one of :data:`SHAPES` pins a shape;
``SPARSE_ATTN_AUTOTUNE=1`` times the choice's neighbours on the GPU once per key and keeps the
winner on disk (``autotune.py``).

Provenance: the tiles are FlashAttention-2/3-style starting points for A100 (sm_80) and H100
(sm_90), checked statically (``sparse-attn bench --static``: wgmma on sm_90, no spills for
head dims 64 and 128); not yet timed on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from sparse_attn.tiling import TilePlan, build_plan, computed_pairs, kept_pairs

__all__ = ["TileConfig", "KERNELS", "SHAPES", "CHIPS", "gpu_family", "tile_config", "candidates", "dense_tiles",
           "model_ms", "select_tiles", "plan_for", "family_override", "tune_space", "autotuned", "launch_report"]

KERNELS = ("fwd", "dq", "dkdv")
SHAPES = ("wide", "wide64", "rows", "rows64", "exact")
MAX_WORK_RATIO = 1.3  # computed / kept pairs a launch accepts when a cheaper-than-v1 option meets it


@dataclass(frozen=True)
class TileConfig:
    """``block_m`` query rows x ``block_n`` keys per step, for every kernel (for dK/dV the key
    tile is the program's own and the query tile is walked)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (family, kernel, head-dim bucket) -> the wide tile. Buckets: padded head dim <= 64, <= 128, <= 256.
# Head dim 256 may spill (the static report lists where): a [64, 256] fp32 accumulator is 64
# registers a thread at 8 warps, the Q and dO tiles as much again, so Hopper's dQ (64x16, which
# must keep 64 rows for wgmma) spills ~25-50 B, and the walks over 128-blocks (sub-tile loops)
# spill more on sm_80; the dK/dV walk takes 32 query rows there (its dK^T/dV^T products keep
# wgmma through the head dim).
_TABLE: Dict[Tuple[str, str, int], TileConfig] = {
    # Hopper (H100 / H200): wgmma needs >= 64 rows per warp group. Chosen from ptxas -v on
    # sm_90a (sparse-attn bench --static): the largest tiles without spills, bit-mask walk included.
    ("hopper", "fwd", 64): TileConfig(128, 128, 8, 2),
    ("hopper", "fwd", 128): TileConfig(128, 32, 8, 2),
    ("hopper", "fwd", 256): TileConfig(64, 32, 8, 1),
    ("hopper", "dq", 64): TileConfig(128, 64, 8, 2),
    ("hopper", "dq", 128): TileConfig(64, 64, 8, 2),
    ("hopper", "dq", 256): TileConfig(64, 16, 8, 1),
    ("hopper", "dkdv", 64): TileConfig(64, 64, 8, 2),
    ("hopper", "dkdv", 128): TileConfig(64, 32, 8, 2),
    ("hopper", "dkdv", 256): TileConfig(32, 16, 8, 1),
    # Ampere (A100 / A10 / RTX 30xx) and anything older or unknown; same method on sm_80
    ("ampere", "fwd", 64): TileConfig(128, 32, 8, 2),
    ("ampere", "fwd", 128): TileConfig(64, 64, 8, 2),
    ("ampere", "fwd", 256): TileConfig(32, 32, 8, 1),
    ("ampere", "dq", 64): TileConfig(64, 64, 4, 2),
    ("ampere", "dq", 128): TileConfig(64, 32, 8, 2),
    ("ampere", "dq", 256): TileConfig(32, 16, 8, 1),
    ("ampere", "dkdv", 64): TileConfig(64, 32, 4, 2),
    ("ampere", "dkdv", 128): TileConfig(64, 16, 8, 2),
    ("ampere", "dkdv", 256): TileConfig(32, 16, 8, 1),
}
# TRITON_INTERPRET=1 on CPU tensors: small tiles keep numpy fast (and still cover two 16-blocks).
for _k in KERNELS:
    for _b in (64, 128, 256):
        _TABLE[("interpret", _k, _b)] = TileConfig(32, 32, 4, 1)

# Chips for the model: dense tensor-core peak (fp16/bf16) and fp32 FMA peak in TFLOP/s, exp2
# throughput (MUFU: 16 / clock / SM), L2 and HBM bandwidth in TB/s, SMs, clock in GHz.
CHIPS = {
    90: dict(name="H100 SXM", tc=989.4, fp32=66.9, exp=16 * 132 * 1.83e-3, l2=10.0, hbm=3.35, sms=132, ghz=1.83),
    80: dict(name="A100 SXM", tc=312.0, fp32=19.5, exp=16 * 108 * 1.41e-3, l2=5.0, hbm=2.04, sms=108, ghz=1.41),
}
# Fraction of the tensor-core peak an instruction reaches in these kernels (model parameters).
_INSTR_EFF = {(90, "wgmma"): 0.75, (90, "mma.sync"): 0.45, (80, "mma.sync"): 0.75}
_ITER_CYCLES = 250  # fixed cost of one inner step (loads issued, barriers, loop): model parameter
_FAMILY_CC = {"hopper": 90, "ampere": 80}

_override: Optional[str] = None


class family_override:
    """``with family_override("hopper"):`` launches pick the Hopper (or Ampere) tiles on any device;
    tests use it to run the GPU tile configurations under the interpreter."""

    def __init__(self, family: Optional[str]) -> None:
        if family not in (None, "hopper", "ampere", "interpret"):
            raise ValueError(f"family must be hopper, ampere or interpret, got {family!r}")
        self.family = family

    def __enter__(self) -> "family_override":
        global _override
        self._prev, _override = _override, self.family
        return self

    def __exit__(self, *exc) -> None:
        global _override
        _override = self._prev


def gpu_family(device: torch.device) -> str:
    """The row of the table a device uses: "hopper" (sm_90+), "ampere" (older GPUs) or
    "interpret" (CPU tensors under TRITON_INTERPRET=1)."""
    if _override is not None:
        return _override
    if device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"


def _bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two (at least 16), as the kernels load it."""
    return max(16, 1 << (head_dim - 1).bit_length())


def tile_config(family: str, kernel: str, head_dim: int, elem_bytes: int = 2) -> TileConfig:
    """The table's (wide) tile of ``kernel``. fp32 operands run exact fp32 dots on the FMA units
    (no tensor cores) with twice the bytes per element: they get half the tile on both sides
    (at least 32 x 16) and one pipeline stage less."""
    cfg = _TABLE[(family, kernel, _bucket(head_dim))]
    if elem_bytes == 4 and family != "interpret":
        return TileConfig(max(32, cfg.block_m // 2), max(16, cfg.block_n // 2), cfg.num_warps,
                          max(1, cfg.num_stages - 1))
    return cfg


def _launch(cfg: TileConfig, bm: int, bn: int, head_dim: int, bq: int, bk: int, shape: str) -> dict:
    # Small tiles keep the table's warps: with a [BLOCK_D, BLOCK_N] (dK/dV) or [BLOCK_M, BLOCK_D]
    # accumulator and the Q/dO tiles, fewer warps spill at head dim 128 (ptxas -v on sm_80/sm_90).
    return dict(BLOCK_D=block_d(head_dim), BLOCK_M=bm, BLOCK_N=bn, BQ=bq, BK=bk, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, shape=shape)


def candidates(family: str, kernel: str, head_dim: int, elem_bytes: int, bq: int, bk: int) -> List[dict]:
    """The launch parameters each tile shape gives (``SHAPES`` order, duplicates merged):
    ``BLOCK_D, BLOCK_M, BLOCK_N, BQ, BK, num_warps, num_stages``, ``shape`` and ``aliases`` (every
    shape name that gives these tiles). The 64-row variants exist only where the table's query
    tile is taller."""
    cfg = tile_config(family, kernel, head_dim, elem_bytes)
    tall = [cfg.block_m] + ([64] if cfg.block_m > 64 else [])
    shapes = []
    for i, bm in enumerate(tall):
        shapes.append(("wide" + ("64" if i else ""), bm, cfg.block_n))
    for i, bm in enumerate(tall):
        shapes.append(("rows" + ("64" if i else ""), bm, min(cfg.block_n, bk)))
    exact_m = min(cfg.block_m, bq)
    # dK/dV under 64 query rows: S/dP run mma.sync beside the wgmma of dK^T/dV^T, and the 32x32
    # variant spills at head dim 128 on sm_90 (ptxas -v) where 32x16 does not.
    exact_n = min(cfg.block_n, bk, 16 if kernel == "dkdv" and exact_m < 64 else cfg.block_n)
    shapes.append(("exact", exact_m, exact_n))
    out: Dict[Tuple[int, int], dict] = {}
    for shape, bm, bn in shapes:
        if (bm, bn) in out:  # the same tiles under another name: pinning that name picks them
            out[(bm, bn)]["aliases"] += (shape,)
        else:
            out[(bm, bn)] = dict(_launch(cfg, bm, bn, head_dim, bq, bk, shape), aliases=(shape,))
    return list(out.values())


def dense_tiles(family: str, kernel: str, head_dim: int, elem_bytes: int) -> dict:
    """Launch parameters without a layout: the table's tile (``BQ``/``BK`` equal it)."""
    cfg = tile_config(family, kernel, head_dim, elem_bytes)
    return _launch(cfg, cfg.block_m, cfg.block_n, head_dim, cfg.block_m, cfg.block_n, "dense")


def expected_instr(kernel: str, cc: int, dtype: str, tiles: dict) -> str:
    """The tensor-core instruction the tile should compile to: ``wgmma`` on sm_90 in 16-bit types
    when a product has >= 64 rows (the query tile; for dK/dV also the head dim, its accumulators
    being ``[BLOCK_D, BLOCK_N]``), ``mma.sync`` otherwise, ``none`` for fp32 (exact fp32 dots run
    on FMA)."""
    if dtype == "fp32":
        return "none"
    rows = max(tiles["BLOCK_M"], tiles["BLOCK_D"]) if kernel == "dkdv" else tiles["BLOCK_M"]
    return "wgmma" if cc >= 90 and rows >= 64 else "mma.sync"


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
_DOTS = {"fwd": 2, "dq": 3, "dkdv": 4}  # matmuls per step, each 2 * BM * BN * D FLOPs


def model_ms(kernel: str, cc: int, dtype: str, head_dim: int, tiles: dict, pairs: float, compulsory_bytes: float,
             ) -> float:
    """Roofline-modelled time (ms) of a launch that computes ``pairs`` (query, key) products in
    steps of ``BLOCK_M x BLOCK_N``. A MODEL, not a measurement:

    ``max(matmul + exp + per-step time, tile loads / L2 bandwidth, compulsory bytes / HBM)``, with
    the matmuls at the instruction's modelled fraction of the chip's peak, one exp2 per pair on the
    special-function units and a fixed cost per inner step spread over the SMs.
    """
    chip = CHIPS[cc]
    bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
    d = block_d(head_dim)
    elem = 4 if dtype == "fp32" else 2
    steps = pairs / (bm * bn)
    flops = _DOTS[kernel] * 2.0 * pairs * d
    instr = expected_instr(kernel, cc, dtype, tiles)
    rate = chip["fp32"] * 0.7 if instr == "none" else chip["tc"] * _INSTR_EFF[(cc, instr)]
    compute_s = flops / (rate * 1e12) + pairs / (chip["exp"] * 1e12) + steps * _ITER_CYCLES / (
        chip["sms"] * chip["ghz"] * 1e9)
    walk_side = bm if kernel == "dkdv" else bn  # the tile that is loaded at every step
    tile_bytes = steps * 2 * walk_side * d * elem
    return 1e3 * max(compute_s, tile_bytes / (chip["l2"] * 1e12), compulsory_bytes / (chip["hbm"] * 1e12))


# ----------------------------------------------------------------------------------------------
# Choosing a launch
# ----------------------------------------------------------------------------------------------
def plan_for(kernel: str, tiles: dict, num: torch.Tensor, idx: torch.Tensor, seq_q: int, seq_k: int) -> TilePlan:
    """The tile plan ``kernel`` walks with ``tiles`` over a layout walk (``kv_num, kv_idx`` for the
    forward and dQ, the transposed ``q_num, q_idx`` for dK/dV)."""
    bq, bk, bm, bn = tiles["BQ"], tiles["BK"], tiles["BLOCK_M"], tiles["BLOCK_N"]
    if kernel == "dkdv":
        return build_plan(num, idx, bk, bq, bn, bm, -(-seq_q // bq))
    return build_plan(num, idx, bq, bk, bm, bn, -(-seq_k // bk))


def _cache(idx: torch.Tensor) -> dict:
    """Plans and choices cached on the index tensor itself (so on the layout that owns it);
    entries are keyed by the tensors' versions, so an in-place change is never served stale."""
    cache = getattr(idx, "_sparse_attn_plans", None)
    if cache is None:
        cache = {}
        try:
            idx._sparse_attn_plans = cache
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass that refuses attributes
            pass
    return cache


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def select_tiles(kernel: str, q: torch.Tensor, num: Optional[torch.Tensor], idx: Optional[torch.Tensor],
                 bq: int, bk: int, seq_q: int, seq_k: int) -> Tuple[dict, Optional[TilePlan]]:
    """Launch parameters (tile constexprs + warps/stages) and the tile plan for ``kernel`` (one of
    ``KERNELS``) over the walk ``(num, idx)``, or the dense tiles and ``None`` without a layout."""
    family = gpu_family(q.device)
    head_dim, elem = q.shape[-1], q.element_size()
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(q.dtype, "fp32")
    if num is None:
        return _strip(dense_tiles(family, kernel, head_dim, elem)), None
    cands = candidates(family, kernel, head_dim, elem, bq, bk)
    cache = _cache(idx)
    base = (num.data_ptr(), num._version, idx._version, seq_q, seq_k)
    pinned = os.environ.get("SPARSE_ATTN_TILES", "auto")
    plan = None  # a plan built while choosing
    if pinned != "auto":
        if pinned not in SHAPES:
            raise ValueError(f"SPARSE_ATTN_TILES must be auto, {', '.join(SHAPES)}; got {pinned!r}")
        # a 64-row variant exists only where the table's tile is taller; else its base shape
        names = [pinned, pinned[:-2]] if pinned.endswith("64") else [pinned]
        chosen = next(c for name in names for c in cands if name in c["aliases"])
    else:
        key = base + ("choice", kernel, family, head_dim, elem, bq, bk)
        chosen = cache.get(key)
        if chosen is None:
            if len(cands) == 1:
                chosen = cands[0]
            elif _capturing(q.device):
                chosen = next(c for c in cands if "rows" in c["aliases"])
            else:
                chosen, plan = _cheapest(kernel, family, dtype, head_dim, cands, num, idx, seq_q, seq_k)
                cache[key] = chosen
    return _strip(chosen), _cached_plan(kernel, chosen, num, idx, seq_q, seq_k, plan)


def _cheapest(kernel, family, dtype, head_dim, cands, num, idx, seq_q, seq_k) -> Tuple[dict, TilePlan]:
    """The candidate to launch and its plan (one host read): among the candidates the model puts
    no slower than v1's ``exact`` tiles, the cheapest whose work ratio is at most
    :data:`MAX_WORK_RATIO` (the model's per-step constant is a guess; bounded waste keeps a
    miscalibration from costing much), else the cheapest overall. The losers' plans are dropped."""
    plans = [plan_for(kernel, c, num, idx, seq_q, seq_k) for c in cands]
    bq, bk = cands[0]["BQ"], cands[0]["BK"]
    rows, cols = (bk, bq) if kernel == "dkdv" else (bq, bk)
    n_rows, n_cols = (seq_k, seq_q) if kernel == "dkdv" else (seq_q, seq_k)
    sizes = torch.stack([kept_pairs(num, idx, rows, cols, n_rows, n_cols).sum()]
                        + [computed_pairs(p, n_rows, n_cols).sum() for p in plans]).tolist()
    kept_total, sizes = max(1, sizes[0]), sizes[1:]
    cc = _FAMILY_CC.get(family, 90)  # the interpreter follows the Hopper model
    times = [model_ms(kernel, cc, dtype, head_dim, c, float(s), 0.0) for c, s in zip(cands, sizes)]
    v1 = next(t for c, t in zip(cands, times) if "exact" in c["aliases"])
    order = sorted(range(len(cands)), key=times.__getitem__)
    bounded = [i for i in order if times[i] <= v1 and sizes[i] / kept_total <= MAX_WORK_RATIO]
    best = bounded[0] if bounded else order[0]
    return cands[best], plans[best]


def _strip(tiles: dict) -> dict:
    """The launch parameters without the bookkeeping keys."""
    return {k: v for k, v in tiles.items() if k not in ("shape", "aliases")}


# ----------------------------------------------------------------------------------------------
# Opt-in autotune (SPARSE_ATTN_AUTOTUNE=1)
# ----------------------------------------------------------------------------------------------
def tune_space(tiles: dict) -> List[dict]:
    """The configurations an autotune run times around the launcher's choice: half the query
    tile (down to 64 rows, so Hopper keeps wgmma), half the key tile (down to 16), 4 or 8 warps,
    1 or 2 pipeline stages where the walk can pipeline. At most 16."""
    out = []
    for bm in sorted({tiles["BLOCK_M"], max(64, tiles["BLOCK_M"] // 2)} if tiles["BLOCK_M"] >= 64
                     else {tiles["BLOCK_M"]}, reverse=True):
        for bn in sorted({tiles["BLOCK_N"], max(16, tiles["BLOCK_N"] // 2)}, reverse=True):
            for warps in (4, 8):
                for stages in sorted({tiles["num_stages"], 1}):
                    out.append(dict(tiles, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))
    return out


def autotuned(kernel: str, q: torch.Tensor, tiles: dict, plan: Optional[TilePlan], num: Optional[torch.Tensor],
              idx: Optional[torch.Tensor], seq_q: int, seq_k: int, causal: bool,
              launch) -> Tuple[dict, Optional[TilePlan]]:
    """With ``SPARSE_ATTN_AUTOTUNE=1`` on a GPU family (not while a CUDA graph is captured): the
    fastest of :func:`tune_space` for this key, from the on-disk cache or timed now with
    ``launch(tiles, plan)``; otherwise ``(tiles, plan)`` unchanged."""
    from . import autotune

    family = gpu_family(q.device)
    if family == "interpret" or not autotune.enabled() or _capturing(q.device):
        return tiles, plan
    options = tune_space(tiles)
    device = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else family
    key = ("v1", kernel, device, q.shape[-1], str(q.dtype), tiles["BQ"], tiles["BK"], causal, num is None,
           tiles["BLOCK_M"], tiles["BLOCK_N"])
    plans: Dict[Tuple[int, int], Optional[TilePlan]] = {}  # built only if a search runs

    def plan_of(t: dict) -> Optional[TilePlan]:
        if num is None:
            return None
        if (t["BLOCK_M"], t["BLOCK_N"]) not in plans:
            plans[(t["BLOCK_M"], t["BLOCK_N"])] = plan_for(kernel, t, num, idx, seq_q, seq_k)
        return plans[(t["BLOCK_M"], t["BLOCK_N"])]

    best, _ = autotune.pick(key, options, lambda t: launch(t, plan_of(t)))
    if num is None:
        return best, None
    return best, _cached_plan(kernel, best, num, idx, seq_q, seq_k, plans.get((best["BLOCK_M"], best["BLOCK_N"])))


def _cached_plan(kernel: str, tiles: dict, num: torch.Tensor, idx: torch.Tensor, seq_q: int, seq_k: int,
                 plan: Optional[TilePlan] = None) -> TilePlan:
    """The plan of ``tiles``, kept on the layout (``plan``: one just built for these tiles)."""
    cache = _cache(idx)
    key = (num.data_ptr(), num._version, idx._version, seq_q, seq_k, "plan", kernel, tiles["BLOCK_M"],
           tiles["BLOCK_N"], tiles["BQ"], tiles["BK"])
    if key not in cache:
        cache[key] = plan if plan is not None else plan_for(kernel, tiles, num, idx, seq_q, seq_k)
    return cache[key]


def launch_report(q: torch.Tensor, layout) -> Dict[str, dict]:
    """What the launchers pick for ``layout`` with inputs like ``q`` (``[B, Hq, Sq, D]``; only its
    device, dtype and head dim matter) from the tile table (autotune aside), per kernel: ``shape``,
    ``tile`` (``BLOCK_M x BLOCK_N``)
    and ``work_ratio`` (computed / kept pairs, see ``sparse_attn.tiling``). Reads back to the host."""
    from sparse_attn.tiling import work_ratio

    bq, bk = layout.block_size
    sq, sk = layout.seq_q, layout.seq_k
    out = {}
    for kernel in KERNELS:
        num, idx = (layout.q_num, layout.q_idx) if kernel == "dkdv" else (layout.kv_num, layout.kv_idx)
        tiles, plan = select_tiles(kernel, q, num, idx, bq, bk, sq, sk)
        rows, cols = (bk, bq) if kernel == "dkdv" else (bq, bk)
        n_rows, n_cols = (sk, sq) if kernel == "dkdv" else (sq, sk)
        tile = (tiles["BLOCK_M"], tiles["BLOCK_N"])
        cands = candidates(gpu_family(q.device), kernel, q.shape[-1], q.element_size(), bq, bk)
        shape = next(c["shape"] for c in cands if (c["BLOCK_M"], c["BLOCK_N"]) == tile)
        out[kernel] = dict(shape=shape, tile=f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}",
                           work_ratio=work_ratio(num, idx, plan, rows, cols, n_rows, n_cols))
    return out
