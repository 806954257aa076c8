"""``sparse_decode``: the API, its validation and its oracle (``reference_decode``) against a
brute-force, element-by-element statement of the decode rule. The kernels are tested against
``reference_decode`` in tests/test_decode_triton.py and tests/test_cuda_decode.py."""

import math

import pytest
import torch

from helpers import page_pool, random_block_lists
from sparse_attn import BlockSparseLayout, sparse_attention, sparse_decode
from sparse_attn.decode import _check_list_contents, decode_shaped, reference_decode
from sparse_attn.patterns.s2 import S2Config, strided_block_mask


def brute_force(q, k_full, v_full, lens, keep_fn, scale):
    """fp64, one (b, hq, i) at a time: ``keep_fn(b, h, p, j) -> bool`` on top of ``j <= p``.
    ``k_full [B, Hkv, S, D]`` holds each sequence's keys in order."""
    bsz, hq, sq, d = q.shape
    g = hq // k_full.shape[1]
    out = torch.zeros(bsz, hq, sq, d, dtype=torch.float64)
    lse = torch.full((bsz, hq, sq), -math.inf, dtype=torch.float64)
    for b in range(bsz):
        length = int(lens[b])
        for hh in range(hq):
            h = hh // g
            for i in range(sq):
                p = length - sq + i
                js = [j for j in range(max(0, p + 1)) if keep_fn(b, h, p, j)]
                if not js:
                    continue
                s = (k_full[b, h, js].double() @ q[b, hh, i].double()) * scale
                w = torch.softmax(s, 0)
                out[b, hh, i] = w @ v_full[b, h, js].double()
                lse[b, hh, i] = torch.logsumexp(s, 0)
    return out, lse


def to_paged(k_full, page_size, extra_pages=3, seed=0):
    """A shuffled page pool ``[P, page_size, Hkv, D]`` (NaN in pages no sequence owns) and the
    block table of ``k_full [B, Hkv, S, D]``."""
    return page_pool(k_full, page_size, torch.Generator().manual_seed(seed), extra_pages)


def nan_past(k_full, lens):
    """``k_full`` with NaN in every row at or past each sequence's length."""
    k = k_full.clone()
    for b, length in enumerate(lens.tolist()):
        k[b, :, length:] = float("nan")
    return k


def list_keep(kv_num, kv_idx, bs, own_block):
    def keep(b, h, p, j):
        listed = set(kv_idx[b, h, : int(kv_num[b, h])].tolist())
        return j // bs in listed or (own_block and j // bs == p // bs)

    return keep


def check(out, lse, ref_out, ref_lse, atol=1e-5):
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=atol, rtol=0)


