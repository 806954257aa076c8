"""S2 layouts against DKernel's definition (the S2-Attention authors' reference), written out here
one (head, query block, key block) at a time, plus Phi-3-small's pattern and its KV saving.

The oracle, ``helpers.s2_rule_mask`` (imported as ``dkernel_mask``), follows DKernel's ``get_sparse_attn_mask`` definition:
``num_heads`` are query heads; with ``num_kv_heads`` there is one pattern per KV head and the
head step is still ``max(1, vert_stride // num_heads)``; ``vert_position_type`` defaults to
absolute when causal and relative otherwise; the window is ``(L, 1)`` when causal, ``(L, L)`` or
``(L, R)`` otherwise; ``kv_start_position`` moves the absolute key blocks. Our convention for
``seq_q < seq_k`` (queries are the last ``seq_q`` keys, a row is placed by its first token) is
built into the positions it uses.
"""

from __future__ import annotations

import random

import pytest
import torch

from helpers import assert_matches_reference, make_qkv
from helpers import s2_rule_mask as dkernel_mask
from sparse_attn import BlockSparseLayout
from sparse_attn.modules import AttentionSpec, S2Pattern
from sparse_attn.patterns import S2KVCache, strided, strided_block_mask


def check_both_forms(layout, expected):
    """The row form (kv_num / kv_idx) and the transposed form (q_num / q_idx) both equal ``expected``."""
    assert layout.shape == tuple(expected.shape)
    assert torch.equal(layout.to_block_mask(), expected)
    ref = BlockSparseLayout.from_block_mask(expected, layout.block_size, layout.seq_q, layout.seq_k)
    for name in ("kv", "q"):
        num, idx = getattr(layout, name + "_num"), getattr(layout, name + "_idx")
        ref_num, ref_idx = getattr(ref, name + "_num"), getattr(ref, name + "_idx")
        assert torch.equal(num, ref_num), name
        assert int(num.max()) <= idx.shape[-1], name  # the slots hold every kept block
        valid = torch.arange(idx.shape[-1]) < num.unsqueeze(-1)
        assert torch.equal(torch.where(valid, idx, -1), torch.where(valid, ref_idx[..., : idx.shape[-1]], -1)), name
        n_targets = layout.num_key_blocks if name == "kv" else layout.num_query_blocks
        assert 0 <= int(idx.min()) and int(idx.max()) < n_targets, name  # padding stays in range


def ours(num_heads, seq_q, seq_k, block_size, local_blocks, vert_stride, *, num_kv_heads=None, heads=None, **kw):
    """:func:`strided` with the same arguments as :func:`dkernel_mask`."""
    if num_kv_heads is None:
        return strided(num_heads, seq_q, seq_k, block_size=block_size, local_blocks=local_blocks,
                       vert_stride=vert_stride, active_head_range=heads, **kw)
    return strided(num_kv_heads, seq_q, seq_k, block_size=block_size, local_blocks=local_blocks,
                   vert_stride=vert_stride, num_query_heads=num_heads, active_head_range=heads, **kw)


def _strided_residues(mask_row, window):
    """Residues mod 4 of the kept blocks left of a row's window (one decode row)."""
    return sorted({c % 4 for c in mask_row[:-window].nonzero().flatten().tolist()})


# ------------------------------------------------------------------------------------------------
# GQA: DKernel steps the per-KV-head pattern by the query heads
# ------------------------------------------------------------------------------------------------
def test_gqa_example_residues():
    """Hq = 4, Hkv = 2, stride 4: residues per KV head [0, 3] with num_query_heads (DKernel's
    step 4 // 4 = 1), [0, 2] without (step 4 // 2)."""
    kw = dict(block_size=16, local_blocks=1, vert_stride=4)
    dk = strided_block_mask(2, 1, 16 * 40, num_query_heads=4, **kw)[0, :, 0]
    old = strided_block_mask(2, 1, 16 * 40, **kw)[0, :, 0]
    assert [_strided_residues(row, 1) for row in dk] == [[0], [3]]
    assert [_strided_residues(row, 1) for row in old] == [[0], [2]]
    assert torch.equal(dk[None, :, None], dkernel_mask(4, 1, 16 * 40, 16, 1, 4, num_kv_heads=2))


