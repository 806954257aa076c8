"""S2KVCache: decoding from the per-head compacted cache == S2 attention over the full cache.

Oracles: ``sparse_attention`` on the full K/V with the ``strided(...)`` layout of the same
step, and ``naive_attention`` with an element mask written out here from the S2 rule. The
memory test checks the closed form against a block-by-block count and the cache's own
bookkeeping run to 128k tokens (no 128k tensors).
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_no_nan, naive_attention, tolerances
from helpers import s2_rule_mask
from sparse_attn import available_backends, sparse_attention
from sparse_attn.patterns import S2KVCache, strided
from sparse_attn.patterns.s2_cache import _SlotTable, _stride_residues

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kept(n, hkv, bs, cfg):
    """Per KV head, the sorted block indices the token at position n - 1 reads (the suite's one S2
    oracle, ``helpers.s2_rule_mask``, with DKernel's head step from the query heads)."""
    opts = {k: v for k, v in cfg.items() if k != "num_query_heads"}
    hq = cfg.get("num_query_heads") or hkv
    mask = s2_rule_mask(hq, 1, n, bs, num_kv_heads=hkv, **opts)[0, :, 0]  # [Hkv, Mk]: the decode row
    return [row.nonzero().flatten().tolist() for row in mask]


def _element_mask(n, hkv, g, bs, cfg):
    """``[1, Hq, 1, n]``: which keys the query at position n - 1 sees, query head by query head."""
    blocks = torch.zeros(hkv, (n - 1) // bs + 1, dtype=torch.bool)
    for h, kept in enumerate(_kept(n, hkv, bs, cfg)):
        blocks[h, kept] = True
    per_key = blocks.repeat_interleave(bs, dim=1)[:, :n]  # [Hkv, n]
    return per_key.repeat_interleave(g, dim=0)[None, :, None, :].to(DEVICE)


# (id, Hkv, G, cfg): GQA / MQA, homo and hetero heads, dense heads, both offsets, step > 1; the
# GQA ones give num_query_heads = Hkv * G (DKernel's step: vert_stride // Hq, which differs from
# vert_stride // Hkv in "gqa-step-differs" (1 vs 2) and "dkernel-step2" (2 vs 4)).
CONFIGS = [
    ("hetero-off0-gqa", 4, 2, dict(local_blocks=2, vert_stride=3, num_query_heads=8)),
    ("homo-off1-window1", 2, 3, dict(local_blocks=1, vert_stride=4, homo_head=True, head_sliding_offset=1,
                                     num_query_heads=6)),
    ("gqa-step-differs-off1-dense1", 4, 2, dict(local_blocks=3, vert_stride=8, num_dense_heads=1,
                                                head_sliding_offset=1, num_query_heads=8)),
    ("dkernel-step2", 2, 2, dict(local_blocks=2, vert_stride=8, num_query_heads=4)),
    ("mqa-off0", 1, 4, dict(local_blocks=2, vert_stride=2, num_query_heads=4)),
    ("all-dense", 2, 1, dict(local_blocks=2, vert_stride=4, num_dense_heads=2)),
]
# Appends after the 75-token prompt (odd, inside block 4): single tokens and bursts that cross
# one or two block boundaries, ending at 311 tokens (block 19; 15 boundaries crossed).
APPENDS = [1] * 20 + [5, 17, 1, 33] + [1] * 30 + [40, 1, 1, 49] + [1] * 35


def _sequence(b, hkv, d, total, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(b, hkv, total, d, generator=gen).to(DEVICE) for _ in range(2))
    return k, v, gen


@pytest.mark.parametrize("name,hkv,g,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_decode_matches_full_cache(name, hkv, g, cfg):
    b, d, bs, prompt = 2, 16, 16, 75
    total = prompt + sum(APPENDS)
    k, v, gen = _sequence(b, hkv, d, total, seed=len(name))
    cache = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=total, device=DEVICE, **cfg)
    cache.prefill(k[:, :, :prompt], v[:, :, :prompt])
    n = prompt
    tol = tolerances(torch.float32)
    for t in [0] + APPENDS:  # 0: decode the prompt's last token straight after prefill
        if t:
            cache.append(k[:, :, n:n + t], v[:, :, n:n + t])
            n += t
        assert cache.seq_len == n
        q = torch.randn(b, hkv * g, 1, d, generator=gen).to(DEVICE)
        out, lse = cache.attend(q, return_lse=True)
        assert_no_nan(out, lse)
        layout = strided(hkv, 1, n, block_size=bs, device=DEVICE, **cfg)
        ref, ref_lse = sparse_attention(q, k[:, :, :n], v[:, :, :n], layout, causal=True, return_lse=True)
        torch.testing.assert_close(out, ref, **tol, msg=f"out at seq_len={n}")
        torch.testing.assert_close(lse, ref_lse, **tol, msg=f"lse at seq_len={n}")
        # What is stored is exactly what the S2 rule lets the newest token read.
        assert [sorted(x) for x in cache.block_table()] == _kept(n, hkv, bs, cfg), f"seq_len={n}"
        assert [len(x) for x in cache.block_table()] == S2KVCache.kept_blocks(n, hkv, block_size=bs, **cfg)
    # Independent oracle once more at the end: dense attention under the element mask.
    naive, naive_lse = naive_attention(q.double(), k[:, :, :n].double(), v[:, :, :n].double(),
                                       _element_mask(n, hkv, g, bs, cfg), return_lse=True)
    torch.testing.assert_close(out.double(), naive, **tol)
    torch.testing.assert_close(lse.double(), naive_lse, **tol)
    # The shard really is smaller than the history: per sharded head, far fewer keys than n.
    if cfg.get("num_dense_heads", 0) < hkv:
        part = cache.decode_parts()[0]
        assert part.k.shape[2] <= 0.6 * n


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="Triton backend unavailable")
def test_decode_inputs_through_triton_kernel():
    """The layout over the compacted storage runs on the kernel (interpreter on CPU)."""
    b, hkv, g, d, bs = 1, 2, 2, 32, 16
    cfg = dict(local_blocks=2, vert_stride=2, head_sliding_offset=1, num_query_heads=hkv * g)
    k, v, gen = _sequence(b, hkv, d, 200, seed=5)
    cache = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=200, device=DEVICE, **cfg)
    cache.prefill(k[:, :, :150], v[:, :, :150])
    for n in (151, 160, 161, 200):  # mid-block, full block, first token of a block, capacity
        cache.append(k[:, :, cache.seq_len:n], v[:, :, cache.seq_len:n])
        q = torch.randn(b, hkv * g, 1, d, generator=gen).to(DEVICE)
        k_c, v_c, layout = cache.decode_inputs()
        out = sparse_attention(q, k_c, v_c, layout, causal=False, backend="triton")
        ref = sparse_attention(q, k[:, :, :n], v[:, :, :n], strided(hkv, 1, n, block_size=bs, device=DEVICE, **cfg),
                               backend="reference")
        torch.testing.assert_close(out, ref, **tolerances(torch.float32), msg=f"seq_len={n}")


