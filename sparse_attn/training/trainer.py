"""The gating-network trainer: self-distillation of SeerAttention gates on a frozen model.

One optimisation step:

1. the frozen model runs a normal forward on a packed batch; at every attention layer the
   patched attention (``sparse_attn.integrations.transformers``, pattern in ``distill``
   mode) computes the dense output and, in the same pass, the block max-pooled attention
   map (``attention_block_map``, the target); the layer's gate scores the pre-RoPE q/k and
   the layer stores ``KL(target || softmax(gate logits))`` in ``last_loss`` -- ours, the mean
   over query rows, or with ``loss="seerattention"`` the authors' mean over elements after
   dropping the first quarter of the query-block rows -- (and, when it holds a decode gate, the
   loss against the per-token GQA-max map in ``last_decode_loss``);
2. the loss is the sum over layers; only gate parameters get gradients (the base model's
   parameters are frozen, so no activation of the base model is kept for backward);
3. AdamW, cosine schedule with linear warm-up, optional gradient accumulation.

Gates are saved as safetensors + JSON (:func:`sparse_attn.patterns.seer.save_gates`), never
pickle; checkpoints add the optimiser state (safetensors) and the step counter (JSON). Every
checkpoint is a new directory that appears complete or not at all (see :func:`_save_checkpoint`)
and is verified against its manifest on resume (:func:`_resume`)::

    output_dir/gates_config.json, gates-<hash>.safetensors       the final gates
    output_dir/checkpoints/step-000050/manifest.json              step, size + SHA-256 of each file
                                       trainer_state.json         step, run config, history, optimiser scalars
                                       optimizer.safetensors      optimiser tensors
                                       gates_config.json, gates-<hash>.safetensors
    output_dir/checkpoints/step-000100/...                        the newest ``keep_checkpoints`` (2)
    output_dir/checkpoints/.tmp-step-000150-<random>/             a save in progress (or interrupted:
                                                                  ignored, removed by the next save)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _files
from .data import ByteTokenizer, PackedSequences, read_documents, tokenize_documents

__all__ = ["TrainConfig", "train_gates", "gate_modules", "cosine_schedule", "CheckpointWarning", "CHECKPOINTS_DIR"]


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
    loss: str = "sparse_attn"


def cosine_schedule(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def gate_modules(model: nn.Module) -> List[nn.Module]:
    """The model's per-layer pattern modules that hold a trainable gate, prefill or decode (in layer order)."""
    from ..integrations.transformers import sparse_patterns

    return [p for _, p in sorted(sparse_patterns(model).items())
            if getattr(p, "gate", None) is not None or getattr(p, "decode_gate", None) is not None]


def _vocab_size(model: nn.Module) -> Optional[int]:
    """How many token ids the model embeds (its input embedding's rows, else ``config.vocab_size``)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def _model_eos(model: nn.Module, vocab: int) -> Optional[int]:
    """The model config's ``eos_token_id`` (the first, if a list) when it is an id the model has."""
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    for cand in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if isinstance(cand, int) and not isinstance(cand, bool) and 0 <= cand < vocab:
            return cand
    return None


