"""Tile plans: the walk a kernel makes when its tile is not the layout block.

A GPU kernel wants tiles sized for its tensor cores (Hopper's ``wgmma`` needs at least 64 rows);
a layout may use blocks of 16 or 32. So a kernel tile may cover several layout blocks. A
*tile plan* is the layout re-expressed at the kernel's granularity, derived once from the
layout's index form, on its device, with static shapes (no host synchronisation):

* a *unit* row covers ``max(tile_rows, block_rows)`` rows, a unit column
  ``max(tile_cols, block_cols)`` columns; a unit holds ``R x C`` layout blocks
  (``R = unit_rows // block_rows``, ``C = unit_cols // block_cols``, ``R * C <= 64``);
* ``num [Bl, Hl, U]`` int32: how many unit columns unit row ``u`` walks (the union of the
  columns its ``R`` layout rows keep);
* ``idx [Bl, Hl, U, W]`` int32: those unit columns, ascending, in the first ``num`` slots;
* ``bits [Bl, Hl, U, W]`` int64: which of the unit's ``R x C`` layout blocks are kept, bit
  ``r * C + c`` for the block in sub-row ``r``, sub-column ``c``. The kernel applies it inside
  the tile; a unit with every bit set needs no element mask.

With ``R = C = 1`` the plan *is* the layout (``bits`` is ``None``). The same builder serves the
transposed walk of dK/dV: rows are then key blocks and columns query blocks.

*Work efficiency* is what the union costs: ``computed pairs / kept pairs``, where a plan
computes ``unit_rows x unit_cols`` pairs per entry and the layout keeps ``bq x bk`` per block
(both clipped to the sequence ends). :func:`work_ratio` reports it; launchers compare plans
with it (see ``sparse_attn.triton_kernels.configs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layout import ceil_div

__all__ = ["TilePlan", "build_plan", "full_bits", "kept_pairs", "computed_pairs", "work_ratio"]

_MAX_BITS = 64


@dataclass(frozen=True)
class TilePlan:
    """A layout at a kernel's tile granularity (see the module docstring).

    Attributes:
        num: ``[Bl, Hl, U]`` int32 entries per unit row.
        idx: ``[Bl, Hl, U, W]`` int32 unit-column indices, ascending in the first ``num`` slots.
        bits: ``[Bl, Hl, U, W]`` int64 kept sub-blocks per entry, or ``None`` when a unit is one
            layout block (``R = C = 1``).
        unit_rows, unit_cols: rows / columns a unit covers.
        sub_rows, sub_cols: ``R``, ``C``: layout blocks per unit along each side.
    """

    num: torch.Tensor
    idx: torch.Tensor
    bits: Optional[torch.Tensor]
    unit_rows: int
    unit_cols: int
    sub_rows: int
    sub_cols: int

    @property
    def full_bits(self) -> int:
        """The ``bits`` value of a unit whose every layout block is kept."""
        return full_bits(self.sub_rows * self.sub_cols)


def full_bits(n_blocks: int) -> int:
    """The bit mask of ``n_blocks`` kept layout blocks, as the kernels compare it (int64: all 64
    bits set is -1)."""
    return -1 if n_blocks == _MAX_BITS else (1 << n_blocks) - 1


def build_plan(
    num: torch.Tensor,
    idx: torch.Tensor,
    block_rows: int,
    block_cols: int,
    tile_rows: int,
    tile_cols: int,
    n_cols: int,
) -> TilePlan:
    """The tile plan of a layout walk.

    Args:
        num: ``[Bl, Hl, M]`` kept columns per layout row (a layout's ``kv_num``, or ``q_num`` for
            the transposed walk).
        idx: ``[Bl, Hl, M, K]`` their ascending indices (``kv_idx`` / ``q_idx``); slots past
            ``num`` are ignored.
        block_rows, block_cols: layout block sizes along rows / columns (``bq, bk``, or
            ``bk, bq`` for the transposed walk).
        tile_rows, tile_cols: the kernel tile along rows / columns (powers of two).
        n_cols: number of layout column blocks.

    Returns:
        A :class:`TilePlan`. No host synchronisation; the work is a sort of ``R x K`` entries per
        unit row.
    """
    r = max(1, tile_rows // block_rows)
    c = max(1, tile_cols // block_cols)
    if r * c > _MAX_BITS:
        raise ValueError(f"a tile of {tile_rows}x{tile_cols} over blocks {block_rows}x{block_cols} holds "
                         f"{r * c} layout blocks; at most {_MAX_BITS} fit the plan's bit masks")
    unit_rows, unit_cols = max(tile_rows, block_rows), max(tile_cols, block_cols)
    if r == 1 and c == 1:
        return TilePlan(num.contiguous(), idx.contiguous(), None, unit_rows, unit_cols, 1, 1)
    bl, hl, m, k = idx.shape
    u = ceil_div(m, r)
    pad = u * r - m
    valid = torch.arange(k, device=idx.device, dtype=torch.int32) < num.unsqueeze(-1)  # [Bl, Hl, M, K]
    col = idx.to(torch.int64)
    if pad:
        col = torch.nn.functional.pad(col, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, 0, 0, pad))
    sub_row = torch.arange(u * r, device=idx.device).remainder(r).view(1, 1, u * r, 1)
    bit = torch.ones((), dtype=torch.int64, device=idx.device) << (sub_row * c + col.remainder(c))  # [.., U*R, K]
    n_ucols = ceil_div(n_cols, c)
    ucol = torch.where(valid, col // c, n_ucols)  # invalid slots sort last (sentinel n_ucols)
    ucol, bit = ucol.view(bl, hl, u, r * k), bit.expand_as(ucol).reshape(bl, hl, u, r * k)
    ucol, order = torch.sort(ucol, dim=-1)
    bit = torch.gather(bit, -1, order)
    live = ucol < n_ucols
    first = torch.ones_like(live)
    first[..., 1:] = ucol[..., 1:] != ucol[..., :-1]
    first &= live
    slot = torch.cumsum(first.to(torch.int32), dim=-1) - 1  # [.., R*K] unique slot of each entry
    width = max(1, min(r * k, n_ucols))
    dump = torch.full_like(slot, width)  # dead entries land in an extra slot that is cut off
    slot = torch.where(live, slot, dump).to(torch.int64)
    plan_idx = torch.zeros(bl, hl, u, width + 1, dtype=torch.int64, device=idx.device)
    plan_idx.scatter_(-1, torch.where(first, slot, dump.to(torch.int64)), ucol)
    plan_bits = torch.zeros(bl, hl, u, width + 1, dtype=torch.int64, device=idx.device)
    # one layout block maps to one (entry, bit), so a sum of distinct bits is their OR
    plan_bits.scatter_add_(-1, slot, torch.where(live, bit, torch.zeros_like(bit)))
    plan_num = first.sum(-1, dtype=torch.int32)
    return TilePlan(plan_num.contiguous(), plan_idx[..., :width].to(torch.int32).contiguous(),
                    plan_bits[..., :width].contiguous(), unit_rows, unit_cols, r, c)


def _span(n: int, unit: int, count: int, device) -> torch.Tensor:
    """Length of each of ``count`` consecutive spans of ``unit`` within ``[0, n)``."""
    start = torch.arange(count, device=device, dtype=torch.int64) * unit
    return (n - start).clamp(0, unit)


def kept_pairs(num: torch.Tensor, idx: torch.Tensor, block_rows: int, block_cols: int, n_rows: int,
               n_cols: int) -> torch.Tensor:
    """Element pairs inside the kept blocks, per ``[Bl, Hl]`` (int64), clipped to the ends."""
    m, k = idx.shape[-2], idx.shape[-1]
    rows = _span(n_rows, block_rows, m, idx.device)  # [M]
    cols = _span(n_cols, block_cols, ceil_div(n_cols, block_cols), idx.device)  # [Mk]
    valid = torch.arange(k, device=idx.device) < num.unsqueeze(-1)
    width = torch.where(valid, cols[idx.long().clamp(0, cols.numel() - 1)], 0).sum(-1)  # [Bl, Hl, M]
    return (width * rows).sum(-1)


def computed_pairs(plan: TilePlan, n_rows: int, n_cols: int) -> torch.Tensor:
    """Element pairs a kernel computes when it walks ``plan``, per ``[Bl, Hl]`` (int64)."""
    return kept_pairs(plan.num, plan.idx, plan.unit_rows, plan.unit_cols, n_rows, n_cols)


def work_ratio(num: torch.Tensor, idx: torch.Tensor, plan: TilePlan, block_rows: int, block_cols: int,
               n_rows: int, n_cols: int) -> float:
    """``computed pairs / kept pairs`` of ``plan`` over the layout walk ``(num, idx)`` (reads back
    to the host). 1.0 for an empty layout."""
    kept = int(kept_pairs(num, idx, block_rows, block_cols, n_rows, n_cols).sum())
    done = int(computed_pairs(plan, n_rows, n_cols).sum())
    return done / kept if kept else 1.0