def test_layout_indexes_compacted_storage():
    """Row h lists slots 0..used_h-1 then the shared last slot; each slot holds the block the
    block table says; seq_k cuts the current block at its fill."""
    b, hkv, d, bs = 1, 3, 8, 16
    cfg = dict(local_blocks=2, vert_stride=3, head_sliding_offset=1)
    k, v, _ = _sequence(b, hkv, d, 300, seed=9)
    cache = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=300, device=DEVICE, **cfg)
    cache.prefill(k[:, :, :203], v[:, :, :203])
    k_c, v_c, layout = cache.decode_inputs()
    slots = cache.num_slots
    assert layout.shape == (1, hkv, 1, slots + 1) and layout.seq_q == 1
    assert layout.seq_k == k_c.shape[2] == slots * bs + (203 - 12 * bs)
    for h, blocks in enumerate(cache.block_table()):
        row = layout.kv_idx[0, h, 0, : int(layout.kv_num[0, h, 0])].tolist()
        assert row == list(range(len(blocks) - 1)) + [slots]
        for slot, blk in zip(row, blocks):
            lo, hi = blk * bs, min((blk + 1) * bs, 203)
            torch.testing.assert_close(k_c[:, h, slot * bs: slot * bs + hi - lo], k[:, h, lo:hi], rtol=0, atol=0)
            torch.testing.assert_close(v_c[:, h, slot * bs: slot * bs + hi - lo], v[:, h, lo:hi], rtol=0, atol=0)


