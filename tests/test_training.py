"""train_gates / sparse-attn train-gates on a tiny offline Llama: loss falls, files round-trip, resume is exact."""

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn.cli import main as cli_main  # noqa: E402
from sparse_attn.integrations.transformers import apply_sparse_attention, collect_gates  # noqa: E402
from sparse_attn.training import ByteTokenizer, stdlib_corpus, train_gates  # noqa: E402
from sparse_attn.training.data import PackedSequences, tokenize_documents  # noqa: E402


def tiny_model(seed=0, layers=2, vocab=257, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation="sdpa", **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokens():
    tok = ByteTokenizer()
    return tokenize_documents(stdlib_corpus(60_000), tok.encode, tok.eos_token_id)


def gate_state(model):
    return {k: v.clone() for k, v in collect_gates(model).state_dict().items()}


def test_training_reduces_kl_and_freezes_base(tokens, tmp_path):
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items() if "sparse_pattern" not in k}
    apply_sparse_attention(model, method="seer", gates=None, block_size=16, density=0.25)
    before = gate_state(model)
    res = train_gates(model, tokens, steps=25, lr=5e-3, seq_len=128, batch_size=2, progress=False,
                      output_dir=str(tmp_path / "gates"))
    losses = [h["loss"] for h in res["history"]]
    assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    after = gate_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # gates moved
    for k, v in model.state_dict().items():  # base model untouched
        if "sparse_pattern" not in k:
            assert torch.equal(v, base[k]), k
    assert all(not p.requires_grad for n, p in model.named_parameters() if "sparse_pattern" not in n)
    # safetensors + JSON, no pickle; loads onto a fresh copy of the base model with one call
    files = sorted(os.listdir(tmp_path / "gates"))
    assert files[0].startswith("gates-") and files[0].endswith(".safetensors") and files[1:] == ["gates_config.json"]
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    fresh = tiny_model()
    apply_sparse_attention(fresh, method="seer", gates=str(tmp_path / "gates"), block_size=16, density=0.25)
    loaded = gate_state(fresh)
    assert loaded.keys() == after.keys() and all(torch.equal(loaded[k], after[k]) for k in after)
    ids = tokens[:200].view(1, -1)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_continues_exactly(tokens, tmp_path, monkeypatch):
    def run(out, **kw):
        model = tiny_model(seed=1)
        apply_sparse_attention(model, method="seer", gates=None, block_size=16, topk=2)
        torch.manual_seed(1)
        train_gates(model, tokens, steps=8, lr=3e-3, seq_len=64, batch_size=2, progress=False,
                    output_dir=str(out), save_every=4, seed=3, **kw)
        return gate_state(model)

    straight = run(tmp_path / "a")
    calls = {"n": 0}
    real = PackedSequences.batch

    def crash_after_five(self, step):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated crash")
        return real(self, step)

    monkeypatch.setattr(PackedSequences, "batch", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(PackedSequences, "batch", real)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step-000004"]
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    resumed = run(tmp_path / "b", resume=True)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run(tmp_path / "c", resume=True)


def test_cli_train_gates(tmp_path, capsys, monkeypatch):
    model = tiny_model(layers=1)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in stdlib_corpus(20_000)))
    calls = []
    real_load = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # our call uses dtype=, not the deprecated torch_dtype=
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    rc = cli_main(["train-gates", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"),
                   "--out", str(tmp_path / "gates"), "--steps", "3", "--seq-len", "64", "--batch-size", "2",
                   "--block-size", "16", "--no-progress", "--density", "0.3", "--loss", "seerattention"])
    assert rc == 0
    assert calls and all("dtype" in c and "torch_dtype" not in c for c in calls)
    saved = json.loads((tmp_path / "gates" / "gates_config.json").read_text())["config"]
    assert saved["loss"] == "seerattention" and saved["options"]["options"]["density"] == 0.3
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["first_loss"] > 0
    weights = json.loads((tmp_path / "gates" / "gates_config.json").read_text())["weights"]["file"]
    assert (tmp_path / "gates" / weights).is_file()
    assert len(json.loads((tmp_path / "gates" / "train_log.json").read_text())) == 3
    common = ["train-gates", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"),
              "--out", str(tmp_path / "gates"), "--seq-len", "64", "--batch-size", "2", "--block-size", "16",
              "--no-progress", "--save-every", "2"]
    with pytest.raises(SystemExit):  # one rule at most
        cli_main(common + ["--density", "0.2", "--threshold", "0.1"])
    assert cli_main(common + ["--steps", "3"]) == 0
    assert sorted(os.listdir(tmp_path / "gates" / "checkpoints")) == ["step-000002", "step-000003"]
    assert cli_main(common + ["--steps", "4", "--resume", "--keep-checkpoints", "1"]) == 0  # continues at step 3
    assert sorted(os.listdir(tmp_path / "gates" / "checkpoints")) == ["step-000004"]
    assert [h["step"] for h in json.loads((tmp_path / "gates" / "train_log.json").read_text())] == [1, 2, 3, 4]
    assert cli_main(["train-gates", "--model", str(tmp_path / "nope"), "--data", "x", "--out", "y"]) == 2


