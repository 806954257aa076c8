"""The Triton decode kernel (``triton_kernels/decode.py``) against ``reference_decode`` in fp64.

On a CPU machine the kernels run under ``TRITON_INTERPRET=1`` (conftest) on small shapes. Every
case NaN-fills what the kernel must never read (cache rows at or past each sequence's length,
pages no sequence owns), compares every element with per-dtype tolerances and every row with
flash-attn's criterion (the reference computed in the inputs' dtype sets the error budget), and
checks that rows seeing nothing give out 0, lse -inf. Besides the launcher's own choices the
tests force launches: split counts (the merge), key steps smaller and larger than the layout
block, row tiles smaller than the GQA group, and the Hopper / Ampere tables' launches
(``configs.family_override``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

from helpers import assert_rows_within, tolerances
from sparse_attn.decode import reference_decode
from sparse_attn.triton_kernels import configs
from sparse_attn.triton_kernels import decode as dec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    Sq: int = 1
    D: int = 64
    S: int = 100  # S_max (contiguous) or at least max_pages * page (paged)
    bs: int = 16
    mode: str = "dense"  # dense | list | s2
    page: int = 0  # 0: contiguous cache
    own: bool = True
    dtype: torch.dtype = torch.float16
    lens: Tuple[int, ...] = ()  # cache_seqlens (default: drawn)
    strided: bool = False  # q and caches as transposed views of [B, S, H, D] storage
    s2: Tuple[int, int] = (2, 3)  # (local blocks, stride)

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        lay = f"page{self.page}" if self.page else "contig"
        own = "" if self.mode != "list" else ("-own" if self.own else "-noown")
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-Sq{self.Sq}-D{self.D}-S{self.S}-bs{self.bs}-{self.mode}{own}-{lay}"
                f"{'-strided' if self.strided else ''}-{dt}{'-L' + '_'.join(map(str, self.lens)) if self.lens else ''}")


def make_inputs(c: Case, device: str = DEVICE) -> tuple:
    """The launcher's arguments for ``c``: random q and caches with NaN wherever a key is not part
    of a sequence, lengths, block table, and the list / S2 metadata."""
    g = torch.Generator().manual_seed(zlib.crc32(str(c).encode()))
    nb = -(-c.S // c.bs)
    lens = torch.tensor(c.lens, dtype=torch.int32) if c.lens else torch.randint(1, c.S + 1, (c.B,), generator=g,
                                                                                dtype=torch.int32)
    if c.strided:
        q = torch.randn(c.B, c.Sq, c.Hq, c.D, generator=g).transpose(1, 2)
    else:
        q = torch.randn(c.B, c.Hq, c.Sq, c.D, generator=g)
    full_k = torch.randn(c.B, c.Hkv, c.S, c.D, generator=g)
    full_v = torch.randn(c.B, c.Hkv, c.S, c.D, generator=g)
    used = torch.arange(c.S)[None, :] < lens.clamp(0, c.S)[:, None].long()  # [B, S]
    for t in (full_k, full_v):
        t.masked_fill_(~used[:, None, :, None], float("nan"))
    table = None
    if c.page:
        per_seq = -(-c.S // c.page)
        n_pages = c.B * per_seq + 2  # two pages no sequence owns
        perm = torch.randperm(n_pages, generator=g)
        table = perm[: c.B * per_seq].view(c.B, per_seq).to(torch.int32)
        pools = []
        for t in (full_k, full_v):
            pool = torch.full((n_pages, c.page, c.Hkv, c.D), float("nan"))
            padded = torch.full((c.B, c.Hkv, per_seq * c.page, c.D), float("nan"))
            padded[:, :, : c.S] = t
            pool[table.long().flatten()] = padded.view(c.B, c.Hkv, per_seq, c.page, c.D).permute(0, 2, 3, 1, 4).reshape(
                -1, c.page, c.Hkv, c.D)
            pools.append(pool)
        k, v = pools
    elif c.strided:
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (full_k, full_v))
    else:
        k, v = full_k, full_v
    kv_num = kv_idx = res = None
    local, stride = c.s2
    if c.mode == "list":
        width = max(1, nb // 2)
        kv_num = torch.randint(0, width + 1, (c.B, c.Hkv), generator=g, dtype=torch.int32)
        kv_num[0, 0] = 0  # an empty list
        kv_num[-1, -1] = width  # and a full one
        kv_idx = torch.stack([torch.randperm(nb, generator=g)[:width].sort().values
                              for _ in range(c.B * c.Hkv)]).view(c.B, c.Hkv, width).to(torch.int32)
    elif c.mode == "s2":
        res = torch.tensor([h % stride if h % 3 != 2 else -1 for h in range(c.Hkv)], dtype=torch.int32)
    q, k, v = (t.to(device=device, dtype=c.dtype) for t in (q, k, v))
    to = (lambda t: None if t is None else t.to(device))
    return (q, k, v, lens.to(device), to(table), to(kv_num), to(kv_idx), to(res), local if c.mode == "s2" else None,
            stride if c.mode == "s2" else None, c.bs, c.D ** -0.5, c.own)


def check(args: tuple, got: Tuple[torch.Tensor, torch.Tensor], label: str = "") -> None:
    """``got = (out, lse)`` against the fp64 oracle: no NaN, empty rows exact, per-element
    tolerances and the per-row criterion."""
    q = args[0]
    out, lse = got
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), label
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32, label
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{label}: NaN in out or lse"
    ref_out, ref_lse = reference_decode(*(t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                                          for t in args))
    same_out, _ = reference_decode(*args)  # the inputs' dtype: its rounding is the error budget
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse.cpu()), empty.cpu()), f"{label}: empty rows differ"
    assert (out[empty] == 0).all(), f"{label}: a row that sees nothing must give 0"
    tol = tolerances(q.dtype)
    torch.testing.assert_close(out.double(), ref_out, **tol, msg=lambda m: f"{label}: out: {m}")
    torch.testing.assert_close(torch.where(empty, 0.0, lse.double()), torch.where(empty, 0.0, ref_lse), **tol,
                               msg=lambda m: f"{label}: lse: {m}")
    assert_rows_within(f"{label}: out", out, same_out, ref_out, q.dtype)
    assert not empty.all(), f"{label}: every row is empty (zeros against zeros)"


# ----------------------------------------------------------------------------------------------
# The launcher's own choices, every mode, layout and dtype
# ----------------------------------------------------------------------------------------------
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CASES = [
    # dense
    Case(), Case(B=3, dtype=BF16, Sq=7, Hq=8, Hkv=2, page=16, lens=(0, 5, 100)),
    Case(dtype=F32, Sq=16, Hq=1, Hkv=1, B=1),
    # kept-block lists: own block on/off, pages smaller / larger than the block, odd head dim,
    # block larger than the key step, strided storage
    Case(mode="list", Sq=2, Hq=8, Hkv=2),
    Case(mode="list", dtype=BF16, Hq=8, Hkv=1, page=64, own=False, S=150, lens=(90, 150)),
    Case(mode="list", dtype=F32, Sq=7, bs=32, page=16, lens=(3, 97)), Case(mode="list", D=40, bs=128, S=300),
    Case(mode="list", Sq=16, Hq=2, Hkv=2, bs=16, S=64, own=False, lens=(64, 20), strided=True),
    # S2 closed form (one dense head), pages smaller / larger than the block; the new rows straddle
    # a block boundary (each row's window starts from its own block)
    Case(mode="s2", dtype=BF16, Sq=2, Hkv=3, Hq=6, S=200, lens=(17, 161)),
    Case(mode="s2", Sq=7, bs=64, page=16, S=256, s2=(1, 2), lens=(195, 70)),
    Case(mode="s2", dtype=F32, bs=16, page=64, S=190, Hkv=3, Hq=3, s2=(3, 4), lens=(190, 33)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_matches_reference(case):
    args = make_inputs(case)
    check(args, dec.sparse_decode_fwd(*args), str(case))


# ----------------------------------------------------------------------------------------------
# Forced launches: split counts, key steps vs layout blocks, several row tiles
# ----------------------------------------------------------------------------------------------
FORCED = [
    # (case, block_m, block_n, splits)
    (Case(mode="list", S=160, Sq=2), 16, 16, 3),  # a step is one block; more splits than some lists
    (Case(mode="dense", S=130, bs=16, page=16, dtype=BF16), 16, 64, 2),  # a step spans four blocks
    (Case(mode="s2", S=256, bs=128, Sq=3, s2=(1, 2), dtype=F32), 16, 32, 5),  # a block spans four steps
    (Case(mode="list", Hq=8, Hkv=1, Sq=7, S=96, bs=32, page=16, lens=(96, 40)), 16, 32, 4),  # 56 rows: 4 tiles
    (Case(mode="s2", Hq=4, Hkv=1, Sq=5, S=120, bs=16, dtype=BF16), 16, 16, 7),  # 20 rows: 2 tiles
    (Case(mode="list", Sq=7, S=100, page=16, dtype=BF16, lens=(100, 9)), 16, 32, 1),  # no merge
]


@pytest.mark.parametrize("case,block_m,block_n,splits", FORCED, ids=lambda x: str(x))
def test_forced_launches(case, block_m, block_n, splits):
    args = make_inputs(case)
    launch = dec.DecodeLaunch(block_m, block_n, splits, 4, 1)
    check(args, dec.decode_fwd_with(launch, *args), f"{case} {launch}")


@pytest.mark.parametrize("family,case", [
    ("hopper", Case(mode="list", Sq=1, Hq=8, Hkv=2, S=300, page=64, dtype=BF16)),
    ("ampere", Case(mode="s2", Sq=7, Hq=8, Hkv=1, S=200, bs=32)),
    ("hopper", Case(mode="dense", Sq=16, Hq=8, Hkv=2, B=1, S=90, dtype=F32)),
], ids=lambda x: str(x))
def test_gpu_family_launches(family, case):
    """The launch the Hopper / Ampere tables pick (row tiles up to 64, 32-128 keys a step, many
    splits), run under the interpreter on CPU."""
    args = make_inputs(case)
    q, k, table = args[0], args[1], args[4]
    s_cap = table.shape[1] * k.shape[1] if table is not None else k.shape[2]
    with configs.family_override(family):
        hkv = k.shape[2] if table is not None else k.shape[1]
        launch = dec.decode_launch(q, hkv, dec.max_kept_blocks(s_cap, case.bs, None if args[6] is None else
                                                                 args[6].shape[-1], args[8], args[9], case.own),
                                   case.bs)
        got = dec.sparse_decode_fwd(*args)
    cap = dec.row_tiles(family, q.element_size())[-1]  # 64, or 32 for fp32 (then two row tiles here)
    want_m = min(cap, max(16, 1 << ((case.Hq // case.Hkv) * case.Sq - 1).bit_length()))
    assert launch.block_m == want_m and launch.block_n == dec.decode_tile(family, case.D, q.element_size(),
                                                                          want_m).block_n
    assert launch.num_splits > 1, launch
    check(args, got, f"{family} {case} {launch}")


# ----------------------------------------------------------------------------------------------
# Rules and corner cases
# ----------------------------------------------------------------------------------------------
def test_listed_own_block_counted_once():
    """Every block listed and ``own_block``: the rows' own blocks are walked once (as listed
    entries); and with the own blocks alone (empty lists) each row sees exactly its block."""
    case = Case(mode="list", Sq=7, Hq=4, Hkv=2, S=80, bs=16, lens=(80, 37))
    args = list(make_inputs(case))
    nb = -(-case.S // case.bs)
    args[5] = torch.full((2, 2), nb, dtype=torch.int32, device=DEVICE)
    args[6] = torch.arange(nb, dtype=torch.int32, device=DEVICE).expand(2, 2, nb)  # 0-stride view
    check(tuple(args), dec.decode_fwd_with(dec.DecodeLaunch(16, 16, 3, 4, 1), *args), "all listed")
    args[5] = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    check(tuple(args), dec.sparse_decode_fwd(*args), "own blocks only")


def test_out_of_range_metadata_is_clamped():
    """kv_num outside [0, N], ids outside the cache (negative, past it, huge), page ids outside the
    pool, lengths past the capacity or negative: no read outside the buffers, the reference's
    clamped semantics."""
    case = Case(mode="list", B=3, Sq=2, S=64, bs=16, page=16, dtype=F32, lens=(1000, -5, 40))
    args = list(make_inputs(case))
    args[3] = torch.tensor([1000, -5, 40], dtype=torch.int32, device=DEVICE)
    args[5] = torch.tensor([[-3, 99], [2, 2], [7, 1]], dtype=torch.int32, device=DEVICE)
    args[6] = torch.tensor([[-7, 1, 3], [0, 2 ** 30, 5], [-1, 2, 1 << 20]], dtype=torch.int32,
                           device=DEVICE)[:, None, :].expand(3, 2, 3)
    table = args[4].clone()
    table[0, 1], table[2, 0] = -4, 10 ** 6  # clamped to the first / last page, like the reference
    args[4] = table
    for pool in (args[1], args[2]):  # whatever those two pages held, they are now read: make them finite
        pool[0].normal_()
        pool[-1].normal_()
    check(tuple(args), dec.decode_fwd_with(dec.DecodeLaunch(16, 32, 2, 4, 1), *args), "clamped")


def test_every_row_empty():
    """No sequence holds a token, or zero-width lists without own blocks: out 0 and lse -inf
    everywhere (split and unsplit launches)."""
    empty_cache = make_inputs(Case(mode="s2", B=2, Sq=3, lens=(0, 0), S=48, page=16))
    no_list = list(make_inputs(Case(mode="list", Sq=3, lens=(40, 7), own=False)))
    no_list[5] = torch.full((2, 2), 5, dtype=torch.int32, device=DEVICE)  # clamped to the width, 0
    no_list[6] = torch.zeros(2, 2, 0, dtype=torch.int32, device=DEVICE)
    for args in (empty_cache, tuple(no_list)):
        for splits in (1, 3):
            out, lse = dec.decode_fwd_with(dec.DecodeLaunch(16, 32, splits, 4, 1), *args)
            assert (out == 0).all() and torch.isneginf(lse).all()


def test_split_count_comes_from_shapes():
    """The grid depends on shapes only (never on lengths or lists): it fills two waves of the
    chip's SMs, no more splits than key steps a list can fill, at most MAX_SPLITS."""
    q = torch.zeros(1, 8, 1, 128, dtype=F16)
    with configs.family_override("hopper"):
        assert dec.decode_launch(q, 8, 10 ** 6, 16).num_splits == 33  # 264 programs over 8 heads
        assert dec.decode_launch(q, 8, 5, 16).num_splits == 2  # 5 blocks, 4 a step
        assert dec.decode_launch(q, 1, 10 ** 6, 64).num_splits == dec.MAX_SPLITS
        assert dec.decode_launch(torch.zeros(64, 32, 1, 128, dtype=F16), 8, 10 ** 6, 16).num_splits == 1
        big = dec.decode_launch(torch.zeros(1, 32, 16, 128, dtype=F16), 1, 10 ** 6, 16)
        assert big.block_m == 64  # 512 rows: eight row tiles
    assert dec.max_kept_blocks(1000, 16, 7, None, None, True) == 9
    assert dec.max_kept_blocks(1000, 16, 7, None, None, False) == 7
    assert dec.max_kept_blocks(1024, 64, None, 2, 4, True) == 4 + 2 + 1
    assert dec.max_kept_blocks(1000, 16, None, None, None, True) == 63
    with pytest.raises(ValueError):
        dec.decode_fwd_with(dec.DecodeLaunch(16, 16, dec.MAX_SPLITS + 1, 4, 1), *make_inputs(Case()))


@pytest.mark.gpu
def test_cuda_graph_capture_and_larger_case():
    """Compiled: a longer paged cache in bf16, through a captured CUDA graph (no host read)."""
    case = Case(mode="list", B=3, Hq=32, Hkv=8, Sq=1, D=128, S=4096, bs=64, page=16, dtype=BF16)
    args = make_inputs(case)
    dec.sparse_decode_fwd(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = dec.sparse_decode_fwd(*args)
    graph.replay()
    torch.cuda.synchronize()
    check(args, got, str(case))