def _tokens(data, tokenizer, max_chars: Optional[int], model: Optional[nn.Module] = None) -> torch.Tensor:
    """The training token stream, every id checked against ``model``'s vocabulary before training.

    The document separator is the tokenizer's ``eos_token_id``; when the model has no such id (the
    :class:`ByteTokenizer`'s 256 for a 256-symbol byte model) it is the model's own
    ``eos_token_id`` (with a warning), and without one a ValueError says what to do. Any other id the
    model lacks (a tokenizer that does not fit the model) is a ValueError -- not an IndexError deep
    inside the embedding after the run has started."""
    vocab = None if model is None else _vocab_size(model)
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int32, torch.int64) or data.dim() != 1:
            raise ValueError("a tensor `data` must be a 1-D integer token stream")
        ids = data.long()
        source = "data"
    else:
        tok = tokenizer if tokenizer is not None else ByteTokenizer()
        if isinstance(tok, ByteTokenizer):
            encode = tok.encode
        else:  # a Hugging Face tokenizer: no BOS inside packed sequences
            encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        eos = getattr(tok, "eos_token_id", None)
        if eos is not None and vocab is not None and not 0 <= int(eos) < vocab:
            alt = _model_eos(model, vocab)
            if alt is None:
                raise ValueError(f"the tokenizer's document separator (eos_token_id={eos}) is not a token of the "
                                 f"model, whose vocabulary has {vocab} ids (0..{vocab - 1}), and the model's config "
                                 "names no eos_token_id it has: set model.config.eos_token_id, or give a tokenizer "
                                 "that fits the model")
            warnings.warn(f"the tokenizer's document separator (eos_token_id={eos}) is not a token of the model "
                          f"({vocab} ids); separating documents with the model's eos_token_id={alt} instead",
                          UserWarning, stacklevel=3)
            eos = alt
        ids = tokenize_documents(read_documents(data, max_chars=max_chars), encode, eos)
        source = f"the tokenizer ({type(tok).__name__})"
    if vocab is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{source} gives token id {bad}, but the model's vocabulary has {vocab} ids "
                             f"(0..{vocab - 1}): the tokens do not fit this model")
    return ids


# --------------------------------------------------------------------------------------------------
# Checkpoints: output_dir/checkpoints/step-NNNNNN/, each complete or absent
# --------------------------------------------------------------------------------------------------
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
_CKPT_FORMAT = "sparse_attn.checkpoint"
_CKPT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d{6,12})")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MAX_MANIFEST_BYTES = 1 << 20


class CheckpointWarning(UserWarning):
    """Resume skipped a damaged checkpoint and fell back to an earlier complete one."""


def _checkpoint_dirs(root: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of the ``step-NNNNNN`` directories under ``root``, newest first. Directories
    of interrupted saves (``.tmp-step-*``, ``.old-step-*``) and symbolic links are not listed."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m, path = _STEP_DIR.fullmatch(name), os.path.join(root, name)
        if m and os.path.isdir(path) and not os.path.islink(path):
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def _save_checkpoint(root: str, gates: nn.ModuleDict, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                     history: List[Dict[str, float]], gate_config: Dict[str, Any], keep: int) -> str:
    """Write the checkpoint ``root/step-<step>`` so that it is complete or absent; returns its path.

    The files go into a new directory ``root/.tmp-step-<step>-<random>``: the gates
    (:func:`~sparse_attn.patterns.seer.save_gates`), ``optimizer.safetensors``,
    ``trainer_state.json`` (step, run config, history, optimiser scalars and param groups), then
    ``manifest.json`` (format, step, each file's size and SHA-256, read back from disk), each
    fsynced. The directory is fsynced and renamed to ``step-<step>`` -- the commit point (a
    directory of that name left by an abandoned run is renamed aside first) -- and ``root`` is
    fsynced. Only then are stale entries deleted: leftovers of interrupted saves, checkpoints of a
    later step (an abandoned run, e.g. one found damaged on resume) and all but the newest ``keep``.
    """
    from safetensors.torch import save

    from ..patterns.seer import save_gates

    state = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = val
    meta = {"step": step, "config": asdict(cfg), "history": history, "optimizer_scalars": scalars,
            "param_groups": state["param_groups"]}
    _files.make_dirs(root)
    tmp = _files.make_temp_dir(root, prefix=f".tmp-step-{step:06d}-")
    save_gates(tmp, gates, gate_config)
    _files.write_durable(os.path.join(tmp, OPTIMIZER_FILE), save(tensors))
    _files.write_durable(os.path.join(tmp, TRAINER_STATE), json.dumps(meta, indent=1).encode("utf-8"))
    files = {}
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), "rb") as fh:
            data = fh.read()
        files[name] = {"size": len(data), "sha256": _files.sha256_bytes(data)}
    manifest = {"format": _CKPT_FORMAT, "version": _CKPT_VERSION, "step": step, "files": files}
    _files.write_durable(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode("utf-8"))
    _files.fsync_dir(tmp)
    final = os.path.join(root, f"step-{step:06d}")
    if os.path.lexists(final):
        _files.rename(final, os.path.join(root, f".old-step-{step:06d}-{secrets.token_hex(4)}"))
    _files.rename(tmp, final)
    _files.fsync_dir(root)
    for name in os.listdir(root):
        if name.startswith((".tmp-step-", ".old-step-")):
            _files.rmtree(os.path.join(root, name))
    kept = 0
    for s, d in _checkpoint_dirs(root):
        if s <= step and kept < keep:
            kept += 1
        else:
            _files.rmtree(d)
    return final


