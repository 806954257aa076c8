"""Pieces the block-sparse kernels share: constants, the plan walk, and score masking.

Every kernel walks a *tile plan* (``sparse_attn.tiling``): per unit row a count, ascending unit
columns and, when a unit holds several layout blocks, a bit mask of the blocks it keeps. The
score tile is always ``[BLOCK_M, BLOCK_N]`` (query rows x keys), in every kernel, so one masking
helper serves the forward, dQ and dK/dV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_attn.tiling import full_bits

LOG2E = 1.4426950408889634  # scores live in the log2 domain (exp2); lse is stored as a natural log
LN2 = 0.6931471805599453
# the same two, visible inside @triton.jit code (which may read only constexpr globals)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


@triton.jit
def _plan_row(P_NUM, P_IDX, P_BITS, i_b, i_lh, row, stride_nb, stride_nh, stride_ib, stride_ih, stride_im,
              plan_width):
    """(entries, pointer to their unit indices, pointer to their bits) of plan row ``row``.
    ``bits`` has ``idx``'s shape and strides. The count is clamped to ``[0, plan_width]``, so no
    layout contents can walk past its row."""
    n = tl.load(P_NUM + i_b * stride_nb + i_lh * stride_nh + row)
    n = tl.minimum(tl.maximum(n, 0), plan_width)
    off = i_b * stride_ib + i_lh * stride_ih + row * stride_im
    return n, P_IDX + off, P_BITS + off


@triton.jit
def _plan_entry(p_idx, p_bits, j, n_units, HAS_BITS: tl.constexpr):
    """(unit index, bits) of entry ``j`` of a plan row; bits are 0 (unused) without a bit mask.
    The index is clamped to ``[0, n_units)``: a corrupt layout gives wrong numbers, never a read
    outside K/V (``SPARSE_ATTN_CHECK_LAYOUTS=1`` makes the op reject one instead)."""
    unit = tl.minimum(tl.maximum(tl.load(p_idx + j), 0), n_units - 1)
    bits = tl.load(p_bits + j).to(tl.int64) if HAS_BITS else 0
    return unit, bits


@triton.jit
def _softmax_step(b_s, m_i, l_i, b_v, UPCAST: tl.constexpr):
    """One online-softmax step of the forward and the decode kernels over scores ``b_s [BM, BN]``
    (log2 domain, ``-inf`` where masked) and values ``b_v [BN, BD]``: ``(b_p, b_v, alpha, l, m)``,
    the probabilities in V's dtype, V as they meet it (both fp32 with ``UPCAST``), the factor that
    rescales the accumulator, and the new running sum and max. The caller folds
    ``b_p @ b_v`` into ``acc * alpha``."""
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
    return b_p, b_v, alpha, l_i, m_new


@triton.jit
def _load_tile(base, stride, offs, n, offs_d, HEAD_DIM: tl.constexpr):
    """Rows ``offs`` (zeros at and past ``n``) x the padded head dim of a ``[S, D]`` matrix with row
    stride ``stride`` and unit column stride: ``[len(offs), BLOCK_D]``."""
    mask = (offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _causal_hi(m0, BLOCK_M: tl.constexpr, seq_q, seq_k, CAUSAL: tl.constexpr):
    """Keys at or past this bound are invisible to every query row in ``[m0, m0 + BLOCK_M)``."""
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, m0 + BLOCK_M + seq_k - seq_q)
    return hi


@triton.jit
def _causal_lo(n0, seq_q, seq_k, CAUSAL: tl.constexpr):
    """Query rows below this bound see no key from ``n0`` on."""
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, n0 - (seq_k - seq_q))
    return lo


@triton.jit
def _mask_scores(
    b_s, offs_m, offs_n, start_m, start_n, bits, seq_q, seq_k,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BITS: tl.constexpr, FULL_BITS: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, ROWS_FIRST: tl.constexpr,
):
    """``b_s [BM, BN]`` (query rows ``offs_m`` x keys ``offs_n``) with ``-inf`` where a key is past
    ``seq_k``, after the query (causal, bottom-right) or in a layout block the unit's ``bits``
    drop. Tiles inside the sequence, below the diagonal and fully kept build no mask.

    Bit ``r * C + c`` keeps sub-row ``r``, sub-column ``c`` of a unit; the plan's rows are queries
    (``ROWS_FIRST``: forward, dQ) or keys (dK/dV, the transposed walk)."""
    crosses = start_n + BLOCK_N > seq_k
    if CAUSAL:
        crosses = crosses | (start_n + BLOCK_N - 1 > start_m + (seq_k - seq_q))
    if crosses:
        keep = offs_n[None, :] < seq_k
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + (seq_k - seq_q))
        b_s = tl.where(keep, b_s, float("-inf"))
    if HAS_BITS:
        if bits != FULL_BITS:
            # Split the unit's bits per plan row first (<= 8 bits, int32), then test one bit per
            # element: a [BM, BN] int64 shift would cost two registers an element.
            sub_q = (offs_m % TQ) // BQ  # [BM]
            sub_k = (offs_n % TK) // BK  # [BN]
            if ROWS_FIRST:
                row_bits = ((bits >> (sub_q * (TK // BK)).to(tl.int64)) & ((1 << (TK // BK)) - 1)).to(tl.int32)
                keep = (row_bits[:, None] & (1 << sub_k)[None, :]) != 0
            else:
                row_bits = ((bits >> (sub_k * (TQ // BQ)).to(tl.int64)) & ((1 << (TQ // BQ)) - 1)).to(tl.int32)
                keep = (row_bits[None, :] & (1 << sub_q)[:, None]) != 0
            b_s = tl.where(keep, b_s, float("-inf"))
    return b_s


# --------------------------------------------------------------------------------------------------
# Non-finite containment. A masked probability is an exact 0, but in IEEE arithmetic 0 * NaN and
# 0 * inf are NaN: one NaN in V (or K, Q, dO) would reach, through a tile's matmul, every row of
# the tile, including rows that may not see it. Every kernel is compiled twice: the plain variant
# (CONTAIN=False) and one whose products are :func:`_contained_dot` (the product of the finite
# parts, then each non-finite value put back only where a kept term meets it; a kept term is one
# whose score is above -inf: a -inf score, masked or by value, has probability 0 and is dropped).
# Both are launched; a device flag (:func:`nonfinite_flag`, no host sync) makes one of them return
# at once, so finite inputs run the plain kernel at full speed.
# --------------------------------------------------------------------------------------------------
def nonfinite_flag(*tensors: torch.Tensor, nan_only: tuple = ()) -> torch.Tensor:
    """``int32 [1]`` on the tensors' device: 1 if any of ``tensors`` holds a NaN or an infinity (or
    any of ``nan_only`` a NaN), else 0. Computed on the device, no host synchronisation."""
    bad = [torch.isfinite(t).logical_not().any() for t in tensors] + [torch.isnan(t).any() for t in nan_only]
    return torch.stack(bad).any().to(torch.int32).reshape(1)


@triton.jit
def _other_variant(FLAG, CONTAIN: tl.constexpr):
    """Whether this launch is the variant the flag does not ask for (it then returns at once)."""
    return (tl.load(FLAG) != 0) != CONTAIN


@triton.jit
def _finite_part(x):
    """``x`` with its NaNs and infinities replaced by 0 (same dtype)."""
    return tl.where((x == x) & (tl.abs(x) != float("inf")), x, tl.zeros_like(x))


@triton.jit
def _nonfinite_codes(x):
    """fp32 tile: 0 where ``x`` is finite, 1 for +inf, 256 for -inf, 65536 for NaN. A matmul of a
    0/1 keep matrix (contraction <= 255) with codes counts each kind exactly in base 256 (powers of
    two are exact in tf32/bf16 and the fp32 sums stay below 2**24)."""
    return tl.where(x != x, 65536.0, tl.where(x == float("inf"), 1.0, tl.where(x == float("-inf"), 256.0, 0.0)))


@triton.jit
def _contained_dot(a, b, acc, a_hits, b_hits, DOT_PREC: tl.constexpr):
    """``acc + a @ b`` where ``a``, ``b`` are finite (one of them masked, with exact zeros) and
    ``a_hits @ b_hits`` counts, per output element, the kept non-finite terms of the original
    product (one side the 0/1 keep matrix, the other :func:`_nonfinite_codes` of the values).
    Those elements become what IEEE arithmetic makes of the kept terms: NaN for a NaN or for
    +inf meeting -inf, else +inf or -inf; every other element is the finite product."""
    acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    h = tl.dot(a_hits, b_hits, input_precision="tf32").to(tl.int32)
    pos = (h & 255) != 0
    neg = ((h >> 8) & 255) != 0
    nan = (h >= 65536) | (pos & neg)
    return tl.where(nan, float("nan"), tl.where(pos, float("inf"), tl.where(neg, float("-inf"), acc)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; fp16/bf16 are unaffected by the flag."""
    return "ieee" if dtype == torch.float32 else "tf32"


