"""``attention_block_map`` (SeerAttention's target): the Triton kernel and the chunked
PyTorch path against a naive dense computation.

The oracle below materialises the whole ``[Sq, Sk]`` probability matrix in fp64 and pools
it with explicit loops over blocks, so it shares nothing with either implementation. On a
CPU machine the kernel runs under ``TRITON_INTERPRET=1`` (set by conftest) on small shapes;
the ``gpu``-marked test runs it compiled at a real size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import element_mask, make_qkv, tolerances
from sparse_attn import reference_attention, sparse_attention
from sparse_attn.patterns import attention_block_map
from sparse_attn.benchmark.static import SMEM_LIMIT
from sparse_attn.patterns.block_map import block_map_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def naive_block_map(q, k, block_size, causal=True, scale=None, pool_queries=True, reduce_gqa=None):
    """Dense fp64 oracle: full softmax matrix, block maxima by explicit loops, rows normalised."""
    q, k = q.double().cpu(), k.double().cpu()
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    s = q @ k.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2) * scale
    allowed = element_mask(None, 1, 1, sq, sk, hq, causal)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # rows that see nothing: NaN -> 0
    mq, mk = -(-sq // block_size), -(-sk // block_size)
    per_row = torch.zeros(b, hq, sq, mk, dtype=torch.float64)
    for c in range(mk):
        per_row[..., c] = p[..., c * block_size:(c + 1) * block_size].amax(-1)
    if reduce_gqa == "max":
        per_row = per_row.view(b, hkv, hq // hkv, sq, mk).amax(2)
    m = per_row
    if pool_queries:
        m = torch.zeros(*per_row.shape[:2], mq, mk, dtype=torch.float64)
        for r in range(mq):
            m[:, :, r] = per_row[:, :, r * block_size:(r + 1) * block_size].amax(2)
    total = m.sum(-1, keepdim=True)
    return torch.where(total > 0, m / total.clamp_min(1e-300), 0.0)


@dataclass(frozen=True)
class Case:
    Hq: int = 4
    Hkv: int = 2
    Sq: int = 100
    Sk: int = 100
    D: int = 32
    block: int = 32
    causal: bool = True
    pool: bool = True
    reduce: Optional[str] = None
    dtype: torch.dtype = torch.float32
    output: bool = False
    B: int = 1
    strided: bool = False  # q/k/v as [B, S, H, D] storage seen through .transpose(1, 2)

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-S{self.Sq}x{self.Sk}-D{self.D}-b{self.block}-"
                f"{'causal' if self.causal else 'full'}-{'pool' if self.pool else 'tok'}-{self.reduce or 'all'}-{dt}"
                f"{'-out' if self.output else ''}{'-strided' if self.strided else ''}")


CASES = [
    # dtypes, with the output
    Case(output=True), Case(dtype=torch.float16, output=True), Case(dtype=torch.bfloat16, output=True),
    # GQA 4/1 reduced, Sq < Sk, 16-blocks
    Case(Hq=4, Hkv=1, Sq=37, Sk=129, block=16, reduce="max", output=True),
    # Sq > Sk causal: the first 92 queries see nothing -> zero rows
    Case(Hq=2, Hkv=2, Sq=129, Sk=37, output=True),
    # not causal, 64-blocks, odd lengths, padded head dim
    Case(Sq=100, Sk=129, block=64, causal=False, D=80, dtype=torch.float16),
    Case(Sq=37, Sk=37, block=16, causal=False, dtype=torch.bfloat16, B=2),
    # pooled and reduced over the group
    Case(Sq=129, Sk=129, block=64, reduce="max", dtype=torch.bfloat16),
    # per-token maps (decode-gate target), with and without the group reduction
    Case(Sq=37, Sk=100, block=16, pool=False, dtype=torch.bfloat16, output=True),
    Case(pool=False, reduce="max", strided=True),
    Case(Hq=4, Hkv=1, Sq=129, Sk=129, block=64, pool=False, reduce="max", causal=False, dtype=torch.float16),
    # a group of 3 (padded to 4 in the kernel), Sq > Sk: empty per-token rows
    Case(Hq=6, Hkv=2, Sq=70, Sk=50, block=16, pool=False, reduce="max", output=True),
    # a group larger than the interpreter's row tile (32): the per-head launch + max fallback
    Case(Hq=64, Hkv=1, Sq=20, Sk=20, D=16, block=16, pool=False, reduce="max"),
]

# GPU tier: real sizes, compiled kernel vs the PyTorch path on the same GPU.
GPU_CASES = [
    Case(B=2, Hq=32, Hkv=8, Sq=4096, Sk=4096, D=128, block=64, dtype=torch.bfloat16, output=True),
    Case(B=1, Hq=32, Hkv=8, Sq=4096, Sk=4096, D=128, block=64, pool=False, reduce="max", dtype=torch.bfloat16),
    Case(B=1, Hq=28, Hkv=4, Sq=1000, Sk=8191, D=128, block=128, reduce="max", dtype=torch.float16, output=True),
    Case(B=1, Hq=8, Hkv=8, Sq=3001, Sk=3001, D=64, block=32, causal=False, dtype=torch.float32),
    Case(B=1, Hq=16, Hkv=2, Sq=2048, Sk=2048, D=256, block=16, pool=False, dtype=torch.bfloat16, output=True),
]

MAP_TOL = dict(atol=2e-5, rtol=1e-4)


def _inputs(case: Case, device: str = DEVICE):
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    q, k, v = make_qkv(case.B, case.Hq, case.Hkv, case.Sq, case.Sk, case.D, case.dtype, "cpu", generator=gen)
    if case.strided:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return tuple(t.to(device) for t in (q, k, v))


def _run(case: Case, backend: str, q, k, v):
    kw = dict(block_size=case.block, causal=case.causal, pool_queries=case.pool, reduce_gqa=case.reduce)
    if case.output:
        return attention_block_map(q, k, return_output=True, v=v, backend=backend, **kw)
    return attention_block_map(q, k, backend=backend, **kw), None


def _check_map(case: Case, got: torch.Tensor, want: torch.Tensor, tol: dict) -> None:
    h = case.Hkv if case.reduce else case.Hq
    rows = -(-case.Sq // case.block) if case.pool else case.Sq
    assert got.shape == (case.B, h, rows, -(-case.Sk // case.block)) and got.dtype == torch.float32
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double().cpu(), want, **tol)
    # Every row sums to 1, or is all zeros exactly where its queries see no key.
    sums = got.sum(-1).cpu()
    empty = want.sum(-1) == 0
    assert torch.all(got.cpu()[empty] == 0)
    torch.testing.assert_close(sums[~empty], torch.ones_like(sums[~empty]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive(case: Case):
    q, k, v = _inputs(case, "cpu")
    got, out = _run(case, "reference", q, k, v)
    _check_map(case, got, naive_block_map(q, k, case.block, case.causal, None, case.pool, case.reduce), MAP_TOL)
    if case.output:
        want = reference_attention(q, k, v, causal=case.causal)
        assert out.dtype == q.dtype
        torch.testing.assert_close(out, want, **tolerances(case.dtype))


def _check_triton(case: Case):
    q, k, v = _inputs(case)
    got, out = _run(case, "triton", q, k, v)
    big = case.Sq * case.Sk > 1 << 20
    if big:  # GPU tier: the PyTorch path on the same device is the oracle (the naive one is too big)
        want, _ = block_map_reference(q, k, block_size=case.block, causal=case.causal,
                                      pool_queries=case.pool, reduce_gqa=case.reduce)
        want = want.double().cpu()
    else:
        want = naive_block_map(q, k, case.block, case.causal, None, case.pool, case.reduce)
    _check_map(case, got, want, dict(atol=1e-4, rtol=1e-3) if big else MAP_TOL)
    if not case.output:
        return
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    if big:  # tiles differ from the forward kernel's: compare by relative norm (bf16 rounding of P)
        ref = sparse_attention(q, k, v, causal=case.causal).double()
        limit = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[case.dtype]
        assert ((out.double() - ref).norm() / ref.norm()).item() < limit
    else:
        torch.testing.assert_close(out, reference_attention(q, k, v, causal=case.causal), **tolerances(case.dtype))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_naive(case: Case):
    _check_triton(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_gpu_real_size(case: Case):
    _check_triton(case)


def test_triton_without_output_matches_with_output():
    """The kernel's two pass-1 variants (statistics only / with the output) give one map."""
    case = Case(Hq=4, Hkv=2, Sq=70, Sk=90, block=16, pool=False, reduce="max")
    q, k, v = _inputs(case)
    a = attention_block_map(q, k, block_size=16, pool_queries=False, reduce_gqa="max", backend="triton")
    b, _ = attention_block_map(q, k, block_size=16, pool_queries=False, reduce_gqa="max", return_output=True, v=v,
                               backend="triton")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_scale_and_empty_inputs():
    q, k, v = _inputs(Case(Sq=50, Sk=40, block=16))
    got = attention_block_map(q, k, block_size=16, scale=0.7, backend="triton")
    torch.testing.assert_close(got.double().cpu(), naive_block_map(q, k, 16, True, 0.7), **MAP_TOL)
    m, out = attention_block_map(q[:, :, :0], k, block_size=16, return_output=True, v=v)
    assert m.shape == (1, 4, 0, 3) and out.shape == (1, 4, 0, 32)
    m, out = attention_block_map(q, k[:, :, :0], block_size=16, return_output=True, v=v[:, :, :0])
    assert m.shape == (1, 4, 4, 0) and torch.all(out == 0)


