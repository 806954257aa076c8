"""Pooled attention map (SeerAttention's training target): dense flash attention that also
emits, per (query rows, key block), the max of the *normalised* softmax probabilities.

One program owns ``ROWS`` query tokens of ``PACK`` query heads, stacked into one
``BLOCK_M = PACK * ROWS`` row tile (row ``r`` is head ``r // ROWS``, token ``r % ROWS``).
``PACK`` is 1, or the (power-of-two padded) size of a GQA group when the map is reduced
over the group: the group's heads share one K/V head, so one K tile serves them all and the
max over the group is taken in registers.

Two passes over the keys, inside the one program:

1. online softmax over the visible keys: each row's final max ``m`` and sum ``l``, hence
   ``lse = m + log2(l)`` (and the attention output, when asked, via the forward kernel's
   ``_fwd_tile``);
2. recompute each score tile and fold ``max exp2(s - lse)`` over the tile's keys into the
   current key block's running maximum, per row; a finished key block is reduced over the
   tile's rows (pooled map) or over the packed heads (per-token map) and stored.

Why two passes and not one that keeps raw-score maxima and rescales at the end: the max
over a block's *rows* of ``exp(s - lse_row)`` depends on every row's final ``lse``, so a
single pass would have to keep a raw max per (row, key block) -- O(Sq * Mk) memory -- before
pooling. Recomputing ``q k^T`` costs one extra matmul per tile (about +50% of a forward that
also writes the output) and keeps the extra memory at the map itself, O(Mq * Mk).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .block_sparse_fwd import _fwd_tile
from .common import LOG2E, _causal_hi, _load_tile, _mask_scores, dot_precision, upcast
from .configs import block_d as padded_head_dim, gpu_family, tile_config


@triton.jit
def _score_tile(
    b_q, k_base, stride_kn, start_m, start_n, offs_m, offs_d, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Scores (log2 domain) of the tile's rows against keys ``[start_n, start_n + BLOCK_N)``,
    -inf where a key is past the end or, when causal, after the row's token."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    b_k = _load_tile(k_base, stride_kn, o_n, seq_k, offs_d, HEAD_DIM)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
    b_s = _mask_scores(b_s, offs_m, o_n, start_m, start_n, 0, seq_q, seq_k, BLOCK_N, CAUSAL, False, 0, 1, 1, 1, 1, True)
    return b_s


@triton.jit
def _block_map_kernel(
    Q, K, V, O, MAP,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mr,
    H_OUT, N_PACK, GROUP, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    PACK: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr,
    POOL: tl.constexpr, OUTPUT: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_bo = tl.program_id(1)
    i_b = i_bo // H_OUT
    i_ho = i_bo % H_OUT
    i_h0 = i_ho * N_PACK  # first query head of this program's pack
    i_hk = i_h0 // GROUP
    m0 = i_t * ROWS

    o_r = tl.arange(0, BLOCK_M)
    o_g = o_r // ROWS  # head within the pack
    offs_m = m0 + o_r % ROWS  # query token of each tile row
    offs_d = tl.arange(0, BLOCK_D)
    m_row = (o_g < N_PACK) & (offs_m < seq_q)
    m_q = m_row[:, None] & (offs_d[None, :] < HEAD_DIM)

    p_q = Q + i_b.to(tl.int64) * stride_qb + (i_h0 + o_g).to(tl.int64) * stride_qh + offs_m * stride_qm  # [BM]
    b_q = tl.load(p_q[:, None] + offs_d[None, :], mask=m_q, other=0.0)  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh

    hi = _causal_hi(m0, ROWS, seq_q, seq_k, CAUSAL)  # keys at or past `hi`: invisible to the tile

    # ---- pass 1: each row's final softmax statistics (and the output) ----------------------
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if OUTPUT:
        v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, b_q, k_base, v_base, stride_kn, stride_vn, m0, start_n, offs_m, offs_d, 0,
                seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, 0, 1, 1, 1, 1, UPCAST, DOT_PREC,
                False,  # CONTAIN: the distillation target makes no non-finite containment promise
            )
        b_o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw nothing: 0
        p_o = O + i_b.to(tl.int64) * stride_ob + (i_h0 + o_g).to(tl.int64) * stride_oh + offs_m * stride_om
        tl.store(p_o[:, None] + offs_d[None, :], b_o.to(O.dtype.element_ty), mask=m_q)
    else:
        for start_n in range(0, hi, BLOCK_N):
            b_s = _score_tile(b_q, k_base, stride_kn, m0, start_n, offs_m, offs_d, seq_q, seq_k, qk_scale,
                              HEAD_DIM, BLOCK_N, CAUSAL, UPCAST, DOT_PREC)
            m_new = tl.maximum(m_i, tl.max(b_s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf on empty rows
            l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(b_s - m_use[:, None]), 1)
            m_i = m_new
    # Rows that see nothing, padding rows and padded heads get lse = +inf: every probability
    # exp2(s - lse) of theirs is then exactly 0 (also for s = -inf), with no masking in pass 2.
    lse = tl.where(m_row & (l_i > 0.0), m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("inf"))

    # ---- pass 2: per key block, the max of the normalised probabilities --------------------
    p_map = MAP + i_b.to(tl.int64) * stride_mb + i_ho.to(tl.int64) * stride_mh
    o_tok = m0 + tl.arange(0, ROWS)
    for i_c in range(0, tl.cdiv(hi, BK)):
        r_max = tl.zeros([BLOCK_M], dtype=tl.float32)
        for sub in range(BK // BLOCK_N):
            start_n = i_c * BK + sub * BLOCK_N
            if start_n < hi:
                b_s = _score_tile(b_q, k_base, stride_kn, m0, start_n, offs_m, offs_d, seq_q, seq_k, qk_scale,
                                  HEAD_DIM, BLOCK_N, CAUSAL, UPCAST, DOT_PREC)
                r_max = tl.maximum(r_max, tl.max(tl.math.exp2(b_s - lse[:, None]), 1))
        if POOL:
            # The tile's tokens lie in one query block (ROWS divides it): one partial maximum.
            tl.store(p_map + i_t * stride_mr + i_c, tl.max(r_max, 0))
        else:
            if PACK > 1:
                b_m = tl.max(tl.reshape(r_max, [PACK, ROWS]), 0)  # [ROWS], max over the group
            else:
                b_m = r_max
            tl.store(p_map + o_tok * stride_mr + i_c, b_m, mask=o_tok < seq_q)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_map_tiles(family: str, head_dim: int, elem_bytes: int, block_size: int, pack: int,
                    pool: bool) -> Optional[dict]:
    """Launch parameters for :func:`block_map_fwd`, from the forward's tile table: the same
    ``BLOCK_M`` rows (split into ``PACK`` heads of ``ROWS`` tokens; ``ROWS`` divides
    ``block_size`` when pooling) and ``BLOCK_N`` keys (dividing ``block_size``). None when
    ``pack`` heads do not fit one row tile."""
    block_d = padded_head_dim(head_dim)
    cfg = tile_config(family, "fwd", head_dim, elem_bytes)
    if pack > cfg.block_m:
        return None
    rows = cfg.block_m // pack
    if pool:
        rows = min(rows, block_size)
    return dict(BLOCK_D=block_d, BLOCK_M=pack * rows, ROWS=rows, PACK=pack, BLOCK_N=min(cfg.block_n, block_size),
                BK=block_size, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def block_map_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    block_size: int,
    causal: bool,
    scale: float,
    pool_queries: bool,
    reduce_gqa: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the pooled-map kernel. ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]``, ``v`` like
    ``k`` or None (unit last strides), ``block_size`` a power of two in [16, 128].

    Returns the *unnormalised* maxima, float32 ``[B, H, Mq, Mk]`` (``pool_queries``) or
    ``[B, H, Sq, Mk]``, with ``H = Hkv`` when ``reduce_gqa`` (max over each group's query
    heads) else ``Hq``; and the attention output ``[B, Hq, Sq, D]`` in q's dtype when ``v``
    is given, else None.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    family = gpu_family(q.device)
    pack = _next_pow2(group) if reduce_gqa and group > 1 else 1
    tiles = block_map_tiles(family, d, q.element_size(), block_size, pack, pool_queries)
    if tiles is None:  # a group too large for one tile (> 128 heads): per head, then the max
        raw, out = block_map_fwd(q, k, v, block_size, causal, scale, pool_queries, False)
        return raw.view(b, hkv, group, *raw.shape[2:]).amax(2), out
    h_out, n_pack = (hkv, group) if reduce_gqa else (hq, 1)
    mq, mk = triton.cdiv(sq, block_size), triton.cdiv(sk, block_size)
    rows = tiles["ROWS"]
    # Zero-filled: key blocks past a tile's causal limit are never visited and stay 0.
    if pool_queries:
        raw = torch.zeros(b, h_out, mq * (block_size // rows), mk, dtype=torch.float32, device=q.device)
    else:
        raw = torch.zeros(b, h_out, sq, mk, dtype=torch.float32, device=q.device)
    out = None if v is None else torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(sq, rows), b * h_out)
    _block_map_kernel[grid](
        q, k, v, out, raw,  # v, out: None without the output (OUTPUT=False never reads them)
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *((v.stride(0), v.stride(1), v.stride(2)) if v is not None else (0, 0, 0)),
        *((out.stride(0), out.stride(1), out.stride(2)) if out is not None else (0, 0, 0)),
        raw.stride(0), raw.stride(1), raw.stride(2),
        h_out, n_pack, group, sq, sk, scale * LOG2E,
        HEAD_DIM=d, CAUSAL=causal, POOL=pool_queries, OUTPUT=v is not None,
        UPCAST=upcast(q.device), DOT_PREC=dot_precision(q.dtype), **tiles,
    )
    if pool_queries and rows < block_size:  # partial maxima of the block's row tiles
        raw = raw.view(b, h_out, mq, block_size // rows, mk).amax(3)
    return raw, out
