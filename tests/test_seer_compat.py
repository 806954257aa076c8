"""Faithful to the SeerAttention authors: their gates, target, loss and checkpoint directories.

The reference here is a small transcription, written for these tests from the definitions in the
authors' code (microsoft/SeerAttention: ``AttnGate`` / ``MultiHeadLinear`` / ``HeadPoolingLinear``,
pooling with ``ceil_mode=True``, rotate-half RoPE at ``position_ids[:, 0::block_size]``, RMSNorm,
``repeat_kv``, the decode mask ``c < t // block_size``, their distillation target and
``KLDivLoss()`` with its slicing), in float64 on the authors' tensor layout (``[B, S, H, D]``).
Our gates must give the same scores (before softmax) within fp32 rounding on the allowed blocks and
``-inf`` elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_attn._files import CorruptFileError
from sparse_attn.patterns import (
    attention_block_map,
    decode_gate_from_seerattention,
    gate_from_seerattention,
    load_gates,
    seerattention_loss,
)
from sparse_attn.patterns.seer import SeerDecodeGate, SeerGate, _inv_freq
from sparse_attn.patterns.seer_compat import load_seerattention_gates

POOL = ("max", "min", "avg")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Transcriptions of the authors' definitions (float64, their layout)
# --------------------------------------------------------------------------------------------------
def _author_pool(x, block, mode):
    """[B, S, H, D] pooled over S in windows of ``block`` with ceil_mode (torch's 3-D pools on a 4-D
    input treat it as unbatched (C, D, H, W), so the window runs along S)."""
    kw = dict(kernel_size=[block, 1, 1], stride=[block, 1, 1], ceil_mode=True)
    if mode == "max":
        return F.max_pool3d(x, **kw)
    if mode == "min":
        return -F.max_pool3d(-x, **kw)
    return F.avg_pool3d(x, **kw)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _cos_sin(pos, dim, theta, inv_freq=None):
    """HF rotary tables for positions ``pos [1, N]``: [1, N, dim] each."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)) if inv_freq is None else inv_freq
    freqs = pos.double()[..., None] * inv.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def author_prefill_scores(q, k, w_q, w_k, *, block, q_modes, k_modes, theta, inv_freq=None):
    """The authors' prefill AttnGate (training mode, before the mask): q [B, S, Hq, D], k [B, S, Hkv, D]
    -> [B, Hq, M, M]."""
    q, k = q.double(), k.double()
    B, S, Hq, _ = q.shape
    qp = torch.cat([_author_pool(q, block, m) for m in q_modes], dim=-1)  # [B, M, Hq, D*nq]
    if w_q is not None:
        qp = torch.einsum("bshi,hio->bsho", qp, w_q.double())
    kp = torch.cat([_author_pool(k, block, m) for m in k_modes], dim=-1)  # [B, M, Hkv, D*nk]
    if kp.shape[2] < w_k.shape[0]:  # MultiHeadLinear repeats the KV heads up to its own head count
        kp = kp.repeat_interleave(w_k.shape[0] // kp.shape[2], dim=2)
    kp = torch.einsum("bshi,hio->bsho", kp, w_k.double())
    hidden = kp.shape[-1]
    block_pos = torch.arange(S)[None, 0::block]  # position_ids[:, 0::block_size]
    cos, sin = _cos_sin(block_pos, hidden, theta, inv_freq)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # unsqueeze_dim=2: [B, M, H, hid] layout
    qp, kp = qp * cos + _rotate_half(qp) * sin, kp * cos + _rotate_half(kp) * sin
    qp, kp = qp.transpose(1, 2), kp.transpose(1, 2)
    if kp.shape[1] < Hq:
        kp = kp.repeat_interleave(Hq // kp.shape[1], dim=1)
    return (qp @ kp.transpose(-1, -2)) * hidden ** -0.5


def _rms(x, w, eps=1e-6):
    return w.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def author_decode_scores(q, k, sd, *, form, k_modes, block, theta, qk_norm, use_rope=True):
    """The authors' decode AttnGate (training, one sequence): q [S, Hq, D], k [S, Hkv, D] -> [1, Hkv, S, M]
    before the mask."""
    q, k = q.double(), k.double()
    S, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if form in ("Qavgproj", "Qavg"):
        q = F.avg_pool2d(q, kernel_size=[G, 1], stride=[G, 1])  # 3-D input (C=S, H=Hq, W=D): mean over heads
    if form == "Qproj":
        q = torch.einsum("skgi,kgio->sko", q.view(S, Hkv, G, D), sd["attngate_linear_q.weight"].double())
    elif form == "Qavgproj":
        q = torch.einsum("shi,hio->sho", q, sd["attngate_linear_q.weight"].double())
    q = q.permute(1, 0, 2)[None]  # [1, H', S, hid]
    if qk_norm:
        q = _rms(q, sd["attngate_qnorm.weight"])
    hidden = q.shape[-1]
    M = -(-S // block)
    pooled = []
    for c in range(M):  # varlen pooling: real tokens only
        blk = k[c * block: min((c + 1) * block, S)]
        feats = {"max": blk.amax(0), "min": blk.amin(0), "avg": blk.mean(0)}
        pooled.append(torch.cat([feats[m] for m in k_modes], dim=-1))
    kp = torch.stack(pooled, 0).permute(1, 0, 2)[None]  # [1, Hkv, M, D*nk]
    kp = torch.einsum("bhsi,hio->bhso", kp, sd["attngate_linear_k.weight"].double())
    if qk_norm:
        kp = _rms(kp, sd["attngate_knorm.weight"])
    if use_rope:
        cq, sq = _cos_sin(torch.arange(S)[None], hidden, theta)
        ck, sk = _cos_sin(torch.arange(0, M * block, block)[None], hidden, theta)
        q = q * cq[:, None] + _rotate_half(q) * sq[:, None]
        kp = kp * ck[:, None] + _rotate_half(kp) * sk[:, None]
    if form == "Qorig":
        kp = kp.repeat_interleave(G, dim=1)
    attn = (q @ kp.transpose(-1, -2)) / math.sqrt(hidden)
    if form == "Qorig":
        attn = attn.view(1, Hkv, G, S, M).sum(2) / G
    return attn


def author_decode_mask(S, block):
    """bool [S, M]: token t may use key block c iff c < t // block."""
    M = -(-S // block)
    return torch.tril(torch.ones(M, M, dtype=torch.bool), diagonal=-1).repeat_interleave(block, 0)[:S]


def author_decode_target(q, k, block):
    """Per token and KV head: block maxima of the causal softmax, max over the GQA group, the own
    block and later ones zeroed, divided by (sum + 1e-9). q [B, Hq, S, D], k [B, Hkv, S, D] post-RoPE."""
    B, Hq, S, D = q.shape
    G = Hq // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(s, -1)
    M = -(-S // block)
    pm = torch.stack([p[..., c * block:(c + 1) * block].amax(-1) for c in range(M)], -1)  # [B, Hq, S, M]
    pm = F.max_pool3d(pm, kernel_size=[G, 1, 1], stride=[G, 1, 1])  # max over each group's heads
    pm = pm.masked_fill(~author_decode_mask(S, block), 0.0)
    return pm / (pm.sum(-1, keepdim=True) + 1e-9)


def _kl_div_mean(logp, target):
    """torch.nn.KLDivLoss() (reduction "mean"), without its warning about that reduction."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.nn.KLDivLoss()(logp, target)


def author_prefill_loss(scores, target):
    """KLDivLoss() (mean over elements) after dropping the first quarter of the query-block rows;
    the gate's masked scores carry the dtype's minimum (finite), as the authors add their mask."""
    M = target.shape[2]
    kept = scores[:, :, M // 4:].double()
    s = kept.masked_fill(torch.isneginf(kept), torch.finfo(torch.float32).min)
    return _kl_div_mean(F.log_softmax(s, -1), target[:, :, M // 4:].double())


def author_decode_loss(scores, target, slice_ratio=0.0):
    total = 0.0
    for i in range(scores.shape[0]):
        start = int(scores.shape[2] * slice_ratio)
        s = scores[i, :, start:].double().masked_fill(torch.isneginf(scores[i, :, start:]), -1e20)
        total = total + _kl_div_mean(F.log_softmax(s, -1), target[i, :, start:].double())
    return total / scores.shape[0]


# --------------------------------------------------------------------------------------------------
# Prefill gate
# --------------------------------------------------------------------------------------------------
PREFILL_CASES = [
    # (Hq, Hkv, S, block, q_modes, k_modes, q projection)
    (4, 2, 37, 4, ("avg",), ("max", "min", "avg"), False),   # the published Qavg_Kmaxminavg: no q projection
    (6, 2, 29, 8, ("avg",), ("max",), False),
    (4, 2, 37, 4, ("max", "avg"), ("min", "avg"), True),      # two q poolings: a q projection
    (3, 3, 17, 4, ("min",), ("avg", "max"), True),            # force_double: a q projection anyway
    (4, 1, 8, 8, ("avg", "min", "max"), ("max", "min", "avg"), True),   # one block, MQA
]


@pytest.mark.parametrize("Hq,Hkv,S,b,q_modes,k_modes,has_q", PREFILL_CASES)
def test_prefill_gate_equals_the_authors_attngate(Hq, Hkv, S, b, q_modes, k_modes, has_q):
    D = hidden = 8
    theta = 500.0
    q, k = _randn(2, S, Hq, D, seed=1), _randn(2, S, Hkv, D, seed=2)  # the authors' layout
    sd = {"mask_linear_k.weight": _randn(Hkv if has_q else Hq, D * len(k_modes), hidden, seed=3) * 0.3}
    if has_q:
        sd["mask_linear_q.weight"] = _randn(Hq, D * len(q_modes), hidden, seed=4) * 0.3
    gate = gate_from_seerattention(sd, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=b, hidden_size=hidden,
                                   q_pooling=q_modes, k_pooling=k_modes, rope_theta=theta)
    assert isinstance(gate, SeerGate) and gate.bias is False and gate.q_proj is has_q
    assert gate.k_heads == ("kv" if has_q else "q") and gate.rope_positions == "token"
    got = gate(q.transpose(1, 2), k.transpose(1, 2))  # ours: [B, H, S, D]
    want = author_prefill_scores(q, k, sd.get("mask_linear_q.weight"), sd["mask_linear_k.weight"], block=b,
                                 q_modes=q_modes, k_modes=k_modes, theta=theta)
    allowed = torch.ones(want.shape[-2:], dtype=torch.bool).tril()
    assert torch.equal(torch.isneginf(got), (~allowed).expand_as(got))
    torch.testing.assert_close(got[..., allowed].double(), want[..., allowed], atol=2e-5, rtol=2e-5)


def test_prefill_gate_with_llama3_rope_scaling_and_our_positions_differ():
    Hq, Hkv, D, b, S = 4, 2, 16, 4, 70
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, head_dim=D, rope_theta=10000.0,
                                   rope_scaling=dict(scaling))
    hf_inv, factor = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert factor == 1.0
    torch.testing.assert_close(_inv_freq(D, 10000.0, scaling, "cpu"), hf_inv.float(), atol=1e-9, rtol=1e-6)
    q, k = _randn(1, S, Hq, D, seed=5), _randn(1, S, Hkv, D, seed=6)
    sd = {"mask_linear_k.weight": _randn(Hq, 3 * D, D, seed=7) * 0.3}
    gate = gate_from_seerattention(sd, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=b, hidden_size=D,
                                   rope_theta=10000.0, rope_scaling=scaling)
    want = author_prefill_scores(q, k, None, sd["mask_linear_k.weight"], block=b, q_modes=("avg",), k_modes=POOL,
                                 theta=10000.0, inv_freq=hf_inv)
    got = gate(q.transpose(1, 2), k.transpose(1, 2))
    allowed = torch.ones(want.shape[-2:], dtype=torch.bool).tril()
    torch.testing.assert_close(got[..., allowed].double(), want[..., allowed], atol=2e-5, rtol=2e-5)
    unscaled = gate_from_seerattention(sd, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=b, hidden_size=D,
                                       rope_theta=10000.0)
    assert not torch.allclose(unscaled(q.transpose(1, 2), k.transpose(1, 2)), got)
    # block-index positions (ours) are another gate: the same weights give other scores
    ours = SeerGate(Hq, Hkv, D, block_size=b, hidden_size=D, bias=False, q_proj=False, k_heads="q")
    ours.k_weight.data.copy_(sd["mask_linear_k.weight"])
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    assert not torch.allclose(ours(qt, kt), unscaled(qt, kt))


def test_prefill_gate_from_seerattention_errors():
    sd = {"mask_linear_k.weight": torch.zeros(4, 24, 8)}
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, hidden_size=8)
    with pytest.raises(ValueError, match="mask_linear_q"):  # two q poolings need a q projection
        gate_from_seerattention(sd, **kw, q_pooling=("avg", "max"))
    with pytest.raises(ValueError, match=r"shape \[4, 24, 8\], expected \[4, 16, 8\]"):
        gate_from_seerattention(sd, **kw, k_pooling=("max", "avg"))
    with pytest.raises(ValueError, match="unexpected"):
        gate_from_seerattention({**sd, "extra.weight": torch.zeros(1)}, **kw)
    with pytest.raises(TypeError, match="floating"):
        gate_from_seerattention({"mask_linear_k.weight": torch.zeros(4, 24, 8, dtype=torch.int32)}, **kw)
    with pytest.raises(ValueError, match="hidden_size=16 != head_dim=8"):
        gate_from_seerattention(sd, **{**kw, "hidden_size": 16})
    with pytest.raises(TypeError, match="state_dict"):
        gate_from_seerattention([1, 2], **kw)
    with pytest.raises(ValueError, match="num_heads"):
        gate_from_seerattention(sd, **{**kw, "num_heads": 3})


# --------------------------------------------------------------------------------------------------
# Decode gate
# --------------------------------------------------------------------------------------------------
def _decode_state(form, Hq, Hkv, D, k_modes, qk_norm, seed=10):
    G = Hq // Hkv
    sd = {"attngate_linear_k.weight": _randn(Hkv, D * len(k_modes), D, seed=seed) * 0.3}
    if form == "Qproj":
        sd["attngate_linear_q.weight"] = _randn(Hkv, G, D, D, seed=seed + 1) * 0.3
    elif form == "Qavgproj":
        sd["attngate_linear_q.weight"] = _randn(Hkv, D, D, seed=seed + 1) * 0.3
    if qk_norm:
        sd["attngate_qnorm.weight"] = 1 + 0.5 * _randn(D, seed=seed + 2)
        sd["attngate_knorm.weight"] = 1 + 0.5 * _randn(D, seed=seed + 3)
    return sd


@pytest.mark.parametrize("form", ["Qproj", "Qavgproj", "Qavg", "Qorig"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_decode_gate_equals_the_authors_attngate(form, qk_norm):
    Hq, Hkv, D, b, S = 6, 2, 8, 4, 23
    k_modes = ("max", "avg") if form == "Qavg" else POOL
    q, k = _randn(2, S, Hq, D, seed=11), _randn(2, S, Hkv, D, seed=12)
    sd = _decode_state(form, Hq, Hkv, D, k_modes, qk_norm)
    gate = decode_gate_from_seerattention(sd, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=b,
                                          hidden_size=D, query=form, k_pooling=k_modes, qk_norm=qk_norm,
                                          rope_theta=300.0)
    assert isinstance(gate, SeerDecodeGate) and gate.own_block == "excluded" and gate.rope_positions == "token"
    got = gate(q.transpose(1, 2), k.transpose(1, 2))  # [B, Hkv, S, M]
    allowed = author_decode_mask(S, b)
    assert torch.equal(torch.isneginf(got), (~allowed).expand_as(got))
    for i in range(2):
        want = author_decode_scores(q[i], k[i], sd, form=form, k_modes=k_modes, block=b, theta=300.0, qk_norm=qk_norm)
        torch.testing.assert_close(got[i:i + 1][..., allowed].double(), want[..., allowed], atol=2e-5, rtol=2e-5)
    # one token at a time from the cache: the same rows
    cache = gate.new_cache()
    with torch.no_grad():
        qq, kk = q.transpose(1, 2), k.transpose(1, 2)
        first = gate.step(qq[:, :, 6:7], kk[:, :, :7], cache)
        rows = [first] + [gate.step(qq[:, :, t:t + 1], kk[:, :, t:t + 1], cache) for t in range(7, S)]
    for t, row in zip(range(6, S), rows):
        ref = got[:, :, t:t + 1, : row.shape[-1]]
        assert torch.equal(torch.isneginf(row), torch.isneginf(ref)), t
        torch.testing.assert_close(row.nan_to_num(neginf=0.0), ref.nan_to_num(neginf=0.0), atol=1e-5, rtol=1e-5)


def test_decode_gate_without_rope_and_errors():
    Hq, Hkv, D, b, S = 4, 2, 8, 4, 13
    sd = _decode_state("Qproj", Hq, Hkv, D, POOL, False)
    gate = decode_gate_from_seerattention(sd, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=b,
                                          hidden_size=D, use_rope=False)
    q, k = _randn(1, S, Hq, D, seed=13), _randn(1, S, Hkv, D, seed=14)
    want = author_decode_scores(q[0], k[0], sd, form="Qproj", k_modes=POOL, block=b, theta=1.0, qk_norm=False,
                                use_rope=False)
    allowed = author_decode_mask(S, b)
    got = gate(q.transpose(1, 2), k.transpose(1, 2))
    torch.testing.assert_close(got[..., allowed].double(), want[..., allowed], atol=2e-5, rtol=2e-5)
    kw = dict(num_heads=Hq, num_kv_heads=Hkv, head_dim=D, block_size=b, hidden_size=D)
    with pytest.raises(ValueError, match="query must be one of"):
        decode_gate_from_seerattention(sd, **kw, query="Qmax")
    with pytest.raises(ValueError, match="missing"):
        decode_gate_from_seerattention(sd, **kw, qk_norm=True)
    with pytest.raises(ValueError, match=r"attngate_linear_q.weight.*expected \[2, 8, 8\]"):
        decode_gate_from_seerattention(sd, **kw, query="Qavgproj")


# --------------------------------------------------------------------------------------------------
# Target and loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("Hq,Hkv,S,b", [(4, 2, 37, 16), (2, 2, 48, 16), (3, 1, 20, 32)])
def test_decode_target_is_the_authors(Hq, Hkv, S, b, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    q, k = _randn(2, Hq, S, 16, seed=20) * 2, _randn(2, Hkv, S, 16, seed=21) * 2
    got = attention_block_map(q.to(dev), k.to(dev), block_size=b, pool_queries=False, reduce_gqa="max",
                              exclude_own_block=True, backend=backend).cpu()
    want = author_decode_target(q, k, b)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    # ours (the default) keeps the own block: rows differ
    ours = attention_block_map(q, k, block_size=b, pool_queries=False, reduce_gqa="max")
    assert (ours[..., :b, 0] == 1).all() and (got[..., :b, :] == 0).all()  # block 0's tokens: nothing before
    with pytest.raises(ValueError, match="pool_queries=False"):
        attention_block_map(q, k, block_size=b, exclude_own_block=True)
    with pytest.raises(TypeError, match="exclude_own_block"):
        attention_block_map(q, k, block_size=b, pool_queries=False, exclude_own_block=1)


def test_seerattention_loss_is_the_authors():
    Hq, Hkv, D, b, S = 4, 2, 16, 16, 77
    q, k = _randn(2, Hq, S, D, seed=30), _randn(2, Hkv, S, D, seed=31)
    gate = SeerGate(Hq, Hkv, D, block_size=b, hidden_size=16)
    logits = gate(q, k)
    target = attention_block_map(q, k, block_size=b)
    loss = seerattention_loss(logits, target)
    torch.testing.assert_close(loss.double(), author_prefill_loss(logits.detach(), target), atol=1e-7, rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gate.parameters())
    # decode: no rows dropped (loss_slice_ratio 0), rows of block 0 are all -inf and carry no mass
    dgate = SeerDecodeGate(Hq, Hkv, D, block_size=b, hidden_size=16, own_block="excluded")
    dlogits = dgate(q, k)
    dtarget = attention_block_map(q, k, block_size=b, pool_queries=False, reduce_gqa="max", exclude_own_block=True)
    dloss = seerattention_loss(dlogits, dtarget, drop_first=0.0)
    torch.testing.assert_close(dloss.double(), author_decode_loss(dlogits.detach(), dtarget), atol=1e-7, rtol=1e-5)
    dloss.backward()
    assert all(torch.isfinite(p.grad).all() for p in dgate.parameters())
    # and with the authors' slice ratio
    torch.testing.assert_close(seerattention_loss(dlogits, dtarget, drop_first=0.3).double(),
                               author_decode_loss(dlogits.detach(), dtarget, 0.3), atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="drop_first"):
        seerattention_loss(logits, target, drop_first=1.0)
    with pytest.raises(ValueError, match="same shape"):
        seerattention_loss(logits, target[..., :-1])


def test_pattern_distills_with_the_authors_loss_and_target():
    from sparse_attn.modules import SeerPattern

    Hq, Hkv, D, b, S = 4, 2, 16, 16, 64
    p = SeerPattern(Hq, Hkv, D, block_size=b, decode_gate={"own_block": "excluded", "hidden_size": 16},
                    gate={"hidden_size": 16})
    q, k, v = _randn(1, Hq, S, D, seed=40), _randn(1, Hkv, S, D, seed=41), _randn(1, Hkv, S, D, seed=42)
    p.distill_loss = "seerattention"
    p.distillation_forward(q, k, v, q_pre=q, k_pre=k)
    want = author_prefill_loss(p.gate(q, k).detach(), attention_block_map(q, k, block_size=b))
    torch.testing.assert_close(p.last_loss.double(), want, atol=1e-7, rtol=1e-5)
    dwant = author_decode_loss(p.decode_gate(q, k).detach(), author_decode_target(q, k, b).float())
    torch.testing.assert_close(p.last_decode_loss.double(), dwant, atol=1e-6, rtol=1e-4)
    p.distill_loss = "sparse_attn"  # ours: a different number
    p.distillation_forward(q, k, v, q_pre=q, k_pre=k)
    assert abs(p.last_loss.item() - want.item()) > 1e-3
    p.distill_loss = "mse"
    with pytest.raises(ValueError, match="distill_loss"):
        p.distillation_forward(q, k, v, q_pre=q, k_pre=k)


# --------------------------------------------------------------------------------------------------
# Checkpoint directories in the authors' format
# --------------------------------------------------------------------------------------------------
LLAMA = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, num_hidden_layers=2, rope_theta=500.0,
             seerattn_gate_type="Qavg_Kmaxminavg", seerattn_gate_block_size=16, seerattn_gate_hidden_size=8,
             seerattn_gate_force_double=False, seerattn_sparsity_method="threshold", seerattn_threshold=0.0,
             seerattn_nz_ratio=1.0, seerattn_last_block_dense=True, base_model="tiny-llama")
QWEN3 = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=8, num_hidden_layers=2,
             rope_theta=1000.0, seerattn_k_seq_pooling_type="Kmaxminavg", seerattn_q_head_pooling_type="Qproj",
             seerattn_use_qk_norm=True, seerattn_use_rope=True, seerattn_gate_block_size=16,
             seerattn_gate_hidden_size=8, seerattn_sparsity_method="threshold", seerattn_threshold=0.0)


def _prefix(i):
    return f"model.layers.{i}.self_attn.attn_gate."


def write_author_dir(path, config, layers=(0, 1), dtype=torch.float32, extra=None):
    """A directory as the authors' scripts leave it: config.json + torch.save(state dict) with the
    names their models give the gate tensors."""
    os.makedirs(path, exist_ok=True)
    decode = "seerattn_q_head_pooling_type" in config
    state = {}
    for i in layers:
        if decode:
            sd = _decode_state("Qproj", 4, 2, 8, POOL, config.get("seerattn_use_qk_norm", False), seed=50 + i)
        else:
            sd = {"mask_linear_k.weight": _randn(4, 24, 8, seed=60 + i) * 0.3}
        state.update({_prefix(i) + n: t.to(dtype) for n, t in sd.items()})
    state.update(extra or {})
    torch.save(state, os.path.join(path, "attn_gate_weights.pth"))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    return state


def test_load_gates_reads_the_authors_prefill_directory(tmp_path):
    state = write_author_dir(tmp_path / "llama", LLAMA)
    gates, config = load_gates(tmp_path / "llama")  # format detected
    again, _ = load_gates(tmp_path / "llama", format="seerattention")
    assert config["format"] == "seerattention" and config["kind"] == "prefill" and config["base_model"] == "tiny-llama"
    assert config["selection"] == {}  # threshold 0 (a training config): nothing selected, our default applies
    assert config["seerattention"]["seerattn_gate_type"] == "Qavg_Kmaxminavg"
    assert sorted(gates.keys()) == ["0", "1"] and list(gates["0"].keys()) == ["prefill"]
    q, k = _randn(1, 4, 40, 8, seed=70), _randn(1, 2, 40, 8, seed=71)
    for i in (0, 1):
        direct = gate_from_seerattention({"mask_linear_k.weight": state[_prefix(i) + "mask_linear_k.weight"]},
                                         num_heads=4, num_kv_heads=2, head_dim=8, block_size=16, hidden_size=8,
                                         rope_theta=500.0)
        assert torch.equal(gates[str(i)]["prefill"](q, k), direct(q, k))
        assert torch.equal(again[str(i)]["prefill"].k_weight, direct.k_weight)
    with pytest.raises(FileNotFoundError, match="gates_config.json"):
        load_gates(tmp_path / "llama", format="sparse_attn")
    with pytest.raises(ValueError, match="format"):
        load_gates(tmp_path / "llama", format="pickle")


def test_load_gates_reads_the_authors_decode_directory(tmp_path):
    state = write_author_dir(tmp_path / "qwen3", QWEN3, dtype=torch.bfloat16)
    gates, config = load_gates(tmp_path / "qwen3", model_dims={"num_heads": 4, "num_kv_heads": 2, "head_dim": 8})
    assert config["kind"] == "decode" and list(gates["1"].keys()) == ["decode"]
    gate = gates["1"]["decode"]
    assert gate.qk_norm and gate.query == "proj" and gate.own_block == "excluded"
    assert gate.k_weight.dtype == torch.bfloat16  # the file's dtype is kept
    q, k = _randn(1, 40, 4, 8, seed=72), _randn(1, 40, 2, 8, seed=73)
    sd = {n[len(_prefix(1)):]: t.float() for n, t in state.items() if n.startswith(_prefix(1))}
    want = author_decode_scores(q[0], k[0], sd, form="Qproj", k_modes=POOL, block=16, theta=1000.0, qk_norm=True)
    got = gate.float()(q.transpose(1, 2), k.transpose(1, 2))
    allowed = author_decode_mask(40, 16)
    torch.testing.assert_close(got[..., allowed].double(), want[..., allowed], atol=2e-5, rtol=2e-5)


def test_the_authors_selection_rules_come_with_their_config(tmp_path):
    write_author_dir(tmp_path / "t", {**LLAMA, "seerattn_threshold": 5e-3})
    assert load_gates(tmp_path / "t")[1]["selection"] == {"threshold": 5e-3, "strict": True, "keep_first": 0,
                                                          "keep_last": 0, "dense_last_rows": 2}
    write_author_dir(tmp_path / "n", {**LLAMA, "seerattn_sparsity_method": "nz_ratio", "seerattn_nz_ratio": 0.3,
                                      "seerattn_last_block_dense": False})
    assert load_gates(tmp_path / "n")[1]["selection"] == {"nz_ratio": 0.3, "keep_first": 0, "keep_last": 0,
                                                          "dense_last_rows": 0}
    write_author_dir(tmp_path / "d", {**QWEN3, "seerattn_sparsity_method": "token_budget",
                                      "seerattn_token_budget": 64})
    assert load_gates(tmp_path / "d")[1]["selection"] == {"topk": 4, "keep_first": 0, "keep_last": 0}


def _touch_marker(path):  # what an unsafe unpickler would call
    open(path, "w").close()
    return {}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


DAMAGE = {
    "truncated": lambda d: _rewrite(d, lambda b: b[: len(b) // 2]),
    "garbage": lambda d: _rewrite(d, lambda b: b"PK\x03\x04" + os.urandom(200)),
    "legacy pickle": lambda d: torch.save({"x": torch.zeros(1)}, d / "attn_gate_weights.pth",
                                          _use_new_zipfile_serialization=False),
    "extra tensor": lambda d: write_author_dir(d, LLAMA, extra={"model.lm_head.weight": torch.zeros(2)}),
    "layer out of range": lambda d: write_author_dir(d, LLAMA, layers=(0, 2)),
    "wrong shape": lambda d: write_author_dir(
        d, LLAMA, extra={_prefix(1) + "mask_linear_k.weight": torch.zeros(4, 8, 8)}),
    "integer tensor": lambda d: write_author_dir(
        d, LLAMA, extra={_prefix(1) + "mask_linear_k.weight": torch.zeros(4, 24, 8, dtype=torch.int32)}),
    "not a dict": lambda d: torch.save([torch.zeros(1)], d / "attn_gate_weights.pth"),
    "decode tensors in a prefill dir": lambda d: write_author_dir(
        d, LLAMA, extra={_prefix(0) + "attngate_linear_k.weight": torch.zeros(2, 24, 8)}),
}


def _rewrite(d, fn):
    f = d / "attn_gate_weights.pth"
    f.write_bytes(fn(f.read_bytes()))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_weights_files_name_themselves(tmp_path, damage):
    d = tmp_path / "ckpt"
    write_author_dir(d, LLAMA)
    DAMAGE[damage](d)
    with pytest.raises(CorruptFileError) as err:
        load_gates(d)
    assert str(d / "attn_gate_weights.pth") in str(err.value)
    if damage == "legacy pickle":
        assert "zip archive" in str(err.value)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    d = tmp_path / "evil"
    write_author_dir(d, LLAMA)
    marker = tmp_path / "ran"
    torch.save({"payload": _Evil(str(marker))}, d / "attn_gate_weights.pth")
    with pytest.raises(CorruptFileError, match="weights-only"):
        load_gates(d)
    assert not marker.exists()


CONFIG_DAMAGE = [
    ({"seerattn_gate_type": "Qmedian_Kmax"}, "seerattn_gate_type"),
    ({"seerattn_gate_type": "Qavg_Kmaxmax"}, "repeat"),
    ({"seerattn_gate_hidden_size": 1 << 19}, "hidden_size"),
    ({"seerattn_gate_hidden_size": 16}, "16 != head_dim=8"),
    ({"seerattn_gate_block_size": "64"}, "seerattn_gate_block_size"),
    ({"num_attention_heads": 3}, "multiple"),
    ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "not reproduced"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"seerattn_threshold": 2.0}, "seerattn_threshold"),
    ({"seerattn_gate_type": None, "seerattn_q_head_pooling_type": "Qmax"}, "seerattn_q_head_pooling_type"),
]


@pytest.mark.parametrize("change,match", CONFIG_DAMAGE)
def test_bad_configs_fail_before_allocating(tmp_path, change, match):
    from test_gate_files import NoLargeAllocations

    d = tmp_path / "c"
    write_author_dir(d, LLAMA)
    cfg = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as err, NoLargeAllocations():
        load_gates(d)
    assert str(d / "config.json") in str(err.value)


def test_sizes_are_checked_against_the_model_and_the_file_size_is_bounded(tmp_path):
    from test_gate_files import NoLargeAllocations

    d = tmp_path / "s"
    write_author_dir(d, LLAMA)
    with pytest.raises(ValueError, match="num_heads=4, the model has num_heads=8"):
        load_gates(d, model_dims={"num_heads": 8, "num_kv_heads": 2, "head_dim": 8})
    with open(d / "attn_gate_weights.pth", "ab") as fh:  # far more bytes than two small gates can take
        fh.write(b"\0" * (3 << 20))
    with pytest.raises(CorruptFileError, match="more than"), NoLargeAllocations():
        load_gates(d)
    (d / "attn_gate_weights.pth").unlink()
    with pytest.raises(FileNotFoundError, match="attn_gate_weights.pth"):
        load_seerattention_gates(d)


def test_our_directories_still_win_when_both_formats_are_present(tmp_path):
    from sparse_attn.patterns import save_gates

    d = tmp_path / "both"
    write_author_dir(d, LLAMA)
    ours = nn.ModuleDict({"0": nn.ModuleDict({"prefill": SeerGate(4, 2, 8, block_size=16, hidden_size=8)})})
    save_gates(d, ours, {"x": 1})
    gates, config = load_gates(d)
    assert config == {"x": 1} and gates["0"]["prefill"].bias is True
