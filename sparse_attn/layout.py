"""The block-sparse layout: which (query block, key block) pairs are computed.

Pure PyTorch, no Triton import, runs on any device. A layout is built on the
device of its input without host synchronisation (no ``.item()``, ``.cpu()`` or
data-dependent shapes), so it can be produced inside a CUDA graph or a
``torch.compile`` region.

Format (like FlexAttention's ``BlockMask``), per (batch, head, query block):

* ``kv_num [Bl, Hl, Mq]`` int32 -- how many key blocks the query block sees;
* ``kv_idx [Bl, Hl, Mq, Mk]`` int32 -- those key-block indices, ascending, in the
  first ``kv_num`` slots (the rest are padding and never read);

and the transposed form used by the dK/dV pass, per key block (built on first
access, so inference never makes it; ``sparse_attention`` asks for it only when a
gradient can flow):

* ``q_num [Bl, Hl, Mk]``, ``q_idx [Bl, Hl, Mk, Mq]``.

``Bl`` is 1 (shared by the batch) or ``B``; ``Hl`` is 1, ``Hkv`` (shared by the
query heads of a GQA group: query head ``h`` uses layout head ``h // (Hq // Hkv)``)
or ``Hq``. Query block ``r`` covers query rows ``[r*bq, (r+1)*bq)`` and key block
``c`` covers keys ``[c*bk, (c+1)*bk)``; the last block of each may be partial.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = ["BlockSparseLayout", "SUPPORTED_BLOCK_SIZES", "compress_block_mask"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

BlockSize = Union[int, Sequence[int]]


def _as_int(value, name: str) -> int:
    """``value`` as an int if it is an integer (numpy integers included; not bool, not float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def parse_block_size(block_size: BlockSize) -> Tuple[int, int]:
    if isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool):
        pair = (int(block_size), int(block_size))
    else:
        try:
            pair = tuple(_as_int(b, "block_size") for b in block_size)
        except TypeError:
            raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}") from None
        if len(pair) != 2:
            raise ValueError(f"block_size must be an int or a pair (bq, bk), got {block_size!r}")
    for b in pair:
        if b not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size entries must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    return pair  # type: ignore[return-value]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def seq_lengths(seq_q, seq_k, bq: int, bk: int, mq: int, mk: int, what: str) -> Tuple[int, int]:
    """Sequence lengths (default: whole blocks), checked against the ``mq x mk`` block grid."""
    seq_q = mq * bq if seq_q is None else _as_int(seq_q, "seq_q")
    seq_k = mk * bk if seq_k is None else _as_int(seq_k, "seq_k")
    if seq_q < 0 or seq_k < 0:
        raise ValueError(f"seq_q and seq_k must be >= 0, got seq_q={seq_q}, seq_k={seq_k}")
    if ceil_div(seq_q, bq) != mq:
        raise ValueError(f"seq_q={seq_q} needs {ceil_div(seq_q, bq)} query blocks of {bq}, {what} has Mq={mq}")
    if ceil_div(seq_k, bk) != mk:
        raise ValueError(f"seq_k={seq_k} needs {ceil_div(seq_k, bk)} key blocks of {bk}, {what} has Mk={mk}")
    return seq_q, seq_k


