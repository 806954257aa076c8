"""S2-Attention (DKernel) layouts: a local window plus a strided set of blocks.

Every head keeps the key blocks near the query (its local window) and, further away, one block
in every ``vert_stride``. In ``"absolute"`` mode the stride is shifted by head, so the heads
together cover the whole context while each one reads only ``~1/vert_stride`` of it (and a decode
cache need only keep each head's shard); in ``"relative"`` mode every head counts the stride
outwards from its own window.

Notation. Layout head ``h`` (its global index), query block row ``r``, key block ``c`` (0-based
within the ``seq_k`` keys given). Queries are the last ``seq_q`` key positions, so row ``r``'s
first query token is in key block ``i = r + (seq_k - seq_q) // block_size``. The window is
``(L, R) = local_blocks``: ``c`` is local iff ``i - c < L`` and ``c - i < R`` (both counts
include the query's own block). Causal layouts take ``local_blocks = L`` (an int) and ``R = 1``;
non-causal ones an int ``L`` (``R = L``, symmetric) or a pair ``(L, R)``.

The rule (DKernel's ``get_sparse_attn_mask``):

* ``vert_position_type="absolute"`` (the default when causal): keep ``c`` iff it is local or
  ``(kv0 + c + h_eff * step + head_sliding_offset) % vert_stride == 0``, with
  ``kv0 = kv_start_position // block_size`` (the absolute block of key 0),
  ``h_eff = 0 if homo_head else h`` and ``step = max(1, vert_stride // n)``, ``n`` being
  ``num_query_heads`` when given, else ``num_heads``.
* ``vert_position_type="relative"`` (the default when not causal): keep ``c`` iff
  ``(max(0, i - c - L + 1) + max(0, c - i - R + 1)) % vert_stride == 0``: the window (both terms
  are 0 there) and every ``vert_stride``-th block counted outwards from its edges. The rule is the
  same for every head (``homo_head``, ``head_sliding_offset``, ``num_query_heads`` and
  ``kv_start_position`` change nothing).
* Either way the last ``num_dense_heads`` heads keep every block, and causal layouts drop
  ``c > i``.

GQA. One pattern per KV head (``num_heads = Hkv``, shared by the KV head's query group) is what
DKernel builds when given ``num_kv_heads``; it steps the heads by ``vert_stride // Hq`` (query
heads), so pass ``num_query_heads=Hq`` to get its pattern. Without it the step is
``vert_stride // Hkv``: e.g. ``Hq = 4``, ``Hkv = 2``, stride 4 gives residues ``[0, 3]`` per KV
head with ``num_query_heads=4`` (DKernel) and ``[0, 2]`` without.

Offsets: ``head_sliding_offset=0`` is DKernel's training rule; ``head_sliding_offset=1`` is the
rule of its vLLM port (Phi-3-small), which shifts every head's stride by one block. A model
trained with one must be served with the same one.

Example (absolute, 8 blocks, stride 4, window 2, two heads; ``x`` kept)::

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
import dataclasses
import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from ..layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout, ceil_div, rows_to_mask

__all__ = ["S2Config", "strided", "strided_block_mask", "layout_cache"]

Device = Union[str, torch.device, None]
LocalBlocks = Union[int, Tuple[int, int]]

VERT_POSITION_TYPES = ("absolute", "relative")


def _is_int(val: Any) -> bool:
    return isinstance(val, int) and not isinstance(val, bool)


def _check(num_heads, seq_q, seq_k, block_size, vert_stride, num_dense_heads, active_head_range):
    for name, val in (("num_heads", num_heads), ("seq_q", seq_q), ("seq_k", seq_k), ("block_size", block_size),
                      ("vert_stride", vert_stride), ("num_dense_heads", num_dense_heads)):
        if not _is_int(val):
            raise TypeError(f"{name} must be an int, got {val!r}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if seq_q < 1 or seq_k < 1:
        raise ValueError(f"seq_q and seq_k must be >= 1, got seq_q={seq_q}, seq_k={seq_k}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
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


def _local_window(local_blocks: Any, causal: bool) -> Tuple[int, int]:
    """``local_blocks`` as the window ``(L, R)``: an int ``L`` (causal: ``R = 1``, the query's own
    block; not causal: ``R = L``) or, not causal only, a pair ``(L, R)``; all counts ``>= 0``."""
    if _is_int(local_blocks):
        if local_blocks < 0:
            raise ValueError(f"local_blocks must be >= 0, got {local_blocks}")
        return (local_blocks, 1) if causal else (local_blocks, local_blocks)
    if isinstance(local_blocks, (tuple, list)):
        if causal:
            raise ValueError(f"local_blocks must be an int when causal=True (the window's right side is the "
                             f"query's own block), got {local_blocks!r}; a pair (left, right) is for causal=False")
        if len(local_blocks) != 2 or not all(_is_int(x) for x in local_blocks):
            raise TypeError(f"local_blocks must be an int or a pair of ints (left, right), got {local_blocks!r}")
        left, right = local_blocks
        if left < 0 or right < 0:
            raise ValueError(f"local_blocks must be >= 0 on both sides, got {local_blocks!r}")
        return left, right
    raise TypeError(f"local_blocks must be an int or a pair of ints (left, right), got {local_blocks!r}")


def _check_num_query_heads(num_query_heads: Any, num_heads: int) -> None:
    if num_query_heads is None:
        return
    if not _is_int(num_query_heads):
        raise TypeError(f"num_query_heads must be an int or None, got {num_query_heads!r}")
    if num_query_heads < 1 or num_query_heads % num_heads:
        raise ValueError(f"num_query_heads must be a positive multiple of num_heads={num_heads} (the query "
                         f"heads of a per-KV-head layout), got {num_query_heads}")


@dataclasses.dataclass(frozen=True)
class S2Config:
    """The S2-Attention (DKernel) pattern options, checked once: the one place they are validated
    (``strided``, ``S2KVCache`` and the drop-in's ``S2Pattern`` all build one). Frozen and
    hashable; ``to_dict()`` / ``S2Config(**d)`` round-trip through JSON.

    Fields (the rule is in the module docstring): ``block_size`` (16, 32, 64, 128),
    ``local_blocks`` (an int ``L`` or, for non-causal layouts, a pair ``(L, R)``), ``vert_stride``
    (>= 1), ``homo_head``, ``num_dense_heads`` (>= 0), ``head_sliding_offset`` (0: DKernel's
    training rule, 1: its vLLM port), ``vert_position_type`` (None, "absolute", "relative") and
    ``kv_start_position`` (a non-negative multiple of ``block_size``). What depends on the call --
    ``causal``, the head counts, ``active_head_range``, the device -- is not part of it:
    :meth:`window` and :meth:`check_heads` check the combination.

    Example::

        >>> cfg = S2Config(block_size=16, local_blocks=2, vert_stride=4)
        >>> layout = strided(4, 100, config=cfg)
        >>> S2Config(**cfg.to_dict()) == cfg
        True
    """

    block_size: int = 64
    local_blocks: LocalBlocks = 16
    vert_stride: int = 8
    homo_head: bool = False
    num_dense_heads: int = 0
    head_sliding_offset: int = 0
    vert_position_type: Optional[str] = None
    kv_start_position: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.local_blocks, list):  # from JSON
            object.__setattr__(self, "local_blocks", tuple(self.local_blocks))
        self.validate()

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the field for a bad value."""
        for name in ("block_size", "vert_stride", "num_dense_heads", "head_sliding_offset", "kv_start_position"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size}")
        if self.vert_stride < 1:
            raise ValueError(f"vert_stride must be >= 1, got {self.vert_stride}")
        if self.num_dense_heads < 0:
            raise ValueError(f"num_dense_heads must be >= 0, got {self.num_dense_heads}")
        if not isinstance(self.homo_head, bool):
            raise TypeError(f"homo_head must be a bool, got {self.homo_head!r}")
        if self.vert_position_type is not None and self.vert_position_type not in VERT_POSITION_TYPES:
            raise ValueError(f"vert_position_type must be None, 'absolute' or 'relative', "
                             f"got {self.vert_position_type!r}")
        if self.kv_start_position < 0 or self.kv_start_position % self.block_size:
            raise ValueError(f"kv_start_position must be a non-negative multiple of block_size={self.block_size} "
                             f"(sequence chunks start at a block boundary), got {self.kv_start_position}")
        _local_window(self.local_blocks, isinstance(self.local_blocks, int))  # types and signs

    def window(self, causal: bool) -> Tuple[int, int]:
        """The local window ``(L, R)`` for a causal or non-causal layout (a pair needs non-causal)."""
        return _local_window(self.local_blocks, causal)

    def position_type(self, causal: bool) -> str:
        """``vert_position_type``, or DKernel's default for ``causal``."""
        return self.vert_position_type or ("absolute" if causal else "relative")

    def check_heads(self, num_heads: int, num_query_heads: Optional[int] = None) -> None:
        """The head counts a layout over ``num_heads`` pattern heads needs: ``num_dense_heads``
        at most ``num_heads``; ``num_query_heads`` (if given) a positive multiple of it."""
        if not _is_int(num_heads):
            raise TypeError(f"num_heads must be an int, got {num_heads!r}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if self.num_dense_heads > num_heads:
            raise ValueError(f"num_dense_heads must lie in [0, num_heads={num_heads}], got {self.num_dense_heads}")
        _check_num_query_heads(num_query_heads, num_heads)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready fields (a pair window as a list)."""
        d = dataclasses.asdict(self)
        if isinstance(d["local_blocks"], tuple):
            d["local_blocks"] = list(d["local_blocks"])
        return d

    @classmethod
    def from_options(cls, config: Optional["S2Config"], options: Dict[str, Any]) -> "S2Config":
        """``config``, or one built from keyword ``options`` (not both; unknown names are an error)."""
        if config is not None:
            if not isinstance(config, S2Config):
                raise TypeError(f"config must be an S2Config, got {type(config).__name__}")
            if options:
                raise TypeError(f"give config=S2Config(...) or pattern options, not both (got {sorted(options)})")
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown S2 option(s) {unknown}; the options are {sorted(names)}")
        return cls(**options)


_DEFAULT_CONFIG = S2Config()


def stride_residue(head: int, num_heads: int, vert_stride: int, homo_head: bool, head_sliding_offset: int,
                   *, num_query_heads: Optional[int] = None, kv_start_block: int = 0) -> int:
    """The residue ``r`` such that key block ``c`` is on head ``head``'s stride (absolute mode) iff
    ``c % vert_stride == r``, i.e. ``(kv_start_block + c + h_eff * step + head_sliding_offset) %
    vert_stride == 0`` with ``step = max(1, vert_stride // (num_query_heads or num_heads))``.

    >>> [stride_residue(h, 2, 4, False, 0) for h in range(2)]
    [0, 2]
    >>> [stride_residue(h, 2, 4, False, 0, num_query_heads=4) for h in range(2)]   # DKernel, GQA 4:2
    [0, 3]
    """
    step = max(1, vert_stride // (num_heads if num_query_heads is None else num_query_heads))
    return (-((0 if homo_head else head) * step + head_sliding_offset + kv_start_block)) % vert_stride


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


_BIG = 1 << 40  # a window bound past any block index: "keep everything in range"


def _runs(t_lo, t_hi, w_lo, w_hi, rho_pre, rho_post, runs, stride, width):
    """Counts and ascending indices of a set made of up to three runs, per item.

    All arguments but ``stride``/``width`` are int64 tensors broadcasting to ``[H, X]``. Item
    ``(h, x)`` keeps the targets ``t`` in ``[t_lo, t_hi]`` that are in the window
    ``[w_lo, w_hi]`` (may be empty, or ``(-_BIG, _BIG)``: everything), plus, where ``runs``,
    those before the window with ``t % stride == rho_pre`` and those after it (``t > w_hi`` and
    ``t >= w_lo``) with ``t % stride == rho_post``. Returns ``num [H, X]`` and ``idx [H, X, width]``
    (int32; slots past ``num`` are padding). ``width`` must bound every count.
    """
    pre_hi = torch.minimum(w_lo - 1, t_hi)
    first_pre = t_lo + (rho_pre - t_lo) % stride
    n_pre = torch.where(runs, ((pre_hi - first_pre) // stride + 1).clamp(min=0), 0)
    win_a = torch.maximum(w_lo, t_lo)
    n_win = (torch.minimum(w_hi, t_hi) - win_a + 1).clamp(min=0)
    post_lo = torch.maximum(torch.maximum(w_hi + 1, w_lo), t_lo)
    first_post = post_lo + (rho_post - post_lo) % stride
    n_post = torch.where(runs, ((t_hi - first_post) // stride + 1).clamp(min=0), 0)
    num = n_pre + n_win + n_post
    n_pre, n_win, num = torch.broadcast_tensors(n_pre, n_win, num)

    # slot j: run 1 (j < n_pre), the window, run 2; int32 and in place on the one [H, X, K]
    # temporary, since this is the big piece (8 heads x 2048 rows x 273 slots at 128k)
    cap = 1 << 30  # every start is >= t_lo >= 0; one past the targets only where its run is empty
    i32 = torch.int32
    j = torch.arange(width, device=num.device, dtype=i32)  # [K]
    n_pre3, n_win3 = n_pre.to(i32)[..., None], n_win.to(i32)[..., None]  # [H, X, 1]
    t = j - n_pre3  # [H, X, K] slot index relative to the window start
    in_pre, in_post = t < 0, t >= n_win3
    idx = t + win_a.clamp(max=cap).to(i32)[..., None]
    t.sub_(n_win3).mul_(stride).add_(first_post.clamp(max=cap).to(i32)[..., None])  # run 2 candidates
    idx = torch.where(in_post, t, idx)
    idx = torch.where(in_pre, first_pre.clamp(max=cap).to(i32)[..., None] + j * stride, idx)
    # padding slots hold anything; the caller clamps them into range
    return num.to(i32), idx


def _build(num_heads, seq_q, seq_k, bs, left, right, stride, homo, n_dense, offset, causal, relative, kv0,
           num_query_heads, h0, h1, device):
    """(kv_num, kv_idx, q_num, q_idx) straight from the formula, never an [Mq, Mk] mask.

    Per row the kept columns are three ascending runs (stride hits before the window, the
    window, stride hits after it), so each slot's index is closed-form. Per column the reading
    rows are the same kind of set: one contiguous range (absolute mode: the window's rows, or
    every row for a column on the head's stride), or in relative mode three runs again, the
    window ``[c - R + 1, c + L - 1]`` with the stride counted outwards from its edges.
    """
    dev = torch.device(device)
    mq, mk = ceil_div(seq_q, bs), ceil_div(seq_k, bs)
    shift = (seq_k - seq_q) // bs  # floor: i = r + shift for every row
    heads = torch.arange(h0, h1, device=dev, dtype=torch.int64)  # global head indices
    dense = (heads >= num_heads - n_dense)[:, None]  # [H, 1]
    # the window is [i - wl, i + wr]; with L = R = 0 it is empty, but in relative mode block i
    # itself scores max(0, 1) + max(0, 1) = 2, kept iff vert_stride divides 2: a window of one
    wl, wr = left - 1, right - 1
    if relative and left + right == 0 and 2 % stride == 0:
        wl = wr = 0
    c0 = torch.tensor([stride_residue(h, num_heads, stride, homo, offset, num_query_heads=num_query_heads,
                                      kv_start_block=kv0) for h in range(h0, h1)],
                      device=dev, dtype=torch.int64)[:, None]  # [H, 1] absolute mode's residues
    window_all = h1 > num_heads - n_dense  # some head keeps everything (known on the host: no sync)
    win_size = max(0, wl + wr + 1)

    # rows: item r (absolute block i), targets c in [0, Mk - 1] (causal: c <= i)
    i = torch.arange(mq, device=dev, dtype=torch.int64)[None, :] + shift  # [1, Mq]
    t_hi = i.clamp(max=mk - 1) if causal else torch.full_like(i, mk - 1)
    w_lo = torch.where(dense, -_BIG, i - wl)  # [H, Mq]
    w_hi = torch.where(dense, _BIG, i + wr)
    if relative:
        rho_pre, rho_post = (i - left + 1) % stride, (i + right - 1) % stride
    else:
        rho_pre = rho_post = c0
    width = mk if window_all else min(mk, ceil_div(mk, stride) + 1 + win_size)
    kv_num, kv_idx = _runs(torch.zeros_like(i), t_hi, w_lo, w_hi, rho_pre, rho_post, ~dense, stride, max(1, width))
    kv_idx.clamp_(0, mk - 1)

    def transposed():
        # columns: item c, targets r in [0, Mq - 1] (absolute row i = r + shift; causal: i >= c)
        c = torch.arange(mk, device=dev, dtype=torch.int64)[None, :]  # [1, Mk]
        lo = (c - shift).clamp(min=0) if causal else torch.zeros_like(c)
        hi = torch.full_like(c, mq - 1)
        cw_lo, cw_hi = c - wr - shift, c + wl - shift  # rows whose window holds c
        if not relative:  # one contiguous range: every row if c is on the head's stride, else the window's
            wide = dense | ((c - c0) % stride == 0)  # [H, Mk]
            r_lo = torch.where(wide, lo, torch.maximum(cw_lo, lo))
            r_hi = torch.where(wide, hi, torch.minimum(cw_hi, hi))
            q_num = (r_hi - r_lo + 1).clamp(min=0).to(torch.int32)
            # the widest piece (int32 from the start: Hl * Mk * Mq entries)
            r = torch.arange(mq, device=dev, dtype=torch.int32)
            q_idx = r_lo.to(torch.int32)[..., None] + r  # [H, Mk, Mq]
        else:  # rows i reading c by the stride: i = c - R + 1 - k V and i = c + L - 1 + k V
            q_num, q_idx = _runs(lo, hi, torch.where(dense, -_BIG, cw_lo), torch.where(dense, _BIG, cw_hi),
                                 (c - right + 1 - shift) % stride, (c + left - 1 - shift) % stride, ~dense,
                                 stride, max(1, mq if window_all else min(mq, ceil_div(mq, stride) + 1 + win_size)))
        q_idx.clamp_(0, mq - 1)
        return q_num[None], q_idx[None]

    return BlockSparseLayout._from_parts(kv_num[None], kv_idx[None], None, None, (bs, bs), seq_q, seq_k,
                                         q_builder=transposed)


def strided(
    num_heads: int,
    seq_q: int,
    seq_k: Optional[int] = None,
    *,
    block_size: int = 64,
    local_blocks: LocalBlocks = 16,
    vert_stride: int = 8,
    homo_head: bool = False,
    num_dense_heads: int = 0,
    head_sliding_offset: int = 0,
    causal: bool = True,
    vert_position_type: Optional[str] = None,
    kv_start_position: int = 0,
    num_query_heads: Optional[int] = None,
    active_head_range: Optional[Tuple[int, int]] = None,
    device: Device = None,
    config: Optional[S2Config] = None,
) -> BlockSparseLayout:
    """The S2-Attention layout ``[1, Hl, Mq, Mk]`` (see the module docstring for the rule), with
    ``Mq = ceil(seq_q / block_size)``, ``Mk = ceil(seq_k / block_size)``.

    Args:
        num_heads: heads the pattern is defined over; ``Hl = num_heads``. Pass the number of
            KV heads to share one layout across each GQA group (the usual choice: a KV head's
            shard is then what its cache must hold; add ``num_query_heads`` for DKernel's head
            step), or the query heads for one per head.
        seq_q, seq_k: query / key lengths (``seq_k`` defaults to ``seq_q``); queries are the
            last ``seq_q`` key positions (decode: ``seq_q = 1``).
        block_size: square block (16, 32, 64, 128).
        local_blocks: the local window in blocks, including the query's own block: an int ``L``
            (causal: ``L`` blocks back, ``R = 1``; not causal: ``L`` each side) or, when not
            causal, a pair ``(L, R)``: keep ``c`` with ``i - c < L`` and ``c - i < R``.
        vert_stride: keep one block in ``vert_stride`` outside the window.
        homo_head: all heads use the same stride offset (no sharding).
        num_dense_heads: the last this many heads attend to everything (causally if causal).
        head_sliding_offset: extra shift of the stride (0: DKernel training; 1: its vLLM port).
        causal: cut blocks after the query block.
        vert_position_type: ``"absolute"`` (per-head residues of absolute key blocks) or
            ``"relative"`` (the stride counted outwards from each row's window, no per-head
            shift); ``None`` picks DKernel's default, ``"absolute"`` when causal (what lets a
            decode cache drop blocks) and ``"relative"`` otherwise.
        kv_start_position: absolute token position of key 0, a multiple of ``block_size``
            (sequence chunks / parallel shards); the absolute stride uses key block
            ``kv_start_position // block_size + c``. Queries stay the last ``seq_q`` keys.
        num_query_heads: with a per-KV-head layout (``num_heads = Hkv``), the query heads
            ``Hq`` (a positive multiple of ``num_heads``): the head step becomes
            ``max(1, vert_stride // Hq)``, DKernel's rule. ``None``: ``vert_stride // num_heads``.
        active_head_range: ``(h0, h1)``: build only heads ``h0 .. h1 - 1`` (a tensor-parallel
            rank's heads); head indices in the rule stay global, ``Hl = h1 - h0``.
        device: where the layout lives.
        config: an :class:`S2Config` instead of the pattern options above (``block_size`` ..
            ``head_sliding_offset``, ``vert_position_type``, ``kv_start_position``), which must
            then stay at their defaults.

    Returns:
        A :class:`BlockSparseLayout` (``kv_num [1, Hl, Mq]``, ``kv_idx [1, Hl, Mq, K]`` with
        ``K ~ Mk / vert_stride + L + R``). Built from closed-form indices (no ``Mq x Mk`` mask)
        and cached per arguments: the pattern is static, so a model calls this every step for
        free. The transposed form (``q_idx [1, Hl, Mk, K']`` int32, for gradients) is made on
        first use, so inference never pays for it. Treat the layout as read-only.

    Raises:
        TypeError / ValueError naming the argument: non-int sizes, an unsupported block size,
        a pair ``local_blocks`` with ``causal=True``, ``num_query_heads`` not a multiple of
        ``num_heads``, ``kv_start_position`` not a non-negative multiple of ``block_size``, an
        unknown ``vert_position_type``, a bad ``active_head_range``.

    Example::

        >>> from sparse_attn import sparse_attention
        >>> layout = strided(4, 1000, block_size=64, local_blocks=2, vert_stride=4)
        >>> layout.shape
        (1, 4, 16, 16)
        >>> q = torch.randn(1, 8, 1000, 64); k = v = torch.randn(1, 4, 1000, 64)
        >>> out = sparse_attention(q, k, v, layout)        # GQA: heads 2g, 2g+1 use layout head g
        >>> kv_layout = strided(4, 1000, block_size=64, local_blocks=2, vert_stride=4, num_query_heads=8)
        >>> bidir = strided(4, 1000, block_size=64, local_blocks=(2, 1), vert_stride=4, causal=False)
    """
    options = dict(block_size=block_size, local_blocks=local_blocks, vert_stride=vert_stride,
                   homo_head=bool(homo_head), num_dense_heads=num_dense_heads, head_sliding_offset=head_sliding_offset,
                   vert_position_type=vert_position_type, kv_start_position=kv_start_position)
    if config is None:
        cfg = S2Config(**options)
    else:  # the keyword pattern options must then be left at their defaults
        changed = {k: v for k, v in options.items() if v != getattr(_DEFAULT_CONFIG, k)}
        cfg = S2Config.from_options(config, changed)
    seq_k = seq_q if seq_k is None else seq_k
    h0, h1 = _check(num_heads, seq_q, seq_k, cfg.block_size, cfg.vert_stride, cfg.num_dense_heads, active_head_range)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    left, right = cfg.window(causal)
    relative = cfg.position_type(causal) == "relative"
    cfg.check_heads(num_heads, num_query_heads)
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (num_heads, seq_q, seq_k, cfg.block_size, left, right, cfg.vert_stride, cfg.homo_head, cfg.num_dense_heads,
           cfg.head_sliding_offset, causal, relative, cfg.kv_start_position // cfg.block_size,
           num_query_heads, h0, h1, str(dev))
    if torch.compiler.is_compiling():  # traced into the graph: no Python-side cache for Dynamo to see
        return _build(*key)
    return layout_cache.get(key, lambda: _build(*key))


def strided_block_mask(num_heads: int, seq_q: int, seq_k: Optional[int] = None, **kwargs) -> torch.Tensor:
    """The boolean block mask ``[1, Hl, Mq, Mk]`` of :func:`strided` (same arguments)."""
    layout = strided(num_heads, seq_q, seq_k, **kwargs)
    return rows_to_mask(layout.kv_num, layout.kv_idx, layout.num_key_blocks)
