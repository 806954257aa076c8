"""FlexAttention as a second, independent oracle for the reference implementation.

The mask is expressed directly in a FlexAttention ``mask_mod`` from the spec (block
lookup ``bm[b, h // group, q // bq, k // bk]`` plus bottom-right causal
``k <= q + (Sk - Sq)``), so it shares no code with ``sparse_attn`` or ``helpers``.

On CPU, FlexAttention only runs fused under ``torch.compile`` and then supports
inference only, without the log-sum-exp (torch 2.13: "torch.compile on CPU only
supports inference and `return_lse` is not supported yet"). So the compiled kernel
checks ``out``; the eager (unfused, math) FlexAttention, which does return the lse on
CPU, checks ``lse``. Both give exactly 0 / ``-inf`` on rows that see nothing, which is
asserted below for both.
"""

import warnings

import pytest
import torch

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

from helpers import make_qkv, random_block_mask  # noqa: E402
from sparse_attn.layout import BlockSparseLayout  # noqa: E402
from sparse_attn.reference import reference_attention  # noqa: E402

# One compiled function for the whole module (compilation is the slow part).
# dynamic=False: torch 2.13 CPU inductor emits uncompilable C++ for flex with dynamic
# shapes ("cur_kvSplitSize9 was not declared"), which automatic-dynamic would pick on
# the second shape; static shapes recompile per case but work.
_compiled_flex = torch.compile(flex_attention, dynamic=False)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 on both sides; a GPU kernel may sum in another order (or use TF32), so a bit looser there.
TOL = dict(atol=2e-5, rtol=2e-5) if DEVICE == "cpu" else dict(atol=2e-4, rtol=2e-4)


def _cdiv(a, b):
    return -(-a // b)


def _pair(bs):
    return (bs, bs) if isinstance(bs, int) else tuple(bs)


def _flex_block_mask(bm, block_size, B, Hq, Sq, Sk, causal):
    """FlexAttention BlockMask for our semantics, from the boolean block mask ``bm``."""
    bq, bk = _pair(block_size)
    Bl, Hl, Mq, Mk = bm.shape
    bmx = bm.to(DEVICE).expand(B, Hl, Mq, Mk)
    group = Hq // Hl  # query head h uses layout head h // group (Hl in {1, Hkv, Hq})
    offset = Sk - Sq

    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            return bmx[b, h // group, q_idx // bq, kv_idx // bk] & (kv_idx <= q_idx + offset)

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return bmx[b, h // group, q_idx // bq, kv_idx // bk]

    return create_block_mask(mask_mod, B, Hq, Sq, Sk, device=DEVICE)


def _eager_flex_with_lse(q, k, v, block_mask, enable_gqa):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        if hasattr(flex_mod, "AuxRequest"):
            out, aux = flex_attention(
                q, k, v, block_mask=block_mask, enable_gqa=enable_gqa, return_aux=flex_mod.AuxRequest(lse=True)
            )
            return out, aux.lse
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa, return_lse=True)


# (B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal)
CASES = [
    pytest.param(2, 2, 2, 100, 130, 32, 32, 2, 2, False, id="random-noncausal-S100x130-b32-BlB-Hl=Hq"),
    pytest.param(1, 2, 2, 128, 128, 32, 16, 1, 1, True, id="causal+blocks-S128-b16-Bl1-Hl1"),
    pytest.param(2, 4, 2, 100, 130, 32, (32, 16), 2, 2, True, id="gqa2-Sq100<Sk130-causal-b32x16-Hl=Hkv"),
    pytest.param(1, 4, 1, 130, 70, 32, 16, 1, 4, True, id="gqa4-Sq130>Sk70-causal-b16-Hl=Hq-empty-top-rows"),
]


def _problem(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, seed):
    g = torch.Generator().manual_seed(seed)
    bq, bk = _pair(block_size)
    bm = random_block_mask(Bl, Hl, _cdiv(Sq, bq), _cdiv(Sk, bk), 0.6, g)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, torch.float32, device=DEVICE, generator=g)
    layout = BlockSparseLayout.from_block_mask(bm.to(DEVICE), block_size, Sq, Sk)
    with torch.no_grad():
        out_ref, lse_ref = reference_attention(q, k, v, layout, causal=causal, return_lse=True)
    flex_bm = _flex_block_mask(bm, block_size, B, Hq, Sq, Sk, causal)
    return q, k, v, flex_bm, out_ref, lse_ref


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,block_size,Bl,Hl,causal", CASES)
def test_compiled_flex_out_matches_reference(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal):
    q, k, v, flex_bm, out_ref, lse_ref = _problem(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, seed=0)
    with torch.no_grad():
        out = _compiled_flex(q, k, v, block_mask=flex_bm, enable_gqa=Hq != Hkv)
    empty = torch.isneginf(lse_ref)
    assert empty.any(), "each case should contain rows that see nothing"
    assert not torch.isnan(out).any()
    assert (out[empty] == 0).all()  # flex (compiled) also gives exactly 0 there
    torch.testing.assert_close(out_ref, out, **TOL)


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,block_size,Bl,Hl,causal", CASES)
def test_eager_flex_out_and_lse_match_reference(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal):
    q, k, v, flex_bm, out_ref, lse_ref = _problem(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, seed=1)
    with torch.no_grad():
        out, lse = _eager_flex_with_lse(q, k, v, flex_bm, enable_gqa=Hq != Hkv)
    empty = torch.isneginf(lse_ref)
    assert empty.any()
    assert torch.equal(torch.isneginf(lse), empty), "flex and reference disagree on which rows see nothing"
    assert (out[empty] == 0).all()
    torch.testing.assert_close(out_ref, out, **TOL)
    fin = ~empty
    torch.testing.assert_close(lse_ref[fin], lse.float()[fin], **TOL)


@pytest.mark.gpu
def test_compiled_flex_lse_on_gpu():
    """On CUDA the fused kernel returns the lse too: check it against the reference."""
    B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal = 2, 4, 2, 100, 130, 32, (32, 16), 2, 2, True
    q, k, v, flex_bm, out_ref, lse_ref = _problem(B, Hq, Hkv, Sq, Sk, D, block_size, Bl, Hl, causal, seed=2)
    with torch.no_grad():
        if hasattr(flex_mod, "AuxRequest"):
            out, aux = _compiled_flex(
                q, k, v, block_mask=flex_bm, enable_gqa=True, return_aux=flex_mod.AuxRequest(lse=True)
            )
            lse = aux.lse
        else:
            out, lse = _compiled_flex(q, k, v, block_mask=flex_bm, enable_gqa=True, return_lse=True)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(out_ref, out, atol=2e-4, rtol=2e-4)  # TF32 may be in play on GPU
    torch.testing.assert_close(lse_ref[fin], lse.float()[fin], atol=2e-4, rtol=2e-4)
