"""The reference implementation: exact block-sparse attention in PyTorch.

This is the oracle every kernel is tested against and the CPU path of
``sparse_attention``. It accumulates in fp32 (fp64 for fp64 inputs) and works
``chunk_size`` query rows at a time, forward and backward (the backward recomputes
the probabilities per chunk), so its memory is O(chunk_size * Sk), never
O(Sq * Sk): it can check 16k-token problems on a CPU.

Semantics (shared by every backend), with ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]``:
query ``i`` may see key ``j`` iff block ``(i // bq, j // bk)`` is kept in the layout and,
when ``causal``, ``j <= i + (Sk - Sq)`` (bottom-right aligned, as FlashAttention 2).
For ``Sq = 3, Sk = 5`` the causal part is::

    1 1 1 0 0
    1 1 1 1 0
    1 1 1 1 1

A row that sees no key gets output 0, log-sum-exp ``-inf`` and zero gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import BlockSparseLayout

__all__ = ["reference_attention", "reference_forward", "reference_backward"]

# Elements of the [B, Hq, chunk, Sk] score tile the reference materialises at once.
_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(b: int, hq: int, sq: int, sk: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(sq, _CHUNK_ELEMENTS // max(1, b * hq * sk)))


def block_rows(block_mask: torch.Tensor, block_size: Tuple[int, int], rows: torch.Tensor, sk: int,
               hq: int) -> torch.Tensor:
    """Boolean ``[Bl, Hq|1, C, Sk]``: which keys the query ``rows`` (``[C]``) may see according to
    the block mask ``[Bl, Hl, Mq, Mk]`` alone (a shared ``Hl = 1`` stays 1; ``Hl = Hkv`` is spread
    over the query heads of each group). The one block-to-element expansion of the package."""
    bq, bk = block_size
    cols = torch.arange(sk, device=rows.device)
    m = block_mask[:, :, rows // bq][:, :, :, cols // bk]  # [Bl, Hl, C, Sk]
    hl = m.shape[1]
    return m if hl in (1, hq) else m.repeat_interleave(hq // hl, dim=1)


def _allowed(
    block_mask: Optional[torch.Tensor],
    block_size: Tuple[int, int],
    rows: torch.Tensor,
    sq: int,
    sk: int,
    hq: int,
    causal: bool,
) -> Optional[torch.Tensor]:
    """Boolean ``[Bl|1, Hq|1, C, Sk]`` mask of what the query ``rows`` may see (None = all)."""
    cols = torch.arange(sk, device=rows.device)
    allowed = None if block_mask is None else block_rows(block_mask, block_size, rows, sk, hq)
    if causal:
        c = (cols[None, :] <= rows[:, None] + (sk - sq))[None, None]  # [1, 1, C, Sk]
        allowed = c if allowed is None else allowed & c
    return allowed


def expand_kv(t: torch.Tensor, hq: int, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).repeat_interleave(hq // t.shape[1], dim=1)


def _scores(qc, kf, scale, allowed):
    s = torch.matmul(qc, kf.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _contained_matmul(a: torch.Tensor, b: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """``a @ b`` where ``a`` is zero wherever ``keep`` (broadcastable to ``a``) is false, computed
    so that a NaN or infinity of ``b`` reaches only the output elements of rows that keep its
    term: IEEE's ``0 * nan = nan`` would otherwise carry it to every row. Those elements get what
    the kept terms make of it (NaN for a NaN or for +inf meeting -inf, else +-inf)."""
    bad = ~torch.isfinite(b)
    if keep is None or not bool(bad.any()):  # the oracle may sync: it is not a hot path
        return torch.matmul(a, b)
    out = torch.matmul(a, b.masked_fill(bad, 0.0))
    kept = keep.expand(a.shape).to(b.dtype)
    nan = torch.matmul(kept, torch.isnan(b).to(b.dtype)) > 0
    pos = torch.matmul(kept, (b == float("inf")).to(b.dtype)) > 0
    neg = torch.matmul(kept, (b == float("-inf")).to(b.dtype)) > 0
    out = torch.where(pos, float("inf"), out)
    out = torch.where(neg, float("-inf"), out)
    return torch.where(nan | (pos & neg), float("nan"), out)


def _probabilities(s: torch.Tensor, m: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """``exp(s - m)`` with exact zeros where ``allowed`` is false (also when ``m`` is NaN)."""
    p = torch.exp(s - torch.where(m == float("-inf"), 0.0, m).unsqueeze(-1))
    return p if allowed is None else p.masked_fill(~allowed, 0.0)


def _kept(s: torch.Tensor, allowed: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The terms a row keeps: allowed, and a score above -inf (a -inf score has probability 0 and
    is dropped like a masked one, as in the kernels). None (all) when every score is finite."""
    if allowed is None and not bool(torch.isneginf(s).any()):
        return None
    return s != float("-inf")


