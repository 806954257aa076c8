"""Combine two partial attentions over disjoint key sets (chunked prefill, ring/context parallel).

If ``(out_a, lse_a)`` is softmax attention of the queries over key set ``A`` and
``(out_b, lse_b)`` over a disjoint key set ``B``, attention over ``A ∪ B`` is::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

computed here with a shift by ``max(lse_a, lse_b)`` so nothing overflows, in fp32 (fp64 for
fp64 inputs). Plain PyTorch ops, so it is differentiable w.r.t. all four inputs, runs on any
device and traces under ``torch.compile``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["merge_attention"]


def _check(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    named = (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != out_a.device:
            raise ValueError(f"{name} is on {t.device} but out_a is on {out_a.device}")
    if out_a.dim() != 4:
        raise ValueError(f"out_a must be 4-D [B, H, S, D], got shape {tuple(out_a.shape)}")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:3]:
            raise ValueError(f"{name} must have shape [B, H, S] = {tuple(out_a.shape[:3])}, got {tuple(t.shape)}")


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two attentions of the same queries over disjoint key sets into one.

    Args:
        out_a, out_b: ``[B, H, S, D]`` attention outputs over key sets ``A`` and ``B``.
        lse_a, lse_b: ``[B, H, S]`` their log-sum-exps (natural log, as returned by
            ``sparse_attention(..., return_lse=True)``); ``-inf`` marks a row that saw no key
            in that set (its ``out`` is then ignored).

    Returns:
        ``(out [B, H, S, D], lse [B, H, S])``: attention over ``A ∪ B``. ``out`` has out_a's
        dtype, ``lse`` is fp32 (fp64 if any input is fp64); both are computed in that precision.
        A row with ``-inf`` on one side takes the other side exactly; a row with ``-inf`` on
        both sides gives ``out = 0`` and ``lse = -inf``. Differentiable w.r.t. all four inputs;
        the ``-inf`` rows get zero (never NaN) gradients.

    Example (chunked prefill: the prompt's first ``P`` keys, then the current chunk)::

        >>> from sparse_attn import sparse_attention
        >>> q = torch.randn(1, 2, 16, 32); k = v = torch.randn(1, 2, 48, 32)
        >>> a = sparse_attention(q, k[:, :, :32], v[:, :, :32], causal=False, return_lse=True)
        >>> b = sparse_attention(q, k[:, :, 32:], v[:, :, 32:], causal=True, return_lse=True)
        >>> out, lse = merge_attention(*a, *b)
        >>> torch.allclose(out, sparse_attention(q, k, v, causal=True), atol=1e-5)
        True
    """
    _check(out_a, lse_a, out_b, lse_b)
    any64 = any(t.dtype == torch.float64 for t in (out_a, lse_a, out_b, lse_b))
    acc = torch.float64 if any64 else torch.float32
    la, lb = lse_a.to(acc), lse_b.to(acc)
    # The result does not depend on the shift, so it carries no gradient; shifting empty rows
    # (both -inf) by 0 keeps exp() at 0 instead of exp(-inf + inf) = NaN.
    m = torch.maximum(la, lb).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)  # in [0, 1]; the larger side is exactly 1
    total = wa + wb
    empty = total == 0
    # log/divide a safe denominator and select afterwards, so the empty rows' backward never
    # meets 1/0 (a where() after log(0) would still send inf * 0 = NaN into the gradient).
    safe = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), m + torch.log(safe))
    pa, pb = (wa / safe).unsqueeze(-1), (wb / safe).unsqueeze(-1)
    # A side with lse -inf contributes nothing even if its out holds garbage (0 * NaN = NaN).
    oa = torch.where(torch.isneginf(la).unsqueeze(-1), 0.0, out_a.to(acc))
    ob = torch.where(torch.isneginf(lb).unsqueeze(-1), 0.0, out_b.to(acc))
    out = pa * oa + pb * ob
    return out.to(out_a.dtype), lse
