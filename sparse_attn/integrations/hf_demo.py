"""The Hugging Face part of ``python -m sparse_attn.demo``.

* :func:`tiny_model_demo` (any machine, CPU, a second or two): a tiny random Llama built from a
  config, switched with ``apply_sparse_attention``: dense == sdpa (also left-padded), greedy
  ``generate()`` identical, S2 sparse, save/load round trip.
* :func:`prefill_speed_demo` (CUDA, a local model directory): prefill time of sdpa vs sparse
  attention at a long context (32k by default) and the speed-up.
"""

from __future__ import annotations

import copy
import tempfile
import time
from typing import Any, Dict, Optional

import torch

from ..modules.registry import PATTERNS

__all__ = ["tiny_model_demo", "prefill_speed_demo"]

_PROMPT = b"def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"


def tiny_model_demo(seq: int = 200) -> bool:
    """Run the drop-in on a tiny random ``LlamaForCausalLM`` on the CPU; print, return True if all
    checks hold. ``seq``: length of the S2 prompt (bytes of a code snippet, repeated).

    Example::

        >>> tiny_model_demo()
        True
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from .transformers import apply_sparse_attention, register

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    sdpa = LlamaForCausalLM(cfg).eval()
    sdpa.set_attn_implementation("sdpa")
    prompt = torch.tensor(list((_PROMPT * (seq // len(_PROMPT) + 1))[:seq]))[None]
    gen = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    print("Hugging Face drop-in (tiny random Llama, CPU: Hq=4 Hkv=2 D=16, 2 layers)")

    dense = apply_sparse_attention(copy.deepcopy(sdpa), "dense")
    short = prompt[:, :60]
    with torch.no_grad():
        err = (dense(short).logits - sdpa(short).logits).abs().max().item()
        batch = torch.stack([short[0], torch.cat((torch.zeros(17, dtype=torch.long), short[0, :43]))])
        mask = torch.ones_like(batch)
        mask[1, :17] = 0
        real = mask.bool()
        err_pad = (dense(batch, attention_mask=mask).logits - sdpa(batch, attention_mask=mask).logits)[real]
        err_pad = err_pad.abs().max().item()
    same = torch.equal(dense.generate(batch, attention_mask=mask, **gen),
                       sdpa.generate(batch, attention_mask=mask, **gen))
    print(f"  dense      : max |logit - sdpa| {err:.1e}, left-padded batch {err_pad:.1e}; "
          f"greedy generate(20) {'identical' if same else 'DIFFERENT'}")

    opts = dict(block_size=16, local_blocks=2, vert_stride=4)
    s2 = apply_sparse_attention(copy.deepcopy(sdpa), "s2", **opts)
    layout = s2.model.layers[0].self_attn.sparse_pattern(torch.zeros(1, 4, seq, 16), torch.zeros(1, 2, seq, 16))
    m = layout.num_query_blocks
    kept = layout.to_block_mask().sum().item() / layout.shape[1]
    with torch.no_grad():
        diff = (s2(prompt).logits - sdpa(prompt).logits).abs().max().item()
    out_s2, out_sdpa = s2.generate(prompt, **gen), sdpa.generate(prompt, **gen)
    agree = int((out_s2[0, seq:] == out_sdpa[0, seq:]).sum())
    finite = bool(torch.isfinite(s2(prompt).logits).all())
    print(f"  s2         : {opts}: {kept / (m * (m + 1) / 2):.2f} of the causal blocks at S={seq}; "
          f"max |logit - sdpa| {diff:.2f} (sparse, finite={finite}); {agree}/20 greedy tokens as sdpa")

    with tempfile.TemporaryDirectory() as d:
        s2.save_pretrained(d)
        register()
        again = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sparse_attn").eval()
        with torch.no_grad():
            kept_method = again.config.sparse_attention["method"] == "s2"
            same_logits = torch.equal(again(prompt).logits, s2(prompt).logits)
    print(f"  save/load  : from_pretrained(dir, attn_implementation='sparse_attn') -> method "
          f"{again.config.sparse_attention['method']!r}, logits {'identical' if same_logits else 'DIFFERENT'}")
    ok = err < 1e-4 and err_pad < 1e-4 and same and finite and diff > 0 and kept_method and same_logits
    print(f"  check      : {'OK' if ok else 'FAILED'}")
    return ok


def _time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def prefill_speed_demo(model_dir: str, *, method: str = "s2", seq: int = 32768, reps: int = 3,
                       options: Optional[Dict[str, Any]] = None) -> int:
    """Prefill (one forward over ``seq`` tokens, last-token logits only) of the model in
    ``model_dir`` on CUDA in bf16, with sdpa and then with ``apply_sparse_attention(method)``;
    prints both times and the speed-up. Returns a process exit code.

    Example::

        >>> prefill_speed_demo("/models/Llama-3.1-8B", method="s2", seq=32768)
        0
    """
    from transformers import AutoModelForCausalLM

    from .transformers import apply_sparse_attention

    if not torch.cuda.is_available():
        print("  --model needs a CUDA GPU (the prefill speed-up is a GPU measurement)")
        return 2
    if method not in PATTERNS:
        print(f"  --method must be one of {sorted(PATTERNS)}")
        return 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.cuda().eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    @torch.no_grad()
    def prefill():
        return model(ids, use_cache=False, logits_to_keep=1).logits

    name = torch.cuda.get_device_name()
    print(f"Prefill on {name}: {model_dir} ({type(model).__name__}), bf16, S={seq}")
    dense_logits = prefill().float()
    dense_ms = _time_ms(prefill, reps)
    opts = dict(options or {})
    apply_sparse_attention(model, method, **opts)
    sparse_logits = prefill().float()
    sparse_ms = _time_ms(prefill, reps)
    agree = bool(dense_logits.argmax(-1).eq(sparse_logits.argmax(-1)).all())
    print(f"  sdpa        : {dense_ms:9.1f} ms")
    print(f"  {method:<11} : {sparse_ms:9.1f} ms  {model.config.sparse_attention['options']}")
    print(f"  speed-up    : {dense_ms / sparse_ms:.2f}x (whole model forward); next token same as sdpa: {agree}")
    return 0