def _read_checkpoint(path: str, step: int) -> Dict[str, Any]:
    """Verify the checkpoint directory ``path`` (named for ``step``) and read it; changes nothing.

    Complete means: ``manifest.json`` is valid and lists ``trainer_state.json``,
    ``optimizer.safetensors`` and the gates' JSON; every listed file has the listed size and
    SHA-256; the gates load (:func:`~sparse_attn.patterns.seer.load_gates`, which checks the
    weights against their own hash); and the step agrees in the directory name, the manifest,
    ``trainer_state.json`` and the gates' config. Anything else raises a
    :class:`~sparse_attn._files.CorruptFileError` (or an ``OSError``) naming the file.
    """
    from ..patterns.seer import GATES_CONFIG, load_gates

    mfile = os.path.join(path, MANIFEST)
    man = _files.read_json(mfile, max_bytes=_MAX_MANIFEST_BYTES)
    if (not isinstance(man, dict) or set(man) != {"format", "version", "step", "files"}
            or man["format"] != _CKPT_FORMAT or type(man["version"]) is not int or man["version"] != _CKPT_VERSION):
        raise _files.CorruptFileError(mfile, f"is not a version-{_CKPT_VERSION} sparse_attn checkpoint manifest")
    if type(man["step"]) is not int or man["step"] != step:
        raise _files.CorruptFileError(mfile, f"is for step {str(man['step'])[:20]}, the directory for step {step}")
    files = man["files"]
    if not isinstance(files, dict) or not {TRAINER_STATE, OPTIMIZER_FILE, GATES_CONFIG} <= set(files):
        raise _files.CorruptFileError(mfile, f"must list {TRAINER_STATE}, {OPTIMIZER_FILE} and {GATES_CONFIG}")
    blobs: Dict[str, bytes] = {}
    for name, entry in files.items():
        if not _PLAIN_NAME.fullmatch(name) or ".." in name:
            raise _files.CorruptFileError(mfile, f"lists a file name that is not plain: {name[:80]!r}")
        if (not isinstance(entry, dict) or set(entry) != {"size", "sha256"} or type(entry["size"]) is not int
                or not isinstance(entry["sha256"], str)):
            raise _files.CorruptFileError(mfile, f"entry for {name!r} must be {{'size': int, 'sha256': str}}")
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise _files.CorruptFileError(fpath, f"is missing (listed in {MANIFEST})")
        size = os.path.getsize(fpath)
        if size != entry["size"]:
            raise _files.CorruptFileError(fpath, f"is {size} bytes, {MANIFEST} says {entry['size']}")
        data = _files.read_bytes(fpath, size)
        if _files.sha256_bytes(data) != entry["sha256"]:
            raise _files.CorruptFileError(fpath, f"content does not match its SHA-256 in {MANIFEST}")
        if name in (TRAINER_STATE, OPTIMIZER_FILE):
            blobs[name] = data
    sfile = os.path.join(path, TRAINER_STATE)
    meta = _files.parse_json(blobs[TRAINER_STATE], sfile, allow_nan=True)  # a diverged loss is NaN
    types = {"step": int, "config": dict, "history": list, "optimizer_scalars": dict, "param_groups": list}
    if not isinstance(meta, dict) or any(type(meta.get(k)) is not t for k, t in types.items()):
        want = ", ".join(f"{k}: {t.__name__}" for k, t in types.items())
        raise _files.CorruptFileError(sfile, f"must be an object with {want}")
    if meta["step"] != step:
        raise _files.CorruptFileError(sfile, f"is for step {meta['step']}, the checkpoint for step {step}")
    gates, gate_config = load_gates(path)
    if gate_config.get("trained_steps") != step:
        raise _files.CorruptFileError(os.path.join(path, GATES_CONFIG), f"is for step "
                                      f"{str(gate_config.get('trained_steps'))[:20]}, the checkpoint for step {step}")
    ofile = os.path.join(path, OPTIMIZER_FILE)
    opt_state: Dict[int, Dict[str, Any]] = {}
    tensors = _files.load_safetensors(blobs[OPTIMIZER_FILE], ofile)
    for key, val in [*tensors.items(), *meta["optimizer_scalars"].items()]:
        pid, _, name = key.partition(".")
        if not (pid.isascii() and pid.isdigit() and name):
            raise _files.CorruptFileError(ofile, f"optimizer state key {key[:60]!r} is not '<param id>.<name>'")
        opt_state.setdefault(int(pid), {})[name] = val
    return {"step": step, "config": meta["config"], "history": meta["history"], "gates": gates,
            "optimizer": {"state": opt_state, "param_groups": meta["param_groups"]}}


