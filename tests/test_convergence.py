"""Convergence (Liger-Kernel style): fine-tune one tiny Llama twice from the same weights on the same
byte-level batches of Python standard-library source -- once with dense sdpa attention, once with S2
sparse attention through ``apply_sparse_attention`` -- and check that both losses fall and end close.

Set ``SPARSE_ATTN_RECORD_CONVERGENCE=1`` to also write the curves to
``bench/results/convergence_cpu.json``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import platform
import string
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from sparse_attn.integrations.transformers import apply_sparse_attention  # noqa: E402

STEPS, BATCH, SEQ = 60, 8, 128
S2_OPTIONS = dict(block_size=16, local_blocks=2, vert_stride=4)  # 8 blocks of 16: half the causal blocks
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results",
                       "convergence_cpu.json")


def _corpus() -> torch.Tensor:
    """Bytes of a few standard-library modules' sources (always present, no download)."""
    text = "".join(inspect.getsource(m) for m in (textwrap, string, json.decoder, json.encoder))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def _batches(data: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, data.numel() - SEQ - 1, (STEPS, BATCH), generator=g)
    return [torch.stack([data[s : s + SEQ] for s in row.tolist()]) for row in starts]


def _train(model, batches):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for ids in batches:
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a loaded 2-core runner OpenMP's spinning
    threads can slow them down a hundredfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_s2_converges_like_dense(one_thread):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=SEQ)
    base = LlamaForCausalLM(config)
    base.set_attn_implementation("sdpa")
    batches = _batches(_corpus())
    dense = _train(copy.deepcopy(base), batches)
    s2 = _train(apply_sparse_attention(copy.deepcopy(base), "s2", **S2_OPTIONS), batches)

    if os.environ.get("SPARSE_ATTN_RECORD_CONVERGENCE", "") not in ("", "0"):
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w", encoding="utf-8") as f:
            json.dump({"what": "tiny Llama fine-tune, byte-level stdlib source, same init and batches",
                       "model": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                  "num_attention_heads", "num_key_value_heads")},
                       "steps": STEPS, "batch": BATCH, "seq": SEQ, "lr": 3e-3, "s2": S2_OPTIONS,
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "python": platform.python_version(), "loss_dense": dense, "loss_s2": s2}, f, indent=1)

    def head(x):
        return sum(x[:5]) / 5

    def tail(x):
        return sum(x[-5:]) / 5

    assert all(map(lambda v: v == v and v < 100, dense + s2)), "a loss is NaN or exploded"
    assert tail(dense) < 0.75 * head(dense), f"dense did not learn: {head(dense):.3f} -> {tail(dense):.3f}"
    assert tail(s2) < 0.75 * head(s2), f"S2 did not learn: {head(s2):.3f} -> {tail(s2):.3f}"
    assert abs(head(s2) - head(dense)) < 0.05 * head(dense)  # same start
    assert tail(s2) < 1.1 * tail(dense), f"S2 ends at {tail(s2):.3f}, dense at {tail(dense):.3f}"
