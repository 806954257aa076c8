"""Block-sparse flash-attention forward: online softmax, log-sum-exp out.

One program computes ``BLOCK_M`` query rows of one (batch, query head). It walks the entries of
its row of the tile plan (``sparse_attn.tiling``): unit columns of ``TK = max(BLOCK_N, bk)``
keys, ``BLOCK_N`` at a time, with the unit's bit mask applied inside the tile when a tile covers
several layout blocks. GQA is index arithmetic: query head ``h`` reads K/V head ``h // GROUP``
and layout head ``h // LAYOUT_GROUP``. Scores live in the log2 domain (``exp2``); the stored
log-sum-exp is a natural log. Causal launches run the longest query tiles (the last ones) first.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (LN2_C, LOG2E, _causal_hi, _contained_dot, _finite_part, _load_tile, _mask_scores,
                     _nonfinite_codes, _other_variant, _plan_entry, _plan_row, _softmax_step, dot_precision,
                     nonfinite_flag, plan_args, plan_flags, upcast)
from .configs import autotuned, select_tiles

__all__ = ["block_sparse_attn_fwd", "LOG2E"]


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, b_q, k_base, v_base, stride_kn, stride_vn,
    start_m, start_n, offs_m, offs_d, bits, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BITS: tl.constexpr, FULL_BITS: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    TQ: tl.constexpr, TK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, CONTAIN: tl.constexpr,
):
    """Fold keys ``[start_n, start_n + BLOCK_N)`` into the running (acc, l, m)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    b_k = _load_tile(k_base, stride_kn, offs_n, seq_k, offs_d, HEAD_DIM)  # [BN, BD]
    b_v = _load_tile(v_base, stride_vn, offs_n, seq_k, offs_d, HEAD_DIM)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], log2 domain
    b_s = _mask_scores(b_s, offs_m, offs_n, start_m, start_n, bits, seq_q, seq_k, BLOCK_N, CAUSAL,
                               HAS_BITS, FULL_BITS, BQ, BK, TQ, TK, True)
    b_p, b_v, alpha, l_i, m_new = _softmax_step(b_s, m_i, l_i, b_v, UPCAST)
    acc = acc * alpha[:, None]
    if CONTAIN:  # V holds a NaN/inf somewhere: it must reach only the rows that see its key
        keep = b_s != float("-inf")
        acc = _contained_dot(tl.where(keep, b_p, 0.0).to(b_v.dtype), _finite_part(b_v), acc, keep.to(tl.float32),
                             _nonfinite_codes(b_v), DOT_PREC)
    else:
        acc = tl.dot(b_p, b_v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, STATS, FLAG,
    P_NUM, P_IDX, P_BITS, stride_nb, stride_nh, stride_ib, stride_ih, stride_im, plan_width,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H_Q, GROUP, LAYOUT_GROUP, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    HAS_BITS: tl.constexpr, FULL_BITS: tl.constexpr, CAUSAL: tl.constexpr, DENSE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, CONTAIN: tl.constexpr,
):
    if _other_variant(FLAG, CONTAIN):
        return
    i_bh = tl.program_id(0)
    i_m = tl.program_id(1)
    if CAUSAL:  # later query tiles see more keys: start them first
        i_m = tl.num_programs(1) - 1 - i_m
    i_b = i_bh // H_Q
    i_h = i_bh % H_Q
    i_hk = i_h // GROUP
    m0 = i_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_q = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)

    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    b_q = _load_tile(q_base, stride_qm, offs_m, seq_q, offs_d, HEAD_DIM)  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = _causal_hi(m0, BLOCK_M, seq_q, seq_k, CAUSAL)

    if DENSE:
        for start_n in range(0, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, b_q, k_base, v_base, stride_kn, stride_vn, m0, start_n, offs_m, offs_d, 0,
                seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, 0, BQ, BK, TQ, TK, UPCAST, DOT_PREC, CONTAIN,
            )
    else:
        n_ent, p_idx, p_bits = _plan_row(P_NUM, P_IDX, P_BITS, i_b, i_h // LAYOUT_GROUP, m0 // TQ,
                                         stride_nb, stride_nh, stride_ib, stride_ih, stride_im, plan_width)
        for j in range(n_ent):
            u_c, bits = _plan_entry(p_idx, p_bits, j, tl.cdiv(seq_k, TK), HAS_BITS)
            for sub in range(TK // BLOCK_N):
                start_n = u_c * TK + sub * BLOCK_N
                if start_n < hi:
                    acc, l_i, m_i = _fwd_tile(
                        acc, l_i, m_i, b_q, k_base, v_base, stride_kn, stride_vn, m0, start_n, offs_m, offs_d,
                        bits, seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, HAS_BITS, FULL_BITS, BQ, BK, TQ,
                        TK, UPCAST, DOT_PREC, CONTAIN,
                    )

    # Rows that saw nothing: output 0, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2_C)
    b_lse = tl.where(m_i == float("inf"), float("inf"), b_lse)  # a +inf score: lse +inf (l is NaN there)
    o_base = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], b_o.to(O.dtype.element_ty), mask=m_q)
    row = i_bh.to(tl.int64) * seq_q + offs_m
    tl.store(LSE + row, b_lse, mask=offs_m < seq_q)
    # For the backward, the row max (log2 units) and log2 of the sum apart: p = exp2((s - m) - L)
    # stays exact for scores of any size, where recomputing it from the fp32 lse would not (at
    # |s| ~ 1e6 one ulp of lse is ~0.1 in the exponent). Empty rows: m = +inf, so every p is 0.
    no_sum = (l_i == 0.0) | (m_i == float("inf"))
    tl.store(STATS + row * 2, tl.where(l_i == 0.0, float("inf"), m_i), mask=offs_m < seq_q)
    tl.store(STATS + row * 2 + 1, tl.where(no_sum, 0.0, tl.math.log2(l_safe)), mask=offs_m < seq_q)


def block_sparse_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num: Optional[torch.Tensor],
    kv_idx: Optional[torch.Tensor],
    block_q: int,
    block_k: int,
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` (unit last stride),
    ``kv_num [Bl, Hl, Mq]`` / ``kv_idx [Bl, Hl, Mq, K]`` int32 or both None (dense).
    Returns ``out [B, Hq, Sq, D]`` (q's dtype, contiguous), ``lse [B, Hq, Sq]`` fp32 and, for the
    backward, ``stats [B, Hq, Sq, 2]`` fp32: each row's max score and log2 of its sum of
    ``exp2(s - max)``, in log2 units (max ``+inf`` for a row that sees nothing)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    tiles, plan = select_tiles("fwd", q, kv_num, kv_idx, block_q, block_k, sq, sk)
    out = torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    stats = torch.empty(b, hq, sq, 2, dtype=torch.float32, device=q.device)

    flag = nonfinite_flag(v)

    def launch(tiles: dict, plan) -> None:
        *walk, layout_group = plan_args(plan, hq)
        for contain in (False, True):  # one of the two returns at once (see nonfinite_flag)
            _fwd_kernel[(b * hq, triton.cdiv(sq, tiles["BLOCK_M"]))](
                q, k, v, out, lse, stats, flag, *walk,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                hq, hq // hkv, layout_group, sq, sk, scale * LOG2E,
                HEAD_DIM=d, CAUSAL=causal, DENSE=plan is None, UPCAST=upcast(q.device),
                DOT_PREC=dot_precision(q.dtype), CONTAIN=contain, **plan_flags(plan, tiles), **tiles,
            )

    launch(*autotuned("fwd", q, tiles, plan, kv_num, kv_idx, sq, sk, causal, launch))
    return out, lse, stats