def plan_args(plan, heads_q: int) -> tuple:
    """(NUM, IDX, BITS, strides..., width, LAYOUT_GROUP) of a tile plan (``None`` = dense); batch
    stride 0 when the plan is shared by the batch. Without bits, ``IDX`` stands in (never read)."""
    if plan is None:
        return (None, None, None, 0, 0, 0, 0, 0, 0, 1)
    num, idx = plan.num, plan.idx
    bl = num.shape[0]
    return (
        num, idx, idx if plan.bits is None else plan.bits,
        num.stride(0) if bl > 1 else 0, num.stride(1),
        idx.stride(0) if bl > 1 else 0, idx.stride(1), idx.stride(2), idx.shape[-1],
        heads_q // num.shape[1],
    )


def walk_flags(tiles: dict, n_blocks: int) -> dict:
    """The walk's constexprs: units ``TQ x TK`` and the bit mask of units holding ``n_blocks``
    layout blocks (1: no bit mask)."""
    return dict(TQ=max(tiles["BLOCK_M"], tiles["BQ"]), TK=max(tiles["BLOCK_N"], tiles["BK"]), HAS_BITS=n_blocks > 1,
                FULL_BITS=full_bits(n_blocks) if n_blocks > 1 else 0)


def plan_flags(plan, tiles: dict) -> dict:
    """:func:`walk_flags` for ``plan`` (``None``: dense)."""
    has_bits = plan is not None and plan.bits is not None
    return walk_flags(tiles, plan.sub_rows * plan.sub_cols if has_bits else 1)


def upcast(device: torch.device) -> bool:
    """Under the interpreter (CPU tensors) ``tl.dot`` on bf16 is wrong: dots run in fp32 there."""
    return device.type == "cpu"

