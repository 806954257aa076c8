"""Block-sparse flash-attention backward, without atomics.

Three launches:

1. ``_bwd_preprocess``: ``delta = rowsum(dO * O) - dLSE`` per query row (fp32).
2. ``_bwd_dkdv_kernel``: one program per (key tile, batch, K/V head). It walks the *transposed*
   tile plan (query units that read its keys) for every query head of its GQA group and
   accumulates dK, dV in registers, so no two programs write one tile. The accumulators are
   held transposed, ``[BLOCK_D, BLOCK_N]``: every product then has the query tile or the head
   dim as its M side (``dV^T += dO^T P``, ``dK^T += Q^T dS``), so a key tile as narrow as a
   16-key layout block still runs on Hopper's ``wgmma`` (M >= 64) and no union over key blocks
   is needed.
3. ``_bwd_dq_kernel``: one program per (query tile, batch, query head), walking the plan rows,
   like the forward.

The probabilities are recomputed from the forward's row statistics (row max and log2 of the row
sum, apart: exact for scores of any size). A row that saw nothing has max +inf, so every one of
its probabilities is 0.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import (LOG2E, LOG2E_C, _causal_hi, _causal_lo, _contained_dot, _finite_part, _load_tile, _mask_scores,
                     _nonfinite_codes, _other_variant, _plan_entry, _plan_row, dot_precision, nonfinite_flag, plan_args,
                     plan_flags, upcast)
from .configs import autotuned, select_tiles

__all__ = ["block_sparse_attn_bwd"]


@triton.jit
def _bwd_preprocess(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
    H_Q, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H_Q
    i_h = i_bh % H_Q
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    p_do = DO + i_b.to(tl.int64) * stride_db + i_h.to(tl.int64) * stride_dh
    b_o = _load_tile(p_o, stride_om, offs_m, seq_q, offs_d, HEAD_DIM).to(tl.float32)  # [BM, BD]
    b_do = _load_tile(p_do, stride_dm, offs_m, seq_q, offs_d, HEAD_DIM).to(tl.float32)  # [BM, BD]
    b_delta = tl.sum(b_o * b_do, 1)  # [BM]
    row = i_bh.to(tl.int64) * seq_q + offs_m
    if HAS_DLSE:
        b_delta -= tl.load(DLSE + row, mask=offs_m < seq_q, other=0.0)
    tl.store(DELTA + row, b_delta, mask=offs_m < seq_q)


@triton.jit
def _load_row_stats(STATS, DELTA, row_base, offs_m, seq_q):
    """(row max m, log2 of the row's sum L, delta) for rows ``offs_m``, from the forward's
    ``stats`` (log2 units; m = +inf for rows that saw nothing or lie past ``seq_q``, so their
    probabilities ``exp2((s - m) - L)`` are 0)."""
    row = row_base + offs_m
    b_m = tl.load(STATS + row * 2, mask=offs_m < seq_q, other=float("inf"))
    b_l = tl.load(STATS + row * 2 + 1, mask=offs_m < seq_q, other=0.0)
    b_delta = tl.load(DELTA + row, mask=offs_m < seq_q, other=0.0)
    return b_m, b_l, b_delta


@triton.jit
def _dkdv_tile(
    b_dkt, b_dvt, b_k, b_v, q_base, do_base, STATS, DELTA, row_base, stride_qm, stride_dom,
    start_m, start_n, offs_n, offs_d, bits, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BITS: tl.constexpr, FULL_BITS: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    TQ: tl.constexpr, TK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, CONTAIN: tl.constexpr,
):
    """Add query rows ``[start_m, start_m + BLOCK_M)``'s share to dK^T, dV^T of this key tile."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    b_q = _load_tile(q_base, stride_qm, offs_m, seq_q, offs_d, HEAD_DIM)  # [BM, BD]
    b_do = _load_tile(do_base, stride_dom, offs_m, seq_q, offs_d, HEAD_DIM)  # [BM, BD]
    b_m, b_l, b_delta = _load_row_stats(STATS, DELTA, row_base, offs_m, seq_q)
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
    # Rows past seq_q need no mask: their max loads as +inf, so their probabilities are 0 (unless
    # K holds a NaN/inf: the contained path below drops them too).
    b_s = _mask_scores(b_s, offs_m, offs_n, start_m, start_n, bits, seq_q, seq_k, BLOCK_N, CAUSAL,
                               HAS_BITS, FULL_BITS, BQ, BK, TQ, TK, False)
    b_p = tl.math.exp2((b_s - b_m[:, None]) - b_l[:, None])  # [BM, BN]
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    if CONTAIN:
        # a NaN/inf in a query row's Q, dO, lse or delta, or in this tile's K/V, must reach only the
        # keys that row keeps (rows past seq_q keep none)
        keep = (b_s != float("-inf")) & (offs_m < seq_q)[:, None]
        keep_f = keep.to(tl.float32)
        b_p = tl.where(keep, b_p, 0.0)
        b_ds = tl.where(keep, b_ds, 0.0)
        b_dvt = _contained_dot(tl.trans(_finite_part(b_do)), b_p.to(b_do.dtype), b_dvt,
                               tl.trans(_nonfinite_codes(b_do)), keep_f, DOT_PREC)  # [BD, BN]
        b_dkt = _contained_dot(tl.trans(_finite_part(b_q)), b_ds.to(b_q.dtype), b_dkt,
                               tl.trans(_nonfinite_codes(b_q)), keep_f, DOT_PREC)  # [BD, BN]
    else:
        b_dvt = tl.dot(tl.trans(b_do), b_p.to(b_do.dtype), b_dvt, input_precision=DOT_PREC)  # [BD, BN]
        b_dkt = tl.dot(tl.trans(b_q), b_ds.to(b_q.dtype), b_dkt, input_precision=DOT_PREC)  # [BD, BN]
    return b_dkt, b_dvt


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, STATS, DELTA, FLAG, DK, DV,
    P_NUM, P_IDX, P_BITS, stride_nb, stride_nh, stride_ib, stride_ih, stride_im, plan_width,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H_Q, H_KV, GROUP, LAYOUT_GROUP, seq_q, seq_k, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    HAS_BITS: tl.constexpr, FULL_BITS: tl.constexpr, CAUSAL: tl.constexpr, DENSE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, CONTAIN: tl.constexpr,
):
    if _other_variant(FLAG, CONTAIN):
        return
    # Grid (batch x heads, key tiles): the first key tiles, read by the most query rows when
    # causal, start first.
    i_bh = tl.program_id(0)
    i_n = tl.program_id(1)
    i_b = i_bh // H_KV
    i_hk = i_bh % H_KV
    n0 = i_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_k = _load_tile(p_k, stride_kn, offs_n, seq_k, offs_d, HEAD_DIM)  # [BN, BD]
    b_v = _load_tile(p_v, stride_vn, offs_n, seq_k, offs_d, HEAD_DIM)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_dkt = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    b_dvt = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    lo = _causal_lo(n0, seq_q, seq_k, CAUSAL)

    for g in range(GROUP):
        i_h = i_hk * GROUP + g
        q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        do_base = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        row_base = (i_b * H_Q + i_h).to(tl.int64) * seq_q
        if DENSE:
            for start_m in range((lo // BLOCK_M) * BLOCK_M, seq_q, BLOCK_M):
                b_dkt, b_dvt = _dkdv_tile(
                    b_dkt, b_dvt, b_k, b_v, q_base, do_base, STATS, DELTA, row_base, stride_qm, stride_dom,
                    start_m, n0, offs_n, offs_d, 0, seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL,
                    False, 0, BQ, BK, TQ, TK, UPCAST, DOT_PREC, CONTAIN,
                )
        else:
            n_ent, p_idx, p_bits = _plan_row(P_NUM, P_IDX, P_BITS, i_b, i_h // LAYOUT_GROUP, n0 // TK,
                                             stride_nb, stride_nh, stride_ib, stride_ih, stride_im, plan_width)
            for j in range(n_ent):
                u_r, bits = _plan_entry(p_idx, p_bits, j, tl.cdiv(seq_q, TQ), HAS_BITS)
                for sub in range(TQ // BLOCK_M):
                    start_m = u_r * TQ + sub * BLOCK_M
                    if (start_m < seq_q) & (start_m + BLOCK_M > lo):
                        b_dkt, b_dvt = _dkdv_tile(
                            b_dkt, b_dvt, b_k, b_v, q_base, do_base, STATS, DELTA, row_base, stride_qm, stride_dom,
                            start_m, n0, offs_n, offs_d, bits, seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
                            CAUSAL, HAS_BITS, FULL_BITS, BQ, BK, TQ, TK, UPCAST, DOT_PREC, CONTAIN,
                        )

    m_kvt = (offs_n[None, :] < seq_k) & (offs_d[:, None] < HEAD_DIM)
    p_dk = DK + i_b.to(tl.int64) * stride_dkb + i_hk.to(tl.int64) * stride_dkh
    p_dv = DV + i_b.to(tl.int64) * stride_dvb + i_hk.to(tl.int64) * stride_dvh
    tl.store(p_dk + offs_n[None, :] * stride_dkn + offs_d[:, None], (b_dkt * scale).to(DK.dtype.element_ty),
             mask=m_kvt)
    tl.store(p_dv + offs_n[None, :] * stride_dvn + offs_d[:, None], b_dvt.to(DV.dtype.element_ty), mask=m_kvt)


@triton.jit
def _dq_tile(
    b_dq, b_q, b_do, b_m, b_l, b_delta, k_base, v_base, stride_kn, stride_vn,
    start_m, start_n, offs_m, offs_d, bits, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_BITS: tl.constexpr, FULL_BITS: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    TQ: tl.constexpr, TK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, CONTAIN: tl.constexpr,
):
    """Add keys ``[start_n, start_n + BLOCK_N)``'s share to dQ of this query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    b_k = _load_tile(k_base, stride_kn, offs_n, seq_k, offs_d, HEAD_DIM)  # [BN, BD]
    b_v = _load_tile(v_base, stride_vn, offs_n, seq_k, offs_d, HEAD_DIM)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
    b_s = _mask_scores(b_s, offs_m, offs_n, start_m, start_n, bits, seq_q, seq_k, BLOCK_N, CAUSAL,
                               HAS_BITS, FULL_BITS, BQ, BK, TQ, TK, True)
    b_p = tl.math.exp2((b_s - b_m[:, None]) - b_l[:, None])
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)  # [BM, BN]
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_ds = b_ds.to(b_k.dtype)
    if CONTAIN:  # a NaN/inf in K or V must reach only the rows that see its key
        keep = b_s != float("-inf")
        b_dq = _contained_dot(tl.where(keep, b_ds, 0.0), _finite_part(b_k), b_dq, keep.to(tl.float32),
                              _nonfinite_codes(b_k), DOT_PREC)
    else:
        b_dq = tl.dot(b_ds, b_k, b_dq, input_precision=DOT_PREC)
    return b_dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, STATS, DELTA, FLAG, DQ,
    P_NUM, P_IDX, P_BITS, stride_nb, stride_nh, stride_ib, stride_ih, stride_im, plan_width,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    H_Q, GROUP, LAYOUT_GROUP, seq_q, seq_k, qk_scale, scale,
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
    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
    b_q = _load_tile(p_q, stride_qm, offs_m, seq_q, offs_d, HEAD_DIM)  # [BM, BD]
    b_do = _load_tile(p_do, stride_dom, offs_m, seq_q, offs_d, HEAD_DIM)  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    b_m, b_l, b_delta = _load_row_stats(STATS, DELTA, i_bh.to(tl.int64) * seq_q, offs_m, seq_q)
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = _causal_hi(m0, BLOCK_M, seq_q, seq_k, CAUSAL)

    if DENSE:
        for start_n in range(0, hi, BLOCK_N):
            b_dq = _dq_tile(
                b_dq, b_q, b_do, b_m, b_l, b_delta, k_base, v_base, stride_kn, stride_vn, m0, start_n, offs_m, offs_d,
                0, seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, 0, BQ, BK, TQ, TK, UPCAST, DOT_PREC, CONTAIN,
            )
    else:
        n_ent, p_idx, p_bits = _plan_row(P_NUM, P_IDX, P_BITS, i_b, i_h // LAYOUT_GROUP, m0 // TQ,
                                         stride_nb, stride_nh, stride_ib, stride_ih, stride_im, plan_width)
        for j in range(n_ent):
            u_c, bits = _plan_entry(p_idx, p_bits, j, tl.cdiv(seq_k, TK), HAS_BITS)
            for sub in range(TK // BLOCK_N):
                start_n = u_c * TK + sub * BLOCK_N
                if start_n < hi:
                    b_dq = _dq_tile(
                        b_dq, b_q, b_do, b_m, b_l, b_delta, k_base, v_base, stride_kn, stride_vn, m0, start_n, offs_m,
                        offs_d, bits, seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, HAS_BITS, FULL_BITS, BQ, BK,
                        TQ, TK, UPCAST, DOT_PREC, CONTAIN,
                    )

    p_dq = DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
    tl.store(p_dq + offs_m[:, None] * stride_dqm + offs_d[None, :], (b_dq * scale).to(DQ.dtype.element_ty), mask=m_q)


def block_sparse_attn_bwd(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    stats: torch.Tensor,
    kv_num: Optional[torch.Tensor],
    kv_idx: Optional[torch.Tensor],
    q_num: Optional[torch.Tensor],
    q_idx: Optional[torch.Tensor],
    block_q: int,
    block_k: int,
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns contiguous ``(dq, dk, dv)`` in the inputs' dtypes.

    Shapes as in :func:`block_sparse_attn_fwd`; ``out``/``lse``/``stats`` are the forward's outputs,
    ``dlse [B, Hq, Sq]`` (optional) the gradient reaching the log-sum-exp."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    stats = stats.contiguous()
    if dout.stride(-1) != 1:  # e.g. the expanded ones of `out.sum().backward()`
        dout = dout.contiguous()

    delta = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    pre_m = 64
    has_dlse = dlse is not None
    block_d = max(16, triton.next_power_of_2(d))
    _bwd_preprocess[(triton.cdiv(sq, pre_m), b * hq)](
        out, dout, dlse.float().contiguous() if has_dlse else None, delta,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        hq, sq, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_m, HAS_DLSE=has_dlse,
    )

    flag = nonfinite_flag(q, k, v, dout, delta, nan_only=(stats,))
    dq = torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, hkv, sk, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(b, hkv, sk, d, dtype=v.dtype, device=q.device)
    common_strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
    )
    flags = dict(HEAD_DIM=d, CAUSAL=causal, UPCAST=upcast(q.device), DOT_PREC=dot_precision(q.dtype))

    # dK/dV: one program per key tile, walking the transposed plan.
    def launch_dkdv(tiles: dict, plan) -> None:
        *walk, layout_group = plan_args(plan, hq)
        for contain in (False, True):  # one of the two returns at once (see common.nonfinite_flag)
            _bwd_dkdv_kernel[(b * hkv, triton.cdiv(sk, tiles["BLOCK_N"]))](
                q, k, v, dout, stats, delta, flag, dk, dv, *walk, *common_strides,
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                hq, hkv, hq // hkv, layout_group, sq, sk, scale * LOG2E, scale,
                DENSE=plan is None, CONTAIN=contain, **flags, **plan_flags(plan, tiles), **tiles,
            )

    tiles, plan = select_tiles("dkdv", q, q_num, q_idx, block_q, block_k, sq, sk)
    launch_dkdv(*autotuned("dkdv", q, tiles, plan, q_num, q_idx, sq, sk, causal, launch_dkdv))

    # dQ: one program per query tile, walking the plan rows.
    def launch_dq(tiles: dict, plan) -> None:
        *walk, layout_group = plan_args(plan, hq)
        for contain in (False, True):
            _bwd_dq_kernel[(b * hq, triton.cdiv(sq, tiles["BLOCK_M"]))](
                q, k, v, dout, stats, delta, flag, dq, *walk, *common_strides,
                dq.stride(0), dq.stride(1), dq.stride(2),
                hq, hq // hkv, layout_group, sq, sk, scale * LOG2E, scale,
                DENSE=plan is None, CONTAIN=contain, **flags, **plan_flags(plan, tiles), **tiles,
            )

    tiles, plan = select_tiles("dq", q, kv_num, kv_idx, block_q, block_k, sq, sk)
    launch_dq(*autotuned("dq", q, tiles, plan, kv_num, kv_idx, sq, sk, causal, launch_dq))
    return dq, dk, dv
