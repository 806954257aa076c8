"""merge_attention: two partial attentions over disjoint key sets == one-shot attention.

The one-shot result comes from ``sparse_attention`` on the union (checked elsewhere against
the naive oracle); here the parts are split by layout (disjoint block sets, as ring / context
parallel does) or by key range (chunked prefill: cached prefix + current chunk), on the
reference and on the Triton kernels (interpreter on CPU), forward and gradients.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_no_nan, make_qkv, naive_attention, random_block_mask, tolerances
from sparse_attn import BlockSparseLayout, available_backends, sparse_attention
from sparse_attn.merge import merge_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference"] + (["triton"] if "triton" in available_backends(DEVICE) else [])


def _loss(out, lse, g_out, g_lse):
    """A loss that reads both outputs; lse's -inf rows (no key at all) are left out."""
    finite = torch.isfinite(lse)
    return (out.float() * g_out).sum() + torch.where(finite, lse * g_lse, 0.0).sum()


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def _assert_lse_close(lse, ref, **tol):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), "rows without keys differ"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(lse[finite], ref[finite], **tol)


def _compare(q, k, v, one_shot, parts, dtype):
    """``one_shot(q, k, v) -> (out, lse)``; ``parts(q, k, v) -> ((out_a, lse_a), (out_b, lse_b))``."""
    out_ref, lse_ref = one_shot(q, k, v)
    (oa, la), (ob, lb) = parts(q, k, v)
    out, lse = merge_attention(oa, la, ob, lb)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    assert_no_nan(out, lse, names=["out", "lse"])
    tol = tolerances(dtype)
    torch.testing.assert_close(out, out_ref, **tol)
    _assert_lse_close(lse, lse_ref, **tol)

    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    g_lse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    want = _grads(_loss(out_ref, lse_ref, g_out, g_lse), (q, k, v))
    got = _grads(_loss(out, lse, g_out, g_lse), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert_no_nan(a, names=[f"d{name}"])
        torch.testing.assert_close(a, b, **tolerances(dtype, "grad"), msg=f"d{name}")


def _layout(mask, block, sq, sk):
    return BlockSparseLayout.from_block_mask(mask.to(DEVICE), block, sq, sk)


# (B, Hq, Hkv, Sq, Sk, D, block)
LAYOUT_CASES = [
    (1, 4, 2, 100, 100, 32, 32),  # GQA, odd length, partial last block
    (2, 2, 2, 37, 90, 16, 16),  # Sq < Sk (bottom-right causal), per-batch layouts
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "B{}_H{}-{}_S{}-{}_D{}_b{}".format(*c))
def test_layout_split_matches_one_shot(case, backend):
    """Keys split by block: A = mask & R, B = mask & ~R (disjoint); both causal."""
    b, hq, hkv, sq, sk, d, block = case
    gen = torch.Generator().manual_seed(sum(case))
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float32, DEVICE, gen, requires_grad=True)
    mq, mk = -(-sq // block), -(-sk // block)
    mask = random_block_mask(b if b > 1 else 1, hkv, mq, mk, 0.7, gen)  # with an empty row per head
    split = torch.rand(mask.shape, generator=gen) < 0.5
    full, part_a, part_b = (_layout(m, block, sq, sk) for m in (mask, mask & split, mask & ~split))

    def run(layout, q, k, v):
        return sparse_attention(q, k, v, layout, causal=True, return_lse=True, backend=backend)

    _compare(q, k, v, lambda q, k, v: run(full, q, k, v),
             lambda q, k, v: (run(part_a, q, k, v), run(part_b, q, k, v)), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_chunked_prefill_key_split(backend, sparse):
    """Keys split by range: the cached prefix ``[0, P)`` (all before every query: not causal)
    and the current chunk ``[P, Sk)`` (causal, ``Sq == Sk - P``), P block-aligned so a layout
    of the whole problem splits by key-block columns."""
    b, hq, hkv, sq, sk, d, block = 1, 4, 1, 45, 109, 32, 16
    p = sk - sq  # 64 = 4 key blocks
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, torch.float32, DEVICE, gen, requires_grad=True)
    mq, mk = -(-sq // block), -(-sk // block)
    if sparse:
        mask = random_block_mask(1, hkv, mq, mk, 0.6, gen, ensure_empty_rows=False)
        mask[..., 0] = False  # no block 0: with a sparse chunk part, some rows see only one side
        full = _layout(mask, block, sq, sk)
        pre = _layout(mask[..., : p // block], block, sq, p)
        cur = _layout(mask[..., p // block :], block, sq, sk - p)
    else:
        full = pre = cur = None

    def parts(q, k, v):
        a = sparse_attention(q, k[:, :, :p], v[:, :, :p], pre, causal=False, return_lse=True, backend=backend)
        c = sparse_attention(q, k[:, :, p:], v[:, :, p:], cur, causal=True, return_lse=True, backend=backend)
        return a, c

    _compare(q, k, v, lambda q, k, v: sparse_attention(q, k, v, full, causal=True, return_lse=True,
                                                       backend=backend), parts, torch.float32)


def test_three_way_split_is_associative():
    """Ring attention merges one shard at a time: ((A, B), C) == one shot == (A, (B, C))."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(2, 4, 2, 33, 70, 16, torch.float64, DEVICE, gen)
    cuts = (0, 20, 51, 70)
    parts = [naive_attention(q, k[:, :, a:c], v[:, :, a:c], return_lse=True) for a, c in zip(cuts, cuts[1:])]
    ref = naive_attention(q, k, v, return_lse=True)
    left = merge_attention(*merge_attention(*parts[0], *parts[1]), *parts[2])
    right = merge_attention(*parts[0], *merge_attention(*parts[1], *parts[2]))
    for got in (left, right):
        assert got[1].dtype == torch.float64
        torch.testing.assert_close(got[0], ref[0], **tolerances(torch.float64))
        torch.testing.assert_close(got[1], ref[1], **tolerances(torch.float64))


def _random_inputs(dtype=torch.float64, gen=None):
    b, h, s, d = 2, 3, 6, 5
    out_a, out_b = (torch.randn(b, h, s, d, generator=gen, dtype=dtype) for _ in range(2))
    lse_a, lse_b = (torch.randn(b, h, s, generator=gen, dtype=dtype) * 3 for _ in range(2))
    # Row 0: A empty; row 1: B empty; row 2: both empty (their outs are 0 by the op's convention).
    for lse, out, rows in ((lse_a, out_a, [0, 2]), (lse_b, out_b, [1, 2])):
        lse[:, :, rows] = float("-inf")
        out[:, :, rows] = 0.0
    return out_a, lse_a, out_b, lse_b


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(0)
    inputs = [t.requires_grad_() for t in _random_inputs(gen=gen)]

    def f(*xs):
        out, lse = merge_attention(*xs)
        return out, torch.where(torch.isinf(lse), 0.0, lse)  # finite differences of -inf are NaN

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_empty_rows_forward_and_backward():
    gen = torch.Generator().manual_seed(1)
    out_a, lse_a, out_b, lse_b = (t.float().requires_grad_() for t in _random_inputs(gen=gen))
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    # One side empty: the other side exactly (its weight is exp(0) / (1 + 0) = 1).
    torch.testing.assert_close(out[:, :, 0], out_b[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(lse[:, :, 0], lse_b[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 1], out_a[:, :, 1], rtol=0, atol=0)
    torch.testing.assert_close(lse[:, :, 1], lse_a[:, :, 1], rtol=0, atol=0)
    # Both empty: 0 and -inf.
    assert torch.all(out[:, :, 2] == 0) and torch.all(torch.isneginf(lse[:, :, 2]))
    assert not torch.isinf(lse[:, :, 3:]).any()
    # Backward through everything, lse's -inf rows included: finite, zero where a side is empty.
    (out.sum() + lse.sum()).backward()
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        assert torch.isfinite(t.grad).all(), f"{name}.grad is not finite"
    assert torch.all(out_a.grad[:, :, [0, 2]] == 0) and torch.all(lse_a.grad[:, :, [0, 2]] == 0)
    assert torch.all(out_b.grad[:, :, [1, 2]] == 0) and torch.all(lse_b.grad[:, :, [1, 2]] == 0)


def test_garbage_out_of_an_empty_side_is_ignored():
    gen = torch.Generator().manual_seed(2)
    out_a, lse_a, out_b, lse_b = _random_inputs(dtype=torch.float32, gen=gen)
    out_a[:, :, 0] = float("nan")
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert_no_nan(out, lse)
    torch.testing.assert_close(out[:, :, 0], out_b[:, :, 0], rtol=0, atol=0)


def test_low_precision_inputs_merge_in_fp32():
    gen = torch.Generator().manual_seed(4)
    out_a, lse_a, out_b, lse_b = _random_inputs(dtype=torch.float32, gen=gen)
    ref_out, ref_lse = merge_attention(out_a.bfloat16().float(), lse_a, out_b.bfloat16().float(), lse_b)
    out, lse = merge_attention(out_a.bfloat16(), lse_a, out_b.bfloat16(), lse_b)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


BAD = [
    ("out_a-3d", lambda a, la, b, lb: (a[0], la, b, lb), ValueError, "out_a must be 4-D"),
    ("out_b-shape", lambda a, la, b, lb: (a, la, b[..., :2], lb), ValueError, "out_b must have"),
    ("lse_a-shape", lambda a, la, b, lb: (a, la[..., :1], b, lb), ValueError, "lse_a must have shape"),
    ("lse_b-int", lambda a, la, b, lb: (a, la, b, lb.long()), TypeError, "lse_b must be a floating"),
    ("out_b-list", lambda a, la, b, lb: (a, la, b.tolist(), lb), TypeError, "out_b must be a torch.Tensor"),
    ("lse_a-device", lambda a, la, b, lb: (a, la.to("meta"), b, lb), ValueError, "lse_a is on meta"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[x[0] for x in BAD])
def test_bad_input_raises(name, make, exc, msg):
    with pytest.raises(exc, match=msg):
        merge_attention(*make(*_random_inputs(dtype=torch.float32)))
