"""A decode KV cache for S2-Attention that keeps, per KV head, only the blocks that head reads.

With the S2 rule (see :mod:`sparse_attn.patterns.s2`; causal, absolute stride positions,
``num_heads = Hkv``: one pattern per KV head, shared by its GQA group), the token at position
``p`` (block ``i = p // block_size``) reads key block ``c <= i`` of KV head ``h`` iff
``i - c < local_blocks`` or ``c`` is on the head's stride,
``(c + h_eff * step + head_sliding_offset) % vert_stride == 0`` with DKernel's head step
``step = max(1, vert_stride // Hq)`` (``Hq = num_query_heads``). Decoding only
moves forward, so a block that leaves the window and is not on the stride is never read by that
head again: :class:`S2KVCache` drops it. What a head holds is exactly what its newest token
reads: its strided blocks (kept for good) and its last ``local_blocks`` blocks (a sliding window).

Storage (per layer), for the ``Hs = Hkv - num_dense_heads`` sharded heads::

    k_sparse [B, Hs, (N + 1) * bs, D]     slots 0 .. N-1: complete blocks, per head in its own order
                                          slot N: the current (newest, possibly partial) block
    k_dense  [B, num_dense_heads, max_seq_len, D]    dense heads keep everything, in order

``N`` is the most complete blocks any sharded head keeps at ``max_seq_len`` (heads differ by at
most one strided block, so the padding is small). Head ``h`` uses slots ``0 .. used_h - 1``
(always a prefix: when the current block completes it takes the slot of the block leaving the
window, or the next free slot if that block stays on the stride) and slot ``N``.

Decode runs through :func:`sparse_attn.sparse_decode` (:meth:`S2KVCache.attend`,
:meth:`S2KVCache.decode_args`): the store is the contiguous cache ``[B, Hs, (N + 1) * bs, D]``,
``cache_seqlens = N * bs + f`` (``f``: the current block's fill) and, per head, the block list
``kv_blocks = (kv_num, kv_idx)`` with ``kv_idx[h] = 0 .. used_h - 1``. The query then sits at
position ``N * bs + f - 1``, in slot ``N``, so the op's own-block rule adds the current block by
itself and its causal cut hides the slot's unwritten tail; complete blocks are always full, so
nothing else needs masking. Attention is a sum over a set of keys, so their order in the store
does not matter. The partial current block is why slot ``N`` is shared and last: every head is
at the same position, so the current block has the same fill ``f`` in every head (it is always
inside the window, ``local_blocks >= 1``). The dense heads are one more, dense, call over their
own store; the parts hold disjoint heads, so their outputs are concatenated head-wise.
(:meth:`S2KVCache.decode_parts` gives the same decode as ``sparse_attention`` calls with a layout
``[1, Hs, 1, N + 1]`` listing ``0 .. used_h - 1, N`` and ``causal=False``.)

Bookkeeping (which block sits in which slot) is host-side integer work that depends only on the
sequence length, never on tensor values: no device synchronisation (index tensors reach a CUDA
device by asynchronous copies from pinned memory; the decode block lists are computed on the
device in closed form). They are rebuilt once per block (only the length changes in between).
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..layout import BlockSparseLayout, ceil_div
from .s2 import S2Config, stride_residue

__all__ = ["S2KVCache", "S2DecodePart", "S2DecodeArgs"]

Device = Union[str, torch.device, None]


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _cache_config(num_kv_heads: int, num_query_heads: Optional[int], config: Optional[S2Config],
                  options: Dict[str, Any]) -> S2Config:
    """The pattern (``config`` or keyword options, :class:`S2Config`) and what a cache of it needs:
    a causal absolute pattern from position 0 with an int window holding the query's own block."""
    _check_int("num_kv_heads", num_kv_heads, 1)
    cfg = S2Config.from_options(config, options)
    cfg.check_heads(num_kv_heads, num_query_heads)
    if not isinstance(cfg.local_blocks, int) or cfg.local_blocks < 1:
        raise ValueError(f"S2KVCache needs local_blocks to be an int >= 1 (the window holds the query's own "
                         f"block), got {cfg.local_blocks!r}")
    if cfg.position_type(True) != "absolute" or cfg.kv_start_position:
        raise ValueError("S2KVCache keeps the causal absolute pattern from position 0 (vert_position_type "
                         "'absolute' or None, kv_start_position 0)")
    return cfg