def test_bulk_append_equals_token_by_token():
    b, hkv, d, bs = 2, 4, 8, 16
    cfg = dict(local_blocks=3, vert_stride=4, num_dense_heads=1)
    k, v, _ = _sequence(b, hkv, d, 260, seed=2)
    bulk = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=260, device=DEVICE, **cfg)
    step = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=260, device=DEVICE, **cfg)
    kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))  # [B, S, H, D] storage
    bulk.prefill(kt[:, :, :131], vt[:, :, :131])
    bulk.append(kt[:, :, 131:260], vt[:, :, 131:260])
    for n in range(260):
        step.append(k[:, :, n:n + 1], v[:, :, n:n + 1])
    assert bulk.block_table() == step.block_table()
    for pa, pb in zip(bulk.decode_parts(), step.decode_parts()):
        assert pa.kv_heads == pb.kv_heads
        assert torch.equal(pa.k, pb.k) and torch.equal(pa.v, pb.v)


def test_reset_and_reuse():
    b, hkv, d, bs = 1, 2, 8, 16
    k, v, gen = _sequence(b, hkv, d, 100, seed=4)
    cache = S2KVCache(b, hkv, d, block_size=bs, local_blocks=1, vert_stride=2, max_seq_len=100, device=DEVICE)
    cache.prefill(k, v)
    cache.reset()
    assert cache.seq_len == 0
    cache.prefill(k[:, :, :37], v[:, :, :37])
    q = torch.randn(b, hkv, 1, d, generator=gen).to(DEVICE)
    ref = sparse_attention(q, k[:, :, :37], v[:, :, :37], strided(hkv, 1, 37, block_size=bs, local_blocks=1,
                                                                   vert_stride=2, device=DEVICE))
    torch.testing.assert_close(cache.attend(q), ref, **tolerances(torch.float32))


# -- memory ------------------------------------------------------------------------------------
# Phi-3-small's sizes (block 64, 16 local blocks, stride 8; 32 query / 8 KV heads, D 128) as a
# per-KV-head pattern: what this cache holds. (Phi-3-small's own pattern is per query head, see
# tests/test_s2_dkernel.py::test_phi3_small_per_query_head_kv_saving.)
PHI3_SMALL = dict(block_size=64, local_blocks=16, vert_stride=8, num_query_heads=32)


def _ratio_by_counting(n, hkv, cfg):
    """Allocated / full from a block-by-block count: every sharded head gets as many block slots
    as the most any of them keeps; dense heads keep n tokens."""
    bs, nd = cfg["block_size"], cfg.get("num_dense_heads", 0)
    rule = {k: val for k, val in cfg.items() if k != "block_size"}
    kept = [len(blocks) for blocks in _kept(n, hkv, bs, rule)][: hkv - nd]
    return (len(kept) * max(kept, default=0) * bs + nd * n) / (hkv * n)


