"""S2-Attention (DKernel) layouts: a local window plus a strided, per-head-shifted set of blocks.

Every head keeps the key blocks near the query (``local_blocks`` of them) and, further back,
one block in every ``vert_stride``; the stride is shifted by head, so the heads together cover
the whole context while each one reads only ``~1/vert_stride`` of it.

The rule (causal). For layout head ``h``, query block row ``r`` and key block ``c``, let ``i``
be the absolute block index of row ``r``'s first query token (queries are the last ``seq_q``
positions of the ``seq_k`` keys, so ``i = r + (seq_k - seq_q) // block_size``). Keep ``c`` iff
``c <= i`` and either ``i - c < local_blocks`` or
``(c + h_eff * step + head_sliding_offset) % vert_stride == 0``, with
``step = max(1, vert_stride // num_heads)`` and ``h_eff = 0 if homo_head else h``. The last
``num_dense_heads`` heads keep every ``c <= i``. Non-causal: the window is symmetric,
``|i - c| < local_blocks``, the stride rule is the same and nothing else is cut.

Offsets: ``head_sliding_offset=0`` is DKernel's training rule; ``head_sliding_offset=1`` is
the rule of its vLLM port (Phi-3-small), which shifts every head's stride by one block. A
model trained with one must be served with the same one.

Example (8 blocks, stride 4, window 2, two heads; ``x`` kept)::

    head 0: c % 4 == 0         head 1: (c + 2) % 4 == 0
    x . . . . . . .            x . . . . . . .
    x x . . . . . .            x x . . . . . .
    x x x . . . . .            . x x . . . . .
    x . x x . . . .            . . x x . . . .
    x . . x x . . .            . . x x x . . .
    x . . . x x . .            . . x . x x . .
    x . . . x x x .            . . x . . x x .
    x . . . x . x x            . . x . . . x x

When ``(seq_k - seq_q) % block_size != 0`` a query block straddles two key blocks and the
rule, which looks at the block of the first query token, does not keep the second one; use
block-aligned chunks for chunked prefill (decode, ``seq_q = 1``, is always aligned).
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from ..layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout, _ceil_div, _expand

__all__ = ["strided", "strided_block_mask", "layout_cache"]

Device = Union[str, torch.device, None]


def _check(num_heads, seq_q, seq_k, block_size, local_blocks, vert_stride, num_dense_heads, active_head_range):
    for name, val in (("num_heads", num_heads), ("seq_q", seq_q), ("seq_k", seq_k), ("block_size", block_size),
                      ("local_blocks", local_blocks), ("vert_stride", vert_stride),
                      ("num_dense_heads", num_dense_heads)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {val!r}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if seq_q < 1 or seq_k < 1:
        raise ValueError(f"seq_q and seq_k must be >= 1, got seq_q={seq_q}, seq_k={seq_k}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    if local_blocks < 0:
        raise ValueError(f"local_blocks must be >= 0, got {local_blocks}")
    if vert_stride < 1:
        raise ValueError(f"vert_stride must be >= 1, got {vert_stride}")
    if not 0 <= num_dense_heads <= num_heads:
        raise ValueError(f"num_dense_heads must lie in [0, num_heads={num_heads}], got {num_dense_heads}")
    if active_head_range is None:
        return 0, num_heads
    try:
        h0, h1 = (int(x) for x in active_head_range)
    except (TypeError, ValueError):
        raise TypeError(f"active_head_range must be a pair (h0, h1), got {active_head_range!r}") from None
    if not 0 <= h0 < h1 <= num_heads:
        raise ValueError(f"active_head_range must satisfy 0 <= h0 < h1 <= num_heads={num_heads}, "
                         f"got {active_head_range!r}")
    return h0, h1


def stride_residue(head: int, num_heads: int, vert_stride: int, homo_head: bool, head_sliding_offset: int) -> int:
    """The residue ``r`` such that key block ``c`` is on head ``head``'s stride iff
    ``c % vert_stride == r``: ``(c + h_eff * step + head_sliding_offset) % vert_stride == 0``.

    >>> [stride_residue(h, 2, 4, False, 0) for h in range(2)]
    [0, 2]
    """
    step = max(1, vert_stride // num_heads)
    return (-((0 if homo_head else head) * step + head_sliding_offset)) % vert_stride


class LayoutCache:
    """The most recently used layouts, bounded by the bytes of the device tensors they hold
    (:attr:`BlockSparseLayout.nbytes`: the row form, the transposed form once built, the kernels'
    cached tile plans), not by a count: one 128k-token, 32-head S2 layout with its transposed form
    is ~580 MiB. Sizes are re-read on every insertion (a layout grows when its transposed form is
    built), least recently used entries are dropped first, and a layout larger than the whole
    budget is returned without being kept. Thread-safe.

    The budget is ``SPARSE_ATTN_S2_CACHE_MB`` (MiB, default 1024) at import, or :attr:`max_bytes`
    at run time; 0 disables caching.

    Example::

        >>> from sparse_attn.patterns.s2 import layout_cache
        >>> layout_cache.max_bytes = 256 << 20      # keep at most 256 MiB of S2 layouts
        >>> layout_cache.info()["entries"], layout_cache.info()["bytes"]   # doctest: +SKIP
        (3, 12582912)
        >>> layout_cache.cache_clear()
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: "collections.OrderedDict[Any, BlockSparseLayout]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], BlockSparseLayout]) -> BlockSparseLayout:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        layout = build()  # outside the lock: builds of different keys may overlap
        with self._lock:
            if layout.nbytes <= self.max_bytes:
                self._entries[key] = layout
                self._entries.move_to_end(key)
                self._evict()
        return layout

    def _evict(self) -> None:
        sizes = {k: v.nbytes for k, v in self._entries.items()}
        total = sum(sizes.values())
        while total > self.max_bytes and self._entries:
            k, _ = self._entries.popitem(last=False)
            total -= sizes[k]

    def cache_clear(self) -> None:
        """Drop every cached layout (the benchmark runner calls this to time uncached builds)."""
        with self._lock:
            self._entries.clear()

    def info(self) -> Dict[str, int]:
        """``{"entries", "bytes", "max_bytes"}`` (bytes as of now)."""
        with self._lock:
            return dict(entries=len(self._entries), bytes=sum(v.nbytes for v in self._entries.values()),
                        max_bytes=self.max_bytes)


