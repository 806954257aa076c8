"""The gating-network trainer: self-distillation of SeerAttention gates on a frozen model.

One optimisation step:

1. the frozen model runs a normal forward on a packed batch; at every attention layer the
   patched attention (``sparse_attn.integrations.transformers``, pattern in ``distill``
   mode) computes the dense output and, in the same pass, the block max-pooled attention
   map (``attention_block_map``, the target); the layer's gate scores the pre-RoPE q/k and
   the layer stores ``KL(target || softmax(gate logits))`` in ``last_loss`` (and, when it holds
   a decode gate, the loss against the per-token GQA-max map in ``last_decode_loss``);
2. the loss is the sum over layers; only gate parameters get gradients (the base model's
   parameters are frozen, so no activation of the base model is kept for backward);
3. AdamW, cosine schedule with linear warm-up, optional gradient accumulation.

Gates are saved as safetensors + JSON (:func:`sparse_attn.patterns.seer.save_gates`), never
pickle; checkpoints add the optimiser state (safetensors) and the step counter (JSON).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .data import ByteTokenizer, PackedSequences, read_documents, tokenize_documents

__all__ = ["TrainConfig", "train_gates", "gate_modules", "cosine_schedule"]


@dataclass
class TrainConfig:
    """Everything that decides a run (stored with checkpoints so a resume can check it)."""

    method: str = "seer"
    steps: int = 100
    lr: float = 1e-3
    seq_len: int = 1024
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    block_size: int = 64
    method_options: Dict[str, Any] = field(default_factory=dict)


def cosine_schedule(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def gate_modules(model: nn.Module) -> List[nn.Module]:
    """The model's per-layer pattern modules that hold a trainable gate (in layer order)."""
    from ..integrations.transformers import sparse_patterns

    return [p for _, p in sorted(sparse_patterns(model).items()) if getattr(p, "gate", None) is not None]


def _tokens(data, tokenizer, max_chars: Optional[int]) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int32, torch.int64) or data.dim() != 1:
            raise ValueError("a tensor `data` must be a 1-D integer token stream")
        return data.long()
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    if isinstance(tok, ByteTokenizer):
        encode = tok.encode
    else:  # a Hugging Face tokenizer: no BOS inside packed sequences
        encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = getattr(tok, "eos_token_id", None)
    return tokenize_documents(read_documents(data, max_chars=max_chars), encode, eos)


