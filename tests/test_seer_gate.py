"""SeerAttention gates: SeerGate (prefill), SeerDecodeGate (+ its compressed-K cache),
distillation_loss, and safetensors save/load.

Every check compares against an independent computation written here with explicit loops
(pooling, RoPE, per-head projections, the element-level causal mask, KL by hand), at odd
sizes, with GQA, Sq != Sk and partial blocks.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import element_mask
from torch import nn

from sparse_attn.patterns.seer import (
    SeerDecodeGate,
    SeerGate,
    _pool_blocks,
    distillation_loss,
    load_gates,
    save_gates,
)
from sparse_attn.patterns.seer_decode import SeerDecodeCache, _prefix_pool

INF = float("inf")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _randomise_biases(gate):
    # Default init already gives non-zero biases; make them clearly non-zero so a dropped bias shows
    # (the norm weights too: their init is ones).
    with torch.no_grad():
        for i, name in enumerate(("q_bias", "k_bias", "q_norm_weight", "k_norm_weight")):
            t = getattr(gate, name, None)
            if t is not None:
                t.normal_(generator=_gen(99 - i))


# --------------------------------------------------------------------------------------------------
# Independent naive implementations (loops, float64)
# --------------------------------------------------------------------------------------------------
def naive_pool(x, b, modes):
    """[B, H, S, D] -> [B, H, M, D*len(modes)], one block at a time, real tokens only."""
    B, H, S, D = x.shape
    out = []
    for start in range(0, S, b):
        blk = x[:, :, start : min(start + b, S)].double()
        f = []
        for m in modes:
            if m == "avg":
                f.append(blk.sum(2) / blk.shape[2])
            elif m == "max":
                f.append(blk.max(2).values)
            else:
                f.append(blk.min(2).values)
        out.append(torch.cat(f, -1))
    return torch.stack(out, 2)


def naive_rope(x, pos, theta):
    """x [..., N, h] float64, pos [N] float (block units): rotate pairs (i, i + h/2) by pos * theta^(-2i/h)."""
    h = x.shape[-1]
    y = x.clone()
    for i in range(h // 2):
        ang = pos.double() * theta ** (-2.0 * i / h)
        c, s = torch.cos(ang), torch.sin(ang)
        y[..., i] = x[..., i] * c - x[..., i + h // 2] * s
        y[..., i + h // 2] = x[..., i + h // 2] * c + x[..., i] * s
    return y


def naive_block_causal(Sq, Sk, b):
    """bool [Mq, Mk]: block (r, c) allowed iff some query of r may see some key of c (element mask)."""
    em = element_mask(None, b, b, Sq, Sk, 1, causal=True)[0, 0]
    Mq, Mk = -(-Sq // b), -(-Sk // b)
    out = torch.zeros(Mq, Mk, dtype=torch.bool)
    for r in range(Mq):
        for c in range(Mk):
            out[r, c] = em[r * b : (r + 1) * b, c * b : (c + 1) * b].any()
    return out


def _naive_linear(x, weight, bias):
    y = x if weight is None else x @ weight.double()
    return y if bias is None else y + bias.double()


def _naive_rms(x, weight):
    return weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)


def naive_seer_gate(gate, q, k, qpos=None):
    """The SeerGate logits by loops, in float64; qpos [Sq] absolute query positions (one batch row)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, b = k.shape[1], k.shape[2], gate.block_size
    group = Hq // Hkv
    unit = 1 if gate.rope_positions == "token" else b  # RoPE position = block start / unit
    qpos = torch.arange(Sk - Sq, Sk) if qpos is None else qpos
    Mq, Mk = -(-Sq // b), -(-Sk // b)
    qb_pos = torch.tensor([qpos[r * b].item() / unit for r in range(Mq)], dtype=torch.float64)
    key0 = qpos[-1].item() - (Sk - 1)
    kb_pos = torch.tensor([(key0 + c * b) / unit for c in range(Mk)], dtype=torch.float64)
    pq, pk = naive_pool(q, b, gate.q_pooling), naive_pool(k, b, gate.k_pooling)
    allowed = naive_block_causal(Sq, Sk, b)
    out = torch.empty(B, Hq, Mq, Mk, dtype=torch.float64)
    for h in range(Hq):
        hk = h // group
        kw = h if gate.k_heads == "q" else hk  # whose K projection
        qh = _naive_linear(pq[:, h], None if gate.q_weight is None else gate.q_weight[h],
                           None if gate.q_bias is None else gate.q_bias[h])
        kh = _naive_linear(pk[:, hk], gate.k_weight[kw], None if gate.k_bias is None else gate.k_bias[kw])
        if gate.use_rope:
            qh, kh = naive_rope(qh, qb_pos, gate.rope_theta), naive_rope(kh, kb_pos, gate.rope_theta)
        out[:, h] = (qh @ kh.transpose(-1, -2)) / math.sqrt(gate.hidden_size)
    return out.masked_fill(~allowed, -INF)


def naive_decode_gate(gate, q, k):
    """SeerDecodeGate logits by loops (default positions), float64: per token; own block pooled up to
    it (own_block="pooled") or not scored ("excluded"); every query form, q/k norm, RoPE unit."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, b = k.shape[1], k.shape[2], gate.block_size
    group = Hq // Hkv
    unit = 1 if gate.rope_positions == "token" else b
    Mk = -(-Sk // b)
    out = torch.full((B, Hkv, Sq, Mk), -INF, dtype=torch.float64)
    for t in range(Sq):
        p = t + Sk - Sq
        if p < 0:
            continue
        for g in range(Hkv):
            heads = [q[:, g * group + j, t].double() for j in range(group)]  # each [B, D]
            qb = None if gate.q_bias is None else gate.q_bias[g]
            if gate.query == "proj":
                qh = _naive_linear(torch.cat(heads, -1), gate.q_weight[g], qb)
            elif gate.query == "avg_proj":
                qh = _naive_linear(sum(heads) / group, gate.q_weight[g], qb)
            elif gate.query == "avg":
                qh = sum(heads) / group
            if gate.query == "orig":  # each head (normalised), scores averaged over the group
                qs = [_naive_rms(x, gate.q_norm_weight) if gate.qk_norm else x for x in heads]
            else:
                qs = [_naive_rms(qh, gate.q_norm_weight) if gate.qk_norm else qh]
            if gate.use_rope:
                qs = [naive_rope(x[:, None], torch.tensor([p / unit]), gate.rope_theta)[:, 0] for x in qs]
            last = p // b + 1 if gate.own_block == "pooled" else p // b
            for c in range(last):
                keys = k[:, g : g + 1, c * b : min(c * b + b, p + 1)]
                kh = _naive_linear(naive_pool(keys, b, gate.k_pooling)[:, 0, 0], gate.k_weight[g],
                                   None if gate.k_bias is None else gate.k_bias[g])
                if gate.qk_norm:
                    kh = _naive_rms(kh, gate.k_norm_weight)
                if gate.use_rope:
                    kh = naive_rope(kh[:, None], torch.tensor([c * b / unit]), gate.rope_theta)[:, 0]
                out[:, g, t, c] = sum((x * kh).sum(-1) for x in qs) / len(qs) / math.sqrt(gate.hidden_size)
    return out


def naive_target(q, k, b, pool_queries=True):
    """Row-normalised block max-pooled causal softmax map, from the dense probabilities."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kx = k.double().repeat_interleave(Hq // Hkv, 1)
    s = (q.double() @ kx.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~element_mask(None, b, b, Sq, Sk, 1, causal=True), -INF)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    Mq, Mk = -(-Sq // b), -(-Sk // b)
    rows = Mq if pool_queries else Sq
    m = torch.zeros(B, Hq, rows, Mk, dtype=torch.float64)
    for r in range(rows):
        rs = slice(r * b, (r + 1) * b) if pool_queries else slice(r, r + 1)
        for c in range(Mk):
            m[:, :, r, c] = p[:, :, rs, c * b : (c + 1) * b].amax((-1, -2))
    if not pool_queries:
        m = m.view(B, Hkv, Hq // Hkv, rows, Mk).amax(2)
    total = m.sum(-1, keepdim=True)
    return torch.where(total > 0, m / total.clamp(min=1e-300), 0.0).float()


# --------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S,b", [(13, 4), (16, 4), (1, 8), (21, 8)])
def test_pool_blocks_matches_loop_on_partial_blocks(S, b):
    x = _randn(2, 3, S, 5, seed=S)
    modes = ("max", "min", "avg")
    got = _pool_blocks(x, b, modes)
    assert got.dtype == torch.float32 and got.shape == (2, 3, -(-S // b), 15)
    torch.testing.assert_close(got.double(), naive_pool(x, b, modes), atol=1e-6, rtol=1e-6)


def test_pool_blocks_bf16_and_noncontiguous():
    x = _randn(1, 7, 2, 6, seed=3).transpose(1, 2)  # [1, 2, 7, 6] non-contiguous
    got = _pool_blocks(x.to(torch.bfloat16), 4, ("avg", "max"))
    torch.testing.assert_close(got.double(), naive_pool(x.to(torch.bfloat16), 4, ("avg", "max")), atol=1e-6, rtol=1e-6)


def test_prefix_pool_matches_loop():
    b, Sk = 4, 14
    k = _randn(2, 2, Sk, 3, seed=5)
    idx = torch.arange(Sk - 7, Sk)
    got = _prefix_pool(k, b, ("avg", "max", "min"), 7)
    for n, p in enumerate(idx.tolist()):
        want = naive_pool(k[:, :, (p // b) * b : p + 1], b, ("avg", "max", "min"))[:, :, 0]
        torch.testing.assert_close(got[:, :, n].double(), want, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# SeerGate
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,Hq,Hkv,Sq,Sk,b",
    [(2, 4, 2, 13, 13, 4), (1, 6, 3, 9, 22, 4), (1, 2, 1, 20, 12, 8), (1, 3, 3, 1, 17, 4), (2, 4, 1, 32, 32, 8)],
    ids=["square_partial", "sq_lt_sk", "sq_gt_sk", "decode_row", "whole_blocks"],
)
def test_seer_gate_matches_naive_and_mask(B, Hq, Hkv, Sq, Sk, b):
    gate = SeerGate(Hq, Hkv, 8, block_size=b, hidden_size=6, q_pooling=("avg", "max"), k_pooling=("max", "min", "avg"))
    _randomise_biases(gate)
    q, k = _randn(B, Hq, Sq, 8, seed=1), _randn(B, Hkv, Sk, 8, seed=2)
    logits = gate(q, k)
    assert logits.shape == (B, Hq, -(-Sq // b), -(-Sk // b)) and logits.dtype == torch.float32
    allowed = naive_block_causal(Sq, Sk, b)
    # exact -inf pattern, against the block-any of the element-level causal mask
    assert torch.equal(torch.isneginf(logits), (~allowed).expand_as(logits))
    assert torch.isfinite(logits[..., allowed]).all()
    assert torch.equal(gate.block_mask(Sq, Sk), allowed)
    want = naive_seer_gate(gate, q, k)
    torch.testing.assert_close(logits.double(), want, atol=1e-5, rtol=1e-5)


def test_seer_gate_without_rope_and_bf16_inputs():
    gate = SeerGate(4, 2, 8, block_size=4, hidden_size=8, use_rope=False)
    q, k = _randn(1, 4, 10, 8, seed=4), _randn(1, 2, 10, 8, seed=5)
    torch.testing.assert_close(gate(q, k).double(), naive_seer_gate(gate, q, k), atol=1e-5, rtol=1e-5)
    out16 = gate(q.bfloat16(), k.bfloat16())
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16.double(), naive_seer_gate(gate, q.bfloat16(), k.bfloat16()), atol=1e-4, rtol=1e-4)


def test_seer_gate_gqa_broadcast_equals_single_head_gates():
    """A gate with Hkv=1 gives, for each query head, what a one-head gate with that head's weights gives."""
    Hq, D, b = 3, 8, 4
    big = SeerGate(Hq, 1, D, block_size=b, hidden_size=8)
    _randomise_biases(big)
    q, k = _randn(2, Hq, 11, D, seed=6), _randn(2, 1, 15, D, seed=7)
    logits = big(q, k)
    for h in range(Hq):
        one = SeerGate(1, 1, D, block_size=b, hidden_size=8)
        with torch.no_grad():
            one.q_weight.copy_(big.q_weight[h : h + 1])
            one.q_bias.copy_(big.q_bias[h : h + 1])
            one.k_weight.copy_(big.k_weight)
            one.k_bias.copy_(big.k_bias)
        torch.testing.assert_close(logits[:, h : h + 1], one(q[:, h : h + 1], k), atol=1e-6, rtol=1e-6)
    # the heads really differ (the broadcast did not collapse them)
    assert not torch.allclose(logits[:, 0], logits[:, 1])


def test_seer_gate_position_ids():
    gate = SeerGate(2, 1, 8, block_size=4, hidden_size=8, rope_theta=100.0)
    q, k = _randn(2, 2, 9, 8, seed=8), _randn(2, 1, 14, 8, seed=9)
    default = gate(q, k)
    # explicit default positions, as [Sq] and [B, Sq]
    pos = torch.arange(5, 14)
    torch.testing.assert_close(gate(q, k, pos), default)
    torch.testing.assert_close(gate(q, k, pos.expand(2, -1)), default)
    # a uniform shift of every position leaves the (relative) logits unchanged, the mask too
    torch.testing.assert_close(gate(q, k, pos + 37), default, atol=1e-4, rtol=1e-4)
    # non-default positions per batch row: each row against the loop implementation
    odd = torch.stack([torch.arange(9) * 2 + 3, torch.arange(9) + 100])
    got = gate(q, k, odd)
    assert not torch.allclose(got, default)
    for i in range(2):
        want = naive_seer_gate(gate, q[i : i + 1], k[i : i + 1], odd[i])
        torch.testing.assert_close(got[i : i + 1].double(), want, atol=1e-5, rtol=1e-5)


def test_seer_gate_gradients_reach_every_parameter():
    gate = SeerGate(4, 2, 8, block_size=4, hidden_size=8, q_pooling=("avg", "min"))
    q = _randn(2, 4, 13, 8, seed=10).requires_grad_()
    k = _randn(2, 2, 13, 8, seed=11).requires_grad_()
    logits = gate(q, k)
    target = naive_target(q.detach(), k.detach(), 4)
    distillation_loss(logits, target).backward()
    for name, p in list(gate.named_parameters()) + [("q", q), ("k", k)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


GATE_OPTIONS = [
    dict(bias=False),
    dict(q_proj=False, hidden_size=16, q_pooling=("avg", "max"), k_heads="q"),
    dict(k_heads="q", rope_positions="token"),
    dict(rope_positions="token", bias=False, q_proj=False, hidden_size=8),
]


@pytest.mark.parametrize("opts", GATE_OPTIONS, ids=["no_bias", "no_q_proj_k_per_q_head", "k_per_q_head_token",
                                                    "authors_form"])
def test_seer_gate_options_match_naive(opts):
    """The options that reproduce the authors' gate (no bias, no q projection, K projected per query
    head, RoPE at token positions) against the loop implementation, with GQA and partial blocks;
    position shifts still leave the logits unchanged (RoPE stays relative)."""
    kw = dict(block_size=4, hidden_size=6, rope_theta=300.0)
    kw.update(opts)
    gate = SeerGate(6, 2, 8, **kw)
    _randomise_biases(gate)
    q, k = _randn(2, 6, 13, 8, seed=40), _randn(2, 2, 18, 8, seed=41)
    got = gate(q, k)
    torch.testing.assert_close(got.double(), naive_seer_gate(gate, q, k), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gate(q, k, torch.arange(5, 18) + 64), got, atol=2e-4, rtol=2e-4)
    names = dict(gate.named_parameters())
    assert ("q_bias" in names) == (gate.bias and gate.q_proj) and ("k_bias" in names) == gate.bias
    assert names["k_weight"].shape[0] == (6 if gate.k_heads == "q" else 2)
    assert type(gate)(**gate.get_config()).get_config() == gate.get_config()


def test_seer_gate_option_errors_name_the_option():
    with pytest.raises(ValueError, match="q_proj=False"):
        SeerGate(4, 2, 8, q_proj=False, hidden_size=6)
    with pytest.raises(TypeError, match="q_proj must be a bool"):
        SeerGate(4, 2, 8, q_proj=0)
    with pytest.raises(ValueError, match="k_heads must be one of"):
        SeerGate(4, 2, 8, k_heads="query")
    with pytest.raises(TypeError, match="bias must be a bool"):
        SeerGate(4, 2, 8, bias="no")
    with pytest.raises(ValueError, match="rope_positions must be one of"):
        SeerGate(4, 2, 8, rope_positions="tokens")
    with pytest.raises(ValueError, match="rope_scaling"):
        SeerGate(4, 2, 8, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_scaling\['factor'\]"):
        SeerGate(4, 2, 8, rope_scaling={"rope_type": "linear", "factor": -1})
    with pytest.raises(ValueError, match="query must be one of"):
        SeerDecodeGate(4, 2, 8, query="mean")
    with pytest.raises(ValueError, match="hidden_size must equal head_dim"):
        SeerDecodeGate(4, 2, 8, query="avg", hidden_size=6)
    with pytest.raises(ValueError, match="own_block must be one of"):
        SeerDecodeGate(4, 2, 8, own_block="none")
    with pytest.raises(TypeError, match="qk_norm must be a bool"):
        SeerDecodeGate(4, 2, 8, qk_norm="yes")


def test_linear_rope_scaling_is_positions_divided_by_the_factor():
    gate = SeerGate(2, 1, 8, block_size=4, hidden_size=8, rope_positions="token",
                    rope_scaling={"rope_type": "linear", "factor": 4.0})
    plain = SeerGate(2, 1, 8, block_size=4, hidden_size=8, rope_positions="block")
    plain.load_state_dict(gate.state_dict())
    q, k = _randn(1, 2, 16, 8, seed=42), _randn(1, 1, 16, 8, seed=43)
    torch.testing.assert_close(gate(q, k), plain(q, k), atol=1e-5, rtol=1e-5)  # pos / 4 == block index


# --------------------------------------------------------------------------------------------------
# SeerDecodeGate
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "Hq,Hkv,Sq,Sk,b", [(4, 2, 11, 11, 4), (6, 2, 5, 18, 4), (2, 2, 9, 6, 4), (3, 1, 1, 13, 8)],
    ids=["square", "sq_lt_sk", "sq_gt_sk", "one_token"],
)
def test_decode_gate_matches_naive(Hq, Hkv, Sq, Sk, b):
    gate = SeerDecodeGate(Hq, Hkv, 4, block_size=b, hidden_size=6, rope_theta=50.0)
    _randomise_biases(gate)
    q, k = _randn(2, Hq, Sq, 4, seed=12), _randn(2, Hkv, Sk, 4, seed=13)
    logits = gate(q, k)
    assert logits.shape == (2, Hkv, Sq, -(-Sk // b)) and logits.dtype == torch.float32
    want = naive_decode_gate(gate, q, k)
    # exact mask: token at key index p sees key block c iff c*b <= p
    p = torch.arange(Sq) + Sk - Sq
    allowed = (torch.arange(-(-Sk // b)) * b)[None, :] <= p[:, None]
    assert torch.equal(torch.isneginf(logits), (~allowed).expand_as(logits))
    torch.testing.assert_close(logits.double(), want, atol=1e-5, rtol=1e-5)


DECODE_OPTIONS = [
    dict(own_block="excluded"),
    dict(query="avg_proj", bias=False, qk_norm=True),
    dict(query="avg", hidden_size=4, rope_positions="token", own_block="excluded"),
    dict(query="orig", hidden_size=4, qk_norm=True, bias=False),
    dict(query="proj", bias=False, qk_norm=True, rope_positions="token", own_block="excluded"),  # SeerAttention-R
]


@pytest.mark.parametrize("opts", DECODE_OPTIONS, ids=["excluded", "avg_proj_norm", "avg_token", "orig_norm",
                                                      "authors_form"])
@pytest.mark.parametrize("Sq,Sk", [(11, 11), (5, 18), (9, 6)], ids=["square", "sq_lt_sk", "sq_gt_sk"])
def test_decode_gate_options_match_naive(opts, Sq, Sk):
    kw = dict(block_size=4, hidden_size=6, rope_theta=50.0)
    kw.update(opts)
    gate = SeerDecodeGate(6, 2, 4, **kw)
    _randomise_biases(gate)
    q, k = _randn(2, 6, Sq, 4, seed=44), _randn(2, 2, Sk, 4, seed=45)
    logits = gate(q, k)
    want = naive_decode_gate(gate, q, k)
    assert torch.equal(torch.isneginf(logits), torch.isneginf(want))
    torch.testing.assert_close(logits.double(), want, atol=2e-5, rtol=2e-5)
    assert type(gate)(**gate.get_config()).get_config() == gate.get_config()


def test_decode_cache_equals_full_recompute():
    """Prefill of odd length, then many single-token steps across block boundaries: every step's
    logits equal forward on the whole prefix (and the matching row of one forward on everything)."""
    Hq, Hkv, D, b = 4, 2, 8, 4
    gate = SeerDecodeGate(Hq, Hkv, D, block_size=b, hidden_size=8)
    _randomise_biases(gate)
    prompt, steps = 11, 14
    total = prompt + steps
    q, k = _randn(2, Hq, total, D, seed=14), _randn(2, Hkv, total, D, seed=15)
    everything = gate(q, k)
    cache = gate.new_cache()
    with torch.no_grad():
        for L in [prompt] + list(range(prompt + 1, total + 1)):
            k_new = k[:, :, :L] if L == prompt else k[:, :, L - 1 : L]
            got = gate.step(q[:, :, L - 1 : L], k_new, cache)
            assert got.shape == (2, Hkv, 1, -(-L // b))
            assert cache.length == L and cache.num_blocks == L // b
            assert (cache.partial is None) == (L % b == 0)
            torch.testing.assert_close(got, gate(q[:, :, L - 1 : L], k[:, :, :L]), atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(got[:, :, 0], everything[:, :, L - 1, : -(-L // b)], atol=1e-6, rtol=1e-5)


def test_decode_cache_positions_and_errors():
    gate = SeerDecodeGate(2, 1, 4, block_size=4, hidden_size=4)
    q, k = _randn(1, 2, 10, 4, seed=16), _randn(1, 1, 10, 4, seed=17)
    # keys at absolute positions 50..59: same as forward with those query positions
    cache = gate.new_cache()
    gate.extend_cache(k[:, :, :6], cache, position=55)
    assert cache.offset == 50 and cache.length == 6
    got = gate.step(q[:, :, 6:7], k[:, :, 6:7], cache, position=56)
    want = gate(q[:, :, 6:7], k[:, :, :7], position_ids=torch.tensor([56]))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="position"):
        gate.step(q[:, :, 7:8], k[:, :, 7:8], cache, position=99)
    with pytest.raises(ValueError, match="batch"):
        gate.step(q[:, :, 7:8].expand(2, -1, -1, -1), k[:, :, 7:8].expand(2, -1, -1, -1), cache)
    with pytest.raises(TypeError, match="cache"):
        gate.step(q[:, :, :1], k[:, :, :1], {})
    with pytest.raises(ValueError, match="empty"):
        gate.step(q[:, :, :1], k[:, :, :0], SeerDecodeCache())
    with pytest.raises(ValueError, match="q_tok"):
        gate.step(q[:, :, :2], k[:, :, :1], gate.new_cache())


@pytest.mark.parametrize("rule", [
    dict(topk=3, keep_first=0, keep_last=0),
    dict(density=0.4),
    dict(threshold=0.1, strict=True, keep_first=0, keep_last=0),
    dict(nz_ratio=0.5, keep_first=1, keep_last=0),
    dict(topk=1, share_gqa=True),
], ids=["topk", "density", "threshold", "nz_ratio", "share_gqa"])
def test_decode_gate_select_gives_the_rules_blocks_as_lists(rule):
    """select(): per sequence and KV head, the count and the ascending ids of the blocks the rule
    keeps (== select_blocks' mask row; top-k also against torch.topk), int32 [B, Hkv] / [B, Hkv, Mk]."""
    from sparse_attn.layout import rows_to_mask
    from sparse_attn.patterns import select_blocks

    gate = SeerDecodeGate(4, 2, 8, block_size=16, hidden_size=8, own_block="excluded")
    logits = _randn(3, 2, 1, 9, seed=31)
    logits[..., -1] = -INF  # the own block, never scored in this form
    logits[1, 0, 0, 2] = -INF  # a block the gate forbids
    kv_num, kv_idx = gate.select(logits, seq_k=9 * 16 - 5, **rule)
    assert kv_num.shape == (3, 2) and kv_idx.shape == (3, 2, 9)
    assert kv_num.dtype == kv_idx.dtype == torch.int32
    got = rows_to_mask(kv_num[..., None], kv_idx[..., None, :], 9)  # [B, Hkv, 1, Mk]
    want = select_blocks(logits, block_size=16, seq_q=1, seq_k=9 * 16 - 5, num_kv_heads=2, **rule).to_block_mask()
    assert torch.equal(got, want)
    for bb in range(3):
        for h in range(2):
            ids = kv_idx[bb, h, : int(kv_num[bb, h])].tolist()
            assert ids == sorted(set(ids))  # strictly ascending
            assert not got[bb, h, 0, -1] and not (bb == 1 and h == 0 and got[bb, h, 0, 2])
    if "topk" in rule and not rule.get("share_gqa"):
        top = torch.zeros_like(got).scatter_(-1, logits.topk(3, dim=-1).indices, True)
        assert torch.equal(got, top)
    with pytest.raises(ValueError, match="a step's scores"):
        gate.select(logits.expand(3, 2, 2, 9), topk=1)  # two query rows: not a decode step


def test_decode_gate_attend_is_attention_over_the_selected_blocks():
    """attend(): step + select + sparse_decode == fp64 attention under the element mask of the
    selected blocks plus the token's own block, the selection recomputed here from forward() on the
    whole prefix with torch.topk. The KV cache is longer than the sequence, its tail NaN."""
    from helpers import naive_attention

    Hq, Hkv, D, b = 4, 2, 16, 16
    gate = SeerDecodeGate(Hq, Hkv, D, block_size=b, hidden_size=8)
    _randomise_biases(gate)
    prompt, total, cap = 75, 83, 100
    q_pre, k_pre = _randn(2, Hq, total, D, seed=32), _randn(2, Hkv, total, D, seed=33)
    q = _randn(2, Hq, total, D, seed=34)  # "post-RoPE" q/k/v: any tensors
    k_all, v_all = _randn(2, Hkv, total, D, seed=35), _randn(2, Hkv, total, D, seed=36)
    k_cache = torch.full((2, Hkv, cap, D), float("nan"))
    v_cache = torch.full((2, Hkv, cap, D), float("nan"))
    cache = gate.new_cache()
    with torch.no_grad():
        gate.extend_cache(k_pre[:, :, : prompt - 1], cache)
        for L in range(prompt, total + 1):  # crosses the block boundary at 80
            k_cache[:, :, L - 1], v_cache[:, :, L - 1] = k_all[:, :, L - 1], v_all[:, :, L - 1]
            if L == prompt:
                k_cache[:, :, :L], v_cache[:, :, :L] = k_all[:, :, :L], v_all[:, :, :L]
            out, lse = gate.attend(q[:, :, L - 1 : L], k_cache, v_cache, q_pre[:, :, L - 1 : L],
                                   k_pre[:, :, L - 1 : L], cache, topk=2, keep_first=0, keep_last=0,
                                   return_lse=True)
            row = gate(q_pre[:, :, L - 1 : L], k_pre[:, :, :L])[:, :, 0]  # [B, Hkv, Mk]
            keep = torch.zeros_like(row, dtype=torch.bool).scatter_(-1, row.topk(2, dim=-1).indices, True)
            keep[..., (L - 1) // b] = True
            elem = keep.repeat_interleave(b, -1)[..., :L].repeat_interleave(Hq // Hkv, 1)[:, :, None]
            want, want_lse = naive_attention(q[:, :, L - 1 : L].double(), k_all[:, :, :L].double(),
                                             v_all[:, :, :L].double(), elem, return_lse=True)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{m}\nL={L}")
            torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5, msg=lambda m: f"{m}\nL={L}")
            assert keep.sum(-1).le(3).all() and not keep.all()  # really sparse


def test_decode_gate_gradients_reach_every_parameter():
    gate = SeerDecodeGate(4, 2, 8, block_size=4, hidden_size=8)
    q = _randn(1, 4, 10, 8, seed=18).requires_grad_()
    k = _randn(1, 2, 10, 8, seed=19).requires_grad_()
    target = naive_target(q.detach(), k.detach(), 4, pool_queries=False)
    distillation_loss(gate(q, k), target).backward()
    for name, p in list(gate.named_parameters()) + [("q", q), ("k", k)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------
# distillation_loss
# --------------------------------------------------------------------------------------------------
def test_distillation_loss_by_hand_zero_rows_and_inf():
    logits = torch.tensor(
        [[0.3, -1.0, -INF, 2.0], [-INF, -INF, -INF, -INF], [1.0, 0.0, 0.5, -INF], [0.0, 0.0, 0.0, 0.0]],
        requires_grad=True,
    )
    target = torch.tensor([[0.5, 0.2, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss = distillation_loss(logits, target)
    want, rows = 0.0, 0
    for r in range(4):
        if target[r].sum() == 0:
            continue
        rows += 1
        finite = torch.isfinite(logits[r])
        lse = math.log(sum(math.exp(v) for v in logits[r][finite].tolist()))
        for c in range(4):
            t = target[r, c].item()
            if t > 0:
                want += t * (math.log(t) - (logits[r, c].item() - lse))
    assert rows == 2
    assert abs(loss.item() - want / rows) < 1e-6
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[1], torch.zeros(4)) and torch.equal(logits.grad[3], torch.zeros(4))
    # gradient of the mean KL w.r.t. a valid row: (softmax - target) / rows
    sm = torch.softmax(logits.detach()[0], -1)
    torch.testing.assert_close(logits.grad[0], (sm - target[0]) / rows)


def test_distillation_loss_edge_cases():
    z = torch.full((2, 3), -INF, requires_grad=True)
    loss = distillation_loss(z, torch.zeros(2, 3))  # nothing has mass: 0, no NaN
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros(2, 3))
    x = torch.randn(3, 5)
    assert distillation_loss(x, torch.softmax(x, -1)).abs().item() < 1e-6  # KL(p || p) = 0
    assert distillation_loss(torch.tensor([[-INF, 0.0]]), torch.tensor([[0.5, 0.5]])).item() == INF
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="target"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# A tiny optimisation
# --------------------------------------------------------------------------------------------------
def _block_map(q, k, b, pool_queries):
    try:
        from sparse_attn.patterns import attention_block_map
    except (ImportError, AttributeError):
        return naive_target(q, k, b, pool_queries)
    if pool_queries:
        return attention_block_map(q, k, block_size=b)
    return attention_block_map(q, k, block_size=b, pool_queries=False, reduce_gqa="max")


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_training_reduces_the_loss(decode):
    torch.manual_seed(0)
    Hq, Hkv, D, b, S = 4, 2, 16, 16, 77
    # q and k with some structure: shared directions, so the attention map is not flat
    base = _randn(1, 1, S, D, seed=20)
    q = base * 2 + 0.5 * _randn(1, Hq, S, D, seed=21)
    k = base * 2 + 0.5 * _randn(1, Hkv, S, D, seed=22)
    target = _block_map(q, k, b, pool_queries=not decode).float()
    torch.testing.assert_close(target, naive_target(q, k, b, pool_queries=not decode), atol=1e-5, rtol=1e-4)
    cls = SeerDecodeGate if decode else SeerGate
    gate = cls(Hq, Hkv, D, block_size=b, hidden_size=16)
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = distillation_loss(gate(q, k), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = distillation_loss(gate(q, k), target).item()
    assert all(math.isfinite(v) for v in losses)
    assert final < 0.7 * losses[0], (losses[0], final)


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    gates = nn.ModuleDict(
        {
            str(i): nn.ModuleDict(
                {
                    "prefill": SeerGate(
                        4, 2, 8, block_size=4, hidden_size=6, q_pooling=("avg", "max"), rope_theta=500.0
                    ),
                    "decode": SeerDecodeGate(4, 2, 8, block_size=4, hidden_size=6, k_pooling=("avg",)),
                    "prefill_authors": SeerGate(4, 2, 8, block_size=4, hidden_size=8, bias=False, q_proj=False,
                                                k_heads="q", rope_positions="token",
                                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 16}),
                    "decode_authors": SeerDecodeGate(4, 2, 8, block_size=4, hidden_size=8, query="avg_proj",
                                                     bias=False, qk_norm=True, rope_positions="token",
                                                     own_block="excluded"),
                }
            )
            for i in range(2)
        }
    )
    for layer in gates.values():
        for g in layer.values():
            _randomise_biases(g)
    config = {"base_model": "tiny", "density": 0.25, "layers": [0, 1]}
    path = os.path.join(tmp_path, "gates")
    save_gates(path, gates, config)
    meta = json.load(open(os.path.join(path, "gates_config.json")))
    assert sorted(os.listdir(path)) == [meta["weights"]["file"], "gates_config.json"]
    assert meta["config"] == config
    assert meta["modules"]["children"]["1"]["children"]["decode"]["class"] == "SeerDecodeGate"
    loaded, cfg = load_gates(path)
    assert cfg == config
    assert isinstance(loaded["1"]["prefill"], SeerGate) and isinstance(loaded["1"]["decode"], SeerDecodeGate)
    assert loaded["0"]["prefill"].q_pooling == ("avg", "max") and loaded["0"]["prefill"].rope_theta == 500.0
    q, k = _randn(1, 4, 9, 8, seed=23), _randn(1, 2, 9, 8, seed=24)
    for i in ("0", "1"):
        for kind in ("prefill", "decode", "prefill_authors", "decode_authors"):
            assert torch.equal(loaded[i][kind](q, k), gates[i][kind](q, k))
            assert loaded[i][kind].get_config() == gates[i][kind].get_config()
    p = dict(loaded.named_parameters())["0.prefill.q_weight"]
    assert p.requires_grad and isinstance(p, nn.Parameter)


def test_save_load_dtype_single_gate_and_errors(tmp_path):
    gate = SeerGate(2, 1, 8, block_size=4, hidden_size=4).to(torch.bfloat16)
    save_gates(tmp_path, gate, {})
    loaded, cfg = load_gates(tmp_path, device="cpu")
    assert cfg == {} and loaded.q_weight.dtype == torch.bfloat16
    assert torch.equal(loaded.k_weight, gate.k_weight)
    with pytest.raises(TypeError, match="gates"):
        save_gates(tmp_path, nn.Linear(2, 2), {})
    with pytest.raises(TypeError, match="config"):
        save_gates(tmp_path, gate, {"bad": object()})
    with pytest.raises(FileNotFoundError, match="path"):
        load_gates(os.path.join(tmp_path, "missing"))
    meta_file = os.path.join(tmp_path, "gates_config.json")
    meta = json.load(open(meta_file))
    meta["modules"]["class"] = "os.system"
    json.dump(meta, open(meta_file, "w"))
    with pytest.raises(ValueError, match="unknown class"):
        load_gates(tmp_path)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="num_kv_heads"):
        SeerGate(4, 3, 8)
    with pytest.raises(ValueError, match="hidden_size"):
        SeerGate(4, 2, 8, hidden_size=5)
    with pytest.raises(ValueError, match="k_pooling"):
        SeerGate(4, 2, 8, k_pooling=("median",))
    with pytest.raises(ValueError, match="q_pooling"):
        SeerGate(4, 2, 8, q_pooling=())
    with pytest.raises(TypeError, match="block_size"):
        SeerDecodeGate(4, 2, 8, block_size=4.0)
    gate = SeerGate(4, 2, 8, block_size=4, hidden_size=4)
    q, k = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="q has 2 heads"):
        gate(q[:, :2], k)
    with pytest.raises(ValueError, match="head_dim"):
        gate(q, k[..., :4])
    with pytest.raises(ValueError, match="batch"):
        gate(q, k.expand(2, -1, -1, -1))
    with pytest.raises(TypeError, match="k must be a floating"):
        gate(q, k.long())
    with pytest.raises(TypeError, match="position_ids"):
        gate(q, k, torch.arange(8.0))
    with pytest.raises(ValueError, match="position_ids"):
        gate(q, k, torch.arange(7))


# --------------------------------------------------------------------------------------------------
# GPU tier
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gates_on_cuda_match_cpu(tmp_path):
    Hq, Hkv, D, b, S = 8, 2, 64, 64, 333
    prefill = SeerGate(Hq, Hkv, D, block_size=b)
    decode = SeerDecodeGate(Hq, Hkv, D, block_size=b)
    q, k = _randn(2, Hq, S, D, seed=30), _randn(2, Hkv, S, D, seed=31)
    save_gates(tmp_path, nn.ModuleDict({"prefill": prefill, "decode": decode}), {"s": S})
    gates, _ = load_gates(tmp_path, device="cuda")
    assert gates["prefill"].q_weight.device.type == "cuda"
    qc, kc = q.cuda(), k.cuda()
    for name, cpu_gate in (("prefill", prefill), ("decode", decode)):
        want = cpu_gate(q, k)
        got = gates[name](qc, kc)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
        got16 = gates[name](qc.bfloat16(), kc.bfloat16())  # bf16 activations, fp32 gate
        torch.testing.assert_close(got16.cpu(), want, atol=2e-2, rtol=2e-2)
    cache = gates["decode"].new_cache()
    with torch.no_grad():
        gates["decode"].step(qc[:, :, 199:200], kc[:, :, :200], cache)
        for L in range(201, S + 1):
            got = gates["decode"].step(qc[:, :, L - 1 : L], kc[:, :, L - 1 : L], cache)
        torch.testing.assert_close(got, gates["decode"](qc[:, :, S - 1 :], kc), atol=1e-5, rtol=1e-5)