def compress_block_mask(block_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bool [..., M, N] -> (counts int32 [..., M], ascending kept indices int32 [..., M, N]).

    A stable sort of ``~mask`` puts the kept columns first, in ascending order,
    with a static output shape, so no host synchronisation is needed.
    """
    num = block_mask.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def rows_to_mask(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(counts [..., M], indices [..., M, K]) -> bool mask [..., M, n_cols].

    Padding slots (position >= count) are ignored whatever they hold, and so is an index outside
    ``[0, n_cols)`` (an unchecked layout's garbage names no block; it is never moved onto a real one).
    """
    slots = torch.arange(idx.shape[-1], device=idx.device)
    valid = (slots < num.unsqueeze(-1)) & (idx >= 0) & (idx < n_cols)
    target = idx.long().clamp(0, max(n_cols - 1, 0))
    hits = torch.zeros(*idx.shape[:-1], n_cols, dtype=torch.int32, device=idx.device)
    hits.scatter_add_(-1, target, valid.to(torch.int32))
    return hits > 0


class BlockSparseLayout:
    """Which blocks of the attention matrix are computed.

    Build one with :meth:`from_block_mask` (a boolean ``[Bl, Hl, Mq, Mk]`` block mask)
    or with the constructor (counts + ascending indices). Both forms (rows for the
    forward and dQ, columns for dK/dV) are kept on the device.

    Example::

        >>> mask = torch.tensor([[[[1, 0], [1, 1]]]], dtype=torch.bool)  # [1, 1, 2, 2]
        >>> layout = BlockSparseLayout.from_block_mask(mask, block_size=64, seq_q=100, seq_k=100)
        >>> layout.kv_num.tolist(), layout.density
        ([[[1, 2]]], 0.75)
        >>> torch.equal(layout.to_block_mask(), mask)
        True

    Args:
        kv_num: ``[Bl, Hl, Mq]`` integer, number of key blocks each query block sees.
        kv_idx: ``[Bl, Hl, Mq, K]`` integer (``K <= Mk``), strictly ascending key-block
            indices in the first ``kv_num`` slots; later slots are ignored.
        block_size: ``bq`` (= ``bk``) or ``(bq, bk)``, each one of 16, 32, 64, 128.
        seq_q, seq_k: sequence lengths; default ``Mq * bq`` and ``num_key_blocks * bk``.
        num_key_blocks: ``Mk``; defaults to ``ceil(seq_k / bk)`` when ``seq_k`` is given,
            else ``K``.
        validate: check counts and indices (range, strictly ascending) and raise
            ``ValueError`` on a bad one. This reads the data back to the host; ``False``
            means the producer is trusted (e.g. inside CUDA graphs): nothing is read back,
            and whatever the tensors hold can never make a kernel read outside Q/K/V, but a
            bad layout is not reported: indices outside ``[0, Mk)`` are dropped (they keep
            no block), counts are clamped to ``[0, K]`` and repeated indices count once.
            ``SPARSE_ATTN_CHECK_LAYOUTS=1`` makes :func:`sparse_attention` check every
            layout it receives.
    """

    def __init__(
        self,
        kv_num: torch.Tensor,
        kv_idx: torch.Tensor,
        block_size: BlockSize = 64,
        seq_q: Optional[int] = None,
        seq_k: Optional[int] = None,
        *,
        num_key_blocks: Optional[int] = None,
        validate: bool = True,
    ) -> None:
        for name, t in (("kv_num", kv_num), ("kv_idx", kv_idx)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if kv_num.dim() != 3:
            raise ValueError(f"kv_num must be [Bl, Hl, Mq], got shape {tuple(kv_num.shape)}")
        if kv_idx.dim() != 4 or kv_idx.shape[:3] != kv_num.shape:
            raise ValueError(
                f"kv_idx must be [Bl, Hl, Mq, K] matching kv_num {tuple(kv_num.shape)}, got {tuple(kv_idx.shape)}"
            )
        if kv_idx.device != kv_num.device:
            raise ValueError(f"kv_num and kv_idx must be on one device, got {kv_num.device} and {kv_idx.device}")
        bq, bk = parse_block_size(block_size)
        mq = kv_num.shape[2]
        if num_key_blocks is None:
            num_key_blocks = ceil_div(seq_k, bk) if seq_k is not None else kv_idx.shape[3]
        mk = int(num_key_blocks)
        seq_q, seq_k = seq_lengths(seq_q, seq_k, bq, bk, mq, mk, "layout")
        if kv_idx.shape[3] > mk:
            raise ValueError(f"kv_idx has {kv_idx.shape[3]} slots per row but there are only Mk={mk} key blocks")
        if validate:
            _validate_rows(kv_num, kv_idx, mk)
        block_mask = rows_to_mask(kv_num, kv_idx, mk)
        self._init(block_mask, (bq, bk), seq_q, seq_k)

    # -- construction -------------------------------------------------------------------------
    def _init(self, block_mask: torch.Tensor, block_size: Tuple[int, int], seq_q: int, seq_k: int) -> None:
        self.block_size: Tuple[int, int] = block_size
        self.seq_q: int = seq_q
        self.seq_k: int = seq_k
        self.kv_num, self.kv_idx = compress_block_mask(block_mask)
        self._mk = block_mask.shape[-1]
        self._q: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._q_builder: Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]] = None

    # -- the transposed form, built on first use -------------------------------------------------
    def _build_q(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._q is None:
            if self._q_builder is not None:
                q_num, q_idx = self._q_builder()
                self._q_builder = None
            else:
                q_num, q_idx = compress_block_mask(self.to_block_mask().transpose(-1, -2))
            self._q = (q_num.contiguous(), q_idx.contiguous())
        return self._q

    @property
    def q_num(self) -> torch.Tensor:
        """``[Bl, Hl, Mk]`` int32: how many query blocks read each key block (dK/dV pass).

        The transposed form is only needed for gradients, so it is built on first access
        (on the layout's device, no host sync) and then kept: inference never pays for it.
        """
        return self._build_q()[0]

    @property
    def q_idx(self) -> torch.Tensor:
        """``[Bl, Hl, Mk, K']`` int32: those query-block indices, ascending (see :attr:`q_num`)."""
        return self._build_q()[1]

    @property
    def has_transposed(self) -> bool:
        """Whether the transposed form has been built (or given) already."""
        return self._q is not None

    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        block_size: BlockSize = 64,
        seq_q: Optional[int] = None,
        seq_k: Optional[int] = None,
    ) -> "BlockSparseLayout":
        """Layout from a boolean block mask ``[Bl, Hl, Mq, Mk]`` (True = computed).

        ``seq_q``/``seq_k`` default to ``Mq * bq`` and ``Mk * bk``; give them when the
        sequences end inside the last block. No host synchronisation for a bool mask (an
        integer mask is read back once to check it holds only 0 and 1).
        """
        if not isinstance(block_mask, torch.Tensor):
            raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
        if block_mask.dim() != 4:
            raise ValueError(f"block_mask must be [Bl, Hl, Mq, Mk], got shape {tuple(block_mask.shape)}")
        if block_mask.dtype != torch.bool:
            if block_mask.dtype.is_floating_point or block_mask.dtype.is_complex:
                raise TypeError(f"block_mask must be bool (or integer 0/1), got {block_mask.dtype}")
            # an integer mask is checked (a host read; a bool mask avoids it): 2 is not a truth value
            if bool(((block_mask != 0) & (block_mask != 1)).any()):
                raise ValueError("an integer block_mask must hold only 0 and 1 (pass a bool mask for other "
                                 "encodings, e.g. mask != 0)")
            block_mask = block_mask != 0
        bq, bk = parse_block_size(block_size)
        mq, mk = block_mask.shape[2], block_mask.shape[3]
        seq_q, seq_k = seq_lengths(seq_q, seq_k, bq, bk, mq, mk, "block_mask")
        layout = cls.__new__(cls)
        layout._init(block_mask, (bq, bk), seq_q, seq_k)
        return layout

    @classmethod
    def _from_parts(
        cls,
        kv_num: torch.Tensor,
        kv_idx: torch.Tensor,
        q_num: Optional[torch.Tensor],
        q_idx: Optional[torch.Tensor],
        block_size: Tuple[int, int],
        seq_q: int,
        seq_k: int,
        *,
        q_builder: Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> "BlockSparseLayout":
        """Trusted constructor for pattern builders that produce the index form directly.

        Unlike the public constructors nothing is checked and no ``[.., Mq, Mk]`` mask is
        made, so index tensors may be narrower than ``Mk`` / ``Mq`` (``kv_idx [Bl, Hl, Mq, K]``,
        ``q_idx [Bl, Hl, Mk, K']``): slots past the count are never read. The transposed form
        is given (``q_num`` with ``Mk`` entries per row, ``q_idx``), or built on first use by
        ``q_builder()``, or else from the row form. The caller guarantees both forms describe
        the same mask.
        """
        layout = cls.__new__(cls)
        layout.block_size = (int(block_size[0]), int(block_size[1]))
        layout.seq_q, layout.seq_k = int(seq_q), int(seq_k)
        layout.kv_num, layout.kv_idx = kv_num.contiguous(), kv_idx.contiguous()
        layout._mk = ceil_div(layout.seq_k, layout.block_size[1])
        layout._q = None if q_num is None else (q_num.contiguous(), q_idx.contiguous())
        layout._q_builder = q_builder
        return layout

    @classmethod
    def dense(
        cls,
        seq_q: int,
        seq_k: int,
        block_size: BlockSize = 64,
        device: Optional[torch.device] = None,
    ) -> "BlockSparseLayout":
        """A layout that keeps every block (useful to compare against dense kernels)."""
        bq, bk = parse_block_size(block_size)
        seq_q, seq_k = _as_int(seq_q, "seq_q"), _as_int(seq_k, "seq_k")  # negatives: from_block_mask says so
        mask = torch.ones(1, 1, ceil_div(seq_q, bq), ceil_div(seq_k, bk), dtype=torch.bool, device=device)
        return cls.from_block_mask(mask, (bq, bk), seq_q, seq_k)

    # -- views -------------------------------------------------------------------------------
    def to_block_mask(self) -> torch.Tensor:
        """The boolean block mask ``[Bl, Hl, Mq, Mk]`` this layout was built from."""
        return rows_to_mask(self.kv_num, self.kv_idx, self.num_key_blocks)

    @property
    def num_query_blocks(self) -> int:
        return self.kv_num.shape[2]

    @property
    def num_key_blocks(self) -> int:
        return self._mk

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(Bl, Hl, Mq, Mk)``."""
        return (self.kv_num.shape[0], self.kv_num.shape[1], self.num_query_blocks, self.num_key_blocks)

    @property
    def device(self) -> torch.device:
        return self.kv_num.device

    @property
    def density(self) -> float:
        """Fraction of blocks kept (reads back to the host: not for hot paths)."""
        total = self.kv_num.numel() * self.num_key_blocks
        return float(self.kv_num.sum().item()) / max(total, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the device tensors the layout holds: the row form, the transposed form once
        built, and the tile plans the kernels cached on them (no host sync)."""
        tensors = [self.kv_num, self.kv_idx] + (list(self._q) if self._q is not None else [])
        total = 0
        for t in tensors:
            total += t.numel() * t.element_size()
            for entry in getattr(t, "_sparse_attn_plans", {}).values():  # see triton_kernels.configs
                for part in (getattr(entry, name, None) for name in ("num", "idx", "bits")):
                    if isinstance(part, torch.Tensor):
                        total += part.numel() * part.element_size()
        return total

    def to(self, device: Union[str, torch.device]) -> "BlockSparseLayout":
        """A copy of the layout on ``device``."""
        out = self.__class__.__new__(self.__class__)
        out.block_size, out.seq_q, out.seq_k, out._mk = self.block_size, self.seq_q, self.seq_k, self._mk
        out.kv_num, out.kv_idx = self.kv_num.to(device), self.kv_idx.to(device)
        out._q = None if self._q is None else (self._q[0].to(device), self._q[1].to(device))
        out._q_builder = None  # rebuilt from the row form on the new device if ever needed
        return out

    def check(self) -> None:
        """Validate the layout's contents (reads them back to the host): counts within the index
        width, block indices in range and strictly ascending, in the row form and, when built, the
        transposed one, and both forms describing the same mask. Raises ``ValueError``.

        The kernels never read outside K/V whatever a layout holds (they clamp what they load),
        but a layout mutated after it was built computes wrong numbers; ``sparse_attention`` calls
        this on every layout it receives when ``SPARSE_ATTN_CHECK_LAYOUTS=1`` is set at import.
        """
        _validate_rows(self.kv_num, self.kv_idx, self.num_key_blocks)
        if self._q is not None:
            q_num, q_idx = self._q
            _validate_rows(q_num, q_idx, self.num_query_blocks)
            if not torch.equal(rows_to_mask(q_num, q_idx, self.num_query_blocks).transpose(-1, -2), self.to_block_mask()):
                raise ValueError("the layout's row form and transposed form describe different masks")

    # -- composition and a quick look -----------------------------------------------------------
    def _combine(self, other: "BlockSparseLayout", op: str) -> "BlockSparseLayout":
        if not isinstance(other, BlockSparseLayout):
            return NotImplemented
        for name in ("block_size", "seq_q", "seq_k", "device"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"layouts combined with {op} must have the same {name}: "
                                 f"{getattr(self, name)} vs {getattr(other, name)}")
        a, b = self.to_block_mask(), other.to_block_mask()
        try:
            torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            raise ValueError(f"layouts combined with {op} must have broadcastable shapes (Bl, Hl 1 or equal), "
                             f"got {self.shape} and {other.shape}") from None
        return BlockSparseLayout.from_block_mask(a & b if op == "&" else a | b, self.block_size, self.seq_q,
                                                 self.seq_k)

    def __and__(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        """The blocks both layouts keep (same block size, lengths and device; ``Bl``/``Hl`` broadcast)."""
        return self._combine(other, "&")

    def __or__(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        """The blocks either layout keeps (same block size, lengths and device; ``Bl``/``Hl`` broadcast)."""
        return self._combine(other, "|")

    def to_string(self, max_blocks: int = 48, limit: int = 4) -> str:
        """A text picture of the first ``limit`` (batch, head) block masks, one character per block
        (``#`` kept, ``.`` not), or per group of blocks when a side has more than ``max_blocks``
        (``#`` all kept, ``+`` some, ``.`` none). Reads the layout back to the host.

        Example::

            >>> print(BlockSparseLayout.from_block_mask(torch.ones(1, 1, 3, 3).tril().bool(), 16).to_string())
            BlockSparseLayout(shape=(1, 1, 3, 3), block_size=(16, 16), seq_q=48, seq_k=48, density=0.667)
            [b=0, h=0]
            #..
            ##.
            ###
        """
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
        mask = self.to_block_mask().cpu()
        bl, hl, mq, mk = mask.shape
        gq, gk = ceil_div(mq, max_blocks), ceil_div(mk, max_blocks)
        lines = [f"{type(self).__name__}(shape={self.shape}, block_size={self.block_size}, seq_q={self.seq_q}, "
                 f"seq_k={self.seq_k}, density={self.density:.3f})"]
        shown = 0
        for b in range(bl):
            for h in range(hl):
                if shown == limit:
                    lines.append(f"... {bl * hl - limit} more")
                    return "\n".join(lines)
                shown += 1
                m = mask[b, h].to(torch.int32)
                pad = (0, ceil_div(mk, gk) * gk - mk, 0, ceil_div(mq, gq) * gq - mq)
                cells = torch.nn.functional.pad(m, pad).view(ceil_div(mq, gq), gq, ceil_div(mk, gk), gk)
                kept = cells.sum((1, 3))
                real = torch.nn.functional.pad(torch.ones_like(m), pad).view_as(cells).sum((1, 3))
                chars = {0: "."}
                lines.append(f"[b={b}, h={h}]" + (f" ({gq}x{gk} blocks per character)" if gq * gk > 1 else ""))
                for r in range(kept.shape[0]):
                    lines.append("".join(chars.get(int(n), "#" if int(n) == int(t) else "+")
                                         for n, t in zip(kept[r], real[r])))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(shape={self.shape}, block_size={self.block_size}, "
            f"seq_q={self.seq_q}, seq_k={self.seq_k}, device={self.device})"
        )


def _validate_rows(kv_num: torch.Tensor, kv_idx: torch.Tensor, mk: int) -> None:
    """Host-side checks of a user-given (counts, indices) pair; raises ValueError."""
    k = kv_idx.shape[-1]
    if bool(((kv_num < 0) | (kv_num > k)).any()):
        raise ValueError(f"kv_num entries must lie in [0, {k}] (the number of index slots per row)")
    slots = torch.arange(k, device=kv_idx.device)
    valid = slots < kv_num.unsqueeze(-1)
    if bool((valid & ((kv_idx < 0) | (kv_idx >= mk))).any()):
        raise ValueError(f"kv_idx has a block index out of range [0, {mk})")
    if k > 1:
        rising = kv_idx[..., 1:] > kv_idx[..., :-1]
        if bool((valid[..., 1:] & ~rising).any()):
            raise ValueError("kv_idx must be strictly ascending within the first kv_num slots of each row")
