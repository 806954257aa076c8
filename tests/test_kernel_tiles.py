"""The kernels with the GPU families' tiles, run under the interpreter, against the fp64 reference.

On a CPU machine the launches normally take the interpreter's own 32x32 tiles; the Hopper and
Ampere tables (128-row query tiles, 16..128-key tiles) would only ever run on a GPU. Here
``configs.family_override`` makes the launchers use those tables on CPU tensors too, and
``SPARSE_ATTN_TILES`` pins each tile shape (``configs.SHAPES``), so the tile plans, the bit masks
of unioned layout blocks and the causal masking of every tile size are checked on any machine.

* ``test_gpu_tile_configs``: family x shape x a few small cases (dtypes, head dims, GQA, layout
  heads, square and rectangular layout blocks, odd lengths, causal or not), forward and backward.
* ``test_causal_offset_residues_*``: causal, bottom-right aligned, for every residue of
  ``Sk - Sq`` modulo the key tile (the interpreter's 32, Hopper's 128), plus FlashAttention's
  off-by-one length pairs. The inputs carry a *trap* so a one-key slip of the diagonal cannot hide
  in the tolerances: query ``i`` scores ``TRAP`` nats against its last visible key and its first
  invisible key, so leaking or dropping either moves that row by several tolerances (checked row
  by row on the reference itself, by shifting the diagonal).

Every case asserts it is not zeros-against-zeros (some row sees some key), and rows that see
nothing must give output 0, lse ``-inf`` and a zero dQ.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import List, Tuple, Union

import pytest
import torch

from helpers import element_mask, make_qkv, naive_attention, random_block_mask, run_fwd_bwd, tolerances
from sparse_attn import BlockSparseLayout, reference_attention, sparse_attention
from sparse_attn.triton_kernels import configs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "lse", "dq", "dk", "dv")
TRAP = 5.0  # score (nats) of the keys on both sides of each query row's causal diagonal
TRAP_MARGIN = 3.0  # a one-key diagonal slip must move each row it touches by this many tolerances


# ----------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------
def _pair(block: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return block if isinstance(block, tuple) else (block, block)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _seen(block_mask: torch.Tensor, bq: int, bk: int, Sq: int, Sk: int, Hq: int, causal: bool) -> torch.Tensor:
    """``[B or 1, Hq, Sq]``: which query rows see at least one key."""
    return element_mask(block_mask.cpu(), bq, bk, Sq, Sk, Hq, causal).any(-1)


def _assert_not_vacuous(seen: torch.Tensor, label: str) -> None:
    """The case must compare something: at least one row sees at least one key."""
    assert seen.any(), f"{label}: no query row sees any key (the comparison would be zeros vs zeros)"


def _worst(err: torch.Tensor) -> str:
    flat = int(torch.argmax(err))
    return "[" + ", ".join(str(int(i)) for i in torch.unravel_index(torch.tensor(flat), err.shape)) + "]"


def _compare(dtype: torch.dtype, got, want, seen: torch.Tensor) -> List[str]:
    """Differences of ``got`` (the kernels) from ``want`` (fp64 reference) beyond the dtype's
    tolerances, as readable strings (empty = pass). ``seen [., Hq, Sq]``: rows that see a key."""
    fails = []
    for name, t in zip(NAMES, got):
        if torch.isnan(t).any():
            fails.append(f"{name}: {int(torch.isnan(t).sum())} NaN (first at {_worst(torch.isnan(t).double())})")
    if fails:
        return fails
    B, Hq, Sq = got[1].shape
    empty = ~seen.to(got[0].device).expand(B, Hq, Sq)
    for name, g, w in zip(NAMES, got, want):
        tol = tolerances(dtype, "out" if name in ("out", "lse") else "grad")
        g, w = g.double(), w.double()
        if name == "lse":
            gi, wi = torch.isinf(g), torch.isinf(w)
            if not torch.equal(gi, wi):
                fails.append(f"lse: -inf pattern differs at {int((gi != wi).sum())} rows "
                             f"(first {_worst((gi != wi).double())}; kernel -inf {int(gi.sum())}, "
                             f"reference -inf {int(wi.sum())})")
                continue
            g, w = torch.where(gi, 0.0, g), torch.where(wi, 0.0, w)
        err = (g - w).abs()
        bad = err > tol["atol"] + tol["rtol"] * w.abs()
        if bad.any():
            fails.append(f"{name}: {int(bad.sum())}/{bad.numel()} elements off, max abs err "
                         f"{err.max().item():.3e} at {_worst(err)} (|ref| max {w.abs().max().item():.3e}, "
                         f"atol {tol['atol']:.0e}, rtol {tol['rtol']:.0e})")
    out, lse, dq = got[0], got[1], got[2]
    if not (torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf")) and torch.all(dq[empty] == 0)):
        fails.append("rows that see nothing: out must be 0, lse -inf and dq 0")
    if torch.isinf(lse[~empty]).any():
        fails.append(f"lse: {int(torch.isinf(lse[~empty]).sum())} rows that see keys have lse -inf")
    return fails


def _kernel_vs_reference(q, k, v, layout: BlockSparseLayout, causal: bool, family: str, shape: str, gen,
                         monkeypatch) -> Tuple[List[str], torch.Tensor]:
    """Forward and backward of the Triton kernels, launched with ``family``'s tile table and the tile
    shape pinned to ``shape``, against the fp64 reference. Returns (failures, seen rows)."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    bq, bk = layout.block_size
    seen = _seen(layout.to_block_mask(), bq, bk, Sq, Sk, Hq, causal)
    do = torch.randn(q.shape, generator=gen).to(DEVICE, q.dtype)
    dlse = torch.randn(q.shape[:3], generator=gen).to(DEVICE)

    monkeypatch.setenv("SPARSE_ATTN_TILES", shape)
    with configs.family_override(family):  # both the forward and the backward launches
        got = run_fwd_bwd(lambda a, b, c: sparse_attention(a, b, c, layout, causal=causal, return_lse=True,
                                                    backend="triton"), q, k, v, do, dlse)
        report = configs.launch_report(q, layout)
    want = run_fwd_bwd(lambda a, b, c: reference_attention(a, b, c, layout, causal=causal, return_lse=True),
                *(t.double() for t in (q, k, v)), do.double(), dlse.double())
    fails = _compare(q.dtype, got, want, seen)
    if fails:
        tiles = ", ".join(f"{kern} {r['shape']} {r['tile']}" for kern, r in report.items())
        fails = [f"{f} [tiles: {tiles}]" for f in fails]
    return fails, seen


