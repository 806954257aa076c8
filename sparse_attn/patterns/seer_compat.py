"""Gates from the SeerAttention authors' trained weights, and their checkpoint directories.

The authors (microsoft/SeerAttention) train one ``AttnGate`` per attention layer and publish, per
model, a directory with the model's ``config.json`` (their ``seerattn_*`` fields added) and
``attn_gate_weights.pth`` (``torch.save`` of the gates' state dict, tensors named as in their
modelling code: ``model.layers.<i>.self_attn.attn_gate.<name>``). This module rebuilds those gates
as :class:`~sparse_attn.patterns.SeerGate` / :class:`~sparse_attn.patterns.SeerDecodeGate` with
the options that reproduce them, so their scores equal the authors' (before softmax, within fp32
rounding, on the allowed blocks; ``-inf`` elsewhere).

Prefill gate (SeerAttention), per layer, state dict of the original module:

* ``mask_linear_q.weight [Hq, D * len(q_pooling), hidden]`` -- only when it projects q (it does
  unless it pools q one way and ``hidden == D``, or was trained with ``force_double``);
* ``mask_linear_k.weight [Hkv, D * len(k_pooling), hidden]`` with a q projection, else
  ``[Hq, D * len(k_pooling), hidden]`` (one K projection per *query* head, applied to its KV
  head's pooled keys).

No biases; RoPE (rotate-half, the model's ``rope_theta`` and ``rope_scaling``) at the *token*
position of each block's first token; scale ``hidden ** -0.5``. Built as ``SeerGate(bias=False,
q_proj=<has q>, k_heads="kv" or "q", rope_positions="token")``.

Decode gate (SeerAttention-R), per layer:

* ``attngate_linear_q.weight``: ``[Hkv, G, D, hidden]`` for ``Qproj`` (``G = Hq // Hkv``),
  ``[Hkv, D, hidden]`` for ``Qavgproj``, absent for ``Qavg`` / ``Qorig``;
* ``attngate_linear_k.weight [Hkv, D * len(k_pooling), hidden]``;
* ``attngate_qnorm.weight``, ``attngate_knorm.weight`` ``[hidden]`` with ``use_qk_norm``.

The query at its token position, key blocks at their first token's, a token scores only the key
blocks before its own. Built as ``SeerDecodeGate(query=..., bias=False, qk_norm=...,
rope_positions="token", own_block="excluded")``.

Not reproduced (a ``ValueError`` says so): RoPE scalings other than ``linear`` / ``llama3``, and
``hidden != head_dim`` with RoPE (the authors' rotary tables have the model's head dim, so they
would rotate only part of the features, or fail).

Example::

    >>> gates, config = load_seerattention_gates("SeerAttention-Llama-3.1-8B-AttnGates")
    >>> gates["0"]["prefill"]                      # a SeerGate holding layer 0's weights
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _files
from .seer import SeerGate, _check_choice, _check_pooling, _check_positive_int, check_gate_options

__all__ = ["gate_from_seerattention", "decode_gate_from_seerattention", "load_seerattention_gates",
           "SEERATTN_CONFIG", "SEERATTN_WEIGHTS"]

SEERATTN_CONFIG = "config.json"
SEERATTN_WEIGHTS = "attn_gate_weights.pth"
#: the authors' names of the decode gate's query forms -> ours
AUTHOR_QUERY_FORMS = {"Qproj": "proj", "Qavgproj": "avg_proj", "Qavg": "avg", "Qorig": "orig"}
_KEY = re.compile(r"(?:.*\.)?layers\.(\d{1,6})\.self_attn\.attn_gate\.([A-Za-z_]+\.weight)")
_MODES = re.compile(r"max|min|avg")
_MAX_CONFIG_BYTES = 1 << 20
_MAX_LAYERS = 4096
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------------------------------
# One layer's tensors -> a gate
# --------------------------------------------------------------------------------------------------
def _prefill_shapes(num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int, q_modes: Sequence[str],
                    k_modes: Sequence[str], has_q: bool) -> Dict[str, Tuple[int, ...]]:
    shapes = {"mask_linear_k.weight": (num_kv_heads if has_q else num_heads, head_dim * len(k_modes), hidden_size)}
    if has_q:
        shapes["mask_linear_q.weight"] = (num_heads, head_dim * len(q_modes), hidden_size)
    return shapes


def _decode_shapes(num_heads: int, num_kv_heads: int, head_dim: int, hidden_size: int, query: str,
                   k_modes: Sequence[str], qk_norm: bool) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {
        "attngate_linear_k.weight": (num_kv_heads, head_dim * len(k_modes), hidden_size)}
    if query == "proj":
        shapes["attngate_linear_q.weight"] = (num_kv_heads, num_heads // num_kv_heads, head_dim, hidden_size)
    elif query == "avg_proj":
        shapes["attngate_linear_q.weight"] = (num_kv_heads, head_dim, hidden_size)
    if qk_norm:
        shapes["attngate_qnorm.weight"] = (hidden_size,)
        shapes["attngate_knorm.weight"] = (hidden_size,)
    return shapes


def _check_state_dict(state_dict: Any, shapes: Dict[str, Tuple[int, ...]], what: str) -> Dict[str, torch.Tensor]:
    """The tensors of ``state_dict`` named in ``shapes``, each checked (floating, that shape); a
    missing or extra name is a ValueError naming it."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    missing = sorted(set(shapes) - set(state_dict))
    extra = sorted(str(k)[:80] for k in set(state_dict) - set(shapes))
    if missing or extra:
        raise ValueError(f"state_dict does not hold the tensors of the authors' {what}: missing {missing}, "
                         f"unexpected {extra[:6]} (expected exactly {sorted(shapes)})")
    out = {}
    for name, shape in shapes.items():
        t = state_dict[name]
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"state_dict[{name!r}] must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"state_dict[{name!r}] has shape {list(t.shape)}, expected {list(shape)}")
        out[name] = t
    return out


