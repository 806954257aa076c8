"""select_blocks: scores -> layout (threshold / top-k / density), forced blocks, causal correction."""

import math

import pytest
import torch

from sparse_attn.patterns import select_blocks
from sparse_attn.patterns.select import causal_block_mask


def causal_blocks_naive(mq, mk, bq, bk, sq, sk):
    m = torch.zeros(mq, mk, dtype=torch.bool)
    for t in range(sq):
        for j in range(sk):
            if j <= t + sk - sq:
                m[t // bq, j // bk] = True
    return m


@pytest.mark.parametrize("sq,sk,bq,bk", [(100, 100, 16, 16), (37, 100, 16, 32), (1, 129, 16, 16), (129, 70, 32, 16)])
def test_causal_block_mask_matches_elements(sq, sk, bq, bk):
    mq, mk = -(-sq // bq), -(-sk // bk)
    assert torch.equal(causal_block_mask(mq, mk, (bq, bk), sq, sk), causal_blocks_naive(mq, mk, bq, bk, sq, sk))


def _logits(b=2, h=4, mq=9, mk=9, seed=0):
    return torch.randn(b, h, mq, mk, generator=torch.Generator().manual_seed(seed))


def test_topk_exact_counts_and_choice():
    x = _logits()
    lay = select_blocks(x, topk=3, keep_first=0, keep_last=0, block_size=16)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()
    n_allowed = allowed.sum(-1)
    assert torch.equal(lay.kv_num, torch.clamp(n_allowed, max=3).int().expand(2, 4, 9))
    mask = lay.to_block_mask()
    masked = x.masked_fill(~allowed, float("-inf"))
    for b in range(2):
        for h in range(4):
            for r in range(9):
                want = set(masked[b, h, r].topk(min(3, r + 1)).indices.tolist())
                assert set(mask[b, h, r].nonzero().flatten().tolist()) == want


def test_forced_first_and_last_blocks():
    x = torch.zeros(1, 1, 6, 6)
    x[..., 2] = 10.0  # everything prefers column 2
    lay = select_blocks(x, topk=1, keep_first=1, keep_last=2, block_size=16)
    m = lay.to_block_mask()[0, 0]
    expect = torch.zeros(6, 6, dtype=torch.bool)
    for r in range(6):
        expect[r, 0] = True                    # sink
        expect[r, max(0, r - 1): r + 1] = True  # last two allowed (diagonal + neighbour)
        if r >= 2:
            expect[r, 2] = True                # the top-1
    assert torch.equal(m, expect)


def test_threshold_on_softmax_probabilities():
    x = _logits(1, 2, 7, 7, seed=1)
    lay = select_blocks(x, threshold=0.2, keep_first=0, keep_last=0, block_size=16)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    p = torch.softmax(x.masked_fill(~allowed, float("-inf")), -1)
    assert torch.equal(lay.to_block_mask(), (p >= 0.2) & allowed)


def test_density_uses_causal_triangle():
    x = _logits(1, 1, 20, 20, seed=2)
    lay = select_blocks(x, density=0.25, keep_first=0, keep_last=0, block_size=16)
    n_allowed = torch.arange(1, 21)
    expect = torch.floor(n_allowed * 0.25 + 0.5).int()  # round half up, per row
    assert torch.equal(lay.kv_num[0, 0], expect)
    # ~25% of the causal triangle, not of the square
    assert abs(int(lay.kv_num.sum()) / int(n_allowed.sum()) - 0.25) < 0.02


@pytest.mark.parametrize("d", [0.05, 0.13, 0.24, 0.5])
def test_density_counts_forced_blocks_in_the_budget(d):
    """density=d computes d of the causal blocks, sink and diagonal included: the measured
    0.13 -> 0.22 and 0.24 -> 0.33 overshoot of forcing them on top is gone."""
    m = 64
    x = _logits(2, 4, m, m, seed=7)
    lay = select_blocks(x, density=d, block_size=16)  # keep_first = keep_last = 1
    mask = lay.to_block_mask()
    n_allowed = torch.arange(1, m + 1)
    budget = torch.floor(n_allowed * d + 0.5).long()
    forced = torch.clamp(n_allowed, max=2)
    want = torch.maximum(budget, forced)
    assert torch.equal(lay.kv_num.long(), want.expand_as(lay.kv_num))
    tri = int(n_allowed.sum())
    real = float(lay.kv_num.sum()) / (lay.kv_num.shape[0] * lay.kv_num.shape[1] * tri)
    excess = float((forced - budget).clamp(min=0).sum()) / tri  # short rows whose budget < 2
    assert real <= d + excess + 0.5 * m / tri  # at most d (plus rounding and those short rows)
    assert mask[..., 0].all() and torch.diagonal(mask, dim1=-2, dim2=-1).all()  # forced blocks kept
    # the rest of the budget goes to the highest scores
    allowed = torch.ones(m, m, dtype=torch.bool).tril()
    for r in (20, 63):
        free = x[0, 0, r].masked_fill(~allowed[r], float("-inf")).clone()
        free[[0, r]] = float("-inf")
        top = set(free.topk(int(want[r]) - 2).indices.tolist()) | {0, r}
        assert set(mask[0, 0, r].nonzero().flatten().tolist()) == top


def test_threshold_strict_and_dense_last_rows():
    """SeerAttention's rule: probability > threshold (not >=), and the last 2 query-block rows
    dense; no forced sink/diagonal, so a row may be empty."""
    x = torch.zeros(1, 1, 6, 6)  # every allowed block of row r has probability exactly 1/(r+1)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    ge = select_blocks(x, threshold=0.25, keep_first=0, keep_last=0, block_size=16).to_block_mask()[0, 0]
    gt = select_blocks(x, threshold=0.25, strict=True, keep_first=0, keep_last=0, block_size=16).to_block_mask()[0, 0]
    n = torch.arange(1, 7)[:, None]
    assert torch.equal(ge, allowed & (1.0 / n >= 0.25)) and torch.equal(gt, allowed & (1.0 / n > 0.25))
    assert ge[3].any() and not gt[3].any()  # row 3: probability 0.25 exactly
    dense = select_blocks(x, threshold=0.9, strict=True, keep_first=0, keep_last=0, dense_last_rows=2,
                          block_size=16).to_block_mask()[0, 0]
    assert torch.equal(dense[4:], allowed[4:]) and torch.equal(dense[1:4], torch.zeros(3, 6, dtype=torch.bool))


def _nz_ratio_authors(x, nz, last_dense):
    """SeerAttention's nz_ratio rule, transcribed from its definition: top-K of the row's scores
    over all M columns, then the causal (lower-triangular) cut; optionally the last 2 rows dense."""
    b, h, m, _ = x.shape
    k = max(1, int((1 - math.sqrt(1 - nz)) * m))
    out = torch.zeros(b, h, m, m, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            for r in range(m):
                row = x[i, j, r].tolist()
                best = sorted(range(m), key=lambda c: -row[c])[:k]
                for c in best:
                    out[i, j, r, c] = True
    if last_dense:
        out[:, :, -2:, :] = True
    return out & torch.ones(m, m, dtype=torch.bool).tril()


@pytest.mark.parametrize("nz,last_dense", [(0.1, False), (0.3, True), (0.0, False), (1.0, True)])
def test_nz_ratio_matches_the_authors_rule(nz, last_dense):
    m = 12
    allowed = torch.ones(m, m, dtype=torch.bool).tril()
    # softmax probabilities (as the authors rank), with the future at probability 0
    x = torch.softmax(_logits(1, 2, m, m, seed=9).masked_fill(~allowed, float("-inf")), -1)
    lay = select_blocks(x.log(), nz_ratio=nz, keep_first=0, keep_last=0, dense_last_rows=2 if last_dense else 0,
                        block_size=16)
    assert torch.equal(lay.to_block_mask(), _nz_ratio_authors(x, nz, last_dense))


def test_logits_minus_inf_never_chosen_and_no_empty_rows():
    x = _logits(1, 2, 8, 8, seed=3)
    x[..., 3] = float("-inf")
    lay = select_blocks(x, topk=8, block_size=16, causal=False)
    m = lay.to_block_mask()
    assert not m[..., 3].any()
    assert bool((lay.kv_num > 0).all())


def test_rectangular_decode_geometry():
    x = _logits(1, 2, 1, 9, seed=4)  # one query block at the end of a 9-block context
    lay = select_blocks(x, topk=2, block_size=16, seq_q=1, seq_k=140)
    m = lay.to_block_mask()[0]
    assert m.shape == (2, 1, 9)
    assert bool(m[:, 0, 0].all()) and bool(m[:, 0, 8].all())  # sink + the block holding the query
    assert int(m.sum(-1).max()) <= 4


def test_share_gqa_groups():
    x = _logits(1, 4, 6, 6, seed=5)
    lay = select_blocks(x, topk=2, keep_first=0, keep_last=0, block_size=16, share_gqa=True, num_kv_heads=2)
    assert lay.shape == (1, 2, 6, 6)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    red = x.masked_fill(~allowed, float("-inf")).view(1, 2, 2, 6, 6).amax(2)
    m = lay.to_block_mask()
    for g in range(2):
        for r in range(6):
            assert set(m[0, g, r].nonzero().flatten().tolist()) == set(red[0, g, r].topk(min(2, r + 1)).indices.tolist())


def test_no_host_sync(monkeypatch):
    x = _logits()
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"host sync via {_n}"))
    select_blocks(x, density=0.3, block_size=16)
    select_blocks(x, threshold=0.1, block_size=16)
    select_blocks(x, topk=2, block_size=16, share_gqa=True, num_kv_heads=2)


def test_bad_arguments():
    x = _logits()
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(x, topk=2, density=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(x)
    with pytest.raises(ValueError, match="density"):
        select_blocks(x, density=1.5)
    with pytest.raises(ValueError, match="nz_ratio"):
        select_blocks(x, nz_ratio=-0.1)
    with pytest.raises(ValueError, match="dense_last_rows"):
        select_blocks(x, topk=1, dense_last_rows=-1)
    with pytest.raises(TypeError, match="strict"):
        select_blocks(x, threshold=0.1, strict="yes")
    with pytest.raises(ValueError, match="num_kv_heads"):
        select_blocks(x, topk=1, share_gqa=True)
    with pytest.raises(ValueError, match="seq_q"):
        select_blocks(x, topk=1, block_size=16, seq_q=400)
    with pytest.raises(ValueError, match=r"\[B, H, Mq, Mk\]"):
        select_blocks(x[0], topk=1)