def _stride_residues(num_kv_heads: int, vert_stride: int, homo_head: bool, num_dense_heads: int,
                     head_sliding_offset: int, num_query_heads: Optional[int] = None) -> List[int]:
    """Per sharded head ``h``: the residue ``r_h`` with ``c`` on the stride iff ``c % V == r_h``
    (head step from ``num_query_heads``; ``None``: ``Hq = Hkv``)."""
    return [stride_residue(h, num_kv_heads, vert_stride, homo_head, head_sliding_offset,
                           num_query_heads=num_query_heads or num_kv_heads)
            for h in range(num_kv_heads - num_dense_heads)]


def _strided_before(k: int, r: int, v: int) -> int:
    """How many ``c`` in ``[0, k)`` have ``c % v == r`` (``0 <= r < v``)."""
    return max(0, ceil_div(k - r, v))


class S2DecodePart(NamedTuple):
    """One ``sparse_attention`` call of a decode step: the KV heads ``kv_heads = (h0, h1)``
    (query heads ``h0 * G .. h1 * G - 1`` with ``G = Hq // Hkv``), their keys and values
    ``[B, h1 - h0, Sk, D]`` and the layout (``None``: dense). Call it with ``causal=False``."""

    kv_heads: Tuple[int, int]
    k: Tensor
    v: Tensor
    layout: Optional[BlockSparseLayout]


class S2DecodeArgs(NamedTuple):
    """One :func:`~sparse_attn.sparse_decode` call of a decode step: the KV heads ``kv_heads =
    (h0, h1)`` (query heads ``h0 * G .. h1 * G - 1``), their contiguous store ``k_cache``,
    ``v_cache [B, h1 - h0, S_max, D]``, ``cache_seqlens [B]`` int32 and ``kv_blocks``
    (``(kv_num [B, h1 - h0], kv_idx [B, h1 - h0, W])``, int32, ascending; None: dense) in blocks of
    ``block_size``. Call ``sparse_decode(q_part, *args[1:4], kv_blocks=..., block_size=...)``
    or use :meth:`S2KVCache.attend`."""

    kv_heads: Tuple[int, int]
    k_cache: Tensor
    v_cache: Tensor
    cache_seqlens: Tensor
    kv_blocks: Optional[Tuple[Tensor, Tensor]]
    block_size: int


class _SlotTable:
    """Host-side map, per sharded head, from kept complete blocks to storage slots."""

    def __init__(self, residues: Sequence[int], local_blocks: int, vert_stride: int) -> None:
        self.residues = list(residues)
        self.local_blocks = local_blocks
        self.vert_stride = vert_stride
        self.slot_of: List[Dict[int, int]] = [{} for _ in self.residues]
        self.current = -1  # block of the newest token; -1 while empty

    def advance(self) -> List[Tuple[int, int, int]]:
        """The next token starts block ``current + 1``: the current block becomes complete and
        block ``current + 1 - local_blocks`` leaves the window. Returns the ``(head, block,
        slot)`` moves of the completed block (none for heads that drop it)."""
        c, moves = self.current, []
        if c >= 0:
            leaving = c + 1 - self.local_blocks
            for h, (res, slots) in enumerate(zip(self.residues, self.slot_of)):
                if leaving >= 0 and leaving % self.vert_stride != res:
                    if leaving == c:  # window of one block: the completed block itself goes
                        continue
                    slot = slots.pop(leaving)  # its slot is free exactly when c needs one
                else:
                    slot = len(slots)
                slots[c] = slot
                moves.append((h, c, slot))
        self.current = c + 1
        return moves

    def used(self) -> List[int]:
        return [len(s) for s in self.slot_of]


