"""Block-sparse decode (flash-decoding): a few new query rows against a long, possibly paged, KV cache.

Decode is memory-bound: each kept key is read once and used by only ``G * Sq`` query rows
(``G = Hq // Hkv``, ``Sq <= 16``), so the kernel is built around the K/V reads, not the matmuls.

* One tile of query rows per (sequence, KV head): every query head of the GQA group and every new
  token (row ``r = g * Sq + i``, padded to >= 16 rows for ``tl.dot``), so each K/V block is read
  once per group. Rows sit at different positions ``p = L - Sq + i``, possibly in two different
  layout blocks, so the causal bound and the block rules are applied per row inside the tile.
* Each (sequence, KV head) walks a *virtual list* of kept blocks, defined per mode without
  materialising anything on the host:

  - dense: blocks ``0 .. (L - 1) // bs``;
  - list: the ``kv_num`` listed ids (duplicates and ids outside the cache skipped), then the rows'
    own blocks (at most two, ``Sq <= 16 <= bs``) when ``own_block`` and not already listed, so no
    block is counted twice;
  - S2 closed form: the strided blocks ``r, r + stride, ...`` below the union of the rows' local
    windows, then that window (a dense head, residue < 0: every block).

  Keys are addressed as ``u = t * bs + o`` (entry ``t`` of the list, offset ``o``), ``BLOCK_N``
  at a time: a tile covers several small blocks or part of a large one, whatever the page size.
* Split-K: the grid is ``(B * Hkv * row tiles, num_splits)``, fixed by shapes (CUDA-graph
  capturable, no host read). Program ``s`` takes an equal share of its list's *actual* length,
  read on the device, so a short list leaves the last splits empty (they report ``lse = -inf``).
  The partial outputs are merged by log-sum-exp in :func:`_merge_kernel`; with one split the
  split kernel writes the result directly.
* Paged caches: key ``j`` lives in page ``block_table[b, j // page_size]`` (clamped to the pool),
  row ``j % page_size``; each key row is a contiguous ``D``-vector, so loads stay coalesced.
  Keys at or past ``L`` are never loaded (their rows may hold anything, NaN included).

Scores are in the log2 domain (``exp2``); partial log-sum-exps stay in log2 units; the returned
lse is a natural log. Non-finite values inside the visible cache are not contained (unlike the
training kernels): decode caches hold finite keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import LN2_C, LOG2E, _softmax_step, dot_precision, upcast
from .configs import block_d, gpu_family

__all__ = ["sparse_decode_fwd", "decode_fwd_with", "DecodeLaunch", "DecodeTile", "decode_launch", "decode_tile",
           "row_tiles", "max_kept_blocks", "DECODE_TILES", "FP32_TILE", "BLOCK_MS", "MODES", "MAX_SPLITS"]

MODES = ("dense", "list", "s2")  # MODE constexpr values 0, 1, 2
_SCAN = tl.constexpr(64)  # list ids compared per step when looking for the own blocks in the list


@triton.jit
def _decode_split_kernel(
    Q, K, V, O, LSE, O_PART, LSE_PART,
    SEQLENS, BT, NUM, IDX, RES,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_btb, stride_nb, stride_nh, stride_ib, stride_ih, stride_in,
    H_KV, GROUP, seq_q, s_cap, n_pages, page_size, max_pages, list_width, block_size,
    s2_local, s2_stride, own_block, n_mtiles, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (sequence, KV head, row tile) x one split of its kept-block list. ``K``/``V``: contiguous
    ``[B, Hkv, S, D]`` (``stride_kb`` per sequence, ``stride_kn`` per token) or a paged pool
    ``[P, page, Hkv, D]`` (``stride_kb`` per page, ``stride_kn`` per row of a page)."""
    i_p = tl.program_id(0)
    i_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    i_mt = i_p % n_mtiles
    i_bh = i_p // n_mtiles
    i_b = i_bh // H_KV
    i_h = i_bh % H_KV

    seq_len = tl.load(SEQLENS + i_b)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), s_cap)
    # Row r of the tile is query head i_h * GROUP + r // seq_q, new token r % seq_q.
    o_r = i_mt * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_r = o_r < GROUP * seq_q
    i_q = o_r % seq_q
    i_hq = i_h * GROUP + o_r // seq_q
    pos = seq_len - seq_q + i_q  # [BM] the row's position in the cache (< 0: sees nothing)
    pos_blk = tl.maximum(pos, 0) // block_size
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_q = (Q + i_b.to(tl.int64) * stride_qb + i_hq.to(tl.int64)[:, None] * stride_qh
           + i_q[:, None] * stride_qm + o_d[None, :])
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)

    # The rows' blocks: c_lo (the first row that sees anything) .. c_hi (the last row's); at most two
    # blocks, as Sq <= 16 <= block_size (the own-block check below looks at these two).
    c_hi = tl.maximum(seq_len - 1, 0) // block_size
    c_lo = tl.maximum(seq_len - seq_q, 0) // block_size
    n_cap = tl.cdiv(s_cap, block_size)
    idx_base = i_b.to(tl.int64) * stride_ib + i_h.to(tl.int64) * stride_ih
    n_list = 0
    res = 0
    win_lo = 0
    n_str = 0
    if MODE == 0:
        n_virt = c_hi + 1
    elif MODE == 1:
        n_list = tl.load(NUM + i_b.to(tl.int64) * stride_nb + i_h.to(tl.int64) * stride_nh)
        n_list = tl.minimum(tl.maximum(n_list, 0), list_width)
        n_virt = n_list + tl.where(own_block != 0, c_hi - c_lo + 1, 0)
    else:
        res = tl.load(RES + i_h)
        win_lo = tl.maximum(c_lo - s2_local + 1, 0)
        n_str = tl.where((res >= 0) & (res < win_lo), tl.cdiv(win_lo - res, s2_stride), 0)
        n_virt = tl.where(res < 0, c_hi + 1, n_str + c_hi - win_lo + 1)
    n_virt = tl.where(seq_len > 0, n_virt, 0)

    # This split's share, in whole tiles when a tile holds several blocks.
    per_tile = tl.maximum(BLOCK_N // block_size, 1)
    share = tl.cdiv(tl.cdiv(n_virt, n_splits), per_tile) * per_tile
    t_start = i_s * share
    t_end = tl.minimum(t_start + share, n_virt)

    # List mode: is an own block listed already? (then it is walked as a listed entry, not twice)
    lo_hits = tl.zeros([1], dtype=tl.int32)
    hi_hits = tl.zeros([1], dtype=tl.int32)
    if MODE == 1:
        scan_end = tl.where((own_block != 0) & (t_end > n_list), n_list, 0)
        for t0 in range(0, scan_end, _SCAN):
            o_t = t0 + tl.arange(0, _SCAN)
            ids = tl.load(IDX + idx_base + o_t * stride_in, mask=o_t < n_list, other=-1)
            lo_hits += tl.sum((ids == c_lo).to(tl.int32), 0)
            hi_hits += tl.sum((ids == c_hi).to(tl.int32), 0)
    lo_hits = tl.max(lo_hits, 0)
    hi_hits = tl.max(hi_hits, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = i_h.to(tl.int64) * stride_kh
    v_head = i_h.to(tl.int64) * stride_vh
    for u0 in range(t_start * block_size, t_end * block_size, BLOCK_N):
        u = u0 + tl.arange(0, BLOCK_N)  # [BN] virtual key slots
        t = u // block_size
        ok = t < t_end
        # c: the layout block of each slot; ok: the slot holds a key of the list
        if MODE == 0:
            c = t
        elif MODE == 1:
            listed = t < n_list
            c_l = tl.load(IDX + idx_base + t * stride_in, mask=ok & listed, other=-1)
            c_prev = tl.load(IDX + idx_base + (t - 1) * stride_in, mask=ok & listed & (t > 0), other=-1)
            c_o = c_lo + (t - n_list)  # the own-block entries, after the list
            # listed: skip a repeat of the previous id; own: skip a block the list holds. (A where
            # over the hit counts, not over int1 flags: the interpreter's where mishandles scalar int1.)
            own_fresh = tl.where(c_o == c_lo, lo_hits, hi_hits) == 0
            ok = ok & tl.where(listed, c_l != c_prev, (c_o <= c_hi) & own_fresh)
            c = tl.where(listed, c_l, c_o)
        else:
            c = tl.where(res < 0, t, tl.where(t < n_str, res + t * s2_stride, win_lo + (t - n_str)))
        key = c * block_size + u % block_size  # [BN]
        ok = ok & (c >= 0) & (c < n_cap) & (key < seq_len)
        if PAGED:
            slot = key // page_size
            page = tl.load(BT + i_b.to(tl.int64) * stride_btb + slot, mask=ok & (slot < max_pages), other=0)
            page = tl.minimum(tl.maximum(page, 0), n_pages - 1).to(tl.int64)
            k_row = page * stride_kb + (key % page_size) * stride_kn + k_head
            v_row = page * stride_vb + (key % page_size) * stride_vn + v_head
        else:
            k_row = i_b.to(tl.int64) * stride_kb + key.to(tl.int64) * stride_kn + k_head
            v_row = i_b.to(tl.int64) * stride_vb + key.to(tl.int64) * stride_vn + v_head
        m_kv = ok[:, None] & m_d[None, :]
        b_k = tl.load(K + k_row[:, None] + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
        b_v = tl.load(V + v_row[:, None] + o_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
        if UPCAST:
            b_k = b_k.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], log2 domain

        vis = ok[None, :] & (key[None, :] <= pos[:, None])  # causal, per row
        if MODE == 1:  # an own-block entry is visible only to the rows in that block
            vis = vis & ((t < n_list)[None, :] | (c[None, :] == pos_blk[:, None]))
        if MODE == 2:
            on_stride = (c % s2_stride) == res
            vis = vis & ((res < 0) | on_stride[None, :] | ((pos_blk[:, None] - c[None, :]) < s2_local))
        b_s = tl.where(vis, b_s, float("-inf"))

        b_p, b_v, alpha, l_i, m_i = _softmax_step(b_s, m_i, l_i, b_v, UPCAST)
        acc = tl.dot(b_p, b_v, acc * alpha[:, None], input_precision=DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    row = (i_b.to(tl.int64) * (H_KV * GROUP) + i_hq) * seq_q + i_q  # [BM] row of out [B, Hq, Sq]
    m_o = m_r[:, None] & m_d[None, :]
    if n_splits == 1:  # the whole list in one program: write the result itself
        b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2_C)
        tl.store(O + row[:, None] * HEAD_DIM + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_o)
        tl.store(LSE + row, b_lse, mask=m_r)
    else:  # a partial: normalised output and its log2-sum-exp (-inf: this split saw nothing)
        part = row * n_splits + i_s
        tl.store(O_PART + part[:, None] * HEAD_DIM + o_d[None, :], b_o, mask=m_o)
        tl.store(LSE_PART + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=m_r)


@triton.jit
def _merge_kernel(O_PART, LSE_PART, O, LSE, n_splits,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    """One output row: ``out = sum_s w_s o_s / sum_s w_s`` with ``w_s = exp2(lse_s - max lse)``
    (the math of ``sparse_attn.merge``, over every split at once); a row no split saw gives out 0,
    lse -inf."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n_splits
    o_s = tl.arange(0, BLOCK_S)
    b_lse = tl.load(LSE_PART + base + o_s, mask=o_s < n_splits, other=float("-inf"))  # [BS]
    m = tl.max(b_lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.math.exp2(b_lse - m_use), 0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_splits, CHUNK):  # chunks keep the [CHUNK, D] tile in registers
        o_c = s0 + tl.arange(0, CHUNK)
        m_c = o_c < n_splits
        w = tl.math.exp2(tl.load(LSE_PART + base + o_c, mask=m_c, other=float("-inf")) - m_use)  # [C]
        b_o = tl.load(O_PART + (base + o_c)[:, None] * HEAD_DIM + o_d[None, :], mask=m_c[:, None] & m_d[None, :],
                      other=0.0)  # [C, BD]
        acc += tl.sum(w[:, None] * b_o, 0)
    safe = tl.where(total == 0.0, 1.0, total)
    tl.store(O + row * HEAD_DIM + o_d, (acc / safe).to(O.dtype.element_ty), mask=m_d)
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), (m + tl.math.log2(safe)) * LN2_C))


# ----------------------------------------------------------------------------------------------
# Launch parameters
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeTile:
    """Keys per step and the launch's warps/stages for one (family, head-dim bucket, row tile)."""
    block_n: int
    num_warps: int
    num_stages: int


BLOCK_MS = (16, 32, 64)  # row tiles: the GQA group's rows (G * Sq) padded to a power of two, >= 16
# (family, head-dim bucket, row tile) -> tile, for 16-bit caches (fp32: FP32_TILE). Chosen from
# ptxas -v on sm_90 / sm_80 (``sparse-attn bench --static``: no spills at head dims 64 and 128, for
# every mode and cache layout), not yet timed on a GPU. Decode is memory-bound: the largest key
# step without spills keeps the most loads in flight (cp.async, 2-3 stages); the products
# (<= 64 rows) are small, mma.sync or wgmma alike.
DECODE_TILES: Dict[Tuple[str, int, int], DecodeTile] = {
    ("hopper", 64, 16): DecodeTile(128, 4, 3),
    ("hopper", 64, 32): DecodeTile(64, 4, 3),
    ("hopper", 64, 64): DecodeTile(64, 8, 3),
    ("hopper", 128, 16): DecodeTile(64, 4, 3),
    ("hopper", 128, 32): DecodeTile(64, 4, 3),
    ("hopper", 128, 64): DecodeTile(32, 8, 3),
    ("hopper", 256, 16): DecodeTile(32, 4, 2),
    ("hopper", 256, 32): DecodeTile(32, 4, 2),
    ("hopper", 256, 64): DecodeTile(16, 8, 2),
    ("ampere", 64, 16): DecodeTile(128, 4, 3),
    ("ampere", 64, 32): DecodeTile(64, 8, 3),
    ("ampere", 64, 64): DecodeTile(64, 8, 3),
    ("ampere", 128, 16): DecodeTile(64, 4, 3),
    ("ampere", 128, 32): DecodeTile(64, 4, 3),
    ("ampere", 128, 64): DecodeTile(32, 8, 3),
    ("ampere", 256, 16): DecodeTile(32, 4, 2),
    ("ampere", 256, 32): DecodeTile(32, 4, 2),
    ("ampere", 256, 64): DecodeTile(16, 8, 2),
}
# fp32 caches run exact fp32 products on the FMA units, whose operands take far more registers:
# 16 keys a step and at most 32 rows a tile (more rows take more tiles). ptxas -v: no spills on
# sm_90, <= 48 B on sm_80 (fp32 is outside the clean set; 64-row tiles spilled 1-29 KB).
FP32_TILE = DecodeTile(16, 8, 2)
FP32_MAX_BLOCK_M = 32
# TRITON_INTERPRET=1 on CPU tensors: small steps keep numpy fast (still two 16-blocks a step)
for _d in (64, 128, 256):
    for _m in BLOCK_MS:
        DECODE_TILES[("interpret", _d, _m)] = DecodeTile(32, 4, 1)
MAX_SPLITS = 128
WAVES = 2  # programs the split count aims for, in waves of the GPU's SMs
_SMS = {"hopper": 132, "ampere": 108, "interpret": 4}
MERGE_CHUNK = 16  # splits the merge folds per step ([CHUNK, D] fp32 in registers)
MERGE_WARPS = 4


@dataclass(frozen=True)
class DecodeLaunch:
    """How one decode call is launched: ``block_m`` query rows (GQA group x new tokens) per tile,
    ``block_n`` keys per step, ``num_splits`` programs per (sequence, KV head, row tile)."""
    block_m: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


def decode_tile(family: str, head_dim: int, elem_bytes: int, block_m: int) -> DecodeTile:
    """The table's tile (:data:`FP32_TILE` for fp32 on a GPU)."""
    if elem_bytes == 4 and family != "interpret":
        return FP32_TILE
    return DECODE_TILES[(family, 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256, block_m)]


def row_tiles(family: str, elem_bytes: int) -> Tuple[int, ...]:
    """The row tiles a launch can pick (fp32 on a GPU: at most :data:`FP32_MAX_BLOCK_M`)."""
    if elem_bytes == 4 and family != "interpret":
        return tuple(m for m in BLOCK_MS if m <= FP32_MAX_BLOCK_M)
    return BLOCK_MS


def max_kept_blocks(s_cap: int, block_size: int, list_width: Optional[int], s2_local: Optional[int],
                    s2_stride: Optional[int], own_block: bool) -> int:
    """The most blocks one (sequence, KV head) can walk, from shapes alone: a list's width (+ the
    rows' two own blocks), S2's strided blocks below a window of ``local + 1`` blocks, or every
    block of the cache. (S2 dense heads walk every block; the split share follows each list's
    actual length, so this only bounds the split count.)"""
    n_cap = -(-s_cap // block_size)
    if list_width is not None:
        return max(1, min(list_width, n_cap) + (2 if own_block else 0))
    if s2_local is not None:
        return max(1, min(n_cap, -(-n_cap // s2_stride) + s2_local + 1))
    return max(1, n_cap)


def decode_launch(q: torch.Tensor, num_kv_heads: int, max_blocks: int, block_size: int,
                  family: Optional[str] = None) -> DecodeLaunch:
    """The launch for ``q [B, Hq, Sq, D]`` over ``num_kv_heads`` KV heads, each walking at most
    ``max_blocks`` blocks: the row tile holds the whole GQA group's rows (at least 16, at most
    64, 32 for fp32; more rows take several tiles); the split count fills :data:`WAVES` waves of the GPU's SMs
    without exceeding the key steps a list can fill or :data:`MAX_SPLITS`. Shapes only: no host
    read."""
    b, hq, sq, d = q.shape
    family = family or gpu_family(q.device)
    rows = (hq // num_kv_heads) * sq
    tiles = row_tiles(family, q.element_size())
    block_m = min(tiles[-1], max(tiles[0], triton.next_power_of_2(rows)))
    cfg = decode_tile(family, d, q.element_size(), block_m)
    programs = b * num_kv_heads * -(-rows // block_m)
    sms = _SMS.get(family, 132)
    if q.device.type == "cuda" and family != "interpret":
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    per_step = max(1, cfg.block_n // block_size)
    splits = max(1, min(-(-WAVES * sms // programs), -(-max_blocks // per_step), MAX_SPLITS))
    return DecodeLaunch(block_m, cfg.block_n, splits, cfg.num_warps, cfg.num_stages)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def sparse_decode_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor],
    kv_num: Optional[torch.Tensor],
    kv_idx: Optional[torch.Tensor],
    s2_residues: Optional[torch.Tensor],
    s2_local: Optional[int],
    s2_stride: Optional[int],
    block_size: int,
    scale: float,
    own_block: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse decode attention. ``q [B, Hq, Sq, D]``; ``k_cache, v_cache`` contiguous
    ``[B, Hkv, S_max, D]`` or paged pools ``[P, page_size, Hkv, D]`` with ``block_table
    [B, max_pages]`` int32; ``cache_seqlens [B]`` int32 (the ``Sq`` new tokens included: row ``i``
    sits at ``L - Sq + i``); ``kv_num [B, Hkv]`` / ``kv_idx [B, Hkv, N]`` int32 (a kept-block list)
    or ``s2_residues [Hkv]`` int32 with ``s2_local``, ``s2_stride`` (S2 closed form) or neither
    (dense). Returns ``out [B, Hq, Sq, D]`` (q's dtype) and ``lse [B, Hq, Sq]`` fp32 (natural log;
    ``-inf`` and out 0 for a row that sees nothing). The grid comes from shapes only."""
    paged = block_table is not None
    hkv = k_cache.shape[2] if paged else k_cache.shape[1]
    s_cap = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
    max_blocks = max_kept_blocks(s_cap, block_size, None if kv_idx is None else kv_idx.shape[-1],
                                 None if s2_residues is None else s2_local, s2_stride, own_block)
    launch = decode_launch(q, hkv, max_blocks, block_size)
    return decode_fwd_with(launch, q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx, s2_residues,
                           s2_local, s2_stride, block_size, scale, own_block)


def decode_fwd_with(launch: DecodeLaunch, q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx,
                    s2_residues, s2_local, s2_stride, block_size, scale, own_block):
    """:func:`sparse_decode_fwd` with the launch given (tests force split counts and tiles here)."""
    b, hq, sq, d = q.shape
    paged = block_table is not None
    if paged:
        n_pages, page_size, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
        max_pages = block_table.shape[1]
        s_cap = max_pages * page_size
        k_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        v_strides = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        bt_stride = block_table.stride(0)
    else:
        hkv, s_cap = k_cache.shape[1], k_cache.shape[2]
        n_pages = page_size = max_pages = 1
        k_strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        v_strides = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        bt_stride = 0
    mode = 1 if kv_idx is not None else 2 if s2_residues is not None else 0
    if mode == 1:
        list_args = (kv_num.stride(0), kv_num.stride(1), kv_idx.stride(0), kv_idx.stride(1), kv_idx.stride(2))
        list_width = kv_idx.shape[-1]
    else:
        list_args, list_width = (0, 0, 0, 0, 0), 0
    group = hq // hkv
    n_mtiles = -(-(group * sq) // launch.block_m)
    splits = launch.num_splits
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {splits}")
    out = torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    if splits > 1:
        o_part = torch.empty(b * hq * sq, splits, d, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(b * hq * sq, splits, dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = lse  # never written (the kernel writes out/lse itself)
    bd = block_d(d)
    _decode_split_kernel[(b * hkv * n_mtiles, splits)](
        q, k_cache, v_cache, out, lse, o_part, lse_part,
        cache_seqlens, block_table, kv_num, kv_idx, s2_residues,
        q.stride(0), q.stride(1), q.stride(2), *k_strides, *v_strides,
        bt_stride, *list_args,
        hkv, group, sq, s_cap, n_pages, page_size, max_pages, list_width, block_size,
        s2_local or 1, s2_stride or 1, int(bool(own_block)), n_mtiles, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, MODE=mode, PAGED=paged,
        UPCAST=upcast(q.device), DOT_PREC=dot_precision(q.dtype), num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    if splits > 1:
        _merge_kernel[(b * hq * sq,)](o_part, lse_part, out, lse, splits, HEAD_DIM=d, BLOCK_D=bd,
                                      BLOCK_S=MAX_SPLITS, CHUNK=MERGE_CHUNK, num_warps=MERGE_WARPS)
    return out, lse