def _fill(gate: nn.Module, tensors: Dict[str, torch.Tensor], ref: str) -> nn.Module:
    """Copy ``{our parameter name: tensor}`` into ``gate``, which takes the dtype and device of
    ``tensors[ref]``."""
    like = tensors[ref]
    gate = gate.to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(gate, name).copy_(t)
    return gate


def gate_from_seerattention(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    hidden_size: int,
    q_pooling: Sequence[str] = ("avg",),
    k_pooling: Sequence[str] = ("max", "min", "avg"),
    rope_theta: float = 10000.0,
    rope_scaling: Optional[Dict[str, Any]] = None,
) -> SeerGate:
    """A :class:`~sparse_attn.patterns.SeerGate` that computes the authors' prefill ``AttnGate``.

    ``forward(q, k)`` on pre-RoPE ``q [B, Hq, S, D]``, ``k [B, Hkv, S, D]`` (default positions
    ``0 .. S-1``) gives the authors' gate scores before softmax (pooling with ``ceil_mode``, features
    concatenated in pooling order, per-head projections, RoPE at the block starts' token positions,
    GQA by repeating K, scale ``hidden_size ** -0.5``) on the block-causal region, ``-inf``
    elsewhere, ``[B, Hq, Mq, Mk]``.

    Args:
        state_dict: one layer's ``attn_gate`` tensors under the module's own names
            (``"mask_linear_k.weight"``, and ``"mask_linear_q.weight"`` when it projects q); see the
            module docstring for the shapes. Nothing else.
        num_heads, num_kv_heads, head_dim: the model's attention layer.
        block_size, hidden_size: ``seerattn_gate_block_size``, ``seerattn_gate_hidden_size``.
        q_pooling, k_pooling: the pooling names of the gate type, in order (``"Qavg_Kmaxminavg"``
            -> ``("avg",)``, ``("max", "min", "avg")``).
        rope_theta, rope_scaling: the model's (``rope_scaling``: None, or a ``linear`` / ``llama3``
            Hugging Face dict).

    Returns:
        the gate, in the tensors' dtype and on their device.

    Raises:
        TypeError / ValueError naming the argument or tensor: wrong shapes, missing or extra
        tensors, a missing q projection where the authors' module would have one, or settings the
        gate cannot reproduce (``hidden_size != head_dim`` with RoPE).

    Example::

        >>> sd = {"mask_linear_k.weight": torch.randn(32, 3 * 128, 128)}   # Qavg_Kmaxminavg, Llama-3-8B
        >>> gate = gate_from_seerattention(sd, num_heads=32, num_kv_heads=8, head_dim=128, block_size=64,
        ...                                hidden_size=128, rope_theta=500000.0)
    """
    for name, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("block_size", block_size), ("hidden_size", hidden_size)):
        _check_positive_int(name, v)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    q_modes, k_modes = _check_pooling("q_pooling", q_pooling), _check_pooling("k_pooling", k_pooling)
    if hidden_size != head_dim:
        raise ValueError(f"hidden_size={hidden_size} != head_dim={head_dim}: the authors' models rotate the gate "
                         "features with their head_dim-sized rotary tables, which this gate does not reproduce")
    has_q = isinstance(state_dict, Mapping) and "mask_linear_q.weight" in state_dict
    if not has_q and len(q_modes) > 1:
        raise ValueError("state_dict has no 'mask_linear_q.weight', but the authors' AttnGate projects q whenever it "
                         f"pools q more than one way (q_pooling={list(q_modes)})")
    shapes = _prefill_shapes(num_heads, num_kv_heads, head_dim, hidden_size, q_modes, k_modes, has_q)
    tensors = _check_state_dict(state_dict, shapes, "prefill AttnGate")
    gate = SeerGate(num_heads, num_kv_heads, head_dim, block_size=block_size, hidden_size=hidden_size,
                    q_pooling=q_modes, k_pooling=k_modes, use_rope=True, rope_theta=rope_theta, bias=False,
                    q_proj=has_q, k_heads="kv" if has_q else "q", rope_positions="token", rope_scaling=rope_scaling)
    ours = {"k_weight": tensors["mask_linear_k.weight"]}
    if has_q:
        ours["q_weight"] = tensors["mask_linear_q.weight"]
    return _fill(gate, ours, "k_weight")


