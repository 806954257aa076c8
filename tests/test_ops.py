"""The public op: validation, backend choice, custom-op registration, torch.compile."""

from __future__ import annotations

import pytest
import torch

from helpers import make_qkv
from sparse_attn import BlockSparseLayout, available_backends, reference_attention, sparse_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layout(sq=64, sk=64, hl=1, block=32, bl=1, device=DEVICE):
    mq, mk = -(-sq // block), -(-sk // block)
    return BlockSparseLayout.from_block_mask(torch.ones(bl, hl, mq, mk, dtype=torch.bool, device=device), block, sq, sk)


# -- validation: every bad input raises before any kernel runs, naming the argument ---------------
def _qkv(dtype=torch.float32):
    return make_qkv(1, 4, 2, 64, 64, 32, dtype, DEVICE)


BAD = [
    ("q-3d", lambda q, k, v: (q[0], k, v, None, {}), ValueError, "q must be 4-D"),
    ("k-not-tensor", lambda q, k, v: (q, k.tolist(), v, None, {}), TypeError, "k must be a torch.Tensor"),
    ("dtype-int", lambda q, k, v: (q.long(), k.long(), v.long(), None, {}), TypeError, "q must have dtype"),
    ("dtype-mix", lambda q, k, v: (q, k.half(), v, None, {}), TypeError, "k must have q's dtype"),
    ("fp64-triton", lambda q, k, v: (q.double(), k.double(), v.double(), None, {"backend": "triton"}),
     TypeError, "q must have dtype"),
    ("kv-shape-mix", lambda q, k, v: (q, k, v[:, :, :10], None, {}), ValueError, "k and v must have one shape"),
    ("batch-mix", lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v]), None, {}), ValueError, "batch size"),
    ("headdim-mix", lambda q, k, v: (q, k[..., :16], v[..., :16], None, {}), ValueError, "head dim"),
    ("head-ratio", lambda q, k, v: (q[:, :3], k, v, None, {}), ValueError, "multiple of k/v heads"),
    ("layout-type", lambda q, k, v: (q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), {}), TypeError,
     "layout must be a BlockSparseLayout"),
    ("layout-seq", lambda q, k, v: (q, k, v, _layout(sq=96), {}), ValueError, "layout was built for"),
    ("layout-heads", lambda q, k, v: (q, k, v, _layout(hl=3), {}), ValueError, "layout head dim"),
    ("layout-batch", lambda q, k, v: (q, k, v, _layout(bl=2), {}), ValueError, "layout batch dim"),
    ("backend-name", lambda q, k, v: (q, k, v, None, {"backend": "flash"}), ValueError, "backend must be one of"),
    ("scale-nan", lambda q, k, v: (q, k, v, None, {"scale": float("nan")}), ValueError, "scale must be"),
    ("causal-type", lambda q, k, v: (q, k, v, None, {"causal": "yes"}), TypeError, "causal must be a bool"),
    ("scale-huge", lambda q, k, v: (q, k, v, None, {"scale": 3e38}), ValueError, r"\|scale\| must be at most"),
    ("scale-str", lambda q, k, v: (q, k, v, None, {"scale": "0.1"}), ValueError, "scale must be"),
    ("return-lse-type", lambda q, k, v: (q, k, v, None, {"return_lse": "no"}), TypeError,
     "return_lse must be a bool"),
]


def test_numpy_scalars_are_accepted():
    """numpy scalars are ordinary numbers here: a float32 scale, a numpy bool flag, an int64 block."""
    np = pytest.importorskip("numpy")
    q, k, v = _qkv()
    layout = BlockSparseLayout.dense(64, 64, block_size=np.int64(32), device=DEVICE)
    out, lse = sparse_attention(q, k, v, layout, scale=np.float32(0.25), return_lse=np.bool_(True),
                                causal=np.bool_(False), backend="reference")
    want = sparse_attention(q, k, v, layout, scale=0.25, causal=False, backend="reference")
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert lse.shape == q.shape[:3]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, make, exc, msg):
    q, k, v, layout, kw = make(*_qkv())
    with pytest.raises(exc, match=msg):
        sparse_attention(q, k, v, layout, **kw)


