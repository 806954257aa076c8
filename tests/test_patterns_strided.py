"""S2 / DKernel strided layouts: the closed-form builder vs a per-element construction."""

import itertools

import pytest
import torch

from helpers import assert_matches_reference, make_qkv, s2_rule_mask
from sparse_attn import BlockSparseLayout, sparse_attention
from sparse_attn.patterns import strided, strided_block_mask


def rule_mask(H, sq, sk, bs, L, st, homo=False, nd=0, off=0, causal=True, heads=None, vpt=None):
    """The rule (``helpers.s2_rule_mask``) in this file's short argument names; ``H`` heads, the
    step from ``H`` (symmetric window when not causal; ``vpt``: vert_position_type)."""
    return s2_rule_mask(H, sq, sk, bs, L, st, homo_head=homo, num_dense_heads=nd, head_sliding_offset=off,
                        causal=causal, heads=heads, vert_position_type=vpt)


def check_both_forms(layout, expected):
    assert torch.equal(layout.to_block_mask(), expected)
    ref = BlockSparseLayout.from_block_mask(expected, layout.block_size, layout.seq_q, layout.seq_k)
    assert torch.equal(layout.kv_num, ref.kv_num)
    assert torch.equal(layout.q_num, ref.q_num)
    for name in ("kv", "q"):
        num, idx, ridx = getattr(layout, name + "_num"), getattr(layout, name + "_idx"), getattr(ref, name + "_idx")
        slots = torch.arange(idx.shape[-1])
        valid = slots < num.unsqueeze(-1)
        assert torch.equal(torch.where(valid, idx, -1), torch.where(valid, ridx[..., : idx.shape[-1]], -1))
        assert int(idx.min()) >= 0


GRID = list(itertools.product(
    [1, 4],            # heads
    [(37, 200), (200, 200), (1, 333), (128, 333), (100, 37)],  # (seq_q, seq_k): prefill, decode, chunk, Sq > Sk
    [16, 32],          # block
    [0, 1, 3],         # local blocks
    [1, 3, 4],         # stride
    [(False, 0), (True, 0), (False, 1)],  # homo, dense heads
    [0, 1],            # head_sliding_offset
    [(True, None), (False, None), (False, "absolute"), (True, "relative")],  # causal, vert_position_type
))


