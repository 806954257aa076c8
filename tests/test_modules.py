"""sparse_attn.modules: SparseAttention (projections, RoPE, GQA, KV cache), the pattern modules and
the masked path, each against an independent plain-PyTorch computation written here: explicit
RoPE by pairs, repeat-KV softmax attention, and S2's keep rule evaluated with loops.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from helpers import element_mask, naive_attention, s2_rule_mask
from torch import nn

from sparse_attn import BlockSparseLayout, sparse_attention
from sparse_attn.modules import (
    PATTERNS,
    AttentionSpec,
    BlockMaskPattern,
    DensePattern,
    KVCache,
    S2Pattern,
    SeerPattern,
    SparseAttention,
    build_pattern,
    masked_attention,
    pattern_attention,
    register_layout_fn,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Independent computations
# ------------------------------------------------------------------------------------------------
def _rope_pairs(x, positions, theta):
    """RoPE by explicit 2-D rotations of the pairs (i, i + D/2): ``x [B, H, S, D]``, positions [S]."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        ang = positions.double() * theta ** (-2.0 * i / d)  # [S]
        c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = b * c + a * s
    return out


def _plain_attention(attn: SparseAttention, x, elem=None):
    """Plain PyTorch version of ``attn(x)`` (no cache): its weights, our own RoPE and softmax."""
    b, s, _ = x.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(b, s, h, d).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(b, s, hkv, d).transpose(1, 2)
    v = (x @ attn.v_proj.weight.T).view(b, s, hkv, d).transpose(1, 2)
    pos = torch.arange(s)
    q, k = _rope_pairs(q, pos, attn.rope_theta), _rope_pairs(k, pos, attn.rope_theta)
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    allowed = causal if elem is None else causal & elem
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).reshape(b, s, h * d) @ attn.o_proj.weight.T


def _s2_keep(num_heads, m, local, stride, num_query_heads=None):
    """S2's block rule (causal, Sq == Sk, no dense heads, offset 0): bool [H, M, M] over
    ``num_heads`` pattern heads, the head step from the ``num_query_heads`` (DKernel's GQA rule)."""
    nq = num_query_heads or num_heads
    return s2_rule_mask(nq, m, m, 1, local, stride, num_kv_heads=num_heads if nq != num_heads else None)[0]


def _expand_blocks(block, bs, s, hq):
    """[Hl, M, M] block mask -> [Hq, S, S] element mask (query head h uses layout head h // (Hq/Hl))."""
    e = block.repeat_interleave(bs, 1)[:, :s].repeat_interleave(bs, 2)[:, :, :s]
    return e.repeat_interleave(hq // block.shape[0], 0)


# ------------------------------------------------------------------------------------------------
# SparseAttention
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden,heads,kv,s", [(48, 6, 2, 37), (32, 4, 4, 20), (40, 4, 1, 9)],
                         ids=["gqa3-S37", "mha-S20", "mqa-S9"])
def test_dense_matches_plain_pytorch(hidden, heads, kv, s):
    torch.manual_seed(0)
    attn = SparseAttention(hidden, heads, kv, rope_theta=500.0)
    x = torch.randn(2, s, hidden)
    torch.testing.assert_close(attn(x), _plain_attention(attn, x), atol=2e-5, rtol=2e-5)