@pytest.mark.parametrize("offset", [0, 1])
def test_memory_ratio_phi3_small(offset):
    cfg = dict(PHI3_SMALL, head_sliding_offset=offset)
    expect = {32768: 78 * 64 / 32768, 131072: 270 * 64 / 131072}  # 15 + 62 + 1 and 15 + 254 + 1 blocks
    for n, want in expect.items():
        ratio = S2KVCache.memory_ratio(n, 8, **cfg)
        assert ratio == want == _ratio_by_counting(n, 8, cfg)
    assert expect[32768] == pytest.approx(0.1523, abs=1e-4) and expect[131072] == pytest.approx(0.1318, abs=1e-4)
    # The cache's own bookkeeping, run to 128k tokens without tensors, stays within its slots.
    residues = _stride_residues(8, 8, False, 0, offset, 32)
    table = _SlotTable(residues, 16, 8)
    for _ in range(131072 // 64):
        table.advance()
    assert [u + 1 for u in table.used()] == S2KVCache.kept_blocks(131072, 8, **cfg) == [270] * 8


@pytest.mark.parametrize("cfg", [
    dict(block_size=64, local_blocks=16, vert_stride=16),
    dict(block_size=64, local_blocks=4, vert_stride=8, homo_head=True),
    dict(block_size=32, local_blocks=8, vert_stride=8, num_dense_heads=2, head_sliding_offset=1),
    dict(block_size=16, local_blocks=3, vert_stride=3),
    dict(block_size=32, local_blocks=4, vert_stride=16, num_query_heads=32),  # step 1 (Hq), not 2 (Hkv)
    dict(block_size=32, local_blocks=4, vert_stride=32, num_query_heads=16, head_sliding_offset=3),  # step 2
], ids=["stride16", "homo", "dense2-off1", "step-uneven", "gqa-step1", "gqa-step2"])
def test_memory_ratio_closed_form_matches_count(cfg):
    for n in (1, 63, 64, 65, 1000, 4097, 20000):
        assert S2KVCache.memory_ratio(n, 8, **cfg) == pytest.approx(_ratio_by_counting(n, 8, cfg), rel=1e-12)


def test_memory_bytes_of_an_allocated_cache():
    cfg = dict(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1, head_sliding_offset=1)
    cache = S2KVCache(2, 4, 8, max_seq_len=1000, dtype=torch.float16, device=DEVICE, **cfg)
    assert cache.full_cache_bytes() == 2 * 2 * 4 * 1000 * 8 * 2
    assert cache.memory_bytes() / cache.full_cache_bytes() == pytest.approx(S2KVCache.memory_ratio(1000, 4, **cfg))
    assert cache.memory_bytes() < 0.5 * cache.full_cache_bytes()


# -- bad input ---------------------------------------------------------------------------------
def _cache(**kw):
    args = dict(block_size=16, local_blocks=2, vert_stride=2, max_seq_len=64)
    args.update(kw)
    return S2KVCache(1, 2, 8, **args)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(local_blocks=0), ValueError, "local_blocks to be an int >= 1"),
    (dict(block_size=48), ValueError, "block_size must be one of"),
    (dict(num_dense_heads=3), ValueError, "num_dense_heads must lie"),
    (dict(vert_stride=1.5), TypeError, "vert_stride must be an int"),
    (dict(dtype=torch.int32), TypeError, "dtype must be a floating-point"),
    (dict(max_seq_len=0), ValueError, "max_seq_len must be >= 1"),
    (dict(num_query_heads=3), ValueError, "num_query_heads must be a positive multiple of num_heads=2"),
    (dict(num_query_heads=4.0), TypeError, "num_query_heads must be an int"),
    (dict(num_query_heads=0), ValueError, "num_query_heads must be a positive multiple"),
], ids=["local0", "block48", "dense>hkv", "stride-float", "dtype-int", "maxlen0", "hq-not-multiple", "hq-float",
        "hq0"])