@pytest.mark.parametrize("hq,hkv,stride,offset,dense", [
    (4, 2, 4, 0, 0), (4, 2, 8, 1, 0), (8, 4, 16, 0, 1), (4, 1, 8, 3, 0), (32, 8, 8, 1, 0), (6, 2, 12, 0, 1),
    (2, 2, 4, 0, 0),
])
@pytest.mark.parametrize("seqs", [(150, 150), (1, 333), (64, 250)], ids=["prefill", "decode", "chunk"])
def test_gqa_per_kv_head_matches_dkernel(hq, hkv, stride, offset, dense, seqs):
    sq, sk = seqs
    kw = dict(head_sliding_offset=offset, num_dense_heads=dense)
    check_both_forms(ours(hq, sq, sk, 16, 2, stride, num_kv_heads=hkv, **kw),
                     dkernel_mask(hq, sq, sk, 16, 2, stride, num_kv_heads=hkv, **kw))


# ------------------------------------------------------------------------------------------------
# vert_position_type, asymmetric windows, kv_start_position
# ------------------------------------------------------------------------------------------------
def test_position_type_defaults():
    kw = dict(block_size=16, local_blocks=2, vert_stride=3)
    assert strided(4, 200, causal=False, **kw) is strided(4, 200, causal=False, vert_position_type="relative", **kw)
    assert strided(4, 200, **kw) is strided(4, 200, vert_position_type="absolute", **kw)
    rel = strided_block_mask(4, 200, causal=False, **kw)
    assert not torch.equal(rel, strided_block_mask(4, 200, causal=False, vert_position_type="absolute", **kw))
    assert torch.equal(rel, dkernel_mask(4, 200, 200, 16, 2, 3, causal=False))
    assert torch.equal(rel[0, 0], rel[0, 3])  # relative: no per-head shift


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("local", [0, 1, 3])
@pytest.mark.parametrize("stride", [1, 2, 3, 5])
def test_relative_matches_dkernel(causal, local, stride):
    kw = dict(vert_position_type="relative", causal=causal, num_dense_heads=1, head_sliding_offset=1)
    for sq, sk in ((130, 130), (1, 207), (48, 200)):
        check_both_forms(ours(3, sq, sk, 16, local, stride, **kw), dkernel_mask(3, sq, sk, 16, local, stride, **kw))


@pytest.mark.parametrize("window", [(2, 1), (1, 3), (3, 0), (0, 2), (0, 0), (4, 4)])
@pytest.mark.parametrize("vpt", ["relative", "absolute"])
@pytest.mark.parametrize("stride", [2, 3])
def test_asymmetric_windows(window, vpt, stride):
    kw = dict(causal=False, vert_position_type=vpt)
    for sq, sk in ((160, 160), (37, 190), (1, 100)):
        check_both_forms(ours(2, sq, sk, 16, window, stride, **kw), dkernel_mask(2, sq, sk, 16, window, stride, **kw))
    mask = strided_block_mask(1, 16 * 30, block_size=16, local_blocks=window, vert_stride=1000, causal=False)[0, 0]
    left, right = window
    assert mask[15].nonzero().flatten().tolist() == list(range(15 - left + 1, 15 + right))  # the window alone


