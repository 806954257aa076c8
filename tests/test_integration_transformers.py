"""Hugging Face transformers integration on tiny offline Llama models (no hub downloads).

Each check compares the patched model with the same weights under ``attn_implementation="sdpa"``
-- unmodified, or given an explicit 4-D element mask built here from S2's rule by loops -- so the
expected values never come from our own attention code.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from helpers import s2_rule_mask  # noqa: E402
from sparse_attn.modules.functional import left_padding  # noqa: E402
from sparse_attn.integrations.transformers import (  # noqa: E402
    ATTN_NAME,
    apply_sparse_attention,
    collect_gates,
    register,
    register_layout_fn,
    sparse_attention_mask,
    sparse_patterns,
)

VOCAB = 256


def _config(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=1, bos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a loaded 2-core runner OpenMP spinning costs a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    model.set_attn_implementation("sdpa")
    return model


def _patched(base, method, **options):
    return apply_sparse_attention(copy.deepcopy(base), method, **options)


def _ids(b=2, s=50, seed=0):
    return torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _left_padded(seed=1):
    ids = _ids(3, 41, seed)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    mask[2, :30] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@torch.no_grad()
def _logits(model, ids, **kw):
    return model(ids, **kw).logits


# ------------------------------------------------------------------------------------------------
# Exactness against sdpa
# ------------------------------------------------------------------------------------------------
def test_dense_logits_equal_sdpa(base):
    model = _patched(base, "dense")
    assert model.config._attn_implementation == ATTN_NAME
    ids = _ids(2, 77)
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)


def test_dense_logits_equal_sdpa_with_left_padding(base):
    model = _patched(base, "dense")
    ids, mask = _left_padded()
    got, want = _logits(model, ids, attention_mask=mask), _logits(base, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    # a padded prompt gives the logits of the same prompt alone
    alone = _logits(model, ids[1:2, 13:])
    torch.testing.assert_close(got[1, 13:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_greedy_generate_matches_sdpa(base, padded):
    model = _patched(base, "dense")
    ids, mask = _left_padded() if padded else (_ids(2, 30), None)
    kw = dict(max_new_tokens=20, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), base.generate(ids, **kw))


def test_s2_dense_equivalent_is_identical(base):
    # a window wider than the sequence keeps every causal block
    model = _patched(base, "s2", block_size=16, local_blocks=64, vert_stride=4)
    ids = _ids(2, 70)
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:, :30], **kw), base.generate(ids[:, :30], **kw))


def _s2_element_mask(s, bs, local, stride, hkv, hq):
    """[1, Hq, S, S] element mask of S2 over KV heads (DKernel's rule: the head step from the Hq
    query heads), causal included."""
    keep = s2_rule_mask(hq, s, s, bs, local, stride, num_kv_heads=hkv)[0]  # [Hkv, M, M]
    e = keep.repeat_interleave(bs, 1)[:, :s].repeat_interleave(bs, 2)[:, :, :s]
    e = e & torch.ones(s, s, dtype=torch.bool).tril()
    return e.repeat_interleave(hq // hkv, 0)[None]


def test_s2_sparse_matches_sdpa_with_its_element_mask(base):
    model = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3)
    ids = _ids(1, 83)
    got = _logits(model, ids)
    assert torch.isfinite(got).all()
    assert (got - _logits(base, ids)).abs().max() > 1e-3  # really sparse
    mask = _s2_element_mask(83, 16, 1, 3, 2, 4)
    torch.testing.assert_close(got, _logits(base, ids, attention_mask=mask), atol=1e-5, rtol=1e-5)


def test_s2_left_padded_batch_equals_each_prompt_alone(base):
    """Layouts are anchored at each sequence's first real token, so padding changes nothing."""
    model = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3)
    ids, mask = _left_padded()
    got = _logits(model, ids, attention_mask=mask)
    for b, p in enumerate((0, 13, 30)):
        alone = _logits(model, ids[b:b + 1, p:])
        torch.testing.assert_close(got[b, p:], alone[0], atol=1e-5, rtol=1e-5)
    # and it is the S2 element mask of the unpadded prompt, not of the padded tensor
    want = _logits(base, ids[1:2, 13:], attention_mask=_s2_element_mask(28, 16, 1, 3, 2, 4))
    torch.testing.assert_close(got[1, 13:], want[0], atol=1e-5, rtol=1e-5)
    train = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3).train()
    train(ids, attention_mask=mask).logits[mask.bool()].square().mean().backward()
    grads = [p.grad for p in train.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, **kw)
    for b, p in enumerate((0, 13, 30)):
        alone = model.generate(ids[b:b + 1, p:], **kw)[0, 41 - p:].tolist()
        new = batch[b, 41:].tolist()
        assert new[: len(alone)] == alone and set(new[len(alone):]) <= {0}  # a finished row is padded


