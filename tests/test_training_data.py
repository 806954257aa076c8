"""Trainer plumbing that needs no model: text reading, packing, schedule, CLI dispatch."""

import json
import math

import pytest
import torch

from sparse_attn.cli import main as cli_main
from sparse_attn.training import ByteTokenizer, PackedSequences, TrainConfig, cosine_schedule, read_documents
from sparse_attn.training import stdlib_corpus
from sparse_attn.training.data import tokenize_documents


def test_read_documents_txt_jsonl_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert list(read_documents(tmp_path)) == ["hello", "one", "two"]
    assert list(read_documents(str(tmp_path / "b.jsonl"))) == ["one", "two"]
    assert list(read_documents(["abc", "defg"], max_chars=5)) == ["abc", "de"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        list(read_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        list(read_documents(tmp_path / "missing.txt"))


def test_byte_tokenizer_and_packing():
    tok = ByteTokenizer()
    ids = tokenize_documents(["ab", "cé"], tok.encode, tok.eos_token_id)
    assert ids.tolist() == [97, 98, 256, 99, 195, 169, 256]
    assert tok.decode(ids.tolist()) == "abcé"
    stream = torch.arange(103)
    packed = PackedSequences(stream, seq_len=10, batch_size=3, seed=1)
    assert len(packed) == 10 and packed.batches_per_epoch == 3
    seen = torch.cat([packed.batch(s) for s in range(3)])
    assert seen.shape == (9, 10)
    # each row is a contiguous window of the stream, rows are distinct windows
    assert bool(((seen[:, 1:] - seen[:, :-1]) == 1).all())
    assert len(set(seen[:, 0].tolist())) == 9 and all(x % 10 == 0 for x in seen[:, 0].tolist())
    assert torch.equal(packed.batch(1), PackedSequences(stream, 10, 3, seed=1).batch(1))  # resumable
    assert not torch.equal(packed.batch(0), packed.batch(3))  # next epoch is reshuffled (seeded)
    with pytest.raises(ValueError, match="fewer than one batch"):
        PackedSequences(stream, seq_len=50, batch_size=3)


def test_cosine_schedule_shape():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [cosine_schedule(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_stdlib_corpus_is_real_text():
    docs = stdlib_corpus(max_chars=200_000)
    assert sum(map(len, docs)) >= 200_000 and any("def " in d for d in docs)


def test_cli_dispatch(capsys):
    assert cli_main([]) == 0 and "train-gates" in capsys.readouterr().out
    assert cli_main(["nope"]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["train-gates", "--help"])
    assert e.value.code == 0
    assert "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_train_gates_without_transformers_names_the_extra(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    assert cli_main(["train-gates", "--model", "m", "--data", "d", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'sparse_attn[train]'" in err and "transformers" in err