@pytest.mark.parametrize("vpt", ["absolute", "relative"])
@pytest.mark.parametrize("causal", [True, False])
def test_kv_start_position(vpt, causal):
    kw = dict(vert_position_type=vpt, causal=causal, head_sliding_offset=1)
    for start in (0, 16, 48, 112):
        for sq, sk in ((100, 100), (1, 150), (32, 170)):
            check_both_forms(ours(4, sq, sk, 16, 2, 5, num_kv_heads=2, kv_start_position=start, **kw),
                             dkernel_mask(4, sq, sk, 16, 2, 5, num_kv_heads=2, kv_start_position=start, **kw))
    base = strided_block_mask(2, 160, block_size=16, local_blocks=1, vert_stride=5, **kw)
    moved = strided_block_mask(2, 160, block_size=16, local_blocks=1, vert_stride=5, kv_start_position=32, **kw)
    if vpt == "relative":
        assert torch.equal(moved, base)  # only distances matter
    else:  # the stride follows absolute key blocks: block c here is block c + 2 of the sequence
        assert not torch.equal(moved, base)
        longer = strided_block_mask(2, 160 + 32, block_size=16, local_blocks=1, vert_stride=5, **kw)
        assert torch.equal(moved, longer[..., 2:, 2:])


# ------------------------------------------------------------------------------------------------
# Dense heads, homo heads, partial blocks, Sq != Sk, decode rows, head ranges: a seeded sweep
# ------------------------------------------------------------------------------------------------
def _random_config(rng):
    hkv = rng.choice([1, 2, 3, 4])
    hq = hkv * rng.choice([1, 2, 4]) if rng.random() < 0.6 else None
    causal = rng.random() < 0.5
    if causal:
        local = rng.randint(0, 4)
    else:
        local = rng.randint(0, 4) if rng.random() < 0.4 else (rng.randint(0, 4), rng.randint(0, 4))
    sk = rng.randint(1, 300)
    sq = rng.choice([sk, 1, rng.randint(1, sk)]) if rng.random() < 0.9 else rng.randint(1, 330)
    heads = None
    if hkv > 1 and rng.random() < 0.3:
        h0 = rng.randint(0, hkv - 1)
        heads = (h0, rng.randint(h0 + 1, hkv))
    kw = dict(causal=causal, homo_head=rng.random() < 0.2, num_dense_heads=rng.choice([0, 0, 1]) if hkv > 1 else 0,
              head_sliding_offset=rng.randint(0, 3), kv_start_position=16 * rng.randint(0, 5),
              vert_position_type=rng.choice([None, "absolute", "relative"]))
    return (hq or hkv, sq, sk, 16, local, rng.choice([1, 2, 3, 4, 6, 8])), dict(
        kw, num_kv_heads=hkv if hq else None, heads=heads)


@pytest.mark.parametrize("seed", range(8))
def test_random_configurations_match_dkernel(seed):
    rng = random.Random(seed)
    for _ in range(25):
        args, kw = _random_config(rng)
        check_both_forms(ours(*args, **kw), dkernel_mask(*args, **kw))


def test_dense_and_homo_heads_and_active_range():
    kw = dict(num_kv_heads=4, num_dense_heads=1, head_sliding_offset=1)
    for sq, sk in ((77, 77), (1, 250)):
        full = dkernel_mask(8, sq, sk, 16, 2, 8, **kw)
        mq, mk = full.shape[2:]
        assert torch.equal(full[0, 3], torch.ones(mk, mk, dtype=torch.bool).tril()[-mq:])  # the dense head
        assert not torch.equal(full[0, 2], full[0, 3])
        check_both_forms(ours(8, sq, sk, 16, 2, 8, **kw), full)
        check_both_forms(ours(8, sq, sk, 16, 2, 8, heads=(1, 4), **kw), full[:, 1:4])
        homo = ours(8, sq, sk, 16, 2, 8, num_kv_heads=4, homo_head=True)
        check_both_forms(homo, dkernel_mask(8, sq, sk, 16, 2, 8, num_kv_heads=4, homo_head=True))
        assert all(torch.equal(homo.to_block_mask()[0, 0], homo.to_block_mask()[0, h]) for h in range(4))