def test_left_padding_detection():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    pad = torch.ones(3, 6, dtype=torch.bool)
    pad[1, :2] = False
    pad[2, :5] = False
    assert left_padding(causal & pad[:, None, None, :], 6, 6) == [0, 2, 5]
    # decode step (one query at the end) and a chunk of queries over a longer cache
    assert left_padding((causal & pad[:, None, None, :])[:, :, -1:], 1, 6) == [0, 2, 5]
    assert left_padding((causal & pad[:, None, None, :])[:, :, -3:], 3, 6) == [0, 2, 5]
    right = torch.ones(2, 6, dtype=torch.bool)
    right[1, 4:] = False
    assert left_padding(causal & right[:, None, None, :], 6, 6) is None
    packed = causal.clone()
    packed[..., 3:, :3] = False  # two documents in one row
    assert left_padding(packed, 6, 6) is None
    window = causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)[None, None]
    assert left_padding(window, 6, 6) is None
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~causal, float("-inf"))
    assert left_padding(additive, 6, 6) == [0]


def test_s2_chunked_prefill_and_decode_match_the_full_forward(base):
    model = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3)
    ids = _ids(1, 67)
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :32], use_cache=True)
        parts = [out.logits]
        out = model(ids[:, 32:48], past_key_values=out.past_key_values, use_cache=True)  # Sq < Sk, aligned
        parts.append(out.logits)
        for t in range(48, 67):  # decode, Sq = 1
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    # decode="dense": the prompt is sparse, every generated step dense
    dense_decode = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3, decode="dense")
    with torch.no_grad():
        out = dense_decode(ids[:, :66], use_cache=True)
        last = dense_decode(ids[:, 66:], past_key_values=out.past_key_values, use_cache=True).logits
        torch.testing.assert_close(out.logits, full[:, :66], atol=1e-5, rtol=1e-5)
    mask = _s2_element_mask(67, 16, 1, 3, 2, 4)
    mask[..., -1, :] = True  # the decoded token sees everything, the prompt stays S2
    torch.testing.assert_close(last[:, 0], _logits(base, ids, attention_mask=mask)[:, -1], atol=1e-5, rtol=1e-5)


