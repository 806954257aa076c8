"""From block scores to a layout: threshold, top-k, a target density or SeerAttention's ``nz_ratio``, on the device.

Used by SeerAttention's gate (its logits), the benchmarks' "Seer-style top-k from random
scores", and anything else that scores (query block, key block) pairs. Every step is a fixed-
shape tensor op, so selection runs on the GPU without a host synchronisation and inside
``torch.compile`` / CUDA graphs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ..layout import BlockSparseLayout, parse_block_size, seq_lengths

__all__ = ["select_blocks", "causal_block_mask"]


def causal_block_mask(mq: int, mk: int, block_size: Union[int, Sequence[int]], seq_q: int, seq_k: int,
                      device=None) -> torch.Tensor:
    """``[Mq, Mk]`` bool: key block ``c`` holds a key some query of block ``r`` may see.

    Bottom-right causal: query ``t`` sees key ``j`` iff ``j <= t + seq_k - seq_q``, so block ``r``
    reaches key ``min(seq_q, (r + 1) * bq) - 1 + seq_k - seq_q``. Any positive block sizes (a
    pure geometry helper: the Seer gates use it too).
    """
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else (int(block_size[0]), int(block_size[1]))
    r = torch.arange(mq, device=device)
    last_key = torch.clamp((r + 1) * bq, max=seq_q) - 1 + (seq_k - seq_q)  # [Mq]
    c = torch.arange(mk, device=device)
    return c[None, :] * bk <= last_key[:, None]


def _group_reduce(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    b, h = x.shape[:2]
    if h % num_kv_heads:
        raise ValueError(f"logits have {h} heads, not a multiple of num_kv_heads={num_kv_heads}")
    return x.view(b, num_kv_heads, h // num_kv_heads, *x.shape[2:]).amax(dim=2)


def select_blocks(
    logits: torch.Tensor,
    *,
    threshold: Optional[float] = None,
    topk: Optional[int] = None,
    density: Optional[float] = None,
    nz_ratio: Optional[float] = None,
    keep_first: int = 1,
    keep_last: int = 1,
    strict: bool = False,
    dense_last_rows: int = 0,
    causal: bool = True,
    share_gqa: bool = False,
    block_size: Union[int, Tuple[int, int]] = 64,
    seq_q: Optional[int] = None,
    seq_k: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
) -> BlockSparseLayout:
    """Pick key blocks per query block from scores; return the layout.

    Args:
        logits: ``[B, H, Mq, Mk]`` scores (any float dtype; compared in fp32). ``-inf`` marks a
            pair that may not be chosen; ``+inf`` and NaN are rejected at the source's risk
            (NaN is never chosen).
        threshold: keep blocks whose softmax probability along the row is ``>= threshold``
            (``> threshold`` with ``strict=True``, as in the SeerAttention code).
        topk: keep the ``topk`` highest-scoring allowed blocks of each row (all of them if the
            row has fewer); the forced blocks come on top.
        density: a budget of ``round(density * n_r)`` blocks in row ``r`` (half up), where
            ``n_r`` is the row's number of allowed blocks (with ``causal`` the triangle, so
            ``density=0.1`` computes ~10% of what causal dense attention computes, not 5%). The
            forced blocks (``keep_first``, ``keep_last``, ``dense_last_rows``) count toward the
            budget, the rest goes to the highest scores; a row whose budget is smaller than its
            forced blocks keeps just those (short rows: a 0.1 budget of a 4-block row is 0).
        nz_ratio: SeerAttention's top-k rule: ``K = max(1, int((1 - sqrt(1 - nz_ratio)) * Mk))``
            highest-scoring blocks per row, then the causal cut (the authors' code uses the
            number of query blocks, the same in their square prefill); forced blocks on top.
        keep_first: the first this many allowed key blocks of each row are always kept
            (attention sinks).
        keep_last: the last this many allowed key blocks of each row are always kept (the
            diagonal and its neighbours, so no query row is left empty).
        strict: threshold comparison ``>`` instead of ``>=``.
        dense_last_rows: the last this many query-block rows keep every allowed block
            (the SeerAttention configs keep the last 2).
        causal: also forbid blocks past the bottom-right causal limit (from ``seq_q``,
            ``seq_k``), whether or not ``logits`` already carry ``-inf`` there.
        share_gqa: choose once per KV head: reduce over each group of ``H // num_kv_heads``
            query heads (max of probabilities for ``threshold``, max of logits otherwise) and
            return an ``Hl = num_kv_heads`` layout.
        block_size: ``bq`` or ``(bq, bk)`` of the layout.
        seq_q, seq_k: sequence lengths (default ``Mq * bq``, ``Mk * bk``).
        num_kv_heads: needed with ``share_gqa``.

    Exactly one of ``threshold``, ``topk``, ``density``, ``nz_ratio`` must be given. The
    SeerAttention code's rules are ``threshold=t, strict=True, keep_first=0, keep_last=0,
    dense_last_rows=2`` and ``nz_ratio=r, keep_first=0, keep_last=0, dense_last_rows=2``; the
    defaults here force the first and last allowed blocks instead (no row is ever empty).

    Returns:
        :class:`BlockSparseLayout` with ``Bl = B`` and ``Hl = H`` (or ``num_kv_heads``).

    Example::

        >>> logits = torch.randn(1, 4, 16, 16)
        >>> layout = select_blocks(logits, topk=3, block_size=64, seq_q=1000, seq_k=1000)
        >>> layout.kv_num.max().item() <= 3 + 2      # top-3 plus the forced first/last blocks
        True
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating-point torch.Tensor")
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, H, Mq, Mk], got shape {tuple(logits.shape)}")
    modes = [name for name, val in (("threshold", threshold), ("topk", topk), ("density", density),
                                    ("nz_ratio", nz_ratio)) if val is not None]
    if len(modes) != 1:
        raise ValueError(f"give exactly one of threshold, topk, density, nz_ratio (got {modes or 'none'})")
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 0):
        raise ValueError(f"topk must be a non-negative int, got {topk!r}")
    for name, val in (("density", density), ("nz_ratio", nz_ratio)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or not 0.0 <= val <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {val!r}")
    for name, val in (("keep_first", keep_first), ("keep_last", keep_last), ("dense_last_rows", dense_last_rows)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    bq, bk = parse_block_size(block_size)
    b, h, mq, mk = logits.shape
    seq_q, seq_k = seq_lengths(seq_q, seq_k, bq, bk, mq, mk, "logits")
    if share_gqa and num_kv_heads is None:
        raise ValueError("share_gqa=True needs num_kv_heads")

    x = logits.float()
    allowed = x > float("-inf")  # NaN compares False: never allowed
    if causal:
        allowed = allowed & causal_block_mask(mq, mk, (bq, bk), seq_q, seq_k, logits.device)
    x = x.masked_fill(~allowed, float("-inf"))

    if share_gqa:
        heads_allowed = _group_reduce(allowed, num_kv_heads)
    else:
        heads_allowed = allowed
    # forced blocks: by position among the row's allowed blocks, and whole trailing rows
    from_left = torch.cumsum(heads_allowed.to(torch.int32), dim=-1)  # 1-based rank from the left
    from_right = heads_allowed.sum(-1, keepdim=True, dtype=torch.int32) - from_left + 1
    forced = heads_allowed & ((from_left <= keep_first) | (from_right <= keep_last))
    if dense_last_rows:
        rows = torch.arange(mq, device=logits.device)[:, None]
        forced = forced | (heads_allowed & (rows >= mq - dense_last_rows))

    if threshold is not None:
        # softmax of a row with nothing allowed would be NaN: give it zeros instead
        probs = torch.softmax(x.masked_fill(~allowed.any(-1, keepdim=True), 0.0), dim=-1) * allowed
        if share_gqa:
            probs = _group_reduce(probs, num_kv_heads)
        keep = (probs > float(threshold)) if strict else (probs >= float(threshold))
        keep = keep & heads_allowed
    else:
        if share_gqa:
            x = _group_reduce(x, num_kv_heads)
        n_allowed = heads_allowed.sum(-1, keepdim=True)  # [B, H, Mq, 1]
        if topk is not None:
            k_row = torch.clamp(n_allowed, max=topk)
        elif nz_ratio is not None:
            k_row = torch.clamp(n_allowed, max=max(1, int((1.0 - math.sqrt(1.0 - float(nz_ratio))) * mk)))
        else:  # the forced blocks spend the budget first: rank them ahead of every score
            k_row = torch.floor(n_allowed.to(torch.float64) * float(density) + 0.5).to(n_allowed.dtype)
            x = x.masked_fill(forced, float("inf"))
        order = torch.argsort(x, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(mk, device=x.device).expand_as(order).contiguous())
        keep = (rank < k_row) & heads_allowed
    return BlockSparseLayout.from_block_mask(keep | forced, (bq, bk), seq_q, seq_k)