def decode_gate_from_seerattention(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    hidden_size: int,
    query: str = "Qproj",
    k_pooling: Sequence[str] = ("max", "min", "avg"),
    qk_norm: bool = False,
    use_rope: bool = True,
    rope_theta: float = 10000.0,
    rope_scaling: Optional[Dict[str, Any]] = None,
):
    """A :class:`~sparse_attn.patterns.SeerDecodeGate` that computes SeerAttention-R's decode gate.

    ``forward(q, k)`` on pre-RoPE ``q [B, Hq, S, D]``, ``k [B, Hkv, S, D]`` (default positions)
    gives, per token and KV head, the authors' scores before softmax, ``[B, Hkv, S, Mk]``: the
    query feature (``query``) against each key block pooled with ``k_pooling``, projected,
    optionally RMS-normalised, both rotated (the token at its position, each block at its first
    token's), scale ``hidden_size ** -0.5``; the token's own block and later ones ``-inf``.
    :meth:`~sparse_attn.patterns.SeerDecodeGate.step` gives the same row incrementally.

    Args:
        state_dict: one layer's ``attn_gate`` tensors under the module's own names (see the module
            docstring).
        num_heads, num_kv_heads, head_dim: the model's attention layer.
        block_size, hidden_size: ``seerattn_gate_block_size``, ``seerattn_gate_hidden_size``.
        query: ``seerattn_q_head_pooling_type``: ``"Qproj"`` (the published checkpoints),
            ``"Qavgproj"``, ``"Qavg"``, ``"Qorig"`` -- or our names ``"proj"``, ``"avg_proj"``,
            ``"avg"``, ``"orig"``.
        k_pooling: the pooling names of ``seerattn_k_seq_pooling_type`` (``"Kmaxminavg"`` ->
            ``("max", "min", "avg")``).
        qk_norm: ``seerattn_use_qk_norm``.
        use_rope: ``seerattn_use_rope``.
        rope_theta, rope_scaling: the model's.

    Returns:
        the gate, in the tensors' dtype and on their device.

    Example::

        >>> sd = {"attngate_linear_q.weight": torch.randn(8, 5, 128, 128),     # Qwen3-14B: 40 / 8 heads
        ...       "attngate_linear_k.weight": torch.randn(8, 3 * 128, 128)}
        >>> gate = decode_gate_from_seerattention(sd, num_heads=40, num_kv_heads=8, head_dim=128,
        ...                                       block_size=64, hidden_size=128, rope_theta=1e6)
    """
    from .seer_decode import QUERY_FORMS, SeerDecodeGate

    for name, v in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                    ("block_size", block_size), ("hidden_size", hidden_size)):
        _check_positive_int(name, v)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    form = AUTHOR_QUERY_FORMS.get(query, query) if isinstance(query, str) else query
    _check_choice("query", form, QUERY_FORMS + tuple(AUTHOR_QUERY_FORMS))
    k_modes = _check_pooling("k_pooling", k_pooling)
    if not isinstance(qk_norm, bool) or not isinstance(use_rope, bool):
        raise TypeError("qk_norm and use_rope must be bools")
    if use_rope and hidden_size != head_dim:
        raise ValueError(f"hidden_size={hidden_size} != head_dim={head_dim}: the authors' models rotate the gate "
                         "features with their head_dim-sized rotary tables, which this gate does not reproduce")
    shapes = _decode_shapes(num_heads, num_kv_heads, head_dim, hidden_size, form, k_modes, qk_norm)
    tensors = _check_state_dict(state_dict, shapes, f"decode AttnGate ({query})")
    gate = SeerDecodeGate(num_heads, num_kv_heads, head_dim, block_size=block_size, hidden_size=hidden_size,
                          k_pooling=k_modes, use_rope=use_rope, rope_theta=rope_theta, query=form, bias=False,
                          qk_norm=qk_norm, rope_positions="token", rope_scaling=rope_scaling, own_block="excluded")
    ours = {"k_weight": tensors["attngate_linear_k.weight"]}
    if "attngate_linear_q.weight" in tensors:
        # Qproj's [Hkv, G, D, hidden] is our [Hkv, G * D, hidden]: the group's heads concatenated, head-major
        ours["q_weight"] = tensors["attngate_linear_q.weight"].reshape(gate.q_weight.shape)
    if qk_norm:
        ours["q_norm_weight"] = tensors["attngate_qnorm.weight"]
        ours["k_norm_weight"] = tensors["attngate_knorm.weight"]
    return _fill(gate, ours, "k_weight")