def test_not_differentiable():
    q, k, v = (t.requires_grad_(True) for t in _inputs(Case(Sq=40, Sk=40), "cpu"))
    m, out = attention_block_map(q, k, block_size=16, return_output=True, v=v)
    assert not m.requires_grad and not out.requires_grad


def test_reference_chunking_is_invisible():
    q, k, v = _inputs(Case(Hq=4, Hkv=2, Sq=90, Sk=77, block=16), "cpu")
    for pool in (True, False):
        whole, out = block_map_reference(q, k, v, block_size=16, pool_queries=pool, reduce_gqa="max", chunk_size=10**6)
        small, out_s = block_map_reference(q, k, v, block_size=16, pool_queries=pool, reduce_gqa="max", chunk_size=7)
        torch.testing.assert_close(small, whole, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(out_s, out, atol=1e-6, rtol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any single op output had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "tok"])
def test_cpu_path_never_materialises_sq_by_sk(pool):
    """8192 tokens on the CPU path: no tensor anywhere near Sq x Sk (= 67M) is created."""
    s = 8192
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, s, 16, generator=gen), torch.randn(1, 1, s, 16, generator=gen)
    with _LargestTensor() as probe:
        m = attention_block_map(q, k, block_size=64, pool_queries=pool)
    assert probe.largest <= s * s // 8, f"an op produced {probe.largest} elements"
    assert m.shape == (1, 1, 128 if pool else s, 128)
    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)
    assert torch.all(m[0, 0, 0 if pool else 0, 1:] == 0)  # causal: the first rows see only block 0


