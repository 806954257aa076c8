"""Tests of sparse_attn.reference against a naive dense masked-softmax oracle (fp64)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import element_mask, make_qkv, naive_attention, random_block_mask, tolerances
from sparse_attn.layout import BlockSparseLayout
from sparse_attn.reference import reference_attention, reference_backward, reference_forward


def _cdiv(a, b):
    return -(-a // b)


def _pair(bs):
    return (bs, bs) if isinstance(bs, int) else tuple(bs)


# (B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal)
CASES = [
    pytest.param(2, 2, 2, 64, 64, 32, 16, 1, 1, False, id="B2-H2-S64-D32-b16-Bl1-Hl1-full"),
    pytest.param(1, 2, 2, 100, 100, 64, 32, 1, 1, True, id="B1-H2-S100-D64-b32-causal"),
    pytest.param(2, 4, 2, 37, 37, 32, 16, 2, 2, True, id="gqa2-S37-D32-b16-BlB-Hl=Hkv-causal"),
    pytest.param(2, 4, 2, 129, 100, 96, (32, 16), 1, 4, False, id="gqa2-Sq129>Sk100-D96-b32x16-Hl=Hq"),
    pytest.param(1, 4, 1, 129, 129, 64, (32, 16), 1, 4, False, id="gqa4-S129-D64-b32x16-Hl=Hq"),
    pytest.param(2, 4, 1, 100, 129, 128, 64, 2, 1, True, id="gqa4-Sq100<Sk129-D128-b64-BlB-Hl1-causal"),
    pytest.param(1, 4, 1, 37, 100, 32, 16, 1, 1, True, id="gqa4-Hl=Hkv=1-Sq37<Sk100-causal"),
    pytest.param(1, 2, 1, 37, 100, 32, (16, 64), 1, 2, True, id="gqa2-Sq37<Sk100-b16x64-Hl=Hq-causal"),
    pytest.param(2, 2, 2, 129, 37, 48, 16, 2, 2, True, id="Sq129>Sk37-D48-causal-empty-top-rows"),
    pytest.param(1, 2, 2, 1, 100, 64, 16, 1, 1, True, id="Sq1-Sk100-decode-causal"),
    pytest.param(1, 2, 2, 1, 37, 64, 32, 1, 2, False, id="Sq1-Sk37-noncausal"),
    pytest.param(1, 2, 1, 37, 1, 32, 16, 1, 1, True, id="Sq37-Sk1-causal"),
    pytest.param(1, 2, 2, 129, 100, 128, 128, 1, 2, True, id="S129x100-D128-b128-partial"),
    pytest.param(2, 2, 1, 100, 100, 80, (64, 128), 2, 1, False, id="gqa2-S100-D80-b64x128"),
]

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


class Problem:
    """A random problem plus everything needed to check it against the fp64 oracle."""

    def __init__(self, B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, dtype, seed=0, density=0.6):
        g = torch.Generator().manual_seed(seed)
        bq, bk = _pair(block_size)
        self.block_mask = random_block_mask(Bl, Hl, _cdiv(Sq, bq), _cdiv(Sk, bk), density, g)
        self.layout = BlockSparseLayout.from_block_mask(self.block_mask, block_size, Sq, Sk)
        self.causal = causal
        self.q, self.k, self.v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, generator=g, requires_grad=True)
        self.dout = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
        self.dlse = torch.randn(B, Hq, Sq, generator=g)
        self.elem = element_mask(self.block_mask, bq, bk, Sq, Sk, Hq, causal)
        self.empty = ~self.elem.any(-1).expand(B, Hq, Sq)  # [B, Hq, Sq] rows that see nothing
        # keys no query of their group sees: [B, Hkv, Sk]
        seen = self.elem.expand(B, Hq, Sq, Sk).any(2).view(B, Hkv, Hq // Hkv, Sk).any(2)
        self.unseen_keys = ~seen

    def oracle(self):
        q, k, v = (t.detach().double().requires_grad_(True) for t in (self.q, self.k, self.v))
        out, lse = naive_attention(q, k, v, self.elem, return_lse=True)
        return (q, k, v), out, lse

    def loss(self, out, lse):
        lse_finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out.double() * self.dout.double()).sum() + (lse_finite.double() * self.dlse.double()).sum()


def _assert_close(actual, expected, dtype, kind, what):
    torch.testing.assert_close(actual.double(), expected.double(), **tolerances(dtype, kind), msg=lambda m: f"{what}: {m}")


def _check_empty_rows_forward(p, out, lse):
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    assert torch.isneginf(lse[p.empty]).all(), "lse of rows that see nothing must be -inf"
    assert torch.isfinite(lse[~p.empty]).all(), "lse of rows that see something must be finite"
    assert (out[p.empty] == 0).all(), "out of rows that see nothing must be exactly 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,block_size,Bl,Hl,causal", CASES)
def test_forward_matches_naive(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, dtype):
    p = Problem(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, dtype)
    with torch.no_grad():
        out, lse = reference_attention(p.q, p.k, p.v, p.layout, causal=causal, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    _, out_ref, lse_ref = p.oracle()
    _check_empty_rows_forward(p, out, lse)
    _assert_close(out, out_ref.detach(), dtype, "out", "out")
    fin = ~p.empty
    _assert_close(lse[fin], lse_ref.detach()[fin], dtype, "out", "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,block_size,Bl,Hl,causal", CASES)
def test_backward_matches_naive(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, dtype):
    p = Problem(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, dtype, seed=1)
    out, lse = reference_attention(p.q, p.k, p.v, p.layout, causal=causal, return_lse=True)
    p.loss(out, lse).backward()
    (q64, k64, v64), out_ref, lse_ref = p.oracle()
    p.loss(out_ref, lse_ref).backward()
    for name, got, want in (("dq", p.q.grad, q64.grad), ("dk", p.k.grad, k64.grad), ("dv", p.v.grad, v64.grad)):
        assert got.dtype == dtype, name
        assert not torch.isnan(got).any(), f"NaN in {name}"
        _assert_close(got, want, dtype, "grad", name)
    assert (p.q.grad[p.empty] == 0).all(), "dq of rows that see nothing must be exactly 0"
    assert (p.k.grad[p.unseen_keys] == 0).all(), "dk of keys nobody sees must be exactly 0"
    assert (p.v.grad[p.unseen_keys] == 0).all(), "dv of keys nobody sees must be exactly 0"


@pytest.mark.parametrize(
    "causal", [pytest.param(False, id="noncausal"), pytest.param(True, id="causal")]
)
def test_dense_matches_sdpa(causal):
    """layout=None is dense attention; for Sq == Sk the causal masks of SDPA and ours agree."""
    g = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(2, 4, 4, 77, 77, 32, torch.float64, generator=g)
    out = reference_attention(q, k, v, None, causal=causal)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_custom_scale():
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 1, 50, 70, 32, torch.float64, generator=g)
    mask = random_block_mask(1, 1, 4, 5, 0.7, g)
    layout = BlockSparseLayout.from_block_mask(mask, 16, 50, 70)
    elem = element_mask(mask, 16, 16, 50, 70, 2, True)
    out, lse = reference_attention(q, k, v, layout, causal=True, scale=0.3, return_lse=True)
    out_ref, lse_ref = naive_attention(q, k, v, elem, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_ref, atol=1e-12, rtol=1e-12)
    # and it is not silently the default scale
    assert not torch.allclose(out, reference_attention(q, k, v, layout, causal=True))


def test_fp64_inputs_give_fp64_lse():
    g = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float64, generator=g)
    out, lse = reference_attention(q, k, v, None, return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64


# ----------------------------------------------------------------------------------------
# Rows that see nothing
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_empty(dtype):
    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 2, 1, 40, 50, 32, dtype, generator=g, requires_grad=True)
    layout = BlockSparseLayout.from_block_mask(torch.zeros(1, 1, 3, 4, dtype=torch.bool), 16, 40, 50)
    out, lse = reference_attention(q, k, v, layout, causal=False, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    (out.float() * 3.0).sum().backward()
    for t in (q, k, v):
        assert (t.grad == 0).all()


def test_nonzero_dlse_on_empty_rows_is_ignored():
    """Even when a loss sends gradient into lse = -inf rows, the grads there stay 0, no NaN."""
    g = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(1, 2, 2, 48, 48, 16, torch.float32, generator=g)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[0, 0, 1] = False
    _, lse = reference_forward(q, k, v, mask, (16, 16), causal=True)
    dout = torch.randn(q.shape, generator=g) * 100
    dlse = torch.randn(lse.shape, generator=g) * 100
    dq, dk, dv = reference_backward(dout, dlse, q, k, v, lse, mask, (16, 16), causal=True)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (dq[:, :, 16:32] == 0).all()
    assert (dq[:, :, :16] != 0).any()


# ----------------------------------------------------------------------------------------
# gradcheck (fp64)
# ----------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    # (B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, chunk_size)
    pytest.param(1, 2, 1, 20, 35, 4, 16, 1, 2, True, 7, id="gqa2-Sq20<Sk35-Hl=Hq-causal-chunk7"),
    pytest.param(2, 2, 1, 35, 20, 4, (32, 16), 2, 1, True, None, id="gqa2-Sq35>Sk20-BlB-Hl=Hkv-causal"),
    pytest.param(1, 4, 2, 18, 18, 4, 16, 1, 2, False, 5, id="gqa2-S18-Hl=Hkv-noncausal-chunk5"),
]


@pytest.mark.parametrize("return_lse", [pytest.param(False, id="out"), pytest.param(True, id="out+lse")])
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,block_size,Bl,Hl,causal,chunk_size", GRADCHECK_CASES)
def test_gradcheck(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, chunk_size, return_lse):
    g = torch.Generator().manual_seed(7)
    bq, bk = _pair(block_size)
    mask = random_block_mask(Bl, Hl, _cdiv(Sq, bq), _cdiv(Sk, bk), 0.7, g, ensure_empty_rows=Sq > bq)
    layout = BlockSparseLayout.from_block_mask(mask, block_size, Sq, Sk)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float64, generator=g, requires_grad=True)

    def fn(q, k, v):
        res = reference_attention(q, k, v, layout, causal=causal, return_lse=return_lse, chunk_size=chunk_size)
        if not return_lse:
            return res
        out, lse = res
        # lse is -inf on rows that see nothing; finite differences need finite outputs
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# Chunking
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,tol",
    [pytest.param(torch.float64, 1e-12, id="fp64"), pytest.param(torch.float32, 1e-5, id="fp32")],
)
@pytest.mark.parametrize("causal", [pytest.param(False, id="noncausal"), pytest.param(True, id="causal")])
def test_chunk_size_invariance(dtype, tol, causal):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 45, 70, 16
    g = torch.Generator().manual_seed(8)
    mask = random_block_mask(2, 2, 3, 5, 0.6, g)
    layout = BlockSparseLayout.from_block_mask(mask, 16, Sq, Sk)
    dout = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    dlse = torch.randn(B, Hq, Sq, generator=g).to(dtype)
    base = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, generator=g)
    results = {}
    for chunk in (1, 7, None, 1000):
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        out, lse = reference_attention(q, k, v, layout, causal=causal, return_lse=True, chunk_size=chunk)
        lse_fin = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        ((out * dout).sum() + (lse_fin * dlse).sum()).backward()
        results[chunk] = (out.detach(), lse.detach(), q.grad, k.grad, v.grad)
    names = ("out", "lse", "dq", "dk", "dv")
    for chunk in (7, None, 1000):
        for name, a, b in zip(names, results[1], results[chunk]):
            assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{name} chunk={chunk}"
            fa, fb = torch.where(torch.isinf(a), 0, a), torch.where(torch.isinf(b), 0, b)
            torch.testing.assert_close(fa, fb, atol=tol, rtol=tol, msg=lambda m: f"{name} chunk={chunk}: {m}")


# ----------------------------------------------------------------------------------------
# Memory: never an Sq x Sk tensor
# ----------------------------------------------------------------------------------------
class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces, and which ops ran."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.max_op = None
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.max_op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("chunk_size", [pytest.param(64, id="chunk64"), pytest.param(None, id="chunk-default")])
def test_memory_is_never_quadratic(chunk_size, monkeypatch):
    S, D = 4096, 16
    g = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(1, 1, 1, S, S, D, torch.float32, generator=g, requires_grad=True)
    mask = random_block_mask(1, 1, S // 64, S // 64, 0.5, g)
    layout = BlockSparseLayout.from_block_mask(mask, 64, S, S)

    matmul_numels = []
    real_matmul = torch.matmul

    def recording_matmul(*args, **kwargs):
        res = real_matmul(*args, **kwargs)
        matmul_numels.append(res.numel())
        return res

    monkeypatch.setattr(torch, "matmul", recording_matmul)

    fwd = _MaxNumel()
    with fwd:
        out, lse = reference_attention(q, k, v, layout, causal=True, return_lse=True, chunk_size=chunk_size)
    bwd = _MaxNumel()
    with bwd:
        (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()

    limit = S * S
    assert matmul_numels, "the reference did not go through torch.matmul at all?"
    assert max(matmul_numels) < limit
    assert "mm" in fwd.ops or "bmm" in fwd.ops or "matmul" in fwd.ops, fwd.ops
    assert "mm" in bwd.ops or "bmm" in bwd.ops or "matmul" in bwd.ops, bwd.ops
    assert fwd.max_numel < limit, f"forward made a {fwd.max_numel}-element tensor in {fwd.max_op}"
    assert bwd.max_numel < limit, f"backward made a {bwd.max_numel}-element tensor in {bwd.max_op}"
    if chunk_size == 64:  # a score tile is 64 x 4096; allow a few of them side by side
        assert fwd.max_numel <= 4 * 64 * S and bwd.max_numel <= 4 * 64 * S
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


# ----------------------------------------------------------------------------------------
# reference_forward / reference_backward, the functional API
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "with_dlse", [pytest.param(False, id="dlse-None"), pytest.param(True, id="dlse")]
)
@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
)
def test_functional_api_with_dlse(with_dlse, dtype):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 60, 90, 32
    bq, bk = 32, 16
    g = torch.Generator().manual_seed(10)
    mask = random_block_mask(B, Hkv, _cdiv(Sq, bq), _cdiv(Sk, bk), 0.6, g)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, generator=g)
    dout = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    dlse = torch.randn(B, Hq, Sq, generator=g) if with_dlse else None

    out, lse = reference_forward(q, k, v, mask, (bq, bk), causal=True, chunk_size=16)
    assert out.dtype == dtype and lse.dtype == torch.float32
    dq, dk, dv = reference_backward(dout, dlse, q, k, v, lse, mask, (bq, bk), causal=True, chunk_size=16)
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype, dtype, dtype)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    elem = element_mask(mask, bq, bk, Sq, Sk, Hq, True)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    out_ref, lse_ref = naive_attention(q64, k64, v64, elem, return_lse=True)
    loss = (out_ref * dout.double()).sum()
    if with_dlse:
        loss = loss + (torch.where(torch.isfinite(lse_ref), lse_ref, 0) * dlse.double()).sum()
    loss.backward()

    torch.testing.assert_close(out.double(), out_ref.detach(), **tolerances(dtype, "out"))
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], lse_ref.detach()[fin], **tolerances(dtype, "out"))
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        torch.testing.assert_close(got.double(), want, **tolerances(dtype, "grad"), msg=lambda m: f"{name}: {m}")


def test_functional_dense_block_mask_none_equals_full_mask():
    g = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 2, 1, 40, 56, 32, torch.float64, generator=g)
    full = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    a_out, a_lse = reference_forward(q, k, v, None, (16, 16), causal=True)
    b_out, b_lse = reference_forward(q, k, v, full, (16, 16), causal=True)
    torch.testing.assert_close(a_out, b_out, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(a_lse, b_lse, atol=1e-13, rtol=1e-13)
    out_ref, lse_ref = naive_attention(q, k, v, element_mask(None, 16, 16, 40, 56, 2, True), return_lse=True)
    torch.testing.assert_close(a_out, out_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a_lse, lse_ref, atol=1e-12, rtol=1e-12)


def test_bottom_right_causal_alignment_example():
    """The docstring's Sq = 3, Sk = 5 example: row i sees keys j <= i + 2."""
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)  # uniform attention over visible keys
    k = torch.zeros(1, 1, 5, 4, dtype=torch.float64)
    v = torch.arange(5, dtype=torch.float64).view(1, 1, 5, 1).expand(1, 1, 5, 4).contiguous()
    out, lse = reference_attention(q, k, v, None, causal=True, return_lse=True)
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(lse[0, 0], torch.log(torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)))