def test_bad_construction_raises(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        _cache(**kw)


def test_bad_use_raises():
    cache = _cache(num_dense_heads=1)
    kv = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="the cache is empty"):
        cache.decode_parts()
    with pytest.raises(ValueError, match="k must be"):
        cache.append(kv[:, :1], kv)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        cache.append(kv, kv[:, :, :5])
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        cache.append(torch.randn(1, 2, 65, 8), torch.randn(1, 2, 65, 8))
    cache.prefill(kv, kv)
    with pytest.raises(ValueError, match="prefill needs an empty cache"):
        cache.prefill(kv, kv)
    with pytest.raises(ValueError, match="use decode_parts"):
        cache.decode_inputs()
    with pytest.raises(ValueError, match="q must be"):
        cache.attend(torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cache.attend(torch.randn(1, 3, 1, 8))
    with pytest.raises(ValueError, match="built for num_query_heads=2"):  # GQA queries need num_query_heads
        cache.attend(torch.randn(1, 4, 1, 8))


def test_gqa_head_step_follows_the_query_heads():
    """DKernel's per-KV-head GQA rule: Hq = 4, Hkv = 2, stride 4 -> residues [0, 3] (step 4 // 4),
    not [0, 2] (step 4 // 2); the stored strided blocks follow it."""
    bs, n = 16, 16 * 20
    k = torch.randn(1, 2, n, 8)
    stored = {}
    for hq in (None, 4):
        cache = S2KVCache(1, 2, 8, block_size=bs, local_blocks=1, vert_stride=4, max_seq_len=n, num_query_heads=hq)
        cache.prefill(k, k)
        stored[hq] = [sorted({b % 4 for b in blocks[:-1]}) for blocks in cache.block_table()]  # strided residues
    assert stored == {None: [[0], [2]], 4: [[0], [3]]}
    assert _stride_residues(2, 4, False, 0, 0, 4) == [0, 3]


# -- sparse_decode over the compacted store ----------------------------------------------------
def _poison_unread(cache):
    """NaN into every stored element no decode of the newest token may read: the slots past each
    head's kept blocks, the current slot past its fill, the dense heads past the length."""
    n, bs, slots = cache.seq_len, cache.block_size, cache.num_slots
    fill = n - cache._table.current * bs
    for store in (cache._k_s, cache._v_s):
        store[:, :, slots * bs + fill:] = float("nan")
        for h, used in enumerate(cache._table.used()):
            store[:, h, used * bs: slots * bs] = float("nan")
    for store in (cache._k_d, cache._v_d):
        store[:, :, n:] = float("nan")


@pytest.mark.parametrize("name,hkv,g,cfg", [CONFIGS[0], CONFIGS[2], CONFIGS[4]], ids=[CONFIGS[i][0] for i in (0, 2, 4)])
def test_attend_is_sparse_decode_over_the_listed_blocks_only(name, hkv, g, cfg):
    """attend() == full-cache attention under the S2 element mask (fp64 oracle), with every element
    it must not read set to NaN; decode_args() lists, per head, its kept complete slots in order
    and puts the query at N * bs + fill (its own block: the current slot)."""
    b, d, bs = 2, 16, 16
    k, v, gen = _sequence(b, hkv, d, 260, seed=21)
    cache = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=260, device=DEVICE, **cfg)
    cache.prefill(k[:, :, :93], v[:, :, :93])
    for n in (93, 96, 97, 130, 191, 192, 193, 260):  # mid-block, block end, block start, capacity
        if n > cache.seq_len:
            cache.append(k[:, :, cache.seq_len:n], v[:, :, cache.seq_len:n])
        _poison_unread(cache)
        parts = cache.decode_args()
        hs = hkv - cfg.get("num_dense_heads", 0)
        if hs:
            part = parts[0]
            used = [len(x) - 1 for x in cache.block_table()[:hs]]
            kv_num, kv_idx = part.kv_blocks
            assert part.kv_heads == (0, hs) and part.block_size == bs
            assert kv_num.dtype == kv_idx.dtype == part.cache_seqlens.dtype == torch.int32
            assert kv_num.tolist() == [used] * b
            assert all(kv_idx[bb, h, :u].tolist() == list(range(u)) for bb in range(b) for h, u in enumerate(used))
            fill = n - (n - 1) // bs * bs
            assert part.cache_seqlens.tolist() == [cache.num_slots * bs + fill] * b
        q = torch.randn(b, hkv * g, 1, d, generator=gen).to(DEVICE)
        out, lse = cache.attend(q, return_lse=True)
        assert_no_nan(out, lse)
        naive, naive_lse = naive_attention(q.double(), k[:, :, :n].double(), v[:, :, :n].double(),
                                           _element_mask(n, hkv, g, bs, cfg), return_lse=True)
        tol = dict(tolerances(torch.float32), msg=lambda m: f"{m}\nseq_len={n}")
        torch.testing.assert_close(out.double(), naive, **tol)
        torch.testing.assert_close(lse.double(), naive_lse, **tol)


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="Triton backend unavailable")
def test_attend_through_the_triton_decode_kernel():
    b, hkv, g, d, bs = 1, 3, 2, 32, 16
    cfg = dict(local_blocks=2, vert_stride=3, num_dense_heads=1, num_query_heads=hkv * g)
    k, v, gen = _sequence(b, hkv, d, 200, seed=23)
    cache = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=200, device=DEVICE, **cfg)
    cache.prefill(k[:, :, :150], v[:, :, :150])
    for n in (150, 161):
        if n > cache.seq_len:
            cache.append(k[:, :, cache.seq_len:n], v[:, :, cache.seq_len:n])
        _poison_unread(cache)
        q = torch.randn(b, hkv * g, 1, d, generator=gen).to(DEVICE)
        out = cache.attend(q, backend="triton")
        ref = sparse_attention(q, k[:, :, :n], v[:, :, :n], strided(hkv, 1, n, block_size=bs, device=DEVICE, **cfg),
                               backend="reference")
        torch.testing.assert_close(out, ref, **tolerances(torch.float32), msg=lambda m: f"{m}\nseq_len={n}")