def test_s2_matches_plain_pytorch_with_the_rule_by_loops():
    torch.manual_seed(1)
    bs, s, local, stride = 16, 83, 2, 4
    attn = SparseAttention(64, 8, 2, pattern="s2",
                           pattern_options=dict(block_size=bs, local_blocks=local, vert_stride=stride))
    x = torch.randn(2, s, 64)
    keep = _s2_keep(2, -(-s // bs), local, stride, num_query_heads=8)  # layout over the 2 KV heads
    elem = _expand_blocks(keep, bs, s, 8)
    out = attn(x)
    torch.testing.assert_close(out, _plain_attention(attn, x, elem), atol=2e-5, rtol=2e-5)
    assert not torch.allclose(out, _plain_attention(attn, x), atol=1e-3)  # it is really sparse

    q_heads = SparseAttention(64, 8, 2, pattern="s2",
                              pattern_options=dict(block_size=bs, local_blocks=local, vert_stride=stride,
                                                   layout_heads="q"))
    q_heads.load_state_dict(attn.state_dict())
    elem_q = _expand_blocks(_s2_keep(8, -(-s // bs), local, stride), bs, s, 8)
    torch.testing.assert_close(q_heads(x), _plain_attention(attn, x, elem_q), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("pattern,opts,chunks", [
    ("dense", {}, [20, 7, 1, 1, 1, 3]),
    ("s2", dict(block_size=16, local_blocks=2, vert_stride=3), [32, 16, 1, 1, 1, 1, 1]),
], ids=["dense", "s2"])
def test_cache_incremental_equals_full_forward(pattern, opts, chunks):
    """Prefill, chunked prefill and one-token decode with the cache == the full forward.
    (S2 chunks of more than 16 rows take the layout path, which reads the block of a chunk's first
    query: they must be block-aligned; shorter ones run on sparse_decode, row by row.)"""
    torch.manual_seed(2)
    attn = SparseAttention(48, 6, 2, pattern=pattern, pattern_options=opts)
    x = torch.randn(2, sum(chunks), 48)
    full = attn(x)
    cache, outs, t = KVCache(), [], 0
    for n in chunks:
        outs.append(attn(x[:, t : t + n], cache=cache))
        t += n
    assert cache.seq_len == t
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=2e-5)


def test_decode_dense_option_runs_decode_dense():
    torch.manual_seed(3)
    opts = dict(block_size=16, local_blocks=1, vert_stride=4)
    sparse = SparseAttention(32, 4, 2, pattern="s2", pattern_options=opts)
    mixed = SparseAttention(32, 4, 2, pattern="s2", pattern_options={**opts, "decode": "dense"})
    dense = SparseAttention(32, 4, 2)
    mixed.load_state_dict(sparse.state_dict())
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(1, 70, 32)
    c1, c2 = KVCache(), KVCache()
    torch.testing.assert_close(mixed(x[:, :69], cache=c1), sparse(x[:, :69]))  # prefill stays sparse
    last = mixed(x[:, 69:], cache=c1)
    torch.testing.assert_close(last, dense(x)[:, 69:], atol=2e-5, rtol=2e-5)
    sparse(x[:, :69], cache=c2)
    assert not torch.allclose(sparse(x[:, 69:], cache=c2), last, atol=1e-4)


def test_backward_gives_finite_gradients():
    torch.manual_seed(4)
    attn = SparseAttention(32, 4, 2, pattern="s2", pattern_options=dict(block_size=16, local_blocks=1))
    x = torch.randn(2, 50, 32, requires_grad=True)
    attn(x).square().sum().backward()
    for t in [x.grad] + [p.grad for p in attn.parameters()]:
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_dim"):
        SparseAttention(30, 4, 2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        SparseAttention(32, 4, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        SparseAttention(32, 4, 2, pattern="nope")
    with pytest.raises(TypeError, match="pattern must be"):
        SparseAttention(32, 4, 2, pattern=3)
    with pytest.raises(ValueError, match="x must be"):
        SparseAttention(32, 4, 2)(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="decode must be"):
        build_pattern("dense", AttentionSpec(4, 2, 8), decode="sometimes")
    with pytest.raises(ValueError, match="block_size"):
        build_pattern("s2", AttentionSpec(4, 2, 8), block_size=48)
    with pytest.raises(TypeError, match="bad option for method 's2'"):
        build_pattern("s2", AttentionSpec(4, 2, 8), threshold=0.1)
    with pytest.raises(ValueError, match="at most one of"):
        build_pattern("seer", AttentionSpec(4, 2, 8), threshold=0.1, topk=2)


# ------------------------------------------------------------------------------------------------
# Masked path and pattern_attention
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sq,sk", [(45, 45), (9, 45), (1, 45)], ids=["prefill", "chunk", "decode"])
def test_masked_attention_is_layout_and_mask(sq, sk):
    g = _gen(5)
    q = torch.randn(3, 4, sq, 16, generator=g)
    k, v = torch.randn(3, 2, sk, 16, generator=g), torch.randn(3, 2, sk, 16, generator=g)
    bm = torch.rand(1, 2, -(-sq // 16), -(-sk // 16), generator=g) < 0.6
    bm[..., -1, :] = False  # the last query block sees nothing through the layout
    layout = BlockSparseLayout.from_block_mask(bm, 16, sq, sk)
    pad = torch.ones(3, sk, dtype=torch.bool)
    pad[1, :11] = False  # left padding
    pad[2, :] = False  # a sequence of nothing but padding
    causal = element_mask(None, 16, 16, sq, sk, 4, causal=True)  # [1, 1, Sq, Sk]
    hf_mask = causal & pad[:, None, None, :]
    out = masked_attention(q, k, v, layout, hf_mask)
    want = naive_attention(q, k, v, element_mask(bm, 16, 16, sq, sk, 4, causal=True) & hf_mask)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert (out[2] == 0).all() and torch.isfinite(out).all()
    additive = torch.zeros(hf_mask.shape).masked_fill(~hf_mask, float("-inf"))
    torch.testing.assert_close(masked_attention(q, k, v, layout, additive), want, atol=2e-5, rtol=2e-5)
    # layout_applies=False for a sequence: that one sees what the mask allows, the layout ignored
    mixed = masked_attention(q, k, v, layout, hf_mask, layout_applies=torch.tensor([True, False, True]))
    torch.testing.assert_close(mixed[0], want[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mixed[1], naive_attention(q, k, v, hf_mask)[1], atol=2e-5, rtol=2e-5)


def test_pattern_attention_without_mask_is_the_op():
    g = _gen(6)
    q, k, v = (torch.randn(2, 4, 50, 16, generator=g), torch.randn(2, 2, 50, 16, generator=g),
               torch.randn(2, 2, 50, 16, generator=g))
    p = S2Pattern.from_spec(AttentionSpec(4, 2, 16), block_size=16, local_blocks=1, vert_stride=2)
    want = sparse_attention(q, k, v, p(q, k))
    torch.testing.assert_close(pattern_attention(p, q, k, v), want)
    torch.testing.assert_close(pattern_attention(None, q, k, v), sparse_attention(q, k, v))


# ------------------------------------------------------------------------------------------------
# Pattern modules
# ------------------------------------------------------------------------------------------------
def sink_and_diagonal(q, k):
    """Top-level (importable) block_mask layout_fn: first key block + the diagonal block (block 16)."""
    mq, mk = -(-q.shape[2] // 16), -(-k.shape[2] // 16)
    r = torch.arange(mq)[:, None] + (mk - mq)
    c = torch.arange(mk)[None, :]
    return ((c == 0) | (c == r))[None, None]


def test_block_mask_pattern():
    g = _gen(7)
    q, k, v = (torch.randn(1, 4, 70, 16, generator=g), torch.randn(1, 2, 70, 16, generator=g),
               torch.randn(1, 2, 70, 16, generator=g))
    register_layout_fn("test_modules.sink_and_diagonal", sink_and_diagonal)
    p = build_pattern("block_mask", AttentionSpec(4, 2, 16), layout_fn=sink_and_diagonal, block_size=16)
    want = naive_attention(q, k, v, element_mask(sink_and_diagonal(q, k), 16, 16, 70, 70, 4, causal=True))
    torch.testing.assert_close(pattern_attention(p, q, k, v), want, atol=2e-5, rtol=2e-5)
    cfg = p.get_config()
    assert cfg["layout_fn"] == "test_modules.sink_and_diagonal"  # the registered name, not a module path
    again = build_pattern("block_mask", AttentionSpec(4, 2, 16), **cfg)
    assert again.layout_fn is sink_and_diagonal
    local = BlockMaskPattern(lambda q, k: None)
    assert local.get_config()["layout_fn"] is None and local(q, k) is None
    with pytest.raises(ValueError, match="pass it again"):
        BlockMaskPattern(None)(q, k)
    with pytest.raises(TypeError, match="layout_fn must return"):
        BlockMaskPattern(lambda q, k: 3)(q, k)


def test_layout_fn_names_are_looked_up_never_imported(tmp_path, monkeypatch):
    """A config is data: a ``layout_fn`` string is only a registry key. Module paths that would
    import (and run) code are unknown names, whatever is importable."""
    marker = tmp_path / "ran"
    (tmp_path / "sa_payload.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef fn(q, k):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sa_payload:fn", "os:system", "tests.test_modules:sink_and_diagonal", "builtins:eval"):
        with pytest.raises(ValueError, match="not a registered layout function name"):
            BlockMaskPattern(name)
    assert not marker.exists() and "sa_payload" not in sys.modules
    with pytest.raises(ValueError, match="already registered to another function"):
        register_layout_fn("test_modules.clash", sink_and_diagonal)
        register_layout_fn("test_modules.clash", lambda q, k: None)
    assert register_layout_fn("test_modules.clash", sink_and_diagonal) is sink_and_diagonal  # same fn: no-op
    for bad in ("", 3, "x" * 201):
        with pytest.raises((ValueError, TypeError)):
            register_layout_fn(bad, sink_and_diagonal)
    with pytest.raises(TypeError, match="callable"):
        register_layout_fn("test_modules.not_callable", 3)


def test_registry_and_configs_round_trip():
    spec = AttentionSpec(8, 2, 16, rope_theta=1e4, layer_idx=1)
    assert set(PATTERNS) >= {"dense", "s2", "block_mask", "seer"}
    for method, opts in [("dense", {}), ("s2", dict(block_size=32, vert_stride=4, num_dense_heads=1)),
                         ("seer", dict(block_size=16, topk=3, gate=dict(hidden_size=32)))]:
        p = build_pattern(method, spec, **opts)
        again = build_pattern(method, spec, **p.get_config())
        assert again.get_config() == p.get_config()
    assert isinstance(build_pattern("dense", spec), DensePattern)


def _seer_inputs(seed, b=2, hq=4, hkv=2, s=75, d=16):
    g = _gen(seed)
    return (torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g),
            torch.randn(b, hkv, s, d, generator=g))


def test_seer_pattern_prefill_and_decode_gate():
    from sparse_attn.patterns import select_blocks

    torch.manual_seed(8)
    p = SeerPattern(4, 2, 16, block_size=16, threshold=0.1, decode_gate=dict(hidden_size=32),
                    gate=dict(hidden_size=32))
    q, k, _ = _seer_inputs(8)
    layout = p(q, k, q_pre=q, k_pre=k)  # prefill (pre-RoPE = the same tensors here)
    want = select_blocks(p.gate(q, k), threshold=0.1, block_size=16, seq_q=75, seq_k=75)
    assert torch.equal(layout.to_block_mask(), want.to_block_mask())
    # decode: one token at a time through the gate's cache == the decode gate on the whole prefix
    q2, k2, _ = _seer_inputs(9, s=3)
    for t in range(3):
        kk = torch.cat((k, k2[:, :, : t + 1]), 2)
        got = p(q2[:, :, t : t + 1], kk, q_pre=q2[:, :, t : t + 1], k_pre=k2[:, :, t : t + 1])
        full_q = torch.cat((q, q2[:, :, : t + 1]), 2)
        logits = p.decode_gate(full_q, kk)[:, :, -1:]
        want = select_blocks(logits, threshold=0.1, block_size=16, seq_q=1, seq_k=kk.shape[2])
        assert got.shape == (2, 2, 1, -(-kk.shape[2] // 16))
        assert torch.equal(got.to_block_mask(), want.to_block_mask())
    # without a decode gate, or with decode="dense", decode runs dense
    assert SeerPattern(4, 2, 16, block_size=16)(q2[:, :, :1], k, q_pre=q2[:, :, :1], k_pre=k[:, :, -1:]) is None
    with pytest.raises(ValueError, match="pre-RoPE"):
        p(q, k)


def test_seer_causal_select_never_looks_ahead():
    """With causal_select, query block r's blocks do not depend on block r's own tokens (changing
    them changes rows > r at most); the default per-block selection does look ahead."""
    torch.manual_seed(12)
    p = SeerPattern(4, 2, 16, block_size=16, topk=2, causal_select=True, gate=dict(hidden_size=32))
    q, k, _ = _seer_inputs(12, s=96)
    base = p(q, k, q_pre=q, k_pre=k).to_block_mask()
    assert base.diagonal(dim1=-2, dim2=-1).all()  # every block keeps itself
    assert base[..., 0, :].sum(-1).eq(1).all()  # block 0 only itself
    for r in (2, 4):
        q2 = q.clone()
        q2[:, :, r * 16 : (r + 1) * 16] = torch.randn(2, 4, 16, 16)
        k2 = k.clone()
        k2[:, :, r * 16 : (r + 1) * 16] = torch.randn(2, 2, 16, 16)
        got = p(q2, k2, q_pre=q2, k_pre=k2).to_block_mask()
        assert torch.equal(got[..., : r + 1, :], base[..., : r + 1, :])
    look_ahead = SeerPattern(4, 2, 16, block_size=16, topk=2, gate=dict(hidden_size=32))
    look_ahead.gate.load_state_dict(p.gate.state_dict())
    assert look_ahead.get_config()["causal_select"] is False
    before = look_ahead(q, k, q_pre=q, k_pre=k).to_block_mask()
    q2 = q.clone()
    q2[:, :, 32:48] = torch.randn(2, 4, 16, 16)
    after = look_ahead(q2, k, q_pre=q2, k_pre=k).to_block_mask()
    assert not torch.equal(after[..., 2, :], before[..., 2, :])  # block 2's own queries moved its blocks


def test_seer_distillation_hook():
    torch.manual_seed(10)
    p = SeerPattern(4, 2, 16, block_size=16, gate=dict(hidden_size=32), decode_gate=dict(hidden_size=32))
    q, k, v = _seer_inputs(10)
    p.distill = True
    out = pattern_attention(p, q, k, v, q_pre=q, k_pre=k)
    torch.testing.assert_close(out, naive_attention(q, k, v, element_mask(None, 16, 16, 75, 75, 4, True)),
                               atol=2e-5, rtol=2e-5)
    assert p.last_loss.dim() == 0 and torch.isfinite(p.last_loss) and p.last_loss > 0
    (p.last_loss + p.last_decode_loss).backward()
    assert p.gate.q_weight.grad.abs().sum() > 0
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in p.decode_gate.parameters())
    with pytest.raises(ValueError, match="attn_mask must be None"):
        pattern_attention(p, q, k, v, q_pre=q, k_pre=k, attn_mask=torch.ones(1, 1, 75, 75, dtype=torch.bool))


def test_seer_from_gates_module():
    from sparse_attn.patterns import SeerGate

    spec = AttentionSpec(4, 2, 16, layer_idx=1)
    src = SeerGate(4, 2, 16, block_size=32, hidden_size=24)
    gates = nn.ModuleDict({"1": nn.ModuleDict({"prefill": src})})
    p = build_pattern("seer", spec, gates=gates)
    assert p.block_size == 32 and p.gate.hidden_size == 24 and p.decode_gate is None
    assert all(torch.equal(a, b) for a, b in zip(p.gate.state_dict().values(), src.state_dict().values()))
    with pytest.raises(ValueError, match="no entry for layer 0"):
        build_pattern("seer", AttentionSpec(4, 2, 16, layer_idx=0), gates=gates)
    with pytest.raises(ValueError, match="block_size=64"):
        build_pattern("seer", spec, gates=gates, block_size=64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_pattern("seer", AttentionSpec(4, 4, 16, layer_idx=1), gates=gates)


def test_seer_in_sparse_attention_generates_with_its_decode_gate(monkeypatch):
    torch.manual_seed(11)
    attn = SparseAttention(64, 4, 2, pattern="seer",
                           pattern_options=dict(block_size=16, threshold=0.2, decode_gate=True,
                                                gate=dict(hidden_size=32)))
    x = torch.randn(1, 60, 64)
    cache = KVCache()
    prefill = attn(x[:, :50], cache=cache)
    torch.testing.assert_close(prefill, attn(x[:, :50]))
    seen = _spy_decode(monkeypatch)
    with torch.no_grad():
        steps = [attn(x[:, t : t + 1], cache=cache) for t in range(50, 60)]
    assert attn.pattern._decode_cache.length == 60
    assert len(seen) == 10 and all(isinstance(blocks, tuple) for _, blocks in seen)  # sparse decode, block lists
    assert all(torch.isfinite(o).all() for o in steps)


# ------------------------------------------------------------------------------------------------
# Decode-shaped calls run on sparse_decode
# ------------------------------------------------------------------------------------------------
def _spy_decode(monkeypatch):
    """Record ``(q shape, kv_blocks)`` of every sparse_decode call pattern_attention makes."""
    import sparse_attn.modules.functional as functional

    seen, inner = [], functional.sparse_decode

    def spy(q, k, v, lens, **kw):
        seen.append((tuple(q.shape), kw.get("kv_blocks")))
        return inner(q, k, v, lens, **kw)

    monkeypatch.setattr(functional, "sparse_decode", spy)
    return seen


@pytest.mark.parametrize("method,opts", [
    ("dense", {}),
    ("s2", dict(block_size=16, local_blocks=2, vert_stride=3, num_dense_heads=1)),
    ("seer", dict(block_size=16, topk=1, keep_first=0, keep_last=0, decode_gate=dict(hidden_size=32),
                  gate=dict(hidden_size=32))),
])
def test_decode_runs_on_sparse_decode_and_equals_the_layout_path(monkeypatch, method, opts):
    """A few new tokens over the cache go to sparse_decode with the pattern's blocks (dense: None,
    S2: its config, Seer: the decode gate's lists) and give what the layout path gives
    (sparse_attention with the pattern's layout; the Seer pattern deep-copied before the step, so
    both see the same gate state)."""
    from sparse_attn.patterns.s2 import S2Config

    torch.manual_seed(20)
    spec = AttentionSpec(6, 3, 16)
    p = build_pattern(method, spec, **opts)
    q, k, v = _seer_inputs(20, hq=6, hkv=3, s=77)
    with torch.no_grad():
        pattern_attention(p, q, k, v, q_pre=q, k_pre=k)  # prefill (feeds Seer's decode cache)
    seen = _spy_decode(monkeypatch)
    for t, sq in enumerate((1, 2, 1, 3)):  # 77 -> 78 -> 80 -> 81 -> 84 (chunks inside one block each)
        q1, k1, v1 = _seer_inputs(21 + t, hq=6, hkv=3, s=sq)
        k, v = torch.cat((k, k1), 2), torch.cat((v, v1), 2)
        ref_pattern = copy.deepcopy(p)
        with torch.no_grad():
            got = pattern_attention(p, q1, k, v, q_pre=q1, k_pre=k1)
            layout = ref_pattern(q1, k, q_pre=q1, k_pre=k1)
        want = sparse_attention(q1, k, v, layout, causal=True)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{m}\nstep {t}")
    assert [shape[2] for shape, _ in seen] == [1, 2, 1, 3]
    blocks = [b for _, b in seen]
    if method == "dense":
        assert blocks == [None] * 4
    elif method == "s2":
        assert all(isinstance(b, S2Config) and b == p.s2_config for b in blocks)
    else:  # a chunk of several tokens runs dense (its keys still feed the gate's cache)
        assert [type(b) for b in blocks] == [tuple, type(None), tuple, type(None)]
        assert all(b[0].shape == (2, 3) and b[0].eq(1).all() for b in blocks if b is not None)
        assert p._decode_cache.length == k.shape[2]


def test_decode_paths_that_keep_the_layout(monkeypatch):
    """No sparse_decode for: block_mask layouts (exact, no own-block rule), S2 over query heads with
    GQA, calls that need a gradient, and more than 16 new rows."""
    torch.manual_seed(22)
    seen = _spy_decode(monkeypatch)
    spec = AttentionSpec(4, 2, 16)
    q, k, v = _seer_inputs(22, s=50)
    cases = [build_pattern("block_mask", spec, block_size=16, layout_fn=lambda q_, k_: None),
             build_pattern("s2", spec, block_size=16, local_blocks=1, vert_stride=2, layout_heads="q")]
    for p in cases:
        with torch.no_grad():
            got = pattern_attention(p, q[:, :, -1:], k, v)
        torch.testing.assert_close(got, sparse_attention(q[:, :, -1:], k, v, p(q[:, :, -1:], k)), atol=0, rtol=0)
    qg = q[:, :, -1:].clone().requires_grad_()
    out = pattern_attention(build_pattern("dense", spec), qg, k, v)
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    with torch.no_grad():
        pattern_attention(None, q[:, :, -17:], k, v)
    assert seen == []
    s2 = build_pattern("s2", spec, block_size=16, local_blocks=1, vert_stride=2)
    assert s2.kv_blocks(q[:, :, -1:], k) is s2.s2_config
    assert build_pattern("s2", spec, block_size=16, decode="dense").kv_blocks(q[:, :, -1:], k) is None


def test_s2_chunks_across_a_block_boundary_equal_the_full_forward():
    """sparse_decode applies S2's rule row by row, so a cached chunk that straddles a block
    boundary gets exactly its rows of the full forward (the layout path reads a chunk's first
    query block for all of its rows)."""
    torch.manual_seed(23)
    attn = SparseAttention(48, 6, 2, pattern="s2", pattern_options=dict(block_size=16, local_blocks=1,
                                                                          vert_stride=3))
    x = torch.randn(2, 90, 48)
    with torch.no_grad():
        full = attn(x)
        cache, outs, t = KVCache(), [], 0
        for n in (30, 5, 1, 11, 16, 27):  # 30 -> 35 (across 32) -> 36 -> 47 -> 63 (across 48) -> 90 (prefill path)
            outs.append(attn(x[:, t : t + n], cache=cache))
            t += n
    torch.testing.assert_close(torch.cat(outs[:5], 1), full[:, :63], atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# Seer selection: the authors' rules as options, the density default, the decode's own block
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [
    dict(threshold=0.05, strict=True, keep_first=0, keep_last=0, dense_last_rows=2),   # the authors' threshold rule
    dict(nz_ratio=0.3, keep_first=0, keep_last=0, dense_last_rows=2),                  # the authors' nz_ratio rule
    dict(topk=2, share_gqa=True),
    dict(),                                                                              # the default: density 0.2
], ids=["threshold_strict", "nz_ratio", "topk_shared", "default"])
def test_seer_selection_options_reach_select_blocks(opts):
    from sparse_attn.patterns import select_blocks

    torch.manual_seed(13)
    p = SeerPattern(4, 2, 16, block_size=16, gate=dict(hidden_size=32), **opts)
    q, k, _ = _seer_inputs(13, s=150)
    want_opts = dict(opts) if opts else dict(density=0.2)
    assert {k: v for k, v in p.get_config().items() if k in want_opts} == want_opts
    got = p(q, k, q_pre=q, k_pre=k).to_block_mask()
    want = select_blocks(p.gate(q, k), block_size=16, seq_q=150, seq_k=150, num_kv_heads=2, **want_opts)
    assert torch.equal(got, want.to_block_mask())
    # the pattern rebuilds from its config with the same rule
    again = SeerPattern(4, 2, 16, **{k: v for k, v in p.get_config().items() if k not in ("decode", "backend")})
    assert again.select == p.select


def test_seer_default_density_is_sparse_and_threshold_2e3_was_not():
    """The default (density 0.2) computes about a fifth of the causal blocks; the old default,
    threshold 2e-3, kept nearly all of them for an untrained gate."""
    torch.manual_seed(14)
    p = SeerPattern(4, 2, 16, block_size=16, gate=dict(hidden_size=32))
    assert p.select["density"] == 0.2 and p.select["threshold"] is None
    q, k, _ = _seer_inputs(14, s=640)
    causal = 40 * 41 / 2
    kept = p(q, k, q_pre=q, k_pre=k).to_block_mask().sum((-1, -2)).float() / causal
    assert (kept - 0.2).abs().max() < 0.03, kept
    old = SeerPattern(4, 2, 16, block_size=16, gate=dict(hidden_size=32), threshold=2e-3)
    old.gate.load_state_dict(p.gate.state_dict())
    kept_old = old(q, k, q_pre=q, k_pre=k).to_block_mask().sum((-1, -2)).float() / causal
    assert kept_old.min() > 0.7, kept_old


def test_seer_selection_option_errors_name_the_option():
    with pytest.raises(ValueError, match="at most one of"):
        SeerPattern(4, 2, 16, threshold=0.1, nz_ratio=0.5)
    with pytest.raises(ValueError, match="nz_ratio must be a number"):
        SeerPattern(4, 2, 16, nz_ratio=1.5)
    with pytest.raises(TypeError, match="strict must be a bool"):
        SeerPattern(4, 2, 16, strict=1)
    with pytest.raises(ValueError, match="dense_last_rows must be a non-negative int"):
        SeerPattern(4, 2, 16, dense_last_rows=-1)
    with pytest.raises(ValueError, match="prefill_gate=False needs a decode gate"):
        SeerPattern(4, 2, 16, prefill_gate=False)


@pytest.mark.parametrize("own_block", ["pooled", "excluded"])
def test_seer_decode_always_computes_the_tokens_own_block(own_block):
    """Even a rule that keeps nothing (top-0, nothing forced) keeps the token's own key block at
    decode, as the authors' decode does; the rest follows the rule."""
    torch.manual_seed(15)
    p = SeerPattern(4, 2, 16, block_size=16, topk=0, keep_first=0, keep_last=0, gate=dict(hidden_size=32),
                    decode_gate=dict(hidden_size=32, own_block=own_block))
    q, k, _ = _seer_inputs(15, s=70)
    p(q, k, q_pre=q, k_pre=k)  # prefill feeds the decode cache
    q1, k1, _ = _seer_inputs(16, s=1)
    kk = torch.cat((k, k1), 2)
    got = p(q1, kk, q_pre=q1, k_pre=k1).to_block_mask()
    assert got.shape == (2, 2, 1, 5) and got[..., -1].all() and not got[..., :-1].any()
    p2 = SeerPattern(4, 2, 16, block_size=16, topk=2, keep_first=0, keep_last=0, gate=dict(hidden_size=32),
                     decode_gate=dict(hidden_size=32, own_block=own_block))
    p2.load_state_dict(p.state_dict())
    p2(q, k, q_pre=q, k_pre=k)
    got2 = p2(q1, kk, q_pre=q1, k_pre=k1).to_block_mask()
    scores = p2.decode_gate(torch.cat((q, q1), 2), kk)[:, :, -1:]
    if own_block == "excluded":  # never scored: the two best are other blocks
        assert torch.isneginf(scores[..., -1]).all()
    top = scores.topk(2, dim=-1).indices  # "pooled": the own block competes (and is then forced anyway)
    want = torch.zeros_like(got2).scatter_(-1, top, True)
    want[..., -1] = True
    assert torch.equal(got2, want)


def test_seer_decode_only_gates_run_a_dense_prefill():
    from sparse_attn.patterns import SeerDecodeGate

    spec = AttentionSpec(4, 2, 16, layer_idx=0)
    dec = SeerDecodeGate(4, 2, 16, block_size=16, hidden_size=16, own_block="excluded", bias=False)
    p = build_pattern("seer", spec, gates=nn.ModuleDict({"0": nn.ModuleDict({"decode": dec})}), topk=1)
    assert p.gate is None and p.get_config()["prefill_gate"] is False
    assert all(torch.equal(a, b) for a, b in zip(p.decode_gate.state_dict().values(), dec.state_dict().values()))
    q, k, v = _seer_inputs(17, s=40)
    assert p(q, k, q_pre=q, k_pre=k) is None  # dense prefill
    q1, k1, _ = _seer_inputs(18, s=1)
    lay = p(q1, torch.cat((k, k1), 2), q_pre=q1, k_pre=k1)
    assert lay is not None and lay.to_block_mask()[..., -1].all()
    p.distill = True
    pattern_attention(p, q, k, v, q_pre=q, k_pre=k)
    assert p.last_loss is None and torch.isfinite(p.last_decode_loss)
    again = SeerPattern(4, 2, 16, **{k: v for k, v in p.get_config().items() if k not in ("decode", "backend")})
    assert again.gate is None and again.decode_gate.own_block == "excluded"