# ----------------------------------------------------------------------------------------------
# 1. GPU tile tables x tile shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileCase:
    Hq: int
    Hkv: int
    Hl: int
    Sq: int
    Sk: int
    D: int
    block: Union[int, Tuple[int, int]]
    causal: bool
    dtype: torch.dtype
    density: float = 0.5

    def __str__(self) -> str:
        bq, bk = _pair(self.block)
        return (f"H{self.Hq}/{self.Hkv}-Hl{self.Hl}-S{self.Sq}x{self.Sk}-D{self.D}-blk{bq}x{bk}-"
                f"{'causal' if self.causal else 'full'}-{_dt(self.dtype)}")


# Every tile shape; the 64-row variants differ from the table's tiles only on Hopper (Ampere's
# query tiles are 64 rows already, so there they alias "wide" / "rows").
FAMILY_SHAPES = [(f, s) for f in ("hopper", "ampere") for s in configs.SHAPES
                 if f == "hopper" or not s.endswith("64")]
TILE_CASES = [
    # fp32 (the tables give fp32 smaller tiles), MQA, small square blocks unioned
    TileCase(Hq=2, Hkv=1, Hl=1, Sq=150, Sk=170, D=64, block=16, causal=True, dtype=torch.float32),
    # head dim 128, layout per query head, rectangular blocks (16 query rows x 64 keys)
    TileCase(Hq=2, Hkv=1, Hl=2, Sq=70, Sk=200, D=128, block=(16, 64), causal=True, dtype=torch.bfloat16),
    # odd head dim (padded to 128), 64 x 16 blocks, Sq > Sk causal (the first rows see nothing)
    TileCase(Hq=4, Hkv=2, Hl=2, Sq=170, Sk=150, D=80, block=(64, 16), causal=True, dtype=torch.bfloat16),
    # blocks larger than some tiles (the tile splits them), non-causal
    TileCase(Hq=4, Hkv=2, Hl=4, Sq=150, Sk=260, D=64, block=128, causal=False, dtype=torch.bfloat16),
    # 32-blocks, non-causal, fp32 at head dim 128
    TileCase(Hq=4, Hkv=2, Hl=2, Sq=70, Sk=130, D=128, block=32, causal=False, dtype=torch.float32),
]