BAD = [
    (dict(q="x"), TypeError, "q must be"),
    (dict(q=torch.zeros(2, 8, 4)), ValueError, "q must be 4-D"),
    (dict(k=torch.zeros(1, 2, 8, 4, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    (dict(k=torch.zeros(1, 3, 8, 4)), ValueError, "multiple of k heads"),
    (dict(k=torch.zeros(2, 2, 8, 4)), ValueError, "batch size"),
    (dict(k=torch.zeros(1, 2, 8, 5)), ValueError, "head dim"),
    (dict(q=torch.zeros(1, 4, 8, 4, dtype=torch.int32), k=torch.zeros(1, 2, 8, 4, dtype=torch.int32)), TypeError,
     "q must have dtype"),
    (dict(block_size=48), ValueError, "block_size"),
    (dict(block_size=64.0), TypeError, "block_size"),
    (dict(causal=1), TypeError, "causal"),
    (dict(pool_queries=None), TypeError, "pool_queries"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(reduce_gqa="mean"), ValueError, "reduce_gqa"),
    (dict(return_output=True), ValueError, "needs v"),
    (dict(return_output=True, v=torch.zeros(1, 2, 9, 4)), ValueError, "k and v must have one shape"),
    (dict(v=torch.zeros(1, 2, 8, 4)), ValueError, "v is only used"),
    (dict(return_output="yes"), TypeError, "return_output"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend="triton", q=torch.zeros(1, 4, 8, 512), k=torch.zeros(1, 2, 8, 512)), ValueError, "head dim"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_validation(bad, exc, msg):
    args = dict(q=torch.zeros(1, 4, 8, 4), k=torch.zeros(1, 2, 8, 4), backend="reference")
    args.update(bad)
    q, k = args.pop("q"), args.pop("k")
    if args["backend"] == "triton":  # a kernel-only limit: checked where the kernel can run
        q, k = q.to(DEVICE), k.to(DEVICE)
    with pytest.raises(exc, match=msg):
        attention_block_map(q, k, **args)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile for real GPUs (the interpreter does not run Triton's compiler)
# --------------------------------------------------------------------------------------------
COMPILE_CASES = [  # (cc, dtype, D, block, pool, group packed, output, causal)
    (90, "bf16", 128, 64, True, 1, True, True),
    (90, "bf16", 128, 64, False, 8, False, True),
    (90, "bf16", 256, 128, True, 4, True, False),
    (80, "fp32", 128, 32, True, 2, False, True),
    (80, "fp16", 64, 16, False, 1, True, False),
]


def test_compile_runs_outside_interpreter():
    """Under TRITON_INTERPRET=1 kernels cannot be compiled: run the compile test in a child
    process without it."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the compile test runs directly in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "compiles_for_gpu"], env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert f"{len(COMPILE_CASES)} passed" in proc.stdout, tail


@pytest.mark.parametrize("cc,dt,d,block,pool,pack,output,causal", COMPILE_CASES,
                         ids=[f"sm{c[0]}-{c[1]}-D{c[2]}-b{c[3]}-{'pool' if c[4] else 'tok'}-pack{c[5]}"
                              f"{'-out' if c[6] else ''}-{'causal' if c[7] else 'full'}" for c in COMPILE_CASES])
def test_kernel_compiles_for_gpu(cc, dt, d, block, pool, pack, output, causal):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("interpreted here; test_compile_runs_outside_interpreter compiles it")
    pytest.importorskip("triton")
    from sparse_attn.benchmark.static import compile_kernel
    from sparse_attn.triton_kernels import block_map

    tiles = block_map.block_map_tiles("hopper" if cc >= 90 else "ampere", d, 4 if dt == "fp32" else 2, block,
                                      pack, pool)
    warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
    ptr = "*" + dt
    consts = dict(HEAD_DIM=d, CAUSAL=causal, POOL=pool, OUTPUT=output, UPCAST=False,
                  DOT_PREC="ieee" if dt == "fp32" else "tf32", **tiles)
    if not output:
        consts.update(V=None, O=None)
    types = dict(Q=ptr, K=ptr, V=ptr, O=ptr, MAP="*fp32", qk_scale="fp32")
    compiled = compile_kernel(block_map._block_map_kernel, types, consts, cc, warps, stages)
    assert compiled["regs"] > 0
    assert compiled["smem_bytes"] <= SMEM_LIMIT[cc], f"{compiled['smem_bytes']} B of shared memory, tiles {tiles}"