def test_device_mix_raises():
    q, k, v = make_qkv(1, 2, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="k is on meta"):
        sparse_attention(q, k.to("meta"), v)
    layout = _layout(32, 32, device="meta")
    with pytest.raises(ValueError, match="layout is on meta"):
        sparse_attention(q, k, v, layout, backend="reference")


def test_head_dim_limit_of_kernels():
    q, k, v = make_qkv(1, 1, 1, 16, 16, 272)
    with pytest.raises(ValueError, match="head dim D=272"):
        sparse_attention(q, k, v, backend="triton")
    # The reference has no limit.
    assert sparse_attention(q, k, v, backend="reference").shape == q.shape


def test_cuda_backend_not_built_is_clear():
    q, k, v = _qkv()
    # a ValueError (bad input, as the README promises) whose advice works on this device
    advice = "'auto' or 'triton'" if q.is_cuda else "backend='reference'"
    with pytest.raises(ValueError, match=f"backend='cuda'.*{advice}"):
        sparse_attention(q, k, v, backend="cuda")


def test_bshd_inputs_get_a_hint():
    """[B, S, H, D] tensors (flash-attn's layout) are named in the error where the shapes show it."""
    q = torch.randn(1, 64, 8, 32, device=DEVICE)  # [B, S=64, Hq=8, D]
    kv48 = torch.randn(1, 48, 2, 32, device=DEVICE)  # [B, S=48, Hkv=2, D]: read as 64 heads over 48
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        sparse_attention(q, kv48, kv48)
    kv = torch.randn(1, 64, 2, 32, device=DEVICE)  # heads 64 / 64 pass; the layout's lengths do not
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        sparse_attention(q, kv, kv, BlockSparseLayout.dense(64, 64, 16, device=DEVICE))
    with pytest.raises(ValueError) as info:  # a plain length mismatch gets no hint
        sparse_attention(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2),
                         BlockSparseLayout.dense(32, 32, 16, device=DEVICE))
    assert "[B, S, H, D]" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_auto_on_cpu_is_reference_and_triton_needs_interpreter(monkeypatch):
    import sparse_attn.ops as ops

    assert "reference" in available_backends("cpu")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setattr(ops, "_INTERPRET", False)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sparse_attention(q, k, v, backend="triton")


# -- behaviour ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_return_forms(backend):
    q, k, v = _qkv(torch.float16)
    out = sparse_attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    out2, lse = sparse_attention(q, k, v, _layout(), return_lse=True, backend=backend)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    # an all-ones layout equals dense
    torch.testing.assert_close(out2, out, atol=2e-3, rtol=2e-3)