def _resume(root: str, gates: nn.ModuleDict, opt: torch.optim.Optimizer, cfg: TrainConfig
            ) -> Tuple[int, List[Dict[str, float]]]:
    """Load the newest complete checkpoint under ``root`` into ``gates`` and ``opt``; returns
    ``(step, history)``.

    A damaged newest checkpoint falls back to the one before it, with a :class:`CheckpointWarning`
    naming what was wrong -- never to a mix of files of different checkpoints. No checkpoint: a
    ``FileNotFoundError``; none complete: a ``CorruptFileError`` naming ``root`` and each problem; a
    complete one made with other settings (``seq_len``, ``batch_size``, ...): a ``ValueError``.
    """
    found = _checkpoint_dirs(root)
    if not found:
        legacy = os.path.join(os.path.dirname(root), "checkpoint")
        hint = (f"; {legacy} is a checkpoint of an older sparse_attn without a manifest, which cannot be "
                "verified: resume it with that version, or train again") if os.path.isdir(legacy) else ""
        raise FileNotFoundError(f"resume=True but there is no checkpoint under {root!r}{hint}")
    damaged: List[str] = []
    for step, path in found:
        try:
            ck = _read_checkpoint(path, step)
        except (_files.CorruptFileError, OSError) as e:
            damaged.append(str(e))
            continue
        if damaged:
            warnings.warn(f"skipped damaged checkpoint(s): {'; '.join(damaged)}; resuming from {path}",
                          CheckpointWarning, stacklevel=3)
        ck["config"].setdefault("loss", "sparse_attn")  # checkpoints older than the option
        for key in ("seq_len", "batch_size", "grad_accum", "block_size", "method", "seed", "loss"):
            if ck["config"].get(key) != getattr(cfg, key):
                raise ValueError(f"checkpoint {path!r} was made with {key}={ck['config'].get(key)!r}, "
                                 f"this run has {getattr(cfg, key)!r}")
        try:
            gates.load_state_dict(ck["gates"].state_dict())
            opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"checkpoint {path!r} does not fit this run's gates / optimiser: {e}") from None
        return step, list(ck["history"])
    raise _files.CorruptFileError(root, f"no complete checkpoint to resume from: {'; '.join(damaged)}")


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
    keep_checkpoints: int = 2,
    max_chars: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
    method_options: Optional[Dict[str, Any]] = None,
    loss: str = "sparse_attn",
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
        output_dir: where the gates go (:func:`~sparse_attn.patterns.seer.save_gates`, written
            atomically at the end) and, with ``save_every > 0``, checkpoints: every that many steps
            and at the end into ``output_dir/checkpoints/step-NNNNNN/`` (gates, optimiser state,
            step and history, a manifest of sizes and SHA-256s), each one complete or absent
            whenever the process dies; the newest ``keep_checkpoints`` are kept. A fresh run
            refuses an ``output_dir`` that already holds checkpoints (``FileExistsError``).
        resume: continue from the newest complete checkpoint (verified against its manifest; a
            damaged one falls back to the one before with a :class:`CheckpointWarning`). The
            resumed run ends with the same gates as an uninterrupted one.
        max_chars: read at most this many characters of text.
        progress: a tqdm bar with loss, tokens/s and ETA.
        method_options: extra options for ``apply_sparse_attention`` when gates are attached.
        loss: ``"sparse_attn"`` (ours, default: :func:`~sparse_attn.patterns.seer.distillation_loss`,
            the mean over query rows of each row's KL) or ``"seerattention"`` (the authors':
            :func:`~sparse_attn.patterns.seer.seerattention_loss`, the KL averaged over all elements
            after dropping the first quarter of the query-block rows; decode rows: none dropped,
            their ``loss_slice_ratio`` default). Either way summed over layers (and prefill +
            decode gates).

    Token ids are checked against the model's vocabulary before training starts (see
    :func:`_tokens`): a document separator the model lacks is replaced by the model's
    ``eos_token_id``, with a warning, or refused.

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
    from ..modules.seer import LOSSES

    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, val in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size), ("grad_accum", grad_accum),
                      ("keep_checkpoints", keep_checkpoints)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every must be an int >= 0, got {save_every!r}")
    cfg = TrainConfig(method=method, steps=steps, lr=lr, seq_len=seq_len, batch_size=batch_size,
                      grad_accum=grad_accum, warmup_steps=max(1, steps // 20) if warmup_steps is None else warmup_steps,
                      weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
                      method_options=dict(method_options or {}), loss=loss)
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

    tokens = _tokens(data, tokenizer, max_chars, model)
    packed = PackedSequences(tokens, seq_len, batch_size, seed=seed)
    gate_config = {"method": "seer", "trained_steps": 0, "seq_len": seq_len, "loss": loss,
                   "options": dict(getattr(model.config, "sparse_attention", {}) or {})}

    ckpt = os.path.join(output_dir, CHECKPOINTS_DIR) if output_dir else None
    start, history = 0, []
    if resume:
        if not ckpt:
            raise FileNotFoundError("resume=True needs the output_dir whose checkpoints to continue from")
        start, history = _resume(ckpt, gates, opt, cfg)
    elif ckpt and save_every and _checkpoint_dirs(ckpt):
        raise FileExistsError(f"{ckpt} holds checkpoints of an earlier run (newest: step "
                              f"{_checkpoint_dirs(ckpt)[0][0]}); pass resume=True to continue it, or delete the "
                              "directory to start over")
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
        m.distill_loss = loss
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
                step_loss = sum(m.last_loss for m in patterns if m.last_loss is not None)
                step_loss = step_loss + sum(getattr(m, "last_decode_loss", None) for m in patterns
                                            if getattr(m, "last_decode_loss", None) is not None)
                if not isinstance(step_loss, torch.Tensor):
                    raise RuntimeError("no layer produced a distillation loss: is the model patched with "
                                       "method='seer'?")
                (step_loss / grad_accum).backward()
                total += float(step_loss.detach()) / grad_accum
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
                _save_checkpoint(ckpt, gates, opt, step + 1, cfg, history, {**gate_config, "trained_steps": step + 1},
                                 keep_checkpoints)
    finally:
        for m in patterns:
            m.distill = False
            m.distill_loss = "sparse_attn"
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
            _save_checkpoint(ckpt, gates, opt, steps, cfg, history, {**gate_config, "trained_steps": steps},
                             keep_checkpoints)
    return {"history": history, "gates": gates, "output_dir": output_dir}