# ------------------------------------------------------------------------------------------------
# Errors and the cache key
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,exc,match", [
    (dict(local_blocks=(2, 1)), ValueError, "local_blocks must be an int when causal=True"),
    (dict(local_blocks=(1, 2, 3), causal=False), TypeError, "local_blocks"),
    (dict(local_blocks=(1, 2.0), causal=False), TypeError, "local_blocks"),
    (dict(local_blocks=(1, -1), causal=False), ValueError, "local_blocks must be >= 0"),
    (dict(local_blocks=-1), ValueError, "local_blocks must be >= 0"),
    (dict(local_blocks="2"), TypeError, "local_blocks"),
    (dict(vert_position_type="rel"), ValueError, "vert_position_type"),
    (dict(kv_start_position=10), ValueError, "kv_start_position must be a non-negative multiple of block_size=16"),
    (dict(kv_start_position=-16), ValueError, "kv_start_position"),
    (dict(kv_start_position=16.0), TypeError, "kv_start_position must be an int"),
    (dict(num_query_heads=3), ValueError, "num_query_heads must be a positive multiple of num_heads=2"),
    (dict(num_query_heads=0), ValueError, "num_query_heads"),
    (dict(num_query_heads=4.0), TypeError, "num_query_heads must be an int"),
    (dict(head_sliding_offset=0.5), TypeError, "head_sliding_offset"),
])
def test_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        strided(2, 100, **{"block_size": 16, **kw})


def test_cache_key_covers_the_new_arguments():
    base = dict(block_size=16, local_blocks=2, vert_stride=4, causal=False)
    a = strided(2, 100, **base)
    variants = [dict(vert_position_type="absolute"), dict(local_blocks=(2, 1)), dict(local_blocks=(1, 2)),
                dict(kv_start_position=16), dict(num_query_heads=4)]
    got = [strided(2, 100, **{**base, **v}) for v in variants]
    assert len({id(x) for x in [a] + got}) == 1 + len(variants)
    assert strided(2, 100, **{**base, "local_blocks": (2, 2)}) is a  # an int window is the symmetric pair
    causal = dict(base, causal=True, vert_position_type="absolute")
    c1 = strided(2, 100, **causal, kv_start_position=16)
    assert strided(2, 100, **causal, kv_start_position=16) is c1
    assert strided(2, 100, **causal, num_query_heads=4) is not strided(2, 100, **causal, num_query_heads=8)


# ------------------------------------------------------------------------------------------------
# Through the attention op (forward + backward) against the dense reference
# ------------------------------------------------------------------------------------------------
CASES = [
    # (hq, hkv, sq, sk, local, stride, kwargs of both strided and the oracle)
    (4, 2, 100, 100, (2, 1), 3, dict(causal=False)),                                     # relative, asymmetric
    (4, 2, 40, 130, 2, 4, dict(causal=True, kv_start_position=32, head_sliding_offset=1)),  # GQA step, chunk
    (4, 2, 1, 150, 2, 4, dict(causal=True, num_dense_heads=1)),                           # decode row
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=["relative-asym", "gqa-chunk-kvstart", "decode-dense-head"])
def test_attention_matches_reference(backend, case):
    hq, hkv, sq, sk, local, stride, kw = case
    q, k, v = make_qkv(1, hq, hkv, sq, sk, 16, torch.float32, generator=torch.Generator().manual_seed(7),
                       requires_grad=True)
    layout = ours(hq, sq, sk, 16, local, stride, num_kv_heads=hkv, **kw)
    oracle = BlockSparseLayout.from_block_mask(dkernel_mask(hq, sq, sk, 16, local, stride, num_kv_heads=hkv, **kw),
                                               16, sq, sk)
    causal = kw["causal"]
    assert_matches_reference(q, k, v, layout, oracle, causal, backend)
    assert layout.has_transposed  # the backward used the closed-form transposed form