CASES = [  # (B, Hq, Hkv, Sq, D, S, bs)
    (3, 4, 4, 1, 16, 77, 16),
    (3, 8, 2, 3, 32, 100, 16),
    (2, 8, 1, 7, 16, 130, 32),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("mode", ["dense", "list", "list_no_own", "s2"])
def test_reference_decode_matches_brute_force(case, paged, mode):
    bsz, hq, hkv, sq, d, s, bs = case
    gen = torch.Generator().manual_seed(hash((case, paged, mode)) % 1000)
    q = torch.randn(bsz, hq, sq, d, generator=gen)
    k_full = torch.randn(bsz, hkv, s, d, generator=gen)
    v_full = torch.randn(bsz, hkv, s, d, generator=gen)
    # a full cache, an empty one, and a short one (fewer tokens than new rows when Sq > 1)
    short = sq - 1 if sq > 1 else 5
    lens = torch.tensor([s, 0, short] if bsz == 3 else [s - 3, short], dtype=torch.int32)
    scale = 0.3
    nblocks = -(-s // bs)
    own_block, kv_num, kv_idx, residues, local, stride = True, None, None, None, 1, 1
    if mode == "dense":
        keep = lambda b, h, p, j: True  # noqa: E731
    elif mode.startswith("list"):
        own_block = mode == "list"
        kv_num, kv_idx = random_block_lists(bsz, hkv, nblocks, max(1, nblocks // 2), gen)
        keep = list_keep(kv_num, kv_idx, bs, own_block)
    else:
        cfg = S2Config(block_size=bs, local_blocks=2, vert_stride=3, num_dense_heads=1 if hkv > 1 else 0)
        # the S2 rule from its own definition: the prefill mask of S x S, row = the query's block
        mask = strided_block_mask(hkv, s, s, config=cfg, num_query_heads=hq)[0]
        keep = lambda b, h, p, j: bool(mask[h, p // bs, j // bs])  # noqa: E731
        from sparse_attn.decode import _check_kv_blocks

        kv_num, kv_idx, residues, local, stride, _ = _check_kv_blocks(cfg, q, hkv, None, s)
    ref_out, ref_lse = brute_force(q, k_full, v_full, lens, keep, scale)
    kc, vc = nan_past(k_full, lens), nan_past(v_full, lens)
    table = None
    if paged:
        kc, table = to_paged(kc, 16)
        vc, _ = to_paged(vc, 16)
    out, lse = reference_decode(q, kc, vc, lens, table, kv_num, kv_idx, residues, local, stride, bs, scale, own_block)
    check(out, lse, ref_out, ref_lse)


def test_public_api_routes_kv_blocks_and_s2():
    gen = torch.Generator().manual_seed(3)
    bsz, hq, hkv, d, s, bs = 2, 8, 2, 16, 90, 16
    q = torch.randn(bsz, hq, 2, d, generator=gen)
    k = torch.randn(bsz, hkv, s, d, generator=gen)
    v = torch.randn(bsz, hkv, s, d, generator=gen)
    lens = torch.tensor([90, 41], dtype=torch.int32)
    kv_num, kv_idx = random_block_lists(bsz, hkv, -(-s // bs), 3, gen)
    out, lse = sparse_decode(q, k, v, lens, kv_blocks=(kv_num, kv_idx), block_size=bs, return_lse=True)
    ref = brute_force(q, k, v, lens, list_keep(kv_num, kv_idx, bs, True), d ** -0.5)
    check(out, lse, *ref)
    # broadcast lists: one row shared by every sequence and head
    out_b = sparse_decode(q, k, v, lens, kv_blocks=(kv_num[:1, :1], kv_idx[:1, :1]), block_size=bs)
    ref_b = brute_force(q, k, v, lens, list_keep(kv_num[:1, :1].expand(2, 2), kv_idx[:1, :1].expand(2, 2, 3), bs,
                                                  True), d ** -0.5)
    check(out_b, torch.zeros(bsz, hq, 2), ref_b[0], torch.zeros(bsz, hq, 2, dtype=torch.float64))
    # S2 in closed form equals S2 as explicit lists (the strided layout's decode row per sequence)
    cfg = S2Config(block_size=bs, local_blocks=1, vert_stride=2)
    out_s2 = sparse_decode(q[:, :, :1], k, v, torch.tensor([90, 90], dtype=torch.int32), kv_blocks=cfg)
    layout = strided_block_mask(hkv, 1, 90, config=cfg, num_query_heads=hq)[0, :, 0]  # [Hkv, Mk]
    rows = [torch.nonzero(layout[h]).flatten() for h in range(hkv)]
    n = max(len(r) for r in rows)
    idx = torch.zeros(1, hkv, n, dtype=torch.int32)
    num = torch.zeros(1, hkv, dtype=torch.int32)
    for h, r in enumerate(rows):
        idx[0, h, : len(r)] = r.int()
        num[0, h] = len(r)
    out_l = sparse_decode(q[:, :, :1], k, v, torch.tensor([90, 90], dtype=torch.int32), kv_blocks=(num, idx),
                          block_size=bs)
    torch.testing.assert_close(out_s2, out_l)


def test_full_cache_equals_sparse_attention():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, 32, generator=gen)
    k = torch.randn(2, 2, 70, 32, generator=gen)
    v = torch.randn(2, 2, 70, 32, generator=gen)
    mask = torch.rand(1, 2, 1, 5, generator=gen) < 0.5
    mask[..., -1] = True  # the own block, which sparse_decode always keeps
    layout = BlockSparseLayout.from_block_mask(mask, block_size=(16, 16), seq_q=3, seq_k=70)
    want = sparse_attention(q, k, v, layout, backend="reference")
    lens = torch.full((2,), 70, dtype=torch.int32)
    got = sparse_decode(q, k, v, lens, kv_blocks=(layout.kv_num[:, :, 0], layout.kv_idx[:, :, 0]), block_size=16)
    torch.testing.assert_close(got, want)


def test_strided_storage_and_lengths_past_capacity():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    kbsh = torch.randn(2, 40, 2, 16, generator=gen)  # [B, S, H, D] storage
    vbsh = torch.randn(2, 40, 2, 16, generator=gen)
    lens = torch.tensor([40, 1000], dtype=torch.int32)  # 1000 is cut to the capacity, 40
    got = sparse_decode(q, kbsh.transpose(1, 2), vbsh.transpose(1, 2), lens)
    want = sparse_decode(q, kbsh.transpose(1, 2).contiguous(), vbsh.transpose(1, 2).contiguous(),
                         torch.tensor([40, 40], dtype=torch.int32))
    torch.testing.assert_close(got, want)


def test_empty_sequences_give_zeros_and_neg_inf():
    q = torch.randn(2, 2, 4, 16)
    k = torch.randn(2, 2, 32, 16)
    out, lse = sparse_decode(q, k, k, torch.tensor([0, 2], dtype=torch.int32), return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    # L=2 < Sq=4: the first two rows sit before the sequence start
    assert torch.isneginf(lse[1, :, :2]).all() and torch.isfinite(lse[1, :, 2:]).all()


def test_compiles_fullgraph():
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 2, 48, 16)
    lens = torch.tensor([33], dtype=torch.int32)
    f = torch.compile(lambda q, k, v, n: sparse_decode(q, k, v, n, return_lse=True), fullgraph=True,
                      backend="aot_eager")
    out, lse = f(q, k, k, lens)
    want, want_lse = sparse_decode(q, k, k, lens, return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


def _args():
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 2, 32, 16)
    return q, k, k.clone(), torch.tensor([32, 5], dtype=torch.int32)


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda a: a.update(q=torch.randn(2, 4, 17, 16)), ValueError, "1..16"),
    (lambda a: a.update(q=torch.randn(2, 4, 0, 16)), ValueError, "1..16"),
    (lambda a: a.update(q=torch.randn(2, 3, 1, 16)), ValueError, "multiple"),
    (lambda a: a.update(cache_seqlens=torch.tensor([1.0, 2.0])), TypeError, "cache_seqlens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (lambda a: a.update(kv_blocks=(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 2, 1, dtype=torch.int32))),
     ValueError, "kv_num"),
    (lambda a: a.update(kv_blocks=(torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32))),
     ValueError, "kv_idx"),
    (lambda a: a.update(kv_blocks=torch.zeros(2, 2)), TypeError, "kv_blocks"),
    (lambda a: a.update(block_size=48), ValueError, "block_size"),
    (lambda a: a.update(kv_blocks=S2Config(block_size=16), block_size=32), ValueError, "S2Config"),
    (lambda a: a.update(kv_blocks=S2Config(vert_position_type="relative")), ValueError, "absolute"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale"),
    (lambda a: a.update(return_lse=1), TypeError, "return_lse"),
    (lambda a: a.update(backend="cuda"), ValueError, "SPARSE_ATTN_CUDA_EMULATE"),
    (lambda a: a.update(backend="tpu"), ValueError, "backend"),
    (lambda a: a.update(block_table=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "paged pools"),
])
def test_bad_input(mutate, exc, words):
    q, k, v, lens = _args()
    kw = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens)
    mutate(kw)
    with pytest.raises(exc, match=words):
        sparse_decode(**kw)


def test_bad_paged_input():
    q = torch.randn(2, 4, 1, 16)
    pool = torch.randn(6, 16, 2, 16)
    table = torch.zeros(2, 3, dtype=torch.int32)
    lens = torch.tensor([10, 20], dtype=torch.int32)
    sparse_decode(q, pool, pool, lens, block_table=table)  # fine
    with pytest.raises(ValueError, match="block_table"):
        sparse_decode(q, pool, pool, lens, block_table=table[:1])
    with pytest.raises(TypeError, match="block_table"):
        sparse_decode(q, pool, pool, lens, block_table=table.float())
    with pytest.raises(ValueError, match="page_size"):
        sparse_decode(q, pool[:, :12], pool[:, :12], lens, block_table=table)
    with pytest.raises(ValueError, match="head dim"):
        sparse_decode(q, pool[..., :8], pool[..., :8], lens, block_table=table)


def test_list_contents_check():
    num = torch.tensor([[2]], dtype=torch.int32)
    _check_list_contents(num, torch.tensor([[[0, 3]]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="ascending"):
        _check_list_contents(num, torch.tensor([[[3, 3]]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="outside"):
        _check_list_contents(num, torch.tensor([[[0, 4]]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="kv_num"):
        _check_list_contents(num + 1, torch.tensor([[[0, 3]]], dtype=torch.int32), 4)


def test_decode_shaped_rules():
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 2, 64, 16)
    one_row = BlockSparseLayout.from_block_mask(torch.ones(1, 2, 1, 4, dtype=torch.bool), block_size=16,
                                                seq_q=1, seq_k=64)
    per_q_head = BlockSparseLayout.from_block_mask(torch.ones(1, 4, 1, 4, dtype=torch.bool), block_size=16,
                                                   seq_q=1, seq_k=64)
    assert decode_shaped(q, k, None, True, "triton")
    assert decode_shaped(q, k, one_row, True, "triton")
    assert not decode_shaped(q, k, per_q_head, True, "triton")  # a GQA group's heads differ
    assert not decode_shaped(q, k, None, False, "triton")  # not causal
    assert not decode_shaped(q, k, None, True, "reference")
    assert not decode_shaped(torch.randn(1, 4, 2, 16), k, None, True, "triton")  # rows could leak NaN
    assert not decode_shaped(q.requires_grad_(), k, None, True, "triton")  # a gradient to compute
    with torch.no_grad():
        assert decode_shaped(q, k, None, True, "triton")


def test_cuda_supports_only_what_the_cuda_kernel_runs():
    """backend='auto' picks the CUDA C++ kernel only for inputs it runs (fp16/bf16, D 64/128/256);
    fp32 or D=40 stay on Triton instead of failing."""
    from sparse_attn.decode import cuda_supports

    assert cuda_supports(torch.empty(1, 1, 1, 128, dtype=torch.bfloat16))
    assert cuda_supports(torch.empty(1, 1, 1, 64, dtype=torch.float16))
    assert not cuda_supports(torch.empty(1, 1, 1, 128, dtype=torch.float32))
    assert not cuda_supports(torch.empty(1, 1, 1, 40, dtype=torch.float16))


def test_s2_residues_are_built_once_per_config():
    """A decode step over an S2Config reuses its residues tensor (no host-to-device copy per step),
    one per (config, heads, device); under torch.compile the call still traces."""
    from sparse_attn.decode import _s2_residues

    cfg = S2Config(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1)
    first = _s2_residues(cfg, 4, 8, torch.device("cpu"))
    assert _s2_residues(cfg, 4, 8, torch.device("cpu")) is first
    assert first.tolist() == [0, 3, 2, -1]  # step max(1, 4 // 8) = 1: residue -h % 4; the last head dense
    assert _s2_residues(cfg, 4, 4, torch.device("cpu")) is not first
    q = torch.randn(1, 8, 1, 16)
    k = torch.randn(1, 4, 64, 16)
    lens = torch.tensor([50], dtype=torch.int32)
    f = torch.compile(lambda q, k, n: sparse_decode(q, k, k, n, kv_blocks=cfg), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, lens), sparse_decode(q, k, k, lens, kv_blocks=cfg))