def test_static_cache_runs_dense_not_misplaced(base):
    """A static cache holds empty slots after the real keys, so queries are not the last Sq keys:
    the S2 layout must not be applied there (it would be misplaced); the exact masked path runs."""
    from transformers import StaticCache

    model = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3)
    ids = _ids(1, 41)
    outs = []
    with torch.no_grad():
        for m in (base, model):
            cache = StaticCache(config=base.config, max_cache_len=64)
            prefill = m(ids[:, :40], past_key_values=cache, use_cache=True).logits
            step = m(ids[:, 40:], past_key_values=cache, use_cache=True).logits
            outs.append(torch.cat((prefill, step), 1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_layers_option_keeps_other_layers_dense(base):
    model = _patched(base, "s2", layers=[1], block_size=16, local_blocks=1, vert_stride=3)
    kinds = {i: p.name for i, p in sparse_patterns(model).items()}
    assert kinds == {0: "dense", 1: "s2"}
    assert model.config.sparse_attention["layers"] == [1]


def test_backward_gives_finite_gradients(base):
    model = _patched(base, "s2", block_size=16, local_blocks=2, vert_stride=4).train()
    ids = _ids(2, 60)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def first_and_diagonal(q, k):
    """Importable block_mask layout_fn (block 16): key block 0 and the query's own block."""
    mq, mk = -(-q.shape[2] // 16), -(-k.shape[2] // 16)
    r = torch.arange(mq)[:, None] + (mk - mq)
    c = torch.arange(mk)[None, :]
    return ((c == 0) | (c == r))[None, None]


register_layout_fn("tests.first_and_diagonal", first_and_diagonal)


def test_block_mask_method(base):
    model = _patched(base, "block_mask", layout_fn=first_and_diagonal, block_size=16)
    ids = _ids(1, 70)
    m = -(-70 // 16)
    keep = torch.zeros(m, m, dtype=torch.bool)
    for i in range(m):
        keep[i, 0] = keep[i, i] = True
    e = keep.repeat_interleave(16, 0)[:70].repeat_interleave(16, 1)[:, :70] & torch.ones(70, 70).bool().tril()
    torch.testing.assert_close(_logits(model, ids), _logits(base, ids, attention_mask=e[None, None]),
                               atol=1e-5, rtol=1e-5)
    assert model.config.sparse_attention["options"]["layout_fn"] == "tests.first_and_diagonal"
    by_name = _patched(base, "block_mask", layout_fn="tests.first_and_diagonal", block_size=16)
    torch.testing.assert_close(_logits(by_name, ids), _logits(model, ids), atol=0, rtol=0)


def test_saved_configs_name_no_code_and_no_files(base, tmp_path, monkeypatch):
    """A model directory is untrusted data: a config.json naming a module to import (even one
    sitting next to it) or a gates path to read is refused before anything runs or is read."""
    register()
    model = _patched(base, "block_mask", layout_fn=first_and_diagonal, block_size=16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_attn").eval()
    ids = _ids(1, 40)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)  # by registered name

    marker = tmp_path / "payload_ran"
    (tmp_path / "sa_evil_payload.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                                 "def fn(q, k):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg_path = tmp_path / "config.json"
    good = json.loads(cfg_path.read_text())
    for name in ("sa_evil_payload:fn", "os:system"):
        cfg = copy.deepcopy(good)
        cfg["sparse_attention"]["options"]["layout_fn"] = name
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="not a registered layout function name"):
            AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_attn")
    assert not marker.exists()

    seer = _patched(base, "seer", block_size=16, gate=dict(hidden_size=32))
    seer.save_pretrained(tmp_path / "seer")
    cfg_path = tmp_path / "seer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sparse_attention"]["options"]["gates"] = str(tmp_path / "anywhere")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="may not name gates"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "seer", attn_implementation="sparse_attn")


# ------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------
def test_save_and_load_keep_the_method(base, tmp_path):
    model = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["sparse_attention"]
    assert saved["method"] == "s2" and saved["options"]["vert_stride"] == 3
    register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_attn").eval()
    assert {p.name for p in sparse_patterns(loaded).values()} == {"s2"}
    ids = _ids(1, 60)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)


def test_seer_gates_survive_save_and_load(base, tmp_path):
    from sparse_attn.patterns.seer import save_gates

    model = _patched(base, "seer", block_size=16, threshold=0.2, decode_gate=True, gate=dict(hidden_size=32))
    torch.manual_seed(5)
    with torch.no_grad():  # "learned" weights: anything but the fresh init
        for name, p in model.named_parameters():
            if "sparse_pattern" in name:
                p.normal_()
    ids = _ids(2, 70)
    want = _logits(model, ids)
    assert torch.isfinite(want).all()
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="sparse_attn").eval()
    state, state2 = model.state_dict(), loaded.state_dict()
    gate_keys = [k for k in state if "sparse_pattern" in k]
    assert gate_keys and all(torch.equal(state[k], state2[k]) for k in gate_keys)
    torch.testing.assert_close(_logits(loaded, ids), want, atol=0, rtol=0)
    # loaded with sdpa: the gates load too (unused), and apply_sparse_attention(model) switches to them
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="sdpa").eval()
    torch.testing.assert_close(_logits(plain, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(apply_sparse_attention(plain), ids), want, atol=0, rtol=0)
    # the gates alone, through save_gates / gates=path
    save_gates(tmp_path / "gates", collect_gates(model), {"base": "tiny"})
    again = _patched(base, "seer", gates=str(tmp_path / "gates"), threshold=0.2)
    torch.testing.assert_close(_logits(again, ids), want, atol=0, rtol=0)


def test_pattern_weights_missing_from_a_checkpoint_get_their_own_init(base, tmp_path):
    """A config asking for seer over a checkpoint without gate weights: the gates must get their
    own initialisation, not uninitialised memory (the model's _init_weights does not know them)."""
    base.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sparse_attention"] = _patched(base, "seer", block_size=16).config.sparse_attention
    (tmp_path / "config.json").write_text(json.dumps(config))
    register()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_attn")
    for p in sparse_patterns(loaded).values():
        q_bound, k_bound = p.gate.q_weight.shape[1] ** -0.5, p.gate.k_weight.shape[1] ** -0.5  # per-head Linear init
        assert 0 < p.gate.q_weight.abs().max() <= q_bound and 0 < p.gate.k_bias.abs().max() <= k_bound
    assert torch.isfinite(_logits(loaded, _ids(1, 40))).all()


# ------------------------------------------------------------------------------------------------
# Seer: prefill, decode gate in generate(), the distillation hook
# ------------------------------------------------------------------------------------------------
def test_seer_generate_and_distillation(base):
    model = _patched(base, "seer", block_size=16, threshold=0.3, decode_gate=True, gate=dict(hidden_size=32))
    ids = _ids(2, 70)
    sparse = _logits(model, ids)
    dense = _logits(base, ids)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-4
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones_like(ids))
    assert out.shape == (2, 82)
    assert all(p._decode_cache.length == 81 for p in sparse_patterns(model).values())  # decode gate fed
    padded, mask = _left_padded()
    out = model.generate(padded, max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=mask)
    assert out.shape == (3, 46)

    for p in sparse_patterns(model).values():
        p.distill = True
    logits = model(ids).logits  # the dense output, while the gates get their losses
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=1e-5)
    losses = [p.last_loss for p in sparse_patterns(model).values()]
    assert all(torch.isfinite(x) and x > 0 for x in losses)
    sum(losses).backward()
    assert all(p.gate.q_weight.grad.abs().sum() > 0 for p in sparse_patterns(model).values())


