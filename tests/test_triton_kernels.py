"""The Triton kernels (through ``sparse_attention(backend="triton")``) against the reference.

On a CPU machine they run under ``TRITON_INTERPRET=1`` (set by conftest), on small
shapes; on a CUDA machine the same cases run compiled. The oracle is the reference
evaluated in fp64 on the same (rounded) inputs. Every case is held, row by row, to
flash-attn's criterion (at most twice PyTorch's own same-dtype error); the small CPU cases
also to per-dtype tolerances. The GPU tile configurations are exercised under the
interpreter in ``test_kernel_tiles.py``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import pytest
import torch

from helpers import (assert_no_nan, assert_rows_within, element_mask, make_qkv, naive_attention, random_block_mask,
                     run_fwd_bwd, tolerances)
from sparse_attn import BlockSparseLayout, reference_attention, sparse_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    B: int = 1
    Hq: int = 2
    Hkv: int = 1
    Sq: int = 100
    Sk: int = 100
    D: int = 64
    block: Union[int, Tuple[int, int]] = 32
    causal: bool = True
    dtype: torch.dtype = torch.float32
    Hl: Optional[int] = None  # layout heads (default Hkv); 0 = dense (no layout)
    Bl: int = 1
    density: float = 0.5

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        lay = "dense" if self.Hl == 0 else f"blk{self.block}-Hl{self.Hl or self.Hkv}-Bl{self.Bl}-p{self.density}"
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-S{self.Sq}x{self.Sk}-D{self.D}-{lay}-"
                f"{'causal' if self.causal else 'full'}-{dt}")


CASES = [
    # dtypes x causal
    Case(dtype=torch.float32), Case(dtype=torch.float16), Case(dtype=torch.bfloat16),
    Case(causal=False, dtype=torch.float32), Case(causal=False, dtype=torch.float16),
    Case(causal=False, dtype=torch.bfloat16),
    # GQA ratios 1, 2, 4 and layout heads 1 / Hkv / Hq
    Case(Hq=2, Hkv=2, Hl=2), Case(Hq=4, Hkv=2, Hl=2), Case(Hq=4, Hkv=1, Hl=4),
    Case(Hq=4, Hkv=2, Hl=1, dtype=torch.bfloat16), Case(Hq=8, Hkv=2, Hl=8, causal=False),
    # Sq != Sk, odd lengths, decode (density 1.0 where a random mask could leave every row empty)
    Case(Sq=37, Sk=100), Case(Sq=129, Sk=37, density=1.0), Case(Sq=1, Sk=129),
    Case(Sq=1, Sk=37, causal=False, density=1.0),
    Case(Sq=37, Sk=37, dtype=torch.float16, density=1.0), Case(Sq=129, Sk=129, causal=False, dtype=torch.bfloat16),
    Case(Sq=100, Sk=129, Hq=4, Hkv=2, dtype=torch.float16),
    # Sk - Sq = 30: the causal diagonal passes one key from a tile corner (off-by-one traps)
    Case(Sq=34, Sk=64, density=1.0), Case(Sq=70, Sk=100, block=16, density=1.0), Case(Sq=34, Sk=64, Hl=0),
    # head dims (96 and 80 are padded to 128 in the kernel)
    Case(D=32), Case(D=96), Case(D=128, Sq=64, Sk=64, density=1.0), Case(D=80, dtype=torch.float16),
    Case(D=16, causal=False),
    # block sizes, rectangular blocks, per-batch layouts
    Case(block=16, Sq=37, Sk=53), Case(block=64, Sq=129, Sk=129), Case(block=128, Sq=129, Sk=200),
    Case(block=(32, 64), Sq=100, Sk=129), Case(block=(64, 16), Sq=100, Sk=70, causal=False),
    Case(B=2, Bl=2, Hq=4, Hkv=2, Hl=4), Case(B=2, Bl=1, Sq=64, Sk=96),
    # dense path (no layout)
    Case(Hl=0), Case(Hl=0, causal=False, Sq=37, Sk=129), Case(Hl=0, Sq=129, Sk=37, Hq=4, Hkv=2, dtype=torch.bfloat16),
    # density extremes
    Case(density=1.0), Case(density=0.1, Sq=129, Sk=129),
]


# GPU tier: real sizes, compiled kernels (skipped without CUDA), held to the row criterion only
# (bf16 rounding of the probabilities grows with the sequence length, in PyTorch's own
# computation too).
GPU_CASES = [
    Case(B=2, Hq=16, Hkv=4, Sq=4096, Sk=4096, D=128, block=64, dtype=torch.bfloat16, density=0.3),
    Case(B=1, Hq=8, Hkv=8, Sq=4096, Sk=4096, D=128, block=128, dtype=torch.float16, density=0.5, causal=False),
    Case(B=1, Hq=8, Hkv=2, Sq=1000, Sk=8192, D=128, block=(64, 128), dtype=torch.bfloat16, density=0.2, Hl=8),
    Case(B=1, Hq=32, Hkv=8, Sq=1, Sk=16384, D=128, block=128, dtype=torch.bfloat16, density=0.3),
    Case(B=1, Hq=4, Hkv=4, Sq=2048, Sk=2048, D=256, block=64, dtype=torch.bfloat16, density=0.4),
    Case(B=1, Hq=4, Hkv=2, Sq=3001, Sk=3001, D=96, block=32, dtype=torch.float16, density=0.4),
    Case(B=1, Hq=4, Hkv=1, Sq=2047, Sk=2047, D=64, block=16, dtype=torch.bfloat16, density=0.2),
    Case(B=1, Hq=4, Hkv=2, Sq=2048, Sk=2048, D=32, block=128, dtype=torch.float32, density=0.5),
    Case(B=1, Hq=8, Hkv=2, Sq=4096, Sk=4096, D=128, dtype=torch.bfloat16, Hl=0),
    Case(B=1, Hq=8, Hkv=2, Sq=1111, Sk=4096, D=128, dtype=torch.bfloat16, Hl=0, causal=False),
]
ALL_CASES = CASES + [pytest.param(c, marks=pytest.mark.gpu, id=f"gpu-{c}") for c in GPU_CASES]


def _layout(case: Case, gen: torch.Generator) -> Optional[BlockSparseLayout]:
    if case.Hl == 0:
        return None
    bq, bk = case.block if isinstance(case.block, tuple) else (case.block, case.block)
    mq, mk = -(-case.Sq // bq), -(-case.Sk // bk)
    mask = random_block_mask(case.Bl, case.Hl or case.Hkv, mq, mk, case.density, generator=gen)
    return BlockSparseLayout.from_block_mask(mask.to(DEVICE), (bq, bk), case.Sq, case.Sk)


def _compare(case: Case, got, want, same_dtype=None):
    """``got`` (ours) against ``want`` (fp64 reference): per-dtype tolerances on small cases, and,
    given PyTorch's own same-dtype results, flash-attn's per-row criterion (lse: fp32 tolerance)."""
    names = ("out", "lse", "dq", "dk", "dv")
    assert_no_nan(*got, names=names)
    if same_dtype is not None:
        for name, g, p, w in zip(names, got, same_dtype, want):
            if name == "lse":  # fp32 in every dtype: an fp32-level tolerance, not the inputs' dtype
                assert torch.equal(torch.isinf(g), torch.isinf(w)), "lse -inf pattern differs"
                g, w = torch.where(torch.isinf(g), 0.0, g.double()), torch.where(torch.isinf(w), 0.0, w.double())
                torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-5, msg=lambda m: f"lse: {m}")
            else:
                assert_rows_within(name, g, p, w, case.dtype)
    if case.Sq * case.Sk > 1 << 20:  # GPU-tier sizes: the row criterion above is the test
        assert same_dtype is not None
        return
    for name, g, w in zip(names, got, want):
        kind = "out" if name in ("out", "lse") else "grad"
        tol = tolerances(case.dtype, kind)
        if name == "lse":
            assert torch.equal(torch.isinf(g), torch.isinf(w)), "lse -inf pattern differs"
            g, w = torch.where(torch.isinf(g), 0.0, g.double()), torch.where(torch.isinf(w), 0.0, w.double())
        torch.testing.assert_close(g.double(), w.double(), **tol, msg=lambda m: f"{name}: {m}")


def _same_dtype(case: Case, layout, q, k, v, do, dlse):
    """PyTorch's own computation in the inputs' dtype (the naive masked softmax)."""
    bq, bk = layout.block_size if layout is not None else (1, 1)
    elem = element_mask(None if layout is None else layout.to_block_mask().cpu(), bq, bk, case.Sq, case.Sk, case.Hq,
                        case.causal).to(q.device)
    return run_fwd_bwd(lambda a, b, c: naive_attention(a, b, c, elem, return_lse=True), q, k, v, do, dlse)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_triton_matches_reference(case: Case):
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    q, k, v = make_qkv(case.B, case.Hq, case.Hkv, case.Sq, case.Sk, case.D, case.dtype, DEVICE, generator=gen)
    layout = _layout(case, gen)
    do = torch.randn(q.shape, generator=gen).to(DEVICE, case.dtype)
    dlse = torch.randn(q.shape[:3], generator=gen).to(DEVICE)

    got = run_fwd_bwd(lambda a, b, c: sparse_attention(a, b, c, layout, causal=case.causal, return_lse=True,
                                                backend="triton"), q, k, v, do, dlse)
    want = run_fwd_bwd(lambda a, b, c: reference_attention(a, b, c, layout, causal=case.causal, return_lse=True),
                *(t.double() for t in (q, k, v)), do.double(), dlse.double())
    _compare(case, got, want, _same_dtype(case, layout, q, k, v, do, dlse))
    for t, ref in zip(got[2:], (q, k, v)):
        assert t.dtype == ref.dtype and t.shape == ref.shape

    # Rows that see nothing: exactly 0 out, -inf lse, 0 gradient.
    bq = layout.block_size[0] if layout is not None else 1
    seen = element_mask(None if layout is None else layout.to_block_mask().cpu(), bq,
                        layout.block_size[1] if layout is not None else 1, case.Sq, case.Sk, case.Hq,
                        case.causal).any(-1).expand(case.B, case.Hq, case.Sq)
    out, lse, dq = got[0], got[1], got[2]
    assert seen.any(), "every row is empty: the case would compare zeros with zeros"
    empty = ~seen.to(DEVICE)
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf")) and torch.all(dq[empty] == 0)
    assert not torch.isinf(lse[~empty]).any()


def test_against_naive_dense_mask():
    """An independent oracle: a plain masked softmax over the expanded element mask."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(1, 4, 2, 70, 90, 32, torch.float32, DEVICE, generator=gen)
    mask = random_block_mask(1, 4, 3, 3, 0.6, generator=gen)
    layout = BlockSparseLayout.from_block_mask(mask.to(DEVICE), 32, 70, 90)
    out = sparse_attention(q, k, v, layout, backend="triton")
    elem = element_mask(mask, 32, 32, 70, 90, 4, True).to(DEVICE)
    torch.testing.assert_close(out, naive_attention(q, k, v, elem), atol=2e-5, rtol=2e-5)