def _transposed(keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if keep is None else keep.transpose(-1, -2)


def reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[torch.Tensor] = None,
    block_size: Tuple[int, int] = (64, 64),
    causal: bool = True,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward pass, no autograd. Returns ``out [B, Hq, Sq, D]`` (q's dtype) and
    ``lse [B, Hq, Sq]`` (float32, or float64 for fp64 inputs; natural log).

    ``block_mask`` is a boolean ``[Bl, Hl, Mq, Mk]`` block mask (None = dense).
    """
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    kf, vf = expand_kv(k, hq, acc), expand_kv(v, hq, acc)
    out = torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=acc, device=q.device)
    step = _chunk_rows(b, hq, sq, sk, chunk_size)
    for i0 in range(0, sq, step):
        rows = torch.arange(i0, min(i0 + step, sq), device=q.device)
        allowed = _allowed(block_mask, block_size, rows, sq, sk, hq, causal)
        s = _scores(q[:, :, i0 : i0 + step].to(acc), kf, scale, allowed)
        allowed = _kept(s, allowed)
        m = torch.logsumexp(s, dim=-1)  # -inf on rows that see nothing
        p = _probabilities(s, m, allowed)
        out[:, :, i0 : i0 + step] = _contained_matmul(p, vf, allowed).to(q.dtype)
        lse[:, :, i0 : i0 + step] = m
    return out, lse


def reference_backward(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    block_mask: Optional[torch.Tensor] = None,
    block_size: Tuple[int, int] = (64, 64),
    causal: bool = True,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the forward above, recomputing the probabilities
    chunk by chunk. ``dlse`` (optional, ``[B, Hq, Sq]``) is the gradient flowing into
    the log-sum-exp output."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    acc = _acc_dtype(q.dtype)
    kf, vf = expand_kv(k, hq, acc), expand_kv(v, hq, acc)
    dq = torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    dk = torch.zeros(b, hq, sk, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, hq, sk, d, dtype=acc, device=q.device)
    step = _chunk_rows(b, hq, sq, sk, chunk_size)
    for i0 in range(0, sq, step):
        sl = slice(i0, i0 + step)
        rows = torch.arange(i0, min(i0 + step, sq), device=q.device)
        allowed = _allowed(block_mask, block_size, rows, sq, sk, hq, causal)
        qc, doc = q[:, :, sl].to(acc), dout[:, :, sl].to(acc)
        s = _scores(qc, kf, scale, allowed)
        allowed = _kept(s, allowed)
        m = lse[:, :, sl].to(acc)
        p = _probabilities(s, m, allowed)  # [B, Hq, C, Sk]
        dv += _contained_matmul(p.transpose(-1, -2), doc, _transposed(allowed))
        dp = torch.matmul(doc, vf.transpose(-1, -2))
        pdp = p * dp if allowed is None else torch.where(allowed, p * dp, 0.0)
        delta = pdp.sum(-1, keepdim=True)  # = rowsum(dO * O), without O's rounding
        if dlse is not None:
            delta = delta - dlse[:, :, sl].to(acc).unsqueeze(-1)
        ds = p * (dp - delta) * scale
        if allowed is not None:
            ds = ds.masked_fill(~allowed, 0.0)
        dq[:, :, sl] = _contained_matmul(ds, kf, allowed).to(q.dtype)
        dk += _contained_matmul(ds.transpose(-1, -2), qc, _transposed(allowed))
    group = hq // hkv
    dk = dk.view(b, hkv, group, sk, d).sum(2).to(k.dtype)
    dv = dv.view(b, hkv, group, sk, d).sum(2).to(v.dtype)
    return dq, dk, dv


class _ReferenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_mask, block_size, causal, scale, chunk_size):
        out, lse = reference_forward(q, k, v, block_mask, block_size, causal, scale, chunk_size)
        ctx.save_for_backward(q, k, v, lse, block_mask)
        ctx.args = (block_size, causal, scale, chunk_size)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, lse, block_mask = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        dq, dk, dv = reference_backward(dout, dlse, q, k, v, lse, block_mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Optional[BlockSparseLayout] = None,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    chunk_size: Optional[int] = None,
):
    """Exact block-sparse attention with autograd (the oracle).

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0``.
        layout: a :class:`BlockSparseLayout` for ``(Sq, Sk)``, or None for dense.
        causal: bottom-right aligned causal mask (``j <= i + Sk - Sq``).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return ``lse [B, Hq, Sq]`` (fp32, natural log), differentiable.
        chunk_size: query rows per chunk (default: about 4M score elements per chunk).

    No input validation: call through :func:`sparse_attn.sparse_attention` with
    ``backend="reference"`` for that.
    """
    block_mask = None if layout is None else layout.to_block_mask()
    block_size = (64, 64) if layout is None else layout.block_size
    out, lse = _ReferenceAttention.apply(q, k, v, block_mask, block_size, causal, scale, chunk_size)
    return (out, lse) if return_lse else out