def test_zero_length_sequences():
    q, k, v = make_qkv(1, 2, 1, 0, 16, 16)
    assert sparse_attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = make_qkv(1, 2, 1, 5, 0, 16, requires_grad=True)
    out, lse = sparse_attention(q, k, v, causal=False, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_op_is_registered_with_fake():
    op = torch.ops.sparse_attn.sparse_attention.default
    q, k, v = (t.to("meta") for t in _qkv(torch.bfloat16))
    out, lse, stats = op(q, k, v, None, None, None, None, 64, 64, True, 0.1, "reference")
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert stats.shape == (0,)  # the reference's backward needs nothing besides lse
    _, _, stats = op(q, k, v, None, None, None, None, 64, 64, True, 0.1, "triton")
    assert stats.shape == (*q.shape[:3], 2) and stats.dtype == torch.float32  # row max and log2 sum
    torch.library.opcheck(
        torch.ops.sparse_attn.sparse_attention.default,
        tuple(t.requires_grad_(True) for t in _qkv()) + (None, None, None, None, 64, 64, True, 0.2, "reference"),
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(1, 4, 2, 80, 80, 32, torch.float32, DEVICE, generator=gen, requires_grad=True)
    mask = torch.rand(1, 2, 3, 3, generator=gen) < 0.6
    layout = BlockSparseLayout.from_block_mask(mask.to(DEVICE), 32, 80, 80)

    def f(q, k, v):
        out, lse = sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
        return out.sin().sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()

    compiled = torch.compile(f, fullgraph=True)
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_cpu():
    """Inductor (C++ codegen on CPU) compiles the surrounding graph around the op."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16)
    f = torch.compile(lambda q, k, v: sparse_attention(q * 2, k, v, causal=False) + 1, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), reference_attention(q * 2, k, v, causal=False) + 1)


def _nan_padded(t: torch.Tensor, pad: int = 96) -> torch.Tensor:
    """``t`` as a view into a larger NaN-filled buffer (``pad`` NaN rows before and after it along
    the sequence), so a read outside the view shows up as NaN in the result."""
    buf = torch.full((*t.shape[:2], t.shape[2] + 2 * pad, t.shape[3]), float("nan"), dtype=t.dtype, device=t.device)
    buf[:, :, pad:pad + t.shape[2]] = t
    return buf[:, :, pad:pad + t.shape[2]].detach().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("fill", [-5, 99, -2 ** 31, 2 ** 31 - 1])
def test_corrupt_block_ids_never_read_outside_qkv(fill):
    """Block ids overwritten after the layout was built (negative, past the end, int32 extremes)
    must not make the kernels read outside Q/K/V (they clamp what they load): Q/K/V sit inside
    NaN-filled buffers, so any stray read would turn the result non-finite."""
    if "triton" not in available_backends(DEVICE):
        pytest.skip("the Triton backend is not available here")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_nan_padded(t) for t in make_qkv(1, 2, 1, 100, 100, 32, torch.float32, DEVICE, generator=gen,
                                                 requires_grad=True))
    for block in (32, 16):  # 16: the interpreter's 32-row tiles walk a tile plan with bit masks
        layout = BlockSparseLayout.from_block_mask((torch.rand(1, 1, -(-100 // block), -(-100 // block),
                                                               generator=gen) < 0.6).to(DEVICE), block, 100, 100)
        layout.q_num  # noqa: B018 - build the transposed form, then corrupt both
        layout.kv_idx.fill_(fill)
        layout.q_idx.fill_(fill)
        out = sparse_attention(q, k, v, layout, backend="triton")
        out.sum().backward()
        for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            assert torch.isfinite(t).all(), f"block {block}, ids {fill}: {name} read outside its tensor"
        q.grad = k.grad = v.grad = None


def test_corrupt_counts_stay_inside_their_row():
    """A count past the index width is clamped to it: the walk never reads the next row's ids (or
    past the tensor), so the result equals the one with the count at the width."""
    if "triton" not in available_backends(DEVICE):
        pytest.skip("the Triton backend is not available here")
    q, k, v = make_qkv(1, 2, 1, 128, 128, 32, torch.float32, DEVICE)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, :2] = True  # row 0 keeps 2 of its 4 slots; the next rows keep others
    mask[..., 1:, 1:] = True
    full = BlockSparseLayout.from_block_mask(mask.to(DEVICE), 32, 128, 128)
    width = full.kv_idx.shape[-1]
    full.kv_num[..., 0] = width  # row 0 walks all its slots (the padding ones included)
    want = sparse_attention(q, k, v, full, causal=False, backend="triton")
    over = BlockSparseLayout.from_block_mask(mask.to(DEVICE), 32, 128, 128)
    over.kv_num[..., 0] = width + 3  # past the row: would walk row 1's ids
    got = sparse_attention(q, k, v, over, causal=False, backend="triton")
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_check_layouts_flag_rejects_corrupt_layouts(monkeypatch):
    import sparse_attn.ops as ops

    q, k, v = _qkv()
    layout = BlockSparseLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), 32, 64, 64)
    layout.check()  # a built layout is valid
    monkeypatch.setattr(ops, "_CHECK_LAYOUTS", True)
    sparse_attention(q, k, v, layout, backend="reference")
    layout.kv_idx.fill_(-5)
    with pytest.raises(ValueError, match="out of range"):
        sparse_attention(q, k, v, layout, backend="reference")
    good = BlockSparseLayout.from_block_mask(torch.tril(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE)),
                                             32, 64, 64)
    good.q_num  # noqa: B018 - builds the transposed form
    good.q_idx[0, 0, 1, 0] = 0  # column 1 now claims row 0: the forms disagree
    with pytest.raises(ValueError, match="different masks"):
        good.check()