def test_all_blocks_off_gives_zeros():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 32, torch.float16, DEVICE, requires_grad=True)
    layout = BlockSparseLayout.from_block_mask(torch.zeros(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), 32, 40, 40)
    out, lse = sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.all(g == 0)


def test_strided_inputs_and_expanded_grad():
    """[B, S, H, D] storage passed as .transpose(1, 2), and a stride-0 upstream gradient
    (what ``out.sum().backward()`` produces)."""
    gen = torch.Generator().manual_seed(3)
    base_q = torch.randn(1, 70, 4, 32, generator=gen).to(DEVICE)
    base_kv = torch.randn(2, 1, 90, 2, 32, generator=gen).to(DEVICE)
    q = base_q.transpose(1, 2).requires_grad_(False)
    k, v = base_kv[0].transpose(1, 2), base_kv[1].transpose(1, 2)
    assert not q.is_contiguous()
    layout = BlockSparseLayout.from_block_mask(random_block_mask(1, 2, 3, 3, 0.7, generator=gen).to(DEVICE), 32, 70, 90)
    got = run_fwd_bwd(lambda a, b, c: sparse_attention(a, b, c, layout, return_lse=True, backend="triton"),
               q, k, v, torch.ones(()).expand(q.shape).to(DEVICE), torch.zeros(q.shape[:3], device=DEVICE))
    want = run_fwd_bwd(lambda a, b, c: reference_attention(a, b, c, layout, return_lse=True),
                q.double(), k.double(), v.double(), torch.ones(q.shape, dtype=torch.float64, device=DEVICE),
                torch.zeros(q.shape[:3], dtype=torch.float64, device=DEVICE))
    _compare(Case(dtype=torch.float32), got, want)

    # out.sum().backward() hands the op a stride-0 gradient.
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    sparse_attention(qq, kk, vv, layout, backend="triton").sum().backward()
    torch.testing.assert_close(qq.grad, got[2], atol=1e-5, rtol=1e-5)


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 2, 50, 50, 32, torch.float32, DEVICE)
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), 32, 50, 50)
    got = sparse_attention(q, k, v, layout, scale=0.3, causal=False, backend="triton")
    want = reference_attention(q, k, v, layout, scale=0.3, causal=False)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