@pytest.mark.parametrize("H,seqs,bs,L,st,homo_nd,off,mode", GRID[::13] + GRID[3::23])
def test_formula_matches_rule(H, seqs, bs, L, st, homo_nd, off, mode):
    sq, sk = seqs
    homo, nd = homo_nd
    causal, vpt = mode
    layout = strided(H, sq, sk, block_size=bs, local_blocks=L, vert_stride=st, homo_head=homo,
                     num_dense_heads=nd, head_sliding_offset=off, causal=causal, vert_position_type=vpt)
    assert layout.shape == (1, H, -(-sq // bs), -(-sk // bs))
    assert (layout.seq_q, layout.seq_k, layout.block_size) == (sq, sk, (bs, bs))
    check_both_forms(layout, rule_mask(H, sq, sk, bs, L, st, homo, nd, off, causal, vpt=vpt))


def test_issue_example_pictures_offset_one():
    # Phi-3-small style: offset 1 shifts every head's stride by one block
    m0 = strided_block_mask(2, 8 * 16, block_size=16, local_blocks=2, vert_stride=4)[0]
    m1 = strided_block_mask(2, 8 * 16, block_size=16, local_blocks=2, vert_stride=4, head_sliding_offset=1)[0]
    # head 0, row 7: window {6, 7}; stride column 0 and 4 (offset 0) / 3 (offset 1)
    assert m0[0, 7].nonzero().flatten().tolist() == [0, 4, 6, 7]
    assert m1[0, 7].nonzero().flatten().tolist() == [3, 6, 7]
    # head 1 (step = 4 // 2 = 2): (c + 2) % 4 == 0 -> c = 2; offset 1 -> c = 1, 5
    assert m0[1, 7].nonzero().flatten().tolist() == [2, 6, 7]
    assert m1[1, 7].nonzero().flatten().tolist() == [1, 5, 6, 7]


@pytest.mark.parametrize("H,st,off", [(8, 8, 0), (8, 8, 1), (16, 8, 0), (4, 4, 0), (8, 4, 1)])
def test_union_over_heads_covers_causal_triangle(H, st, off):
    m = strided_block_mask(H, 40 * 16, block_size=16, local_blocks=2, vert_stride=st, head_sliding_offset=off)
    union = m[0].any(0)
    assert torch.equal(union, torch.ones(40, 40, dtype=torch.bool).tril())
    assert not m[0].all(0).equal(union)  # and no single head reads everything


def test_union_has_holes_with_too_few_heads():
    m = strided_block_mask(2, 40 * 16, block_size=16, local_blocks=2, vert_stride=8)
    assert not torch.equal(m[0].any(0), torch.ones(40, 40, dtype=torch.bool).tril())


def test_active_head_range_keeps_global_head_indices():
    full = strided(8, 300, block_size=16, local_blocks=2, vert_stride=8, num_dense_heads=1)
    part = strided(8, 300, block_size=16, local_blocks=2, vert_stride=8, num_dense_heads=1, active_head_range=(5, 8))
    assert part.shape[1] == 3
    assert torch.equal(part.to_block_mask(), full.to_block_mask()[:, 5:8])
    check_both_forms(part, rule_mask(8, 300, 300, 16, 2, 8, nd=1, heads=(5, 8)))


def test_cached_and_fast():
    a = strided(4, 1000, block_size=64, local_blocks=2, vert_stride=4)
    b = strided(4, 1000, block_size=64, local_blocks=2, vert_stride=4)
    c = strided(4, 1000, block_size=64, local_blocks=3, vert_stride=4)
    assert a is b and a is not c
    big = strided(8, 131072, block_size=64, local_blocks=16, vert_stride=8)  # Phi-3-small-like, 128k
    assert big.shape == (1, 8, 2048, 2048)
    assert big.kv_idx.shape[-1] < 300  # ~Mk / stride + window slots, never Mk
    # mean kept blocks per row ~ (i / stride + 16): density of the full square
    assert abs(big.density - (2048 / 2 / 8 + 16) / 2048) < 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        strided(4, 100, block_size=48)
    with pytest.raises(ValueError, match="vert_stride"):
        strided(4, 100, vert_stride=0)
    with pytest.raises(ValueError, match="num_dense_heads"):
        strided(4, 100, num_dense_heads=5)
    with pytest.raises(ValueError, match="active_head_range"):
        strided(4, 100, active_head_range=(2, 2))
    with pytest.raises(TypeError, match="num_heads"):
        strided(4.0, 100)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("sq,sk,causal", [(200, 200, True), (37, 200, True), (1, 150, True), (150, 150, False)])
def test_attention_through_strided_layout(backend, sq, sk, causal):
    """The narrow closed-form index tensors drive the kernels (forward and backward)."""
    q, k, v = make_qkv(1, 4, 2, sq, sk, 32, torch.float32, generator=torch.Generator().manual_seed(3),
                       requires_grad=True)
    layout = strided(2, sq, sk, block_size=16, local_blocks=2, vert_stride=3, causal=causal)
    dense_form = BlockSparseLayout.from_block_mask(layout.to_block_mask(), 16, sq, sk)
    assert_matches_reference(q, k, v, layout, dense_form, causal, backend)


def test_transposed_form_only_built_for_gradients():
    q, k, v = make_qkv(1, 2, 2, 100, 100, 16, torch.float32, generator=torch.Generator().manual_seed(0))
    layout = strided(2, 100, block_size=16, local_blocks=1, vert_stride=3, head_sliding_offset=5)
    with torch.no_grad():
        sparse_attention(q, k, v, layout)
    sparse_attention(q, k, v, layout)  # grad mode on, but nothing requires grad
    assert not layout.has_transposed
    q.requires_grad_(True)
    sparse_attention(q, k, v, layout).sum().backward()
    assert layout.has_transposed
    check_both_forms(layout, rule_mask(2, 100, 100, 16, 1, 3, off=5))
    moved = strided(2, 100, block_size=16, local_blocks=1, vert_stride=4).to("cpu")
    assert not moved.has_transposed and torch.equal(moved.q_num, BlockSparseLayout.from_block_mask(
        moved.to_block_mask(), 16, 100, 100).q_num)


# ------------------------------------------------------------------------------------------------
# The layout cache: bounded in bytes, LRU, thread-safe
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_cache():
    from sparse_attn.patterns.s2 import layout_cache

    saved = layout_cache.max_bytes
    layout_cache.cache_clear()
    yield layout_cache
    layout_cache.max_bytes = saved
    layout_cache.cache_clear()


def test_cache_is_bounded_in_bytes_lru(small_cache):
    one = strided(4, 1024, block_size=16, local_blocks=2, vert_stride=4)
    size = one.nbytes
    assert size == sum(t.numel() * t.element_size() for t in (one.kv_num, one.kv_idx)) > 0
    small_cache.cache_clear()
    small_cache.max_bytes = int(2.5 * size)  # room for two layouts of this size
    a, b = (strided(4, 1024, block_size=16, local_blocks=2, vert_stride=s) for s in (4, 5))
    assert strided(4, 1024, block_size=16, local_blocks=2, vert_stride=4) is a  # a hit, now most recent
    c = strided(4, 1024, block_size=16, local_blocks=2, vert_stride=6)  # evicts b, the least recent
    info = small_cache.info()
    assert info["entries"] == 2 and info["bytes"] <= small_cache.max_bytes
    assert strided(4, 1024, block_size=16, local_blocks=2, vert_stride=4) is a
    assert strided(4, 1024, block_size=16, local_blocks=2, vert_stride=6) is c
    b2 = strided(4, 1024, block_size=16, local_blocks=2, vert_stride=5)
    assert b2 is not b and torch.equal(b2.kv_idx, b.kv_idx)  # rebuilt, same contents


def test_cache_counts_the_transposed_form_once_built(small_cache):
    layout = strided(4, 1024, block_size=16, local_blocks=2, vert_stride=4)
    before = layout.nbytes
    layout.q_idx  # built on first use (for the backward)
    assert layout.nbytes == before + layout.q_num.numel() * 4 + layout.q_idx.numel() * 4
    small_cache.max_bytes = before + 1  # the grown entry no longer fits: dropped at the next insertion
    other = strided(4, 1024, block_size=16, local_blocks=2, vert_stride=5)
    assert small_cache.info()["entries"] == 1
    assert strided(4, 1024, block_size=16, local_blocks=2, vert_stride=5) is other
    assert strided(4, 1024, block_size=16, local_blocks=2, vert_stride=4) is not layout


def test_cache_never_keeps_a_layout_over_budget(small_cache):
    small_cache.max_bytes = 0
    a = strided(2, 256, block_size=16, local_blocks=1, vert_stride=2)
    assert small_cache.info() == dict(entries=0, bytes=0, max_bytes=0)
    assert strided(2, 256, block_size=16, local_blocks=1, vert_stride=2) is not a


def test_cache_budget_from_the_environment(monkeypatch):
    from sparse_attn.patterns import s2

    monkeypatch.setenv("SPARSE_ATTN_S2_CACHE_MB", "1.5")
    assert s2._cache_budget() == 3 << 19
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("SPARSE_ATTN_S2_CACHE_MB", bad)
        with pytest.raises(ValueError, match="SPARSE_ATTN_S2_CACHE_MB"):
            s2._cache_budget()


def test_cache_under_threads(small_cache):
    """8 threads building overlapping keys get correct layouts and leave a consistent cache."""
    from concurrent.futures import ThreadPoolExecutor

    small_cache.max_bytes = 3 * strided(4, 512, block_size=16, local_blocks=2, vert_stride=3).nbytes
    small_cache.cache_clear()
    keys = [(3 + i % 4, 512 + 16 * (i % 3)) for i in range(64)]

    def build(key):
        stride, seq = key
        return key, strided(4, seq, block_size=16, local_blocks=2, vert_stride=stride)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(build, keys))
    for (stride, seq), layout in results:
        assert torch.equal(layout.to_block_mask(), rule_mask(4, seq, seq, 16, 2, stride))
    info = small_cache.info()
    assert info["entries"] >= 1 and info["bytes"] <= info["max_bytes"]  # sizes differ by stride: no fixed count


def test_one_s2_config_serves_every_entry_point():
    """S2Config is the one home of the S2 options: strided, S2KVCache and S2Pattern take it (or its
    fields as keywords, validated by it), it round-trips through JSON, and mixing the two is refused."""
    import json

    from sparse_attn.modules import S2Pattern
    from sparse_attn.patterns import S2KVCache
    from sparse_attn.patterns.s2 import S2Config

    cfg = S2Config(block_size=16, local_blocks=2, vert_stride=4, head_sliding_offset=1)
    assert S2Config(**json.loads(json.dumps(cfg.to_dict()))) == cfg and hash(cfg) == hash(S2Config(**cfg.to_dict()))
    with pytest.raises(Exception):
        cfg.vert_stride = 3  # frozen
    by_kw = strided(4, 100, block_size=16, local_blocks=2, vert_stride=4, head_sliding_offset=1)
    assert torch.equal(strided(4, 100, config=cfg).to_block_mask(), by_kw.to_block_mask())
    with pytest.raises(TypeError, match="not both"):
        strided(4, 100, config=cfg, vert_stride=5)  # (a keyword equal to its default is not detectable)
    with pytest.raises(TypeError, match="unknown S2 option"):
        S2KVCache(1, 2, 16, max_seq_len=64, vertical_stride=4)
    cache = S2KVCache(1, 2, 16, max_seq_len=64, config=cfg)
    assert cache.config == cfg and cache.block_size == 16
    assert S2KVCache.kept_blocks(64, 2, config=cfg) == S2KVCache.kept_blocks(64, 2, **cfg.to_dict())
    pat = S2Pattern(2, config=cfg)
    assert pat.s2_config == cfg and S2Pattern(2, **cfg.to_dict()).s2_config == cfg
    for bad, exc in ((dict(vert_stride=0), ValueError), (dict(block_size=48), ValueError),
                     (dict(local_blocks="2"), TypeError), (dict(homo_head=1), TypeError),
                     (dict(kv_start_position=8), ValueError), (dict(vert_position_type="rel"), ValueError)):
        with pytest.raises(exc):
            S2Config(**bad)
    with pytest.raises(ValueError, match="causal"):  # the drop-in and the cache are causal
        S2Pattern(2, local_blocks=(2, 1))