def test_seer_on_a_model_with_q_norm():
    """Qwen3-style attention normalises q/k per head after the projection: the pre-RoPE capture
    hooks the norms there. Dense is still exact; seer runs and differs."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256)
    base = Qwen3ForCausalLM(cfg).eval()
    base.set_attn_implementation("sdpa")
    ids = _ids(1, 40)
    dense = _patched(base, "dense")
    torch.testing.assert_close(_logits(dense, ids), _logits(base, ids), atol=1e-5, rtol=1e-5)
    seer = _patched(base, "seer", block_size=16, topk=1, keep_first=0, keep_last=1)
    attn = seer.model.layers[0].self_attn
    normed, seen = {}, {}
    attn.q_norm.register_forward_hook(lambda m, a, out: normed.update(q=out.transpose(1, 2)))
    attn.k_norm.register_forward_hook(lambda m, a, out: normed.update(k=out.transpose(1, 2)))
    attn.sparse_pattern.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    got = _logits(seer, ids)
    assert torch.isfinite(got).all() and (got - _logits(base, ids)).abs().max() > 1e-4
    assert torch.equal(seen["q_pre"], normed["q"]) and torch.equal(seen["k_pre"], normed["k"])
    assert seen["q_pre"].shape == (1, 4, 40, 16)


# ------------------------------------------------------------------------------------------------
# torch.compile, the mask function, errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # none may be left
@pytest.mark.parametrize("method,opts", [("dense", {}), ("s2", dict(block_size=16, local_blocks=1, vert_stride=2))])
def test_torch_compile_fullgraph(base, method, opts):
    torch._dynamo.reset()
    model = _patched(base, method, **opts)
    ids = _ids(1, 40)
    want = _logits(model, ids, use_cache=False)
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mask_function():
    assert sparse_attention_mask(2, 5, 5) is None  # prefill, no padding
    assert sparse_attention_mask(2, 1, 9, q_offset=8) is None  # decode
    assert sparse_attention_mask(2, 4, 9, q_offset=5, attention_mask=torch.ones(2, 9, dtype=torch.bool)) is None
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, :2] = False
    mask = sparse_attention_mask(2, 6, 6, attention_mask=pad)
    want = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    assert torch.equal(mask, want)
    # a static-cache prefill (keys past the queries are empty slots) must not be read as bottom-right
    static = sparse_attention_mask(1, 4, 8, attention_mask=torch.ones(1, 4, dtype=torch.bool))
    assert static is not None and not static[0, 0, :, 4:].any()


def test_errors(base):
    with pytest.raises(ValueError, match="method must be one of"):
        _patched(base, "nope")
    with pytest.raises(ValueError, match="needs layout_fn"):
        _patched(base, "block_mask")
    with pytest.raises(ValueError, match="layers must be"):
        _patched(base, "s2", layers=[5])
    with pytest.raises(TypeError, match="model must be"):
        apply_sparse_attention(torch.nn.Linear(2, 2), "dense")
    model = _patched(base, "dense").train()
    model.model.layers[0].self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(_ids(1, 10))


@pytest.mark.gpu
@pytest.mark.parametrize("method,opts", [("dense", {}), ("s2", dict(block_size=64, local_blocks=2, vert_stride=4))])
def test_cuda_bf16_error_at_most_twice_sdpas(base, method, opts):
    """On the GPU (Triton kernels, bf16): our logits' error against an fp32 CPU reference is at
    most about twice sdpa's own bf16 error; generate() runs through the decode path."""
    ids = _ids(2, 300)
    mask = None if method == "dense" else _s2_element_mask(300, 64, 2, 4, 2, 4)
    ref = _logits(base, ids, attention_mask=mask)
    sdpa = copy.deepcopy(base).to("cuda", torch.bfloat16)
    ours = _patched(base, method, **opts).to("cuda", torch.bfloat16)
    cuda_mask = None if mask is None else mask.cuda()
    err_sdpa = (_logits(sdpa, ids.cuda(), attention_mask=cuda_mask).float().cpu() - ref).abs().max()
    err_ours = (_logits(ours, ids.cuda()).float().cpu() - ref).abs().max()
    assert err_ours <= 2 * err_sdpa + 1e-2, (err_ours, err_sdpa)
    out = ours.generate(ids[:, :100].cuda(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 108)


@pytest.mark.parametrize("method,opts", [("s2", dict(block_size=16, local_blocks=1, vert_stride=2)),
                                         ("seer", dict(block_size=16, topk=1))])
def test_the_callers_config_is_left_alone(method, opts, tmp_path):
    """apply_sparse_attention changes the model, not the config object it was built from: a model
    built later from that object is a plain model (no patterns, same weights under the same seed)."""
    cfg = _config()
    torch.manual_seed(0)
    plain = LlamaForCausalLM(cfg).eval()
    before = cfg.to_dict()
    torch.manual_seed(0)
    patched = apply_sparse_attention(LlamaForCausalLM(cfg).eval(), method, **opts)
    assert cfg.to_dict() == before and not hasattr(cfg, "sparse_attention")
    assert patched.config is not cfg and patched.config.sparse_attention["method"] == method
    # every submodule that shared the config follows the model's own copy
    assert all(m.config is patched.config for m in patched.modules() if "config" in m.__dict__)
    torch.manual_seed(0)
    later = LlamaForCausalLM(cfg).eval()
    assert not any(hasattr(m, "sparse_pattern") for m in later.modules())
    for (name, a), b in zip(plain.state_dict().items(), later.state_dict().values()):
        assert torch.equal(a, b), name
    ids = _ids(1, 40)
    with torch.no_grad():
        assert torch.equal(later(ids).logits, plain(ids).logits)
        sparse = patched(ids).logits
    assert not torch.allclose(sparse, plain(ids).logits, atol=1e-4)  # the patched one is sparse
    patched.save_pretrained(tmp_path)  # its own config travels with it
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_attn").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, sparse)


# ------------------------------------------------------------------------------------------------
# Seer: the authors' checkpoint directories, selection defaults and saved selection options
# ------------------------------------------------------------------------------------------------
def test_seer_default_selection_is_a_density(base):
    model = _patched(base, "seer", block_size=16)
    for p in sparse_patterns(model).values():
        assert p.select["density"] == 0.2 and p.select["threshold"] is None
    assert model.config.sparse_attention["options"]["density"] == 0.2


def test_seer_gates_from_an_authors_prefill_directory(tmp_path):
    from test_seer_compat import LLAMA, write_author_dir

    from sparse_attn.patterns import load_gates

    torch.manual_seed(3)
    tiny = LlamaForCausalLM(_config(hidden_size=32)).eval()  # 4 heads of 8, 2 KV heads, 2 layers: LLAMA's
    tiny.set_attn_implementation("sdpa")
    write_author_dir(tmp_path / "a", {**LLAMA, "seerattn_threshold": 5e-3})
    model = _patched(tiny, "seer", gates=str(tmp_path / "a"))  # the format is detected
    gates, _ = load_gates(tmp_path / "a")
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    authors_rule = dict(threshold=5e-3, strict=True, keep_first=0, keep_last=0, dense_last_rows=2)
    for idx, p in sparse_patterns(model).items():
        assert p.block_size == 16 and p.gate.rope_positions == "token" and p.gate.q_weight is None
        assert torch.equal(p.gate(q, k), gates[str(idx)]["prefill"](q, k))
        assert {k_: p.select[k_] for k_ in authors_rule} == authors_rule  # their rule, from their config
    ids = _ids(2, 50)
    assert torch.isfinite(_logits(model, ids)).all()
    # the caller's rule replaces theirs; the caller's other options override theirs one by one
    mine = _patched(tiny, "seer", gates=str(tmp_path / "a"), density=0.5, keep_last=1)
    p = sparse_patterns(mine)[0]
    assert p.select["density"] == 0.5 and p.select["threshold"] is None
    assert p.select["keep_last"] == 1 and p.select["keep_first"] == 0 and p.select["dense_last_rows"] == 2
    # a training config (threshold 0: dense) selects nothing: our default applies
    write_author_dir(tmp_path / "b", LLAMA)
    assert sparse_patterns(_patched(tiny, "seer", gates=str(tmp_path / "b")))[1].select["density"] == 0.2
    with pytest.raises(ValueError, match="head_dim=8, the model has head_dim=16"):  # another model's gates
        _patched(LlamaForCausalLM(_config(hidden_size=64)), "seer", gates=str(tmp_path / "a"))


def test_seer_decode_gates_from_an_authors_directory_on_qwen3(tmp_path):
    """SeerAttention-R gates (decode only, Qproj, q/k norm): prefill stays dense (exactly sdpa's),
    generate() decodes sparsely with the authors' gates."""
    from test_seer_compat import QWEN3, write_author_dir
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(4)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=256,
                      rope_theta=1000.0)
    qwen = Qwen3ForCausalLM(cfg).eval()
    qwen.set_attn_implementation("sdpa")
    write_author_dir(tmp_path / "r", {**QWEN3, "seerattn_sparsity_method": "token_budget",
                                      "seerattn_token_budget": 16})
    model = _patched(qwen, "seer", gates=str(tmp_path / "r"))
    patterns = sparse_patterns(model)
    assert all(p.gate is None and p.decode_gate.own_block == "excluded" and p.select["topk"] == 1
               for p in patterns.values())
    ids = _ids(1, 70)
    torch.testing.assert_close(_logits(model, ids), _logits(qwen, ids), atol=1e-5, rtol=1e-5)
    seen = _spy_kv_blocks(patterns[0])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert out.shape == (1, 76) and patterns[0]._decode_cache.length == 75
    assert len(seen) == 5  # one per decode step (the dense prefill takes the layout path)
    bs = patterns[0].block_size
    for step, (sk, (kv_num, kv_idx)) in enumerate(seen):  # top-1 of the earlier blocks; the op adds the own one
        assert sk == 71 + step and kv_num.shape == (1, 2) and kv_num.eq(1).all()
        assert (kv_idx[..., 0] < (sk - 1) // bs).all()
    assert list(collect_gates(model)["0"].keys()) == ["decode"]


def _spy_kv_blocks(pattern):
    """Record ``(Sk, kv_blocks)`` of each decode step that runs on sparse_decode with block lists."""
    seen, inner = [], pattern.kv_blocks

    def spy(q, k, **kw):
        out = inner(q, k, **kw)
        if isinstance(out, tuple):
            seen.append((k.shape[2], out))
        return out

    pattern.kv_blocks = spy
    return seen


# ------------------------------------------------------------------------------------------------
# Decode on sparse_decode; generate() with the S2 cache (shards only)
# ------------------------------------------------------------------------------------------------
def _tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_s2_generate_keeps_only_the_shards(base):
    """generate() on an S2 model uses S2Cache: token for token (and logits) the generation with
    transformers' full DynamicCache (whose decode runs sparse_decode with the S2 config in closed
    form), both equal to sdpa on the generated text under the S2 element mask, and the S2 cache's
    tensors take less memory than the full cache's."""
    from transformers import DynamicCache

    from sparse_attn.integrations.s2_hf_cache import S2Cache, S2CacheLayer

    model = _patched(base, "s2", block_size=16, local_blocks=2, vert_stride=3)
    ids = _ids(2, 90, seed=3)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    shard = model.generate(ids, **kw)
    full = model.generate(ids, past_key_values=DynamicCache(), **kw)
    cache = shard.past_key_values
    assert isinstance(cache, S2Cache) and all(isinstance(layer, S2CacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 105 and type(full.past_key_values) is DynamicCache
    assert torch.equal(shard.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(shard.logits), torch.stack(full.logits), atol=1e-5, rtol=1e-5)
    # independent: sdpa over the generated text with S2's element mask predicts every new token
    seq = shard.sequences
    want = _logits(base, seq[:, :-1], attention_mask=_s2_element_mask(105, 16, 2, 3, 2, 4))[:, 89:]
    torch.testing.assert_close(torch.stack(shard.logits, 1), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(want.argmax(-1), seq[:, 90:])
    # memory, measured on the tensors each cache holds
    s2_bytes = sum(_tensor_bytes(layer.s2._k_s, layer.s2._v_s, layer.s2._k_d, layer.s2._v_d) for layer in cache.layers)
    full_bytes = sum(_tensor_bytes(layer.keys, layer.values) for layer in full.past_key_values.layers)
    assert s2_bytes == cache.memory_bytes() and full_bytes == cache.full_cache_bytes()
    assert s2_bytes <= 0.7 * full_bytes, (s2_bytes, full_bytes)  # 5 of 7 blocks per head at 105 tokens


def test_s2_cache_with_dense_heads_beams_and_dense_layers(base):
    """S2Cache with a dense KV head, beam search (reorder_cache gathers rows) and a layer left
    dense (a DynamicLayer in the same cache): the same sequences as with the full cache."""
    from transformers import DynamicCache, DynamicLayer

    from sparse_attn.integrations.s2_hf_cache import S2CacheLayer

    model = _patched(base, "s2", layers=[1], block_size=16, local_blocks=1, vert_stride=2, num_dense_heads=1)
    ids = _ids(1, 40, seed=4)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=2, pad_token_id=0, return_dict_in_generate=True)
    shard = model.generate(ids, **kw)
    full = model.generate(ids, past_key_values=DynamicCache(), **kw)
    assert [type(layer) for layer in shard.past_key_values.layers] == [DynamicLayer, S2CacheLayer]
    assert torch.equal(shard.sequences, full.sequences)


def test_s2_cache_fallbacks_and_errors(base):
    """The full cache for padded batches and s2_cache=False; clear errors where S2Cache cannot serve."""
    from transformers import DynamicCache

    from sparse_attn.integrations.transformers import S2Cache

    model = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3)
    kw = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    padded, mask = _left_padded()
    assert type(model.generate(padded, attention_mask=mask, **kw).past_key_values) is DynamicCache
    off = _patched(base, "s2", block_size=16, local_blocks=1, vert_stride=3, s2_cache=False)
    assert off.config.sparse_attention["options"]["s2_cache"] is False
    assert type(off.generate(_ids(1, 20), **kw).past_key_values) is DynamicCache
    with pytest.raises(ValueError, match="S2Cache needs a model patched"):
        S2Cache(_patched(base, "dense"))
    with torch.no_grad():
        cache = S2Cache(model)
        model(_ids(1, 20), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="one token at a time"):
            model(_ids(1, 3), past_key_values=cache, use_cache=True)
        with pytest.raises(NotImplementedError, match="cannot roll back"):
            cache.crop(-1)
        with pytest.raises(ValueError, match="unpadded batch"):
            model(padded, attention_mask=mask, past_key_values=S2Cache(model), use_cache=True)


def test_seer_decode_on_sparse_decode_equals_the_layout_path(base):
    """generate() with Seer's decode gate: each step runs sparse_decode on the gate's block lists,
    and gives the tokens and logits of the layout path (sparse_attention with the same selection)."""
    model = _patched(base, "seer", block_size=16, topk=1, decode_gate=True, gate=dict(hidden_size=32))
    torch.manual_seed(6)
    with torch.no_grad():  # "learned" gates: anything but the fresh init
        for name, p in model.named_parameters():
            if "sparse_pattern" in name:
                p.normal_()
    layout_path = copy.deepcopy(model)
    for p in sparse_patterns(layout_path).values():
        p.kv_blocks = lambda *a, **kw: NotImplemented  # pattern_attention falls back to the layout
    seen = _spy_kv_blocks(sparse_patterns(model)[1])
    ids = _ids(2, 70, seed=5)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
              attention_mask=torch.ones_like(ids))
    got, want = model.generate(ids, **kw), layout_path.generate(ids, **kw)
    assert len(seen) == 9 and all(kv_num.le(3).all() for _, (kv_num, _) in seen)  # top-1 + forced first/last
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=1e-5)