@pytest.mark.parametrize("case", TILE_CASES, ids=str)
@pytest.mark.parametrize("family,shape", FAMILY_SHAPES, ids=[f"{f}-{s}" for f, s in FAMILY_SHAPES])
def test_gpu_tile_configs(family: str, shape: str, case: TileCase, monkeypatch):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{family}-{shape}-{case}".encode()))
    q, k, v = make_qkv(1, case.Hq, case.Hkv, case.Sq, case.Sk, case.D, case.dtype, DEVICE, generator=gen)
    bq, bk = _pair(case.block)
    mq, mk = -(-case.Sq // bq), -(-case.Sk // bk)
    mask = random_block_mask(1, case.Hl, mq, mk, case.density, generator=gen)
    layout = BlockSparseLayout.from_block_mask(mask.to(DEVICE), (bq, bk), case.Sq, case.Sk)

    label = f"{family}/{shape}/{case}"
    assert shape in configs.SHAPES, f"{shape!r} is no longer a tile shape: {configs.SHAPES}"
    fails, seen = _kernel_vs_reference(q, k, v, layout, case.causal, family, shape, gen, monkeypatch)
    _assert_not_vacuous(seen, label)
    if mq >= 2:  # random_block_mask clears one block row per head: the empty-row path is exercised
        assert not seen.all(), f"{label}: expected at least one query row that sees nothing"
    assert not fails, f"{label}:\n  " + "\n  ".join(fails)


# ----------------------------------------------------------------------------------------------
# 2. Causal diagonal: every residue of Sk - Sq
# ----------------------------------------------------------------------------------------------
def _trap_qkv(Sq: int, Sk: int, D: int, dtype: torch.dtype, gen) -> Tuple[torch.Tensor, ...]:
    """Random q, k, v (one head), except that query ``i`` scores exactly ``TRAP`` (before rounding to
    ``dtype``) against key ``i + off`` (its last visible key) and key ``i + off + 1`` (its first
    invisible one), ``off = Sk - Sq``. Each key is such a key for at most two queries: it gets the
    smallest change, in the span of those queries, that sets both scores."""
    q, k, v = (t.double() for t in make_qkv(1, 1, 1, Sq, Sk, D, torch.float32, "cpu", generator=gen))
    off = Sk - Sq
    for j in range(Sk):
        rows = [r for r in (j - off - 1, j - off) if 0 <= r < Sq]
        if rows:
            qr = q[0, 0, rows]  # [R, D]
            want = torch.full((len(rows),), TRAP * D ** 0.5, dtype=torch.float64)
            coef = torch.linalg.solve(qr @ qr.T, want - qr @ k[0, 0, j])
            k[0, 0, j] += coef @ qr
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def _assert_trap_sensitive(q, k, v, block_mask, bq, bk, label: str) -> None:
    """On the reference itself: moving the diagonal by one key either way moves every query row it
    affects by more than ``TRAP_MARGIN`` x the dtype's tolerance on that row, so the kernel
    comparison cannot miss such a slip in any row."""
    Sq, Sk = q.shape[2], k.shape[2]
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    blocks = element_mask(block_mask.cpu(), bq, bk, Sq, Sk, 1, False)[0, 0]
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :]
    mask = blocks & (j <= i + (Sk - Sq))
    ref = naive_attention(q64, k64, v64, mask)[0, 0]
    tol = tolerances(q.dtype, "out")
    for shift in (-1, 1):
        moved_mask = blocks & (j <= i + (Sk - Sq) + shift)
        rows = (moved_mask != mask).any(-1)  # the rows this shift changes
        moved = naive_attention(q64, k64, v64, moved_mask)[0, 0]
        change = (moved - ref).abs().amax(-1)
        limit = TRAP_MARGIN * (tol["atol"] + tol["rtol"] * ref.abs().amax(-1))
        weak = rows & (change <= limit)
        assert rows.any() and not weak.any(), (
            f"{label}: the trap does not make a diagonal shift of {shift} visible in rows "
            f"{weak.nonzero().flatten().tolist()} (change {change[weak].tolist()}, limit {limit[weak].tolist()})")