def test_reserve_grows_without_changing_anything_read():
    """A cache grown mid-sequence (reserve) stores and decodes exactly as one sized for the whole
    sequence from the start; the grown capacity keeps the closed-form slot count."""
    b, hkv, d, bs = 2, 3, 8, 16
    cfg = dict(local_blocks=2, vert_stride=3, num_dense_heads=1, head_sliding_offset=1)
    k, v, gen = _sequence(b, hkv, d, 400, seed=25)
    big = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=400, device=DEVICE, **cfg)
    small = S2KVCache(b, hkv, d, block_size=bs, max_seq_len=70, device=DEVICE, **cfg)
    for cache in (big, small):
        cache.prefill(k[:, :, :69], v[:, :, :69])
    small.reserve(60)  # smaller: nothing happens
    assert small.max_seq_len == 70
    for stop, grow in ((70, 150), (150, 400), (311, None)):
        if grow:
            small.append(k[:, :, small.seq_len:stop], v[:, :, small.seq_len:stop])
            big.append(k[:, :, big.seq_len:stop], v[:, :, big.seq_len:stop])
            small.reserve(grow)
            assert small.num_slots == small._complete_slots(grow)
        else:
            for cache in (small, big):
                cache.append(k[:, :, cache.seq_len:stop], v[:, :, cache.seq_len:stop])
        assert small.block_table() == big.block_table()
        q = torch.randn(b, hkv, 1, d, generator=gen).to(DEVICE)
        torch.testing.assert_close(small.attend(q), big.attend(q), rtol=0, atol=0)
    assert small.memory_bytes() == big.memory_bytes()


def test_select_and_repeat_batch_rows():
    """Beam-search reordering: the gathered cache decodes as a cache built from those rows."""
    hkv, d, bs = 2, 8, 16
    cfg = dict(local_blocks=1, vert_stride=2, num_dense_heads=1)
    k, v, gen = _sequence(3, hkv, d, 90, seed=27)
    cache = S2KVCache(3, hkv, d, block_size=bs, max_seq_len=90, device=DEVICE, **cfg)
    cache.prefill(k[:, :, :77], v[:, :, :77])
    rows = torch.tensor([2, 0, 2, 2])
    cache.select_batch(rows)
    cache.append(k[rows, :, 77:90], v[rows, :, 77:90])
    want = S2KVCache(4, hkv, d, block_size=bs, max_seq_len=90, device=DEVICE, **cfg)
    want.prefill(k[rows], v[rows])
    q = torch.randn(4, hkv, 1, d, generator=gen).to(DEVICE)
    assert cache.batch == 4
    torch.testing.assert_close(cache.attend(q), want.attend(q), rtol=0, atol=0)
    cache.repeat_batch(2)
    torch.testing.assert_close(cache.attend(q.repeat_interleave(2, 0)), want.attend(q).repeat_interleave(2, 0),
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="1-D integer"):
        cache.select_batch(torch.tensor([0.5]))