def _cache_budget() -> int:
    raw = os.environ.get("SPARSE_ATTN_S2_CACHE_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"SPARSE_ATTN_S2_CACHE_MB must be a number of MiB, got {raw!r}") from None
    if not mb >= 0:
        raise ValueError(f"SPARSE_ATTN_S2_CACHE_MB must be >= 0, got {raw!r}")
    return int(mb * (1 << 20))


layout_cache = LayoutCache(_cache_budget())


def _build(num_heads, seq_q, seq_k, bs, local, stride, homo, n_dense, offset, causal, h0, h1, device):
    """(kv_num, kv_idx, q_num, q_idx) straight from the formula, never an [Mq, Mk] mask.

    Per row the kept columns are three ascending runs: stride hits before the window, the
    window, stride hits after it (non-causal only), so each slot's index is closed-form. Per
    column the reading rows form one contiguous range, so the transposed form is too.
    """
    dev = torch.device(device)
    mq, mk = _ceil_div(seq_q, bs), _ceil_div(seq_k, bs)
    shift = (seq_k - seq_q) // bs  # floor: i = r + shift for every row
    heads = torch.arange(h0, h1, device=dev, dtype=torch.int64)  # global head indices
    c0 = torch.tensor([stride_residue(h, num_heads, stride, homo, offset) for h in range(h0, h1)],
                      device=dev, dtype=torch.int64)  # [H] first column on the head's stride
    dense = heads >= num_heads - n_dense  # [H]

    i = torch.arange(mq, device=dev, dtype=torch.int64) + shift  # [Mq] absolute block of each row
    i, c0_, dense_ = i[None, :], c0[:, None], dense[:, None]  # [1, Mq], [H, 1], [H, 1]
    last = mk - 1
    zero = torch.zeros_like(i)
    # the window [win_lo, win_hi] (may be empty); dense heads: everything up to the causal limit
    if causal:
        win_lo = torch.where(dense_, zero, (i - local + 1).clamp(min=0))
        win_hi = i.clamp(max=last).expand_as(win_lo)
    else:
        win_lo = torch.where(dense_, zero, (i - local + 1).clamp(min=0))
        win_hi = torch.where(dense_, zero + last, (i + local - 1).clamp(max=last))
    win_lo = win_lo.clamp(max=mk)
    n_win = (win_hi - win_lo + 1).clamp(min=0)  # [H, Mq]
    # stride hits before the window, c = c0 + j * stride < win_lo (also covers c <= i when local=0)
    n_pre = torch.where(dense_, zero, ((win_lo - c0_ + stride - 1) // stride).clamp(min=0))
    # stride hits after the window, up to the last block (non-causal only)
    start = torch.maximum(win_hi + 1, win_lo)
    first_post = start + (c0_ - start) % stride
    if causal:
        n_post = torch.zeros_like(n_pre)
    else:
        n_post = torch.where(dense_ | (first_post > last), zero, (last - first_post) // stride + 1)
    kv_num = (n_pre + n_win + n_post).to(torch.int32)  # [H, Mq]

    width = max(1, min(mk, (mk + stride - 1) // stride + (local if causal else 2 * local) + 1))
    if n_dense:
        width = mk
    # slot j of a row: run 1 (j < n_pre), the window, run 2; int32 and in place on the one
    # [H, Mq, K] temporary, since this is the big piece (8 heads x 2048 rows x 273 slots at 128k)
    i32 = torch.int32
    j = torch.arange(width, device=dev, dtype=i32)[None, None, :]  # [1, 1, K]
    n_pre3, n_win3 = n_pre.to(i32)[..., None], n_win.to(i32)[..., None]  # [H, Mq, 1]
    t = j - n_pre3  # [H, Mq, K] slot index relative to the window start
    in_pre, in_post = t < 0, t >= n_win3
    kv_idx = t + win_lo.to(i32)[..., None]
    t.sub_(n_win3).mul_(stride).add_(first_post.to(i32)[..., None])  # run 2 candidates
    kv_idx = torch.where(in_post, t, kv_idx)
    kv_idx = torch.where(in_pre, c0_.to(i32)[..., None] + j * stride, kv_idx)  # run 1: [H, 1, K]
    kv_idx.clamp_(0, last)  # [H, Mq, K]; slots past the count are padding

    def transposed():
        # column c is read by absolute rows [lo, hi] (then r = i - shift): one contiguous range
        c = torch.arange(mk, device=dev, dtype=torch.int64)[None, :]  # [1, Mk]
        wide = dense_ | ((c - c0_) % stride == 0)
        big = 1 << 40
        if causal:
            lo = c
            hi = torch.where(wide, torch.full_like(c, big), c + local - 1)
        else:
            lo = torch.where(wide, torch.full_like(c, -big), c - local + 1)
            hi = torch.where(wide, torch.full_like(c, big), c + local - 1)
        lo, hi = torch.broadcast_tensors(lo, hi)  # [H, Mk]
        r_lo = (lo - shift).clamp(min=0)
        r_hi = (hi - shift).clamp(max=mq - 1)
        q_num = (r_hi - r_lo + 1).clamp(min=0).to(torch.int32)  # [H, Mk]
        # the widest piece (int32 from the start: Hl * Mk * Mq entries)
        r = torch.arange(mq, device=dev, dtype=torch.int32)[None, None, :]
        q_idx = (r_lo.to(torch.int32)[..., None] + r).clamp_(max=mq - 1)  # [H, Mk, Mq]
        return q_num[None], q_idx[None]

    layout = BlockSparseLayout._from_parts(kv_num[None], kv_idx[None], None, None, (bs, bs), seq_q, seq_k,
                                           q_builder=transposed)
    return layout


def strided(
    num_heads: int,
    seq_q: int,
    seq_k: Optional[int] = None,
    *,
    block_size: int = 64,
    local_blocks: int = 16,
    vert_stride: int = 8,
    homo_head: bool = False,
    num_dense_heads: int = 0,
    head_sliding_offset: int = 0,
    causal: bool = True,
    active_head_range: Optional[Tuple[int, int]] = None,
    device: Device = None,
) -> BlockSparseLayout:
    """The S2-Attention layout ``[1, Hl, Mq, Mk]`` (see the module docstring for the rule).

    Args:
        num_heads: heads the pattern is defined over; ``Hl = num_heads``. Pass the number of
            KV heads to share one layout across each GQA group (the usual choice: a KV head's
            shard is then what its cache must hold), or the query heads for one per head.
        seq_q, seq_k: query / key lengths (``seq_k`` defaults to ``seq_q``); queries are the
            last ``seq_q`` key positions (decode: ``seq_q = 1``).
        block_size: square block (16, 32, 64, 128).
        local_blocks: window, in blocks, including the query's own block.
        vert_stride: keep one block in ``vert_stride`` outside the window.
        homo_head: all heads use the same stride offset (no sharding).
        num_dense_heads: the last this many heads attend to everything (causally).
        head_sliding_offset: extra shift of the stride (0: DKernel training; 1: its vLLM port).
        causal: cut blocks after the query block; non-causal windows are symmetric.
        active_head_range: ``(h0, h1)``: build only heads ``h0 .. h1 - 1`` (a tensor-parallel
            rank's heads); head indices in the rule stay global, ``Hl = h1 - h0``.
        device: where the layout lives.

    Returns:
        A :class:`BlockSparseLayout`. Built from closed-form indices (no ``Mq x Mk`` mask)
        and cached per arguments: the pattern is static, so a model calls this every step
        for free. The transposed form (``Hl x Mk x Mq`` int32, for gradients) is made on
        first use, so inference never pays for it. Treat the layout as read-only.

    Example::

        >>> from sparse_attn import sparse_attention
        >>> layout = strided(4, 1000, block_size=64, local_blocks=2, vert_stride=4)
        >>> layout.shape
        (1, 4, 16, 16)
        >>> q = torch.randn(1, 8, 1000, 64); k = v = torch.randn(1, 4, 1000, 64)
        >>> out = sparse_attention(q, k, v, layout)        # GQA: heads 2g, 2g+1 use layout head g
    """
    seq_k = seq_q if seq_k is None else seq_k
    h0, h1 = _check(num_heads, seq_q, seq_k, block_size, local_blocks, vert_stride, num_dense_heads,
                    active_head_range)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (num_heads, seq_q, seq_k, block_size, local_blocks, vert_stride, bool(homo_head), num_dense_heads,
           int(head_sliding_offset), causal, h0, h1, str(dev))
    if torch.compiler.is_compiling():  # traced into the graph: no Python-side cache for Dynamo to see
        return _build(*key)
    return layout_cache.get(key, lambda: _build(*key))


def strided_block_mask(num_heads: int, seq_q: int, seq_k: Optional[int] = None, **kwargs) -> torch.Tensor:
    """The boolean block mask ``[1, Hl, Mq, Mk]`` of :func:`strided` (same arguments)."""
    layout = strided(num_heads, seq_q, seq_k, **kwargs)
    return _expand(layout.kv_num, layout.kv_idx, layout.num_key_blocks)