def _residue_case(Sq: int, Sk: int, dtype: torch.dtype, family: str, shape: str, monkeypatch,
                  head_dim: int = 64, cleared: int = 1) -> List[str]:
    """One causal case: block 16, all blocks kept but block row ``cleared`` (chosen so that the last
    row of some full query tile stays live: only such a row makes the tile's causal key bound
    ``_causal_hi`` binding). Returns the failures."""
    label = f"{family}/{shape} Sq={Sq} Sk={Sk} (Sk-Sq={Sk - Sq}) D={head_dim} {_dt(dtype)}"
    gen = torch.Generator().manual_seed(zlib.crc32(label.encode()))
    q, k, v = _trap_qkv(Sq, Sk, head_dim, dtype, gen)
    mask = random_block_mask(1, 1, -(-Sq // 16), -(-Sk // 16), 1.0, generator=gen, ensure_empty_rows=False)
    mask[:, :, cleared] = False
    layout = BlockSparseLayout.from_block_mask(mask.to(DEVICE), 16, Sq, Sk)
    _assert_trap_sensitive(q, k, v, mask, 16, 16, label)
    fails, seen = _kernel_vs_reference(q, k, v, layout, True, family, shape, gen, monkeypatch)
    _assert_not_vacuous(seen, label)
    if mask.shape[2] >= 2:
        assert not seen.all(), f"{label}: expected at least one query row that sees nothing"
    return [f"{label}: {f}" for f in fails]


def _report(fails: List[str], what: str) -> str:
    return f"{len(fails)} failure(s) in {what}:\n  " + "\n  ".join(fails)


def test_causal_offset_residues_interpret(monkeypatch):
    """The interpreter's own tiles (32 x 32, pinned "wide"): Sk - Sq over every residue mod 32,
    plus 32 and 33 (the next tile)."""
    fails = []
    for off in range(34):
        # rows 0..31 (the first tile) live, rows 32..36 (block row 2) see nothing
        fails += _residue_case(37, 37 + off, torch.float32, "interpret", "wide", monkeypatch, cleared=2)
    assert not fails, _report(fails, "Sk - Sq residues, interpreter tiles")


def test_causal_offset_residues_hopper(monkeypatch):
    """Hopper's tiles in bf16 (so the forward key tile is the full 128): Sk - Sq over every residue
    mod 128 with the "wide" shape (128 x 128 forward, 128 x 64 dQ, 64 x 64 dK/dV: the only shape
    whose key tiles make residues up to 127 distinct), and with "rows" (128 x 16, 128 x 16,
    64 x 16: residues mod 16) on every fifth residue, which still meets every residue mod 16."""
    fails = []
    for off in range(128):
        for shape in ("wide", "rows") if off % 5 == 0 else ("wide",):
            fails += _residue_case(19, 19 + off, torch.bfloat16, "hopper", shape, monkeypatch, head_dim=32)
    assert not fails, _report(fails, "Sk - Sq residues, Hopper tiles")


FLASH_PAIRS = [(63, 64), (64, 65), (127, 128), (128, 129), (64, 63), (65, 64), (128, 127), (129, 128)]


@pytest.mark.parametrize("family,shape", [("interpret", "wide"), ("hopper", "wide"), ("hopper", "rows")],
                         ids=lambda x: x)
def test_causal_flash_length_pairs(family: str, shape: str, monkeypatch):
    """FlashAttention's off-by-one length pairs (Sk - Sq = +-1 around tile edges)."""
    dtype = torch.float32 if family == "interpret" else torch.bfloat16
    fails = []
    for sq, sk in FLASH_PAIRS:
        fails += _residue_case(sq, sk, dtype, family, shape, monkeypatch)
    assert not fails, _report(fails, f"flash-attn length pairs, {family}/{shape}")