# ------------------------------------------------------------------------------------------------
# The drop-in pattern follows DKernel for GQA models
# ------------------------------------------------------------------------------------------------
def test_drop_in_pattern_uses_the_query_heads_step():
    p = S2Pattern.from_spec(AttentionSpec(4, 2, 16), block_size=16, local_blocks=1, vert_stride=4)
    assert p.get_config()["num_query_heads"] == 4
    q, k = torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16)
    assert torch.equal(p(q, k).to_block_mask(), dkernel_mask(4, 200, 200, 16, 1, 4, num_kv_heads=2))
    again = S2Pattern.from_spec(AttentionSpec(4, 2, 16), **p.get_config())  # a saved config reloads
    assert torch.equal(again(q, k).to_block_mask(), p(q, k).to_block_mask())
    per_q = S2Pattern.from_spec(AttentionSpec(4, 2, 16), block_size=16, local_blocks=1, vert_stride=4,
                                layout_heads="q", head_sliding_offset=1)
    assert torch.equal(per_q(q, k).to_block_mask(), dkernel_mask(4, 200, 200, 16, 1, 4, head_sliding_offset=1))
    with pytest.raises(ValueError, match="num_query_heads=8 does not match the layer's 4 query heads"):
        S2Pattern.from_spec(AttentionSpec(4, 2, 16), block_size=16, num_query_heads=8)
    with pytest.raises(ValueError, match="built for num_query_heads=4"):
        p(torch.randn(1, 8, 200, 16), k)


# ------------------------------------------------------------------------------------------------
# Phi-3-small: its pattern (vLLM port: per query head, offset 1) and the KV it lets a cache drop
# ------------------------------------------------------------------------------------------------
PHI3 = dict(block_size=64, local_blocks=16, vert_stride=8)  # 32 query heads, 8 KV heads (GQA 4:1)


def test_phi3_small_pattern_is_per_query_head_offset_one():
    """vLLM's Phi-3-small keeps, for query head h, block c iff it is in the 16-block window or
    (c + h * max(1, 8 // 32) + 1) % 8 == 0: strided(32, ..., head_sliding_offset=1)."""
    m = strided_block_mask(32, 1, 64 * 100, head_sliding_offset=1, **PHI3)[0, :, 0]  # decode row, block 99
    for h in range(32):
        far = m[h, :99 - 15].nonzero().flatten().tolist()
        assert far == [c for c in range(84) if (c + h + 1) % 8 == 0]
        assert m[h, 84:].all()


@pytest.mark.parametrize("n,blocks,per_query_head,union,per_kv_head", [
    (32768, 512, 78, 264, 78),
    (131072, 2048, 270, 1032, 270),
], ids=["32k", "128k"])
def test_phi3_small_per_query_head_kv_saving(n, blocks, per_query_head, union, per_kv_head):
    """A KV head serves 4 query heads; with Phi-3-small's per-query-head pattern (step 1, offset 1)
    they read 4 different residues mod 8, so its cache must keep their union: about half of the
    blocks. The per-KV-head pattern (one residue per KV head, what S2KVCache stores) keeps ~1/8."""
    m = strided_block_mask(32, 1, n, head_sliding_offset=1, **PHI3)[0, :, 0]  # [32 query heads, M]
    assert m.shape[-1] == blocks
    assert m.sum(-1).tolist() == [per_query_head] * 32
    assert m.view(8, 4, blocks).any(1).sum(-1).tolist() == [union] * 8  # query heads 4g..4g+3 share KV head g
    kv = strided_block_mask(8, 1, n, head_sliding_offset=1, num_query_heads=32, **PHI3)[0, :, 0]
    assert kv.sum(-1).tolist() == [per_kv_head] * 8
    assert S2KVCache.kept_blocks(n, 8, head_sliding_offset=1, num_query_heads=32, **PHI3) == [per_kv_head] * 8
    # the README's ratios and sizes (8 KV heads, D = 128, K and V in bf16, B = 1)
    assert round(union / blocks, 3) == {32768: 0.516, 131072: 0.504}[n]
    assert round(per_kv_head / blocks, 3) == {32768: 0.152, 131072: 0.132}[n]
    mib = lambda nblocks: nblocks * 64 * 8 * 128 * 2 * 2 / 2**20  # noqa: E731
    assert (mib(union), mib(per_kv_head), mib(blocks)) == {32768: (66.0, 19.5, 128.0),
                                                           131072: (258.0, 67.5, 512.0)}[n]
