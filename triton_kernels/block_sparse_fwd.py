"""Block-sparse flash-attention forward: online softmax, log-sum-exp out.

One program computes ``BLOCK_M`` query rows of one (batch, query head). It walks the
key blocks its layout row keeps (``kv_num``/``kv_idx``), ``BLOCK_N`` keys at a time
(a tile never spans two layout blocks: ``BLOCK_M | bq`` and ``BLOCK_N | bk``). GQA is
index arithmetic: query head ``h`` reads K/V head ``h // GROUP`` and layout head
``h // LAYOUT_GROUP``. Scores live in the log2 domain (``exp2``); the stored
log-sum-exp is a natural log.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .configs import gpu_family, kernel_tiles

LOG2E = 1.4426950408889634


@triton.jit
def _tile_needs_mask(start_m, start_n, BLOCK_N: tl.constexpr, seq_q, seq_k, CAUSAL: tl.constexpr):
    """Whether keys ``[start_n, start_n + BLOCK_N)`` cross the sequence end or, for query rows
    from ``start_m`` on, the causal diagonal. Tiles inside both skip the element masking."""
    crosses = start_n + BLOCK_N > seq_k
    if CAUSAL:
        crosses = crosses | (start_n + BLOCK_N - 1 > start_m + (seq_k - seq_q))
    return crosses


@triton.jit
def _mask_scores(b_s, offs_m, o_n, start_m, start_n, BLOCK_N: tl.constexpr, seq_q, seq_k, CAUSAL: tl.constexpr):
    """``b_s [BM, BN]`` with ``-inf`` where key ``o_n`` is past ``seq_k`` or, when causal, after
    query row ``offs_m`` (bottom-right). Only tiles that cross either edge build the mask."""
    if _tile_needs_mask(start_m, start_n, BLOCK_N, seq_q, seq_k, CAUSAL):
        keep = o_n[None, :] < seq_k
        if CAUSAL:
            keep = keep & (o_n[None, :] <= offs_m[:, None] + (seq_k - seq_q))
        b_s = tl.where(keep, b_s, float("-inf"))
    return b_s


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, b_q, k_base, v_base, stride_kn, stride_vn,
    start_m, start_n, offs_m, offs_d, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Fold keys ``[start_n, start_n + BLOCK_N)`` into the running (acc, l, m)."""
    o_n = start_n + tl.arange(0, BLOCK_N)
    m_kv = (o_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    b_k = tl.load(k_base + o_n[:, None] * stride_kn + offs_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    b_v = tl.load(v_base + o_n[:, None] * stride_vn + offs_d[None, :], mask=m_kv, other=0.0)  # [BN, BD]
    if UPCAST:
        b_k = b_k.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], log2 domain
    b_s = _mask_scores(b_s, offs_m, o_n, start_m, start_n, BLOCK_N, seq_q, seq_k, CAUSAL)
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    # A row that has seen nothing yet keeps m = -inf; shift by 0 there so no inf - inf.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.math.exp2(b_s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    b_p = b_p.to(b_v.dtype)
    if UPCAST:
        b_p = b_p.to(tl.float32)
        b_v = b_v.to(tl.float32)
    acc = tl.dot(b_p, b_v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_NUM, KV_IDX,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh,
    stride_ib, stride_ih, stride_im,
    H_Q, GROUP, LAYOUT_GROUP, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr, DENSE: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H_Q
    i_h = i_bh % H_Q
    i_hk = i_h // GROUP
    m0 = i_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_q = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)

    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    b_q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_q, other=0.0)  # [BM, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
    k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys at or past `hi` are invisible to every row of this tile.
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, m0 + BLOCK_M + seq_k - seq_q)

    if DENSE:
        for start_n in range(0, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, b_q, k_base, v_base, stride_kn, stride_vn, m0, start_n, offs_m, offs_d,
                seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, UPCAST, DOT_PREC,
            )
    else:
        i_lh = i_h // LAYOUT_GROUP
        row = m0 // BQ
        n_blocks = tl.load(KV_NUM + i_b * stride_nb + i_lh * stride_nh + row)
        p_idx = KV_IDX + i_b * stride_ib + i_lh * stride_ih + row * stride_im
        for j in range(n_blocks):
            i_c = tl.load(p_idx + j)
            for sub in range(BK // BLOCK_N):
                start_n = i_c * BK + sub * BLOCK_N
                if start_n < hi:
                    acc, l_i, m_i = _fwd_tile(
                        acc, l_i, m_i, b_q, k_base, v_base, stride_kn, stride_vn, m0, start_n, offs_m, offs_d,
                        seq_q, seq_k, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, UPCAST, DOT_PREC,
                    )

    # Rows that saw nothing: output 0, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    b_o = acc / l_safe[:, None]
    b_lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], b_o.to(O.dtype.element_ty), mask=m_q)
    tl.store(LSE + i_bh.to(tl.int64) * seq_q + offs_m, b_lse, mask=offs_m < seq_q)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; fp16/bf16 are unaffected by the flag."""
    return "ieee" if dtype == torch.float32 else "tf32"


def layout_args(num: Optional[torch.Tensor], idx: Optional[torch.Tensor], heads_q: int):
    """(NUM, IDX, strides..., LAYOUT_GROUP) for a (counts, indices) pair; batch stride 0 when shared."""
    if num is None:
        return (None, None, 0, 0, 0, 0, 0, 1)
    bl = num.shape[0]
    return (
        num, idx,
        num.stride(0) if bl > 1 else 0, num.stride(1),
        idx.stride(0) if bl > 1 else 0, idx.stride(1), idx.stride(2),
        heads_q // num.shape[1],
    )


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` (unit last stride),
    ``kv_num [Bl, Hl, Mq]`` / ``kv_idx [Bl, Hl, Mq, Mk]`` int32 or both None (dense).
    Returns ``out [B, Hq, Sq, D]`` (q's dtype, contiguous) and ``lse [B, Hq, Sq]`` fp32."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dense = kv_num is None
    tiles = kernel_tiles(gpu_family(q.device), "fwd", d, q.element_size(), block_q, block_k, dense)
    out = torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    num, idx, snb, snh, sib, sih, sim, layout_group = layout_args(kv_num, kv_idx, hq)
    grid = (triton.cdiv(sq, tiles["BLOCK_M"]), b * hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, num, idx,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        snb, snh, sib, sih, sim,
        hq, hq // hkv, layout_group, sq, sk, scale * LOG2E,
        HEAD_DIM=d, CAUSAL=causal, DENSE=dense, UPCAST=q.device.type == "cpu", DOT_PREC=dot_precision(q.dtype),
        **tiles,
    )
    return out, lse