def test_bad_arguments(tokens):
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match="method"):
        train_gates(model, tokens, method="s2", steps=1, seq_len=32, batch_size=1)
    with pytest.raises(ValueError, match="steps"):
        train_gates(model, tokens, steps=0, seq_len=32, batch_size=1)


def _documents(folder, n=6):
    folder.mkdir()
    docs = [d for d in stdlib_corpus(60_000) if d.isascii()][:n]
    for i, doc in enumerate(docs):
        (folder / f"doc{i}.py").write_text(doc)
    return folder, len(docs)


def test_a_separator_the_model_lacks_is_replaced_or_refused_before_training(tmp_path):
    """The byte tokenizer separates documents with id 256; a 256-symbol byte model has no such
    token. The trainer uses the model's eos id instead (with a warning), or refuses with a clear
    error before training when the model has none -- never an IndexError inside the embedding."""
    docs, n_docs = _documents(tmp_path / "docs")
    model = tiny_model(layers=1, vocab=256, eos_token_id=3)
    apply_sparse_attention(model, method="seer", block_size=16)
    with pytest.warns(UserWarning, match="eos_token_id=256.*eos_token_id=3"):
        res = train_gates(model, str(docs), steps=2, seq_len=64, batch_size=1, progress=False)
    assert len(res["history"]) == 2 and all(math.isfinite(h["loss"]) for h in res["history"])
    from sparse_attn.training.trainer import _tokens

    with pytest.warns(UserWarning):
        ids = _tokens(str(docs), None, None, model)
    assert int(ids.max()) < 256 and int((ids == 3).sum()) == n_docs > 1  # one separator after each document
    # no eos the model has: refused, and no training step ran
    none = tiny_model(layers=1, vocab=256, eos_token_id=None)
    apply_sparse_attention(none, method="seer", block_size=16)
    before = gate_state(none)
    with pytest.raises(ValueError, match=r"eos_token_id=256\) is not a token of the model.*256 ids"):
        train_gates(none, str(docs), steps=2, seq_len=64, batch_size=1, progress=False)
    after = gate_state(none)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # token ids the model does not have, from a tensor or a tokenizer that does not fit
    with pytest.raises(ValueError, match="token id 300"):
        train_gates(none, torch.tensor([1, 2, 300] * 100), steps=1, seq_len=32, batch_size=1, progress=False)
    small = tiny_model(layers=1, vocab=100, eos_token_id=3)
    with pytest.raises(ValueError, match="the tokenizer \\(ByteTokenizer\\) gives token id 1\\d\\d"), \
            pytest.warns(UserWarning, match="separator"):
        train_gates(small, ["héllo world " * 50], steps=1, seq_len=32, batch_size=1, progress=False)


def test_saved_selection_options_come_back_with_the_gates(tokens, tmp_path):
    from sparse_attn._files import CorruptFileError
    from sparse_attn.integrations.transformers import sparse_patterns

    model = tiny_model(layers=1)
    apply_sparse_attention(model, method="seer", block_size=16, density=0.1, keep_first=0, dense_last_rows=1)
    train_gates(model, tokens, steps=1, seq_len=64, batch_size=1, progress=False, output_dir=str(tmp_path / "g"))

    def select(**opts):
        fresh = apply_sparse_attention(tiny_model(layers=1), method="seer", gates=str(tmp_path / "g"), **opts)
        return sparse_patterns(fresh)[0].select

    assert select() == dict(threshold=None, topk=None, density=0.1, nz_ratio=None, keep_first=0, keep_last=1,
                            strict=False, dense_last_rows=1, share_gqa=False)
    got = select(topk=3)  # the caller's rule replaces the saved one; the saved modifiers stay
    assert got["topk"] == 3 and got["density"] is None and got["keep_first"] == 0 and got["dense_last_rows"] == 1
    got = select(keep_first=2)  # a modifier alone: the saved rule stays
    assert got["density"] == 0.1 and got["keep_first"] == 2
    cfg_file = tmp_path / "g" / "gates_config.json"
    meta = json.loads(cfg_file.read_text())
    meta["config"]["options"]["options"]["density"] = 7
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError, match="density must be a number") as err:
        select()
    assert str(cfg_file) in str(err.value)


def test_the_authors_loss_trains_and_is_checked(tokens, tmp_path):
    model = tiny_model(layers=1)
    apply_sparse_attention(model, method="seer", block_size=16, decode_gate={"own_block": "excluded"})
    res = train_gates(model, tokens, steps=12, lr=5e-3, seq_len=128, batch_size=2, progress=False,
                      loss="seerattention", output_dir=str(tmp_path / "g"), save_every=6)
    losses = [h["loss"] for h in res["history"]]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert json.loads((tmp_path / "g" / "gates_config.json").read_text())["config"]["loss"] == "seerattention"
    with pytest.raises(ValueError, match="this run has 'sparse_attn'"):  # a resume must keep the loss
        train_gates(model, tokens, steps=14, seq_len=128, batch_size=2, progress=False,
                    output_dir=str(tmp_path / "g"), resume=True)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_gates(model, tokens, steps=1, seq_len=32, batch_size=1, loss="kl")