def _save_checkpoint(path: str, gates: nn.ModuleDict, opt: torch.optim.Optimizer, step: int,
                     cfg: TrainConfig, history: List[Dict[str, float]], gate_config: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from ..patterns.seer import save_gates

    os.makedirs(path, exist_ok=True)
    save_gates(path, gates, gate_config)
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = val
    save_file(tensors, os.path.join(path, "optimizer.safetensors"))
    with open(os.path.join(path, "trainer_state.json"), "w") as fh:
        json.dump({"step": step, "config": asdict(cfg), "history": history, "optimizer_scalars": scalars,
                   "param_groups": state["param_groups"]}, fh, indent=1)


def _load_checkpoint(path: str, gates: nn.ModuleDict, opt: torch.optim.Optimizer, cfg: TrainConfig):
    from safetensors.torch import load_file

    from ..patterns.seer import load_gates

    with open(os.path.join(path, "trainer_state.json")) as fh:
        meta = json.load(fh)
    for key in ("seq_len", "batch_size", "grad_accum", "block_size", "method", "seed"):
        if meta["config"].get(key) != getattr(cfg, key):
            raise ValueError(f"checkpoint {path!r} was made with {key}={meta['config'].get(key)!r}, "
                             f"this run has {getattr(cfg, key)!r}")
    loaded, _ = load_gates(path)
    gates.load_state_dict(loaded.state_dict())
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    state: Dict[int, Dict[str, Any]] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for key, val in meta["optimizer_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta["history"])


def train_gates(
    model: nn.Module,
    data: Union[str, os.PathLike, Sequence[str], torch.Tensor],
    *,
    method: str = "seer",
    steps: int,
    lr: float = 1e-3,
    seq_len: int,
    batch_size: int,
    grad_accum: int = 1,
    warmup_steps: Optional[int] = None,
    weight_decay: float = 0.0,
    max_grad_norm: Optional[float] = 1.0,
    tokenizer: Any = None,
    output_dir: Optional[str] = None,
    save_every: int = 0,
    resume: bool = False,
    max_chars: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    method_options: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Train the gates of ``model`` by self-distillation; the base model stays frozen.

    Args:
        model: a Hugging Face causal LM (Llama-style). If it has no seer pattern yet, one with
            fresh gates is attached (``apply_sparse_attention(model, method="seer", ...)``).
        data: text source (a ``.txt``/``.jsonl`` file, a folder, or a list of strings) or a 1-D
            token tensor; packed into ``[batch_size, seq_len]`` sequences.
        method: only ``"seer"`` for now.
        steps: optimiser steps (each of ``grad_accum`` micro-batches).
        lr, weight_decay, max_grad_norm: AdamW settings and gradient clipping.
        warmup_steps: linear warm-up (default ``max(1, steps // 20)``), then cosine to 0.1 x lr.
        tokenizer: an HF tokenizer, or None for UTF-8 bytes (:class:`ByteTokenizer`).
        output_dir: where gates (and checkpoints) go; ``save_every > 0`` checkpoints every that
            many steps into ``output_dir/checkpoint``; ``resume=True`` continues from there.
        max_chars: read at most this many characters of text.
        progress: a tqdm bar with loss, tokens/s and ETA.
        method_options: extra options for ``apply_sparse_attention`` when gates are attached.

    Returns:
        ``{"history": [{"step", "loss", "lr", "tokens_per_s"}...], "gates": nn.ModuleDict,
        "output_dir": str | None}``. The loss is summed over layers.

    Example::

        >>> result = train_gates(model, "corpus.txt", steps=200, seq_len=2048, batch_size=4,
        ...                      output_dir="gates/")          # doctest: +SKIP
        >>> model = apply_sparse_attention(model, method="seer", gates="gates/")  # doctest: +SKIP
    """
    if method != "seer":
        raise ValueError(f"method must be 'seer' (the only trainable pattern so far), got {method!r}")
    for name, val in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    cfg = TrainConfig(method=method, steps=steps, lr=lr, seq_len=seq_len, batch_size=batch_size,
                      grad_accum=grad_accum, warmup_steps=max(1, steps // 20) if warmup_steps is None else warmup_steps,
                      weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
                      method_options=dict(method_options or {}))
    torch.manual_seed(seed)

    from ..integrations.transformers import apply_sparse_attention, collect_gates

    if not gate_modules(model):
        apply_sparse_attention(model, method="seer", gates=None, **cfg.method_options)
    patterns = gate_modules(model)
    if not patterns:
        raise RuntimeError("the model has no distillable attention pattern after apply_sparse_attention")
    gates = collect_gates(model)  # {"<layer>": {"prefill": SeerGate, "decode": SeerDecodeGate}}
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(gates.parameters())
    for p in params:
        p.requires_grad_(True)
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    tokens = _tokens(data, tokenizer, max_chars)
    packed = PackedSequences(tokens, seq_len, batch_size, seed=seed)
    gate_config = {"method": "seer", "trained_steps": 0, "seq_len": seq_len,
                   "options": dict(getattr(model.config, "sparse_attention", {}) or {})}

    ckpt = os.path.join(output_dir, "checkpoint") if output_dir else None
    start, history = 0, []
    if resume:
        if not ckpt or not os.path.isfile(os.path.join(ckpt, "trainer_state.json")):
            raise FileNotFoundError(f"resume=True but there is no checkpoint under {ckpt!r}")
        start, history = _load_checkpoint(ckpt, gates, opt, cfg)
    # the learning rate of step s is lr * cosine_schedule(s): a resumed run picks up at `start`
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, cfg), last_epoch=start - 1)

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train-gates", unit="step", dynamic_ncols=True)
    was_training = model.training
    model.eval()  # dropout off: the target must be the model's real attention
    for m in patterns:
        m.distill = True
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(grad_accum):
                ids = packed.batch(step * grad_accum + micro).to(device)
                with amp:
                    model(input_ids=ids, use_cache=False)
                # prefill gates, plus decode gates where the pattern holds one
                loss = sum(m.last_loss for m in patterns if m.last_loss is not None)
                loss = loss + sum(getattr(m, "last_decode_loss", None) for m in patterns
                                  if getattr(m, "last_decode_loss", None) is not None)
                if not isinstance(loss, torch.Tensor):
                    raise RuntimeError("no layer produced a distillation loss: is the model patched with method='seer'?")
                (loss / grad_accum).backward()
                total += float(loss.detach()) / grad_accum
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": total, "lr": opt.param_groups[0]["lr"],
                   "tokens_per_s": grad_accum * batch_size * seq_len / max(dt, 1e-9)}
            history.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            if ckpt and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                _save_checkpoint(ckpt, gates, opt, step + 1, cfg, history, {**gate_config, "trained_steps": step + 1})
    finally:
        for m in patterns:
            m.distill = False
            m.last_loss = None
            if hasattr(m, "last_decode_loss"):
                m.last_decode_loss = None
        model.train(was_training)
        if bar is not None:
            bar.close()
    if output_dir:
        from ..patterns.seer import save_gates

        save_gates(output_dir, gates, {**gate_config, "trained_steps": steps})
        if ckpt and save_every:
            _save_checkpoint(ckpt, gates, opt, steps, cfg, history, {**gate_config, "trained_steps": steps})
    return {"history": history, "gates": gates, "output_dir": output_dir}