# --------------------------------------------------------------------------------------------------
# A checkpoint directory
# --------------------------------------------------------------------------------------------------
class _Config:
    """Typed access to an untrusted ``config.json``: every problem is a CorruptFileError naming it."""

    _MISSING = object()

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, dict):
            raise _files.CorruptFileError(path, "must be a JSON object (a model config)")
        self.data, self.path = data, path

    def bad(self, msg: str) -> Exception:
        return _files.CorruptFileError(self.path, msg)

    def get(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is self._MISSING:
                raise self.bad(f"has no {key!r}")
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok or (kind is float and not math.isfinite(value)):
            raise self.bad(f"{key!r} must be a {kind.__name__}, got {str(value)[:60]!r}")
        return value

    def size(self, key: str, default: Any = _MISSING, limit: int = 1 << 20) -> int:
        value = self.get(key, int, default)
        try:
            return _check_positive_int(key, value, limit)
        except (TypeError, ValueError) as e:
            raise self.bad(str(e)) from None

    def modes(self, key: str, prefix: str, default: Any = _MISSING) -> Tuple[str, ...]:
        text = self.get(key, str, default)
        m = re.fullmatch(prefix + r"((?:max|min|avg)+)", text)
        try:
            if m is None:
                raise ValueError(f"is not {prefix} followed by pooling names")
            return _check_pooling(key, _MODES.findall(m.group(1)))
        except (TypeError, ValueError) as e:
            raise self.bad(f"{key}={text[:60]!r}: {e}") from None


def _rope_settings(cfg: _Config) -> Tuple[float, Optional[Dict[str, Any]]]:
    """``(rope_theta, rope_scaling)`` from a transformers config (either the ``rope_theta`` /
    ``rope_scaling`` fields or a newer ``rope_parameters`` dict)."""
    params = cfg.data.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.data.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta, scaling = cfg.data.get("rope_theta", 10000.0), cfg.data.get("rope_scaling")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise cfg.bad(f"rope_theta must be a positive number, got {str(theta)[:40]!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise cfg.bad(f"rope_scaling must be an object or null, got {str(scaling)[:60]!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    from .seer import ROPE_SCALING_KEYS, _check_rope_scaling

    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"{cfg.path}: rope scaling {str(kind)[:40]!r} is not reproduced by the gates (only "
                         f"{', '.join(ROPE_SCALING_KEYS)}); the authors' gates rotate with it")
    picked = {"rope_type": kind, **{k: scaling.get(k) for k in ROPE_SCALING_KEYS[kind][1:]}}
    try:
        return float(theta), _check_rope_scaling(picked)
    except ValueError as e:
        raise cfg.bad(str(e)) from None


def _selection(cfg: _Config, decode: bool, block_size: int) -> Dict[str, Any]:
    """The authors' selection settings as :class:`~sparse_attn.modules.SeerPattern` options, or {}
    when the config selects nothing (their training configs carry threshold 0 / nz_ratio 1: dense)."""
    method = cfg.get("seerattn_sparsity_method", str, "threshold")
    rule: Dict[str, Any] = {}
    if method == "threshold":
        t = cfg.get("seerattn_threshold", float, 0.0)
        if not 0.0 <= t <= 1.0:
            raise cfg.bad(f"seerattn_threshold must lie in [0, 1], got {t}")
        if t > 0:
            rule = {"threshold": t, "strict": True}
    elif method == "nz_ratio" and not decode:
        r = cfg.get("seerattn_nz_ratio", float, 1.0)
        if not 0.0 <= r <= 1.0:
            raise cfg.bad(f"seerattn_nz_ratio must lie in [0, 1], got {r}")
        if r < 1:
            rule = {"nz_ratio": r}
    elif method == "token_budget" and decode:
        rule = {"topk": cfg.size("seerattn_token_budget", limit=1 << 40) // block_size}
    if not rule:
        return {}
    rule.update(keep_first=0, keep_last=0)
    if not decode:
        rule["dense_last_rows"] = 2 if cfg.get("seerattn_last_block_dense", bool, True) else 0
    return rule


def _gate_spec(cfg: _Config, dims: Optional[Dict[str, int]]) -> Dict[str, Any]:
    """What the config says the gates are: kind, layers, builder kwargs, the authors' tensor shapes."""
    heads = cfg.size("num_attention_heads")
    kv = cfg.size("num_key_value_heads", heads)
    head_dim = cfg.data.get("head_dim")
    head_dim = cfg.size("head_dim") if head_dim is not None else cfg.size("hidden_size") // heads
    if head_dim < 1:
        raise cfg.bad("hidden_size // num_attention_heads is 0")
    if heads % kv:
        raise cfg.bad(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    if dims is not None:
        for key, got in (("num_heads", heads), ("num_kv_heads", kv), ("head_dim", head_dim)):
            if got != dims[key]:
                raise ValueError(f"{cfg.path}: the gates are for {key}={got}, the model has {key}={dims[key]}")
    layers = cfg.size("num_hidden_layers", limit=_MAX_LAYERS)
    block = cfg.size("seerattn_gate_block_size")
    hidden = cfg.size("seerattn_gate_hidden_size")
    try:
        check_gate_options({"hidden_size": hidden}, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                           where="seerattn_gate_hidden_size")
    except ValueError as e:
        raise cfg.bad(str(e)) from None
    theta, scaling = _rope_settings(cfg)
    common = dict(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, block_size=block, hidden_size=hidden,
                  rope_theta=theta, rope_scaling=scaling)
    decode = "seerattn_q_head_pooling_type" in cfg.data or "seerattn_k_seq_pooling_type" in cfg.data
    if decode:
        author_query = cfg.get("seerattn_q_head_pooling_type", str, "Qproj")
        if author_query not in AUTHOR_QUERY_FORMS:
            raise cfg.bad(f"seerattn_q_head_pooling_type must be one of {list(AUTHOR_QUERY_FORMS)}, "
                          f"got {author_query[:40]!r}")
        k_modes = cfg.modes("seerattn_k_seq_pooling_type", "K", "Kmaxminavg")
        qk_norm = cfg.get("seerattn_use_qk_norm", bool, False)
        use_rope = cfg.get("seerattn_use_rope", bool, True)
        kwargs = dict(common, query=author_query, k_pooling=k_modes, qk_norm=qk_norm, use_rope=use_rope)
        shapes = _decode_shapes(heads, kv, head_dim, hidden, AUTHOR_QUERY_FORMS[author_query], k_modes, qk_norm)
    elif "seerattn_gate_type" in cfg.data:
        gate_type = cfg.get("seerattn_gate_type", str)
        m = re.fullmatch(r"Q((?:max|min|avg)+)_K((?:max|min|avg)+)", gate_type)
        if m is None:
            raise cfg.bad(f"seerattn_gate_type must look like 'Qavg_Kmaxminavg', got {gate_type[:60]!r}")
        try:
            q_modes = _check_pooling("q_pooling", _MODES.findall(m.group(1)))
            k_modes = _check_pooling("k_pooling", _MODES.findall(m.group(2)))
        except ValueError as e:
            raise cfg.bad(f"seerattn_gate_type={gate_type[:60]!r}: {e}") from None
        force = cfg.get("seerattn_gate_force_double", bool, False)
        has_q = len(q_modes) > 1 or hidden != head_dim or force
        kwargs = dict(common, q_pooling=q_modes, k_pooling=k_modes)
        use_rope = True
        shapes = _prefill_shapes(heads, kv, head_dim, hidden, q_modes, k_modes, has_q)
    else:
        raise cfg.bad("is not a SeerAttention gate config (no seerattn_gate_type, seerattn_q_head_pooling_type or "
                      "seerattn_k_seq_pooling_type)")
    if use_rope and hidden != head_dim:
        raise ValueError(f"{cfg.path}: seerattn_gate_hidden_size={hidden} != head_dim={head_dim}; the authors' models "
                         "rotate the gate features with head_dim-sized rotary tables, which is not reproduced")
    return {"decode": decode, "layers": layers, "kwargs": kwargs, "shapes": shapes,
            "selection": _selection(cfg, decode, block)}


def _read_pth(path: str, max_bytes: int) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` of an untrusted file: the zip format only (no
    legacy pickle), at most ``max_bytes`` (so the storages it can map are bounded before anything is
    read); every failure is a CorruptFileError naming the file."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise _files.CorruptFileError(path, f"is {size} bytes, more than the {max_bytes} that the gates described by "
                                            f"{SEERATTN_CONFIG} can take")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        raise _files.CorruptFileError(path, "is not a torch.save zip archive (legacy pickle files are not read)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the unpickler or zip reader says about a bad file
        raise _files.CorruptFileError(path, f"cannot be read as a weights-only torch checkpoint: "
                                            f"{type(e).__name__}: {str(e)[:200]}") from None


def _split_layers(state: Any, spec: Dict[str, Any], path: str) -> Dict[int, Dict[str, torch.Tensor]]:
    """``{layer: {authors' name: tensor}}``, every name, layer, shape and dtype checked."""
    if not isinstance(state, dict):
        raise _files.CorruptFileError(path, f"must hold a state dict, got {type(state).__name__}")
    shapes, layers = spec["shapes"], spec["layers"]
    per_layer: Dict[int, Dict[str, torch.Tensor]] = {}
    unexpected: List[str] = []
    for key, t in state.items():
        m = _KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None or m.group(2) not in shapes or int(m.group(1)) >= layers:
            unexpected.append(str(key)[:100])
            continue
        layer, name = int(m.group(1)), m.group(2)
        if name in per_layer.get(layer, {}):
            raise _files.CorruptFileError(path, f"holds two tensors for layer {layer}'s {name}")
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise _files.CorruptFileError(path, f"{key[:100]!r} must be a floating-point tensor, got "
                                                f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shapes[name]:
            raise _files.CorruptFileError(path, f"{key[:100]!r} has shape {list(t.shape)}, but {SEERATTN_CONFIG} "
                                                f"says {list(shapes[name])}")
        per_layer.setdefault(layer, {})[name] = t
    if unexpected:
        raise _files.CorruptFileError(path, f"holds tensors that are not the gates {SEERATTN_CONFIG} describes "
                                            f"(layers 0..{layers - 1}, {sorted(shapes)}): {unexpected[:4]}")
    if not per_layer:
        raise _files.CorruptFileError(path, "holds no gate tensors")
    for layer, tensors in sorted(per_layer.items()):
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise _files.CorruptFileError(path, f"layer {layer} lacks {missing}")
    return per_layer


def load_seerattention_gates(
    path: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    model_dims: Any = None,
) -> Tuple[nn.ModuleDict, Dict[str, Any]]:
    """Read an authors' checkpoint directory (``config.json`` + ``attn_gate_weights.pth``).

    Hardened like :func:`~sparse_attn.patterns.seer.load_gates`: the JSON is size-bounded and
    type-checked, its sizes are checked against ``model_dims`` (and bounded by them) before anything
    is allocated, the weights file must be a ``torch.save`` zip archive no larger than the gates the
    config describes can take, and is opened with ``torch.load(weights_only=True, mmap=True)``
    (no code runs, storages are mapped, not read); every tensor's name, layer, shape and dtype is
    checked before the gates are built. A damaged or inconsistent file is a
    :class:`~sparse_attn._files.CorruptFileError` naming it; a missing one a ``FileNotFoundError``;
    settings the gates cannot reproduce a ``ValueError`` naming ``config.json``.

    Args:
        path: the directory.
        device: where the gates go (default CPU); they keep the file's dtype.
        model_dims: the model's ``num_heads``, ``num_kv_heads``, ``head_dim`` (an object or dict),
            which the config must match.

    Returns:
        ``(gates, config)``: ``gates`` an ``nn.ModuleDict`` keyed by layer index (``"0"``, ...) holding
        ``nn.ModuleDict({"prefill": SeerGate})`` (SeerAttention) or ``{"decode": SeerDecodeGate}``
        (SeerAttention-R), for the layers the file holds; ``config`` =
        ``{"format": "seerattention", "kind": "prefill" | "decode", "base_model": str | None,
        "seerattention": {the seerattn_* fields}, "selection": {...}}``, where ``selection`` is
        the authors' selection rule as SeerPattern options (``threshold`` with ``strict=True``,
        ``nz_ratio``, or ``topk`` from a token budget; ``keep_first=0, keep_last=0``,
        ``dense_last_rows=2`` with ``seerattn_last_block_dense``), or ``{}`` when the config selects
        nothing (training configs carry threshold 0: dense).

    Example::

        >>> gates, config = load_seerattention_gates("SeerAttention-Llama-3.1-8B-AttnGates")
        >>> config["kind"], sorted(gates["0"].keys())
        ('prefill', ['prefill'])
    """
    from .seer_io import _MetaFactories, _model_dims

    path = os.fspath(path)
    cfg_file, w_file = os.path.join(path, SEERATTN_CONFIG), os.path.join(path, SEERATTN_WEIGHTS)
    for f in (cfg_file, w_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"path must be a SeerAttention checkpoint directory ({SEERATTN_CONFIG} + "
                                    f"{SEERATTN_WEIGHTS}); missing {f}")
    device = torch.device("cpu" if device is None else device)
    dims = _model_dims(model_dims)
    cfg = _Config(_files.read_json(cfg_file, max_bytes=_MAX_CONFIG_BYTES), cfg_file)
    spec = _gate_spec(cfg, dims)
    builder = decode_gate_from_seerattention if spec["decode"] else gate_from_seerattention
    with _MetaFactories():  # the settings build a gate (no memory) before the file is opened
        try:
            builder({n: torch.empty(s, device="meta") for n, s in spec["shapes"].items()}, **spec["kwargs"])
        except (TypeError, ValueError) as e:
            raise cfg.bad(str(e)[:300]) from None
    elements = sum(math.prod(s) for s in spec["shapes"].values())
    n_tensors = len(spec["shapes"]) * spec["layers"]
    state = _read_pth(w_file, elements * 8 * spec["layers"] + (1 << 20) + 4096 * n_tensors)
    per_layer = _split_layers(state, spec, w_file)
    kind = "decode" if spec["decode"] else "prefill"
    gates = nn.ModuleDict()
    for layer, tensors in sorted(per_layer.items()):
        gate = builder({n: t for n, t in tensors.items()}, **spec["kwargs"])
        gates[str(layer)] = nn.ModuleDict({kind: gate.to(device)})
    base = cfg.data.get("base_model")
    config = {"format": "seerattention", "kind": kind, "base_model": base if isinstance(base, str) else None,
              "seerattention": {k: v for k, v in cfg.data.items() if k.startswith("seerattn_")},
              "selection": spec["selection"]}
    return gates, config