class S2KVCache:
    """Per-layer decode KV cache for S2-Attention storing only each KV head's shard.

    The pattern is :func:`~sparse_attn.patterns.strided` with ``num_heads = num_kv_heads``
    (shared by each GQA group) and ``num_query_heads = Hq``: DKernel's rule for GQA models,
    whose head step is ``max(1, vert_stride // Hq)`` (``num_query_heads=None`` means
    ``Hq = Hkv``, no GQA, where both rules agree; a GQA model must pass its query heads, and
    :meth:`attend` refuses queries with another head count). Decoding the token at the last
    position with :meth:`attend` (or the parts of :meth:`decode_parts`) gives the same result as
    ``sparse_attention(q, k_full, v_full, strided(num_kv_heads, 1, seq_len, ...,
    num_query_heads=Hq))`` on the full cache, while the storage holds only the blocks that can
    still be read. All batch rows share one length. See the module docstring for the storage and
    the partial last block. (A per-query-head pattern, e.g. ``strided(Hq, ...)`` as Phi-3-small's
    vLLM port builds it, or ``vert_position_type="relative"``, cannot be compacted this way.)

    Memory (closed form, per KV head, at ``n`` tokens): with ``M = ceil(n / bs)`` blocks,
    ``W = min(L - 1, M - 1)`` complete window blocks, ``K = max(0, M - L)`` blocks before the
    window and ``S_h = max(0, ceil((K - r_h) / V))`` of them on head ``h``'s stride
    (``r_h = -(h_eff * step + head_sliding_offset) mod V``, ``step = max(1, V // Hq)``), a sharded head keeps
    ``W + S_h + 1`` blocks and a dense head ``M``. The cache allocates, per sharded head,
    ``N + 1`` block slots with ``N = W + max_h S_h``, and ``n`` tokens per dense head, so::

        ratio(n) = (Hs * (N + 1) * bs + num_dense_heads * n) / (Hkv * n)
                 -> (Hs / V + num_dense_heads) / Hkv       as n grows

    (:meth:`memory_ratio`). For short sequences (``n < L * bs``) the window is everything and
    padding to whole blocks can make the ratio exceed 1.

    Args:
        batch, num_kv_heads, head_dim: ``B``, ``Hkv``, ``D`` of the K/V tensors it stores.
        config / pattern options: the S2 pattern, an :class:`~sparse_attn.patterns.s2.S2Config`
            or its fields as keywords (``block_size``, ``local_blocks``, ``vert_stride``,
            ``homo_head``, ``num_dense_heads``, ``head_sliding_offset``; defaults 64, 16, 8,
            False, 0, 0), as in :func:`~sparse_attn.patterns.strided`; causal and absolute, with
            ``local_blocks >= 1`` (the window must hold the current block). Kept as ``.config``.
        num_query_heads: ``Hq``, the query heads of the model (a multiple of ``num_kv_heads``);
            sets the head step as DKernel does. ``None``: ``Hq = num_kv_heads``.
        max_seq_len: capacity in tokens (prompt + generated); storage is allocated up front.
        dtype, device: of the storage (zero-initialised).

    Example::

        >>> from sparse_attn import sparse_decode
        >>> cache = S2KVCache(1, 2, 64, block_size=16, local_blocks=2, vert_stride=4, max_seq_len=512,
        ...                   num_query_heads=8)
        >>> k = v = torch.randn(1, 2, 300, 64)
        >>> cache.prefill(k, v)                                   # keeps only each head's shard
        >>> cache.append(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))   # the new token
        >>> q = torch.randn(1, 8, 1, 64)                          # its query, GQA 4:1
        >>> out = cache.attend(q)                                 # [1, 8, 1, 64], through sparse_decode
        >>> (part,) = cache.decode_args()                         # or call the op yourself
        >>> torch.allclose(out, sparse_decode(q, part.k_cache, part.v_cache, part.cache_seqlens,
        ...                                   kv_blocks=part.kv_blocks, block_size=part.block_size))
        True
        >>> int(part.cache_seqlens[0]), cache.seq_len, cache.memory_bytes() / cache.full_cache_bytes()
        (157, 301, 0.3125)
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        max_seq_len: int,
        num_query_heads: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device: Device = None,
        config: Optional[S2Config] = None,
        **pattern_options: Any,
    ) -> None:
        _check_int("batch", batch, 1)
        _check_int("head_dim", head_dim, 1)
        _check_int("max_seq_len", max_seq_len, 1)
        cfg = _cache_config(num_kv_heads, num_query_heads, config, pattern_options)
        block_size, local_blocks, vert_stride = cfg.block_size, cfg.local_blocks, cfg.vert_stride
        homo_head, num_dense_heads, head_sliding_offset = cfg.homo_head, cfg.num_dense_heads, cfg.head_sliding_offset
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.config = cfg
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.block_size, self.local_blocks, self.vert_stride = block_size, local_blocks, vert_stride
        self.homo_head, self.num_dense_heads = bool(homo_head), num_dense_heads
        self.head_sliding_offset, self.max_seq_len = head_sliding_offset, max_seq_len
        self.num_query_heads = num_kv_heads if num_query_heads is None else num_query_heads
        self.dtype = dtype
        self.num_sparse_heads = num_kv_heads - num_dense_heads
        self._residues = _stride_residues(num_kv_heads, vert_stride, self.homo_head, num_dense_heads,
                                          head_sliding_offset, self.num_query_heads)
        self.num_slots = self._complete_slots(max_seq_len)  # N; slot N holds the current block
        self._k_s, self._v_s, self._k_d, self._v_d = self._storage(
            batch, self.num_slots, max_seq_len, torch.device("cpu" if device is None else device))
        self.device = self._k_d.device  # normalised ("cuda" -> "cuda:0")
        self.reset()

    def _storage(self, batch: int, num_slots: int, max_seq_len: int, device) -> Tuple[Tensor, ...]:
        """Zeroed ``(k_s, v_s, k_d, v_d)``. Zeros, not empty: ``decode_parts``' layouts make the
        reference backend multiply unused slots by probability 0 (``attend`` never reads them)."""
        opts = dict(dtype=self.dtype, device=device)
        hs, nd, bs, d = self.num_sparse_heads, self.num_dense_heads, self.block_size, self.head_dim
        k_s = torch.zeros(batch, hs, (num_slots + 1) * bs, d, **opts)
        k_d = torch.zeros(batch, nd, max_seq_len, d, **opts)
        return k_s, torch.zeros_like(k_s), k_d, torch.zeros_like(k_d)

    # -- sizes -----------------------------------------------------------------------------------
    def _complete_slots(self, n: int) -> int:
        if not self._residues:
            return 0
        m = ceil_div(n, self.block_size)
        before = max(0, m - self.local_blocks)
        return min(self.local_blocks - 1, m - 1) + max(_strided_before(before, r, self.vert_stride)
                                                      for r in self._residues)

    @staticmethod
    def kept_blocks(seq_len: int, num_kv_heads: int, *, num_query_heads: Optional[int] = None,
                    config: Optional[S2Config] = None, **pattern_options: Any) -> List[int]:
        """Per KV head, the key blocks the token at position ``seq_len - 1`` reads, which is
        what the cache keeps for that head after ``seq_len`` tokens (closed form, see the class
        docstring; no tensors). Arguments as in the constructor.

        Example::

            >>> S2KVCache.kept_blocks(32768, 8, block_size=64, local_blocks=16, vert_stride=8, num_query_heads=32)
            [78, 78, 78, 78, 78, 78, 78, 78]
        """
        _check_int("seq_len", seq_len, 1)
        cfg = _cache_config(num_kv_heads, num_query_heads, config, pattern_options)
        block_size, local_blocks, vert_stride = cfg.block_size, cfg.local_blocks, cfg.vert_stride
        homo_head, num_dense_heads, head_sliding_offset = cfg.homo_head, cfg.num_dense_heads, cfg.head_sliding_offset
        m = ceil_div(seq_len, block_size)
        window, before = min(local_blocks, m), max(0, m - local_blocks)
        residues = _stride_residues(num_kv_heads, vert_stride, bool(homo_head), num_dense_heads,
                                    head_sliding_offset, num_query_heads)
        return [window + _strided_before(before, r, vert_stride) for r in residues] + [m] * num_dense_heads

    @staticmethod
    def memory_ratio(seq_len: int, num_kv_heads: int, *, num_query_heads: Optional[int] = None,
                     config: Optional[S2Config] = None, **pattern_options: Any) -> float:
        """Bytes an ``S2KVCache(max_seq_len=seq_len)`` allocates over those of a full cache of
        ``seq_len`` tokens (the class docstring's ``ratio(n)``; nothing is allocated).

        Example (a per-KV-head S2 layer with Phi-3-small's sizes: block 64, 16 local blocks,
        stride 8, 32 query / 8 KV heads; not Phi-3-small's own per-query-head pattern)::

            >>> S2KVCache.memory_ratio(32768, 8, block_size=64, local_blocks=16, vert_stride=8, num_query_heads=32)
            0.15234375
        """
        cfg = _cache_config(num_kv_heads, num_query_heads, config, pattern_options)
        kept = S2KVCache.kept_blocks(seq_len, num_kv_heads, num_query_heads=num_query_heads, config=cfg)
        num_dense_heads, block_size = cfg.num_dense_heads, cfg.block_size
        sparse = kept[: num_kv_heads - num_dense_heads]
        tokens = len(sparse) * max(sparse, default=0) * block_size + num_dense_heads * seq_len
        return tokens / (num_kv_heads * seq_len)

    def memory_bytes(self) -> int:
        """Bytes of K and V storage this cache holds (allocated for ``max_seq_len``)."""
        return sum(t.numel() * t.element_size() for t in (self._k_s, self._v_s, self._k_d, self._v_d))

    def full_cache_bytes(self) -> int:
        """Bytes a full K and V cache of ``max_seq_len`` tokens (same B, Hkv, D, dtype) takes."""
        itemsize = self._k_d.element_size()
        return 2 * self.batch * self.num_kv_heads * self.max_seq_len * self.head_dim * itemsize

    @property
    def seq_len(self) -> int:
        """Tokens stored so far (prompt + appended)."""
        return self._n

    # -- writing ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every token (the storage is reused; stale values are never read)."""
        self._n = 0
        self._table = _SlotTable(self._residues, self.local_blocks, self.vert_stride)
        self._forget_index_tensors()

    def _forget_index_tensors(self) -> None:
        self._layout_cache: Optional[Tuple[int, BlockSparseLayout]] = None
        self._blocks_cache: Optional[Tuple[int, Tuple[Tensor, Tensor]]] = None
        self._residues_dev: Optional[Tensor] = None

    def reserve(self, max_seq_len: int) -> None:
        """Grow the capacity to ``max_seq_len`` tokens (no-op if it is not larger), keeping what is
        stored: one copy of the stored tokens into storage sized for the new capacity (a caller
        that does not know the final length can grow geometrically)."""
        _check_int("max_seq_len", max_seq_len, 1)
        if max_seq_len <= self.max_seq_len:
            return
        slots = self._complete_slots(max_seq_len)  # never fewer: N grows with the length
        k_s, v_s, k_d, v_d = self._storage(self.batch, slots, max_seq_len, self.device)
        bs, old, n = self.block_size, self.num_slots, self._n
        for new_t, old_t in ((k_s, self._k_s), (v_s, self._v_s)):
            if old_t.shape[1]:
                new_t[:, :, : old * bs] = old_t[:, :, : old * bs]  # complete blocks keep their slots
                new_t[:, :, slots * bs:] = old_t[:, :, old * bs:]  # the current block stays last
        for new_t, old_t in ((k_d, self._k_d), (v_d, self._v_d)):
            new_t[:, :, :n] = old_t[:, :, :n]
        self._k_s, self._v_s, self._k_d, self._v_d = k_s, v_s, k_d, v_d
        self.num_slots, self.max_seq_len = slots, max_seq_len
        self._forget_index_tensors()

    def select_batch(self, indices: Tensor) -> None:
        """Keep the batch rows ``indices`` (1-D integer tensor, repeats allowed; beam search's
        reordering). Every row shares the slot table, so only the storage is gathered."""
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point:
            raise TypeError("indices must be a 1-D integer tensor")
        idx = indices.to(self.device)
        self._k_s, self._v_s, self._k_d, self._v_d = (t.index_select(0, idx).contiguous()
                                                      for t in (self._k_s, self._v_s, self._k_d, self._v_d))
        self.batch = int(indices.shape[0])
        self._forget_index_tensors()

    def repeat_batch(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (``repeat_interleave`` order)."""
        _check_int("repeats", repeats, 1)
        self.select_batch(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    def prefill(self, k: Tensor, v: Tensor) -> None:
        """Store a prompt's keys and values ``[B, Hkv, S, D]`` in an empty cache (only the
        blocks the last prompt token reads are kept). Same as :meth:`append` on an empty cache."""
        if self._n:
            raise ValueError(f"prefill needs an empty cache, this one holds {self._n} tokens; call reset() first")
        self.append(k, v)

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add ``t >= 1`` tokens' keys and values ``[B, Hkv, t, D]`` (any strides), evicting the
        blocks no head can read any more. Costs one copy of the kept new blocks, plus one
        block per head for each block boundary crossed."""
        self._check_kv(k, v)
        t = k.shape[2]
        n0, n1, hs = self._n, self._n + t, self.num_sparse_heads
        if n1 > self.max_seq_len:
            raise ValueError(f"k: appending {t} tokens to {n0} exceeds max_seq_len={self.max_seq_len}")
        if self.num_dense_heads:
            self._k_d[:, :, n0:n1] = k[:, hs:]
            self._v_d[:, :, n0:n1] = v[:, hs:]
        if hs:
            self._append_sparse(k[:, :hs], v[:, :hs], n0, n1)
        self._n = n1

    def _append_sparse(self, k: Tensor, v: Tensor, n0: int, n1: int) -> None:
        bs, cur = self.block_size, self.num_slots
        table = self._table
        old, new = table.current, (n1 - 1) // bs
        moves: List[Tuple[int, int, int]] = []
        for _ in range(new - old):
            moves += table.advance()
        # Only moves still in place at the end (a block completed and evicted within this call,
        # or one whose slot was taken over, is never written).
        final = [(h, c, s) for h, c, s in moves if table.slot_of[h].get(c) == s]
        k5 = self._k_s.view(self.batch, self.num_sparse_heads, cur + 1, bs, self.head_dim)
        v5 = self._v_s.view_as(k5)
        fill = n0 - old * bs if n0 else 0  # tokens of block `old` already in the current slot
        head_tokens = min(n1, (old + 1) * bs) - n0 if n0 else 0
        if head_tokens > 0:  # 1. the rest of the old current block
            for store, src in ((k5, k), (v5, v)):
                store[:, :, cur, fill:fill + head_tokens] = src[:, :, :head_tokens]
        if n0 and new > old:  # 2. the old current block completed: slot `cur` -> its slot
            hs_, ss = self._index([(h, s) for h, c, s in final if c == old])
            if hs_ is not None:
                for store in (k5, v5):
                    store[:, hs_, ss] = store[:, hs_, cur]
        rest = [(h, c, s) for h, c, s in final if c != old or not n0]
        if rest:  # 3. complete blocks made of new tokens only, straight to their slots
            hs_, ss = self._index([(h, s) for h, _, s in rest])
            blocks = torch.tensor([c for _, c, _ in rest], dtype=torch.long)
            tok = self._upload(blocks[:, None] * bs - n0 + torch.arange(bs)[None, :])  # [P, bs]
            for store, src in ((k5, k), (v5, v)):
                store[:, hs_, ss] = src[:, hs_[:, None], tok]
        if new > old:  # 4. the new current block (new tokens only)
            start = new * bs - n0
            for store, src in ((k5, k), (v5, v)):
                store[:, :, cur, : n1 - new * bs] = src[:, :, start:]

    def _upload(self, t: Tensor) -> Tensor:
        """A host-built index tensor on the cache's device; on CUDA through pinned memory and an
        asynchronous copy, so the host never waits for the device (a pageable copy would)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _index(self, pairs: List[Tuple[int, int]]):
        if not pairs:
            return None, None
        t = self._upload(torch.tensor(pairs, dtype=torch.long))
        return t[:, 0], t[:, 1]

    def _check_kv(self, k: Tensor, v: Tensor) -> None:
        want = (self.batch, self.num_kv_heads)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            if t.dim() != 4 or tuple(t.shape[:2]) != want or t.shape[3] != self.head_dim or t.shape[2] < 1:
                raise ValueError(f"{name} must be [B={want[0]}, Hkv={want[1]}, t>=1, D={self.head_dim}], "
                                 f"got {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")

    # -- reading ---------------------------------------------------------------------------------
    def block_table(self) -> List[List[int]]:
        """Per KV head, the original indices of the key blocks it stores, in storage order (for
        a sharded head: slots ``0 .. used_h - 1``, then the current block; dense heads: all)."""
        cur = (self._n - 1) // self.block_size if self._n else -1
        out = []
        for slots in self._table.slot_of:
            order = sorted(slots, key=slots.get)
            out.append(order + ([cur] if cur >= 0 else []))
        return out + [list(range(cur + 1)) for _ in range(self.num_dense_heads)]

    def _sparse_layout(self) -> BlockSparseLayout:
        """The layout ``[1, Hs, 1, N + 1]`` over the compacted storage (rebuilt once per block)."""
        cur_block, n, bs, slots = self._table.current, self._n, self.block_size, self.num_slots
        seq_k = slots * bs + (n - cur_block * bs)
        if self._layout_cache is None or self._layout_cache[0] != cur_block:
            used = self._table.used()
            hs, mk = len(used), slots + 1
            kv_num = torch.tensor(used, dtype=torch.int32) + 1
            kv_idx = torch.zeros(hs, max(used) + 1, dtype=torch.int32)
            q_num = torch.zeros(hs, mk, dtype=torch.int32)
            for h, u in enumerate(used):
                kv_idx[h, :u] = torch.arange(u, dtype=torch.int32)
                kv_idx[h, u] = slots
                q_num[h, :u] = 1
            q_num[:, slots] = 1
            q_idx = torch.zeros(hs, mk, 1, dtype=torch.int32)  # the single query block row
            parts = [x[None].to(self.device) for x in (kv_num[:, None], kv_idx[:, None], q_num, q_idx)]
            self._layout_cache = (cur_block, BlockSparseLayout._from_parts(*parts, (bs, bs), 1, seq_k))
        base = self._layout_cache[1]
        return BlockSparseLayout._from_parts(base.kv_num, base.kv_idx, base.q_num, base.q_idx, (bs, bs), 1, seq_k)

    def decode_parts(self) -> List[S2DecodePart]:
        """The ``sparse_attention`` calls that decode the query at the last stored position:
        the sharded heads over the compacted storage with its layout, and (if any) the dense
        heads over their full history with no layout. Call each with ``causal=False``.

        Example::

            >>> for part in cache.decode_parts():
            ...     h0, h1 = part.kv_heads
            ...     out[:, h0 * g:h1 * g] = sparse_attention(q[:, h0 * g:h1 * g], part.k, part.v,
            ...                                              part.layout, causal=False)
        """
        if self._n == 0:
            raise ValueError("the cache is empty: prefill() or append() first")
        parts, hs, n = [], self.num_sparse_heads, self._n
        if hs:
            sk = self.num_slots * self.block_size + (n - self._table.current * self.block_size)
            parts.append(S2DecodePart((0, hs), self._k_s[:, :, :sk], self._v_s[:, :, :sk], self._sparse_layout()))
        if self.num_dense_heads:
            parts.append(S2DecodePart((hs, self.num_kv_heads), self._k_d[:, :, :n], self._v_d[:, :, :n], None))
        return parts

    def _sparse_blocks(self) -> Tuple[Tensor, Tensor]:
        """``(kv_num [B, Hs], kv_idx [B, Hs, W])`` int32 over the compacted store: head ``h`` lists
        slots ``0 .. used_h - 1`` (the current block, slot ``N``, is the query's own block and
        needs no entry). Rebuilt once per block; expanded (stride 0) over the batch."""
        cur = self._table.current
        if self._blocks_cache is None or self._blocks_cache[0] != cur:
            # used_h in closed form on the device (the class docstring's W + S_h at M = cur + 1
            # blocks): Python ints and one residue tensor, so nothing is copied from the host
            m, local, stride = cur + 1, self.local_blocks, self.vert_stride
            if self._residues_dev is None:
                self._residues_dev = self._upload(torch.tensor(self._residues, dtype=torch.int64))
            before = max(0, m - local)
            strided = torch.div(before - self._residues_dev + (stride - 1), stride, rounding_mode="floor").clamp(min=0)
            kv_num = (strided + (min(local, m) - 1)).to(torch.int32)
            width = max(1, min(local, m) - 1 + max(_strided_before(before, r, stride) for r in self._residues))
            kv_idx = torch.arange(width, dtype=torch.int32, device=self.device)
            self._blocks_cache = (cur, (kv_num, kv_idx))
        kv_num, kv_idx = self._blocks_cache[1]
        hs = self.num_sparse_heads
        return kv_num[None].expand(self.batch, hs), kv_idx[None, None].expand(self.batch, hs, kv_idx.shape[0])

    def decode_args(self) -> List[S2DecodeArgs]:
        """The :func:`~sparse_attn.sparse_decode` calls that decode the query at the last stored
        position (what :meth:`attend` runs): the sharded heads over their compacted store (length
        ``N * bs + f``, ``f`` the current block's fill, so the query is in slot ``N`` and its own
        block is that slot; the block list names the complete blocks it keeps) and, if any, the dense
        heads over their history with no list. No host synchronisation (the lists are rebuilt on
        the host once per block, from the sequence length only).

        Example::

            >>> for part in cache.decode_args():
            ...     h0, h1 = part.kv_heads
            ...     out[:, h0 * g:h1 * g] = sparse_decode(q[:, h0 * g:h1 * g], part.k_cache, part.v_cache,
            ...                                           part.cache_seqlens, kv_blocks=part.kv_blocks,
            ...                                           block_size=part.block_size)
        """
        if self._n == 0:
            raise ValueError("the cache is empty: prefill() or append() first")
        parts, hs, n, bs = [], self.num_sparse_heads, self._n, self.block_size
        if hs:
            length = self.num_slots * bs + (n - self._table.current * bs)
            lens = torch.full((self.batch,), length, dtype=torch.int32, device=self.device)
            parts.append(S2DecodeArgs((0, hs), self._k_s, self._v_s, lens, self._sparse_blocks(), bs))
        if self.num_dense_heads:
            lens = torch.full((self.batch,), n, dtype=torch.int32, device=self.device)
            parts.append(S2DecodeArgs((hs, self.num_kv_heads), self._k_d, self._v_d, lens, None, bs))
        return parts

    def decode_inputs(self) -> Tuple[Tensor, Tensor, Optional[BlockSparseLayout]]:
        """``(k_c [B, Hkv, Sk_c, D], v_c, layout)`` for ``sparse_attention(q, k_c, v_c, layout,
        causal=False)`` with ``q [B, Hq, 1, D]`` the query at the last stored position. One call
        serves every head only without dense heads (their history is stored apart); with
        ``num_dense_heads > 0`` use :meth:`decode_parts` or :meth:`attend`.

        Example::

            >>> k_c, v_c, layout = cache.decode_inputs()
            >>> out = sparse_attention(q, k_c, v_c, layout, causal=False)     # [B, Hq, 1, D]
        """
        parts = self.decode_parts()
        if len(parts) != 1:
            raise ValueError(f"decode_inputs() serves one call, but num_dense_heads={self.num_dense_heads} heads "
                             "are stored apart from the sharded ones: use decode_parts() or attend()")
        return parts[0].k, parts[0].v, parts[0].layout

    def attend(self, q: Tensor, *, scale: Optional[float] = None, backend: str = "auto",
               return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """Attention of the query at the last stored position over this cache, through
        :func:`~sparse_attn.sparse_decode` (the calls of :meth:`decode_args`; inference only).

        Args:
            q: ``[B, Hq, 1, D]`` with ``Hq = num_query_heads`` (query head ``h`` reads KV head
                ``h // (Hq // Hkv)``), in the cache's dtype and device.
            scale, backend, return_lse: as in :func:`~sparse_attn.sparse_decode`.

        Returns:
            ``out [B, Hq, 1, D]`` (and ``lse [B, Hq, 1]`` with ``return_lse``), equal to
            ``sparse_attention(q, k_full, v_full, strided(Hkv, 1, seq_len, ..., num_query_heads=Hq))``.

        Example::

            >>> cache.append(k_new, v_new)            # [B, Hkv, 1, D]: the token being decoded
            >>> out = cache.attend(q_new)             # [B, Hq, 1, D]
        """
        from ..decode import sparse_decode

        if not isinstance(q, Tensor):
            raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dim() != 4 or q.shape[0] != self.batch or q.shape[2] != 1 or q.shape[3] != self.head_dim:
            raise ValueError(f"q must be [B={self.batch}, Hq, 1, D={self.head_dim}] (one query: the last "
                             f"stored position), got {tuple(q.shape)}")
        if q.shape[1] % self.num_kv_heads:
            raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if q.shape[1] != self.num_query_heads:
            raise ValueError(f"q has {q.shape[1]} heads but this cache's pattern was built for num_query_heads="
                             f"{self.num_query_heads} (the stride's head step depends on it): construct the "
                             f"cache with num_query_heads={q.shape[1]}")
        g = q.shape[1] // self.num_kv_heads
        outs, lses = [], []
        for part in self.decode_args():
            h0, h1 = part.kv_heads
            o, lse = sparse_decode(q[:, h0 * g:h1 * g], part.k_cache, part.v_cache, part.cache_seqlens,
                                   kv_blocks=part.kv_blocks, block_size=part.block_size, scale=scale,
                                   return_lse=True, backend=backend)
            outs.append(o)
            lses.append(lse)
        out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 1), torch.cat(lses, 1))
        return (out, lse) if return_lse else out

    def __repr__(self) -> str:
        return (f"S2KVCache(B={self.batch}, Hkv={self.num_kv_heads}, D={self.head_dim}, "
                f"block_size={self.block_size}, local_blocks={self.local_blocks}, vert_stride={self.vert_stride}, "
                f"num_query_heads={self.num_query_heads}, homo_head={self.homo_head}, "
                f"num_dense_heads={self.num_dense_heads}, "
                f"head_sliding_offset={self.head_sliding_offset}, seq_len={self._n}/{self.max_seq_len}, "
                f"slots={self.num_slots + 1})")
