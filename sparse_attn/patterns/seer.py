"""SeerAttention's learned block gate and its distillation losses.

SeerAttention ("SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs") attaches a small
gate to each attention layer of a frozen model. The gate pools the layer's (pre-RoPE) queries and
keys per block, projects them into a small space of its own, applies RoPE there at block
positions, and scores every (query block, key block) pair. The scores go to
:func:`~sparse_attn.patterns.select_blocks`, which turns them into a layout. The gate is trained by
self-distillation against the block max-pooled attention map of the frozen model
(:func:`~sparse_attn.patterns.attention_block_map`) with :func:`distillation_loss` (ours) or
:func:`seerattention_loss` (the authors').

Save / load (:func:`save_gates`, :func:`load_gates`) live in :mod:`~sparse_attn.patterns.seer_io`;
gates built from the authors' tensors (:func:`gate_from_seerattention`,
:func:`decode_gate_from_seerattention`) in :mod:`~sparse_attn.patterns.seer_compat`. Both are
importable from here.

Conventions shared by :class:`SeerGate` and :class:`SeerDecodeGate` (module ``seer_decode``):

* ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]``, GQA by index (query head ``h`` uses key head
  ``h // (Hq // Hkv)``); K projections are never repeated in memory, only broadcast.
* Blocks are aligned to the start of each tensor (query block ``r`` = query rows
  ``[r*b, (r+1)*b)``, key block ``c`` = keys ``[c*b, (c+1)*b)``); a partial last block is pooled
  over its real tokens only (what the authors' ``ceil_mode=True`` pooling does).
* Masking is bottom-right causal on tensor indices, as everywhere in the package: query ``i`` sees
  key ``j`` iff ``j <= i + (Sk - Sq)``. ``position_ids`` never change the mask, only RoPE.
* Positions. ``position_ids`` (``[Sq]`` or ``[B, Sq]``, integer) are the absolute positions of the
  query tokens; by default the queries are the last ``Sq`` of the positions ``0 .. Sk-1``. The keys
  are taken to be contiguous and to end at the last query's position, so key ``j`` sits at
  ``position_ids[:, -1] - (Sk - 1) + j`` (this is what chunked prefill, decode and left-padded
  batches give). RoPE is applied to the projected features (``hidden_size`` dims, rotate-half
  pairing) at each block's *start*: the position of its first token. ``rope_positions`` says in
  which unit:

  - ``"block"`` (ours, the default): that position divided by the block size (a float; for aligned
    blocks the block index). One block step turns the fastest rotary pair by 1 rad and the slowest
    resolve distances up to ``rope_theta`` blocks, so every pair says something about block
    distance, and positions stay ``block_size`` times smaller than the model's own.
  - ``"token"`` (the authors' code: ``position_ids[:, 0::block_size]``): the token position itself.
    One block step turns pair ``i`` by ``block_size * rope_theta**(-2i/hidden)`` rad; for
    ``block_size=64, rope_theta=1e4`` the fastest third of the pairs turn by more than pi per block,
    so between neighbouring blocks they alias. Use it to run the authors' trained gates.

  Either way the logits depend only on relative positions.

Example::

    >>> gate = SeerGate(num_heads=8, num_kv_heads=2, head_dim=64, block_size=64)
    >>> q, k = torch.randn(1, 8, 300, 64), torch.randn(1, 2, 300, 64)
    >>> gate(q, k).shape                     # [B, Hq, Mq, Mk], -inf above the block diagonal
    torch.Size([1, 8, 5, 5])
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import ceil_div
from ..rope import apply_rope, rope_cos_sin
from .select import causal_block_mask

__all__ = ["SeerGate", "SeerDecodeGate", "distillation_loss", "seerattention_loss", "save_gates", "load_gates",
           "gate_from_seerattention", "decode_gate_from_seerattention"]

POOLING_MODES = ("avg", "max", "min")
ROPE_POSITIONS = ("block", "token")


# Names that live in modules importing this one, resolved lazily (no import cycle either way).
_LAZY = {
    "SeerDecodeGate": ".seer_decode",
    "save_gates": ".seer_io",
    "load_gates": ".seer_io",
    "GATES_CONFIG": ".seer_io",
    "GATES_WEIGHTS": ".seer_io",
    "GATE_FORMATS": ".seer_io",
    "gate_from_seerattention": ".seer_compat",
    "decode_gate_from_seerattention": ".seer_compat",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(module, __package__), name)


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by seer_decode.py)
# --------------------------------------------------------------------------------------------------
def _check_pooling(name: str, pooling: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    """A pooling list as a tuple: 1 to 3 *distinct* names from :data:`POOLING_MODES`."""
    if isinstance(pooling, str):
        pooling = (pooling,)
    if not isinstance(pooling, (list, tuple)):
        raise TypeError(f"{name} must be a list of pooling names, got {type(pooling).__name__}")
    modes = tuple(pooling)
    if not modes:
        raise ValueError(f"{name} must name at least one pooling mode")
    for m in modes:
        if not isinstance(m, str) or m not in POOLING_MODES:
            raise ValueError(f"{name} entries must be one of {POOLING_MODES}, got {str(m)[:50]!r}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"{name} must not repeat a mode, got {list(modes)}")
    return modes


def _check_positive_int(name: str, value: Any, limit: int = 1 << 20) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if value > limit:
        raise ValueError(f"{name} must be at most {limit}, got {value}")
    return value


def _check_common_kwargs(num_heads, num_kv_heads, head_dim, block_size, hidden_size, use_rope, rope_theta):
    # every size is bounded (2**20), so that shapes cannot overflow even on the meta device
    for name, v in (
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("block_size", block_size),
        ("hidden_size", hidden_size),
    ):
        _check_positive_int(name, v)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if not isinstance(use_rope, bool):
        raise TypeError(f"use_rope must be a bool, got {type(use_rope).__name__}")
    if use_rope and hidden_size % 2:
        raise ValueError(f"hidden_size must be even when use_rope=True, got {hidden_size}")
    if (not isinstance(rope_theta, (int, float)) or isinstance(rope_theta, bool) or not math.isfinite(rope_theta)
            or rope_theta <= 0):
        raise ValueError(f"rope_theta must be a positive finite number, got {str(rope_theta)[:50]!r}")


#: A gate's ``hidden_size`` may be at most ``max(GATE_HIDDEN_FLOOR, GATE_HIDDEN_PER_HEAD_DIM * D)``
#: for a model of head dim ``D`` (see :func:`check_gate_options`; the paper uses 128).
GATE_HIDDEN_PER_HEAD_DIM = 8
GATE_HIDDEN_FLOOR = 256


def max_gate_hidden_size(head_dim: int) -> int:
    """The largest gate ``hidden_size`` accepted from a config for a model with this head dim."""
    return max(GATE_HIDDEN_FLOOR, GATE_HIDDEN_PER_HEAD_DIM * int(head_dim))


def check_gate_options(options: Dict[str, Any], *, num_heads: int, num_kv_heads: int, head_dim: int,
                       where: str = "gate") -> None:
    """Check gate constructor kwargs against the model they are for, before anything is allocated.

    Configs (a saved model's ``sparse_attention`` options, a ``gates_config.json``) are untrusted
    data, so the sizes they set are bounded by the model's: ``num_heads`` / ``num_kv_heads`` /
    ``head_dim``, where given, must equal the model's; ``hidden_size`` must be an int in
    ``[1, max_gate_hidden_size(head_dim)]``; ``q_pooling`` / ``k_pooling`` lists of distinct modes
    from :data:`POOLING_MODES`. Other keys are left to the gate's constructor.

    Args:
        options: ``SeerGate`` / ``SeerDecodeGate`` kwargs (all or some of them).
        num_heads, num_kv_heads, head_dim: the model's attention layer.
        where: how to name the options in messages.

    Raises:
        TypeError / ValueError naming ``where`` and the key.

    Example::

        >>> check_gate_options({"hidden_size": 4096}, num_heads=32, num_kv_heads=8, head_dim=128)
        Traceback (most recent call last):
        ValueError: gate: hidden_size=4096 is more than 1024, the most allowed for head_dim=128 (...)
    """
    if not isinstance(options, dict):
        raise TypeError(f"{where} must be a dict of gate options, got {type(options).__name__}")
    for key, model in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if key in options and (type(options[key]) is not int or options[key] != model):
            raise ValueError(f"{where}: {key}={str(options[key])[:50]} but the model has {key}={model}")
    if "hidden_size" in options:
        hidden, limit = options["hidden_size"], max_gate_hidden_size(head_dim)
        _check_positive_int(f"{where}: hidden_size", hidden)
        if hidden > limit:
            raise ValueError(f"{where}: hidden_size={hidden} is more than {limit}, the most allowed for "
                             f"head_dim={head_dim} (max({GATE_HIDDEN_FLOOR}, {GATE_HIDDEN_PER_HEAD_DIM} x head_dim))")
    for key in ("q_pooling", "k_pooling"):
        if key in options:
            _check_pooling(f"{where}: {key}", options[key])


def _pool_blocks(x: torch.Tensor, block_size: int, modes: Sequence[str]) -> torch.Tensor:
    """Pool ``x [B, H, S, D]`` per block of ``block_size`` tokens along S.

    Returns float32 ``[B, H, ceil(S/b), D * len(modes)]`` (the modes' features concatenated along
    the last dim, in order). A partial last block is pooled over its real tokens only.
    """
    B, H, S, D = x.shape
    M = ceil_div(S, block_size)
    pad = M * block_size - S
    feats = []
    for mode in modes:
        if mode == "avg":
            xp = F.pad(x, (0, 0, 0, pad)) if pad else x
            total = xp.reshape(B, H, M, block_size, D).sum(dim=3, dtype=torch.float32)
            count = (S - torch.arange(M, device=x.device) * block_size).clamp(max=block_size)
            feats.append(total / count.to(torch.float32)[:, None])
        else:
            fill = float("-inf") if mode == "max" else float("inf")
            xp = F.pad(x, (0, 0, 0, pad), value=fill) if pad else x
            xb = xp.reshape(B, H, M, block_size, D)
            feats.append((xb.amax(dim=3) if mode == "max" else xb.amin(dim=3)).float())
    return torch.cat(feats, dim=-1)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {str(value)[:50]!r}")
    return value


def _init_heads_linear(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    """nn.Linear's default init, per head: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    if weight is None:
        return
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


def _project(feat: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-head linear: ``feat [B, H, N, in]``, ``weight [H, in, out]``, ``bias [H, out]`` or None
    -> float32 ``[B, H, N, out]``."""
    out = torch.einsum("bhni,hio->bhno", feat.to(weight.dtype), weight)
    if bias is not None:
        out = out + bias[:, None, :]
    return out.float()


def _repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """``[B, H, N, F]`` -> ``[B, H * times, N, F]``, head ``h`` repeated for heads ``h*times ..``
    (GQA by index); small tensors only (pooled blocks)."""
    if times == 1:
        return x
    B, H, N, Fd = x.shape
    return x[:, :, None].expand(B, H, times, N, Fd).reshape(B, H * times, N, Fd)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of float32 ``x`` with a per-feature ``weight`` (the authors' gate
    norm: ``weight * x / sqrt(mean(x**2) + eps)``, eps 1e-6)."""
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


ROPE_SCALING_KEYS = {
    "linear": ("rope_type", "factor"),
    "llama3": ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_scaling(value: Any) -> Optional[Dict[str, Any]]:
    """None, or a Hugging Face ``rope_scaling`` dict of type ``"linear"`` or ``"llama3"`` (exactly
    its keys; positive finite numbers) -- what the authors' gates inherit from their model's config."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("rope_type") not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling must be None or a dict with rope_type in {tuple(ROPE_SCALING_KEYS)}, "
                         f"got {str(value)[:80]!r}")
    keys = ROPE_SCALING_KEYS[value["rope_type"]]
    if set(value) != set(keys):
        raise ValueError(f"rope_scaling of type {value['rope_type']!r} must have exactly the keys {list(keys)}, "
                         f"got {sorted(value)[:8]}")
    out: Dict[str, Any] = {"rope_type": value["rope_type"]}
    for key in keys[1:]:
        v = value[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"rope_scaling[{key!r}] must be a positive finite number, got {str(v)[:50]!r}")
        out[key] = int(v) if key == "original_max_position_embeddings" else float(v)
    if out["rope_type"] == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError("rope_scaling: high_freq_factor must be larger than low_freq_factor")
    return out


def _inv_freq(dim: int, theta: float, scaling: Optional[Dict[str, Any]], device) -> torch.Tensor:
    """float32 ``[dim / 2]`` rotary frequencies ``theta ** (-2i / dim)``, rescaled per ``scaling``:
    ``"linear"`` divides them by ``factor``; ``"llama3"`` divides those whose wavelength exceeds
    ``original_max_position_embeddings / low_freq_factor`` by ``factor``, keeps those below
    ``... / high_freq_factor``, and interpolates linearly (in ``original / wavelength``) between."""
    freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if scaling is None:
        return freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return freq / factor
    ratio = scaling["original_max_position_embeddings"] * freq / (2 * math.pi)  # context length / wavelength
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    keep = ((ratio - low) / (high - low)).clamp(0.0, 1.0)  # 0: divide by factor, 1: keep
    return (1.0 - keep) * freq / factor + keep * freq


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float, scaling: Optional[Dict[str, Any]] = None
          ) -> torch.Tensor:
    """Rotate-half RoPE of float32 ``x [B, H, N, dim]`` at float32 positions ``pos [Bp, N]``
    (``Bp`` is 1 or B). Tables are computed on the fly, never a buffer, so casting the module to
    bf16 cannot degrade them."""
    if scaling is None:
        cos, sin = rope_cos_sin(pos, x.shape[-1], theta)  # [Bp, N, dim]
    else:
        angles = pos.to(torch.float32)[..., None] * _inv_freq(x.shape[-1], theta, scaling, x.device)
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
    return apply_rope(x, cos, sin)


def _block_pos(token_pos: torch.Tensor, block_size: int, unit: str = "block") -> torch.Tensor:
    """Integer token positions -> float32 RoPE positions: ``pos / block_size`` (``unit="block"``)
    or ``pos`` itself (``unit="token"``)."""
    pos = token_pos.to(torch.float32)
    return pos / block_size if unit == "block" else pos


def _query_positions(position_ids: Optional[torch.Tensor], B: int, Sq: int, Sk: int, device) -> torch.Tensor:
    """int64 ``[Bp, Sq]`` absolute query positions (``Bp`` = 1 or B), validated."""
    if position_ids is None:
        return (torch.arange(Sq, device=device) + (Sk - Sq)).unsqueeze(0)
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor or None, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[1] != Sq or position_ids.shape[0] not in (1, B):
        raise ValueError(f"position_ids must be [Sq] or [B, Sq] = [{B}, {Sq}], got shape {tuple(position_ids.shape)}")
    return position_ids.to(device=device, dtype=torch.int64)


def _check_qk(q, k, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    for name, t, h in (("q", q, num_heads), ("k", k, num_kv_heads)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.shape[1] != h:
            raise ValueError(f"{name} has {t.shape[1]} heads, the gate was built for {h}")
        if t.shape[3] != head_dim:
            raise ValueError(f"{name} has head dim {t.shape[3]}, the gate was built for head_dim={head_dim}")
        if t.shape[2] == 0:
            raise ValueError(f"{name} has an empty sequence dimension")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")


class _BlockGate(nn.Module):
    """What the prefill and decode gates share: settings, the batched per-head projections
    (``q_weight [Hq', in_q, hidden]`` unless the query is not projected, ``k_weight [Hk',
    D * len(k_pooling), hidden]``, optional biases ``[H', hidden]``), their initialisation and
    the JSON config. Subclasses give the projections' shapes.

    ``_LEGACY_DEFAULTS``: the constructor kwargs added after gate files of format version 2 were
    first written, with the values that reproduce those files' gates; :func:`load_gates` fills
    them in for a file that has none of them (a file with some of them is corrupt)."""

    _LEGACY_DEFAULTS: Dict[str, Any] = {}

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, hidden_size: int,
                 k_pooling: Sequence[str], use_rope: bool, rope_theta: float, *,
                 q_shape: Optional[Tuple[int, int]], k_heads: int, bias: bool, rope_positions: str,
                 q_pooling: Optional[Sequence[str]] = None, qk_norm: bool = False,
                 rope_scaling: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        _check_common_kwargs(num_heads, num_kv_heads, head_dim, block_size, hidden_size, use_rope, rope_theta)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.hidden_size = hidden_size
        if q_pooling is not None:
            self.q_pooling = _check_pooling("q_pooling", q_pooling)
        self.k_pooling = _check_pooling("k_pooling", k_pooling)
        self.use_rope = bool(use_rope)
        self.rope_theta = float(rope_theta)
        self.bias = _check_bool("bias", bias)
        self.rope_positions = _check_choice("rope_positions", rope_positions, ROPE_POSITIONS)
        self.rope_scaling = _check_rope_scaling(rope_scaling)
        if q_shape is None:
            self.register_parameter("q_weight", None)
            self.register_parameter("q_bias", None)
        else:
            self.q_weight = nn.Parameter(torch.empty(q_shape[0], q_shape[1], hidden_size))
            self.register_parameter("q_bias", nn.Parameter(torch.empty(q_shape[0], hidden_size)) if bias else None)
        self.k_weight = nn.Parameter(torch.empty(k_heads, head_dim * len(self.k_pooling), hidden_size))
        self.register_parameter("k_bias", nn.Parameter(torch.empty(k_heads, hidden_size)) if bias else None)
        # RMSNorm weights of the projected q and k ([hidden] each), when the gate normalises them
        self.qk_norm = _check_bool("qk_norm", qk_norm)
        for name in ("q_norm_weight", "k_norm_weight"):
            self.register_parameter(name, nn.Parameter(torch.empty(hidden_size)) if qk_norm else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per projection head (norm weights: ones)."""
        _init_heads_linear(self.q_weight, self.q_bias)
        _init_heads_linear(self.k_weight, self.k_bias)
        with torch.no_grad():
            for w in (self.q_norm_weight, self.k_norm_weight):
                if w is not None:
                    w.fill_(1.0)

    def _rotate(self, x: torch.Tensor, token_pos: torch.Tensor) -> torch.Tensor:
        """RoPE of features ``x [B, H, N, hidden]`` at integer token positions ``token_pos [Bp, N]``
        (converted to this gate's unit, ``rope_positions``); ``x`` itself without ``use_rope``."""
        if not self.use_rope:
            return x
        pos = _block_pos(token_pos, self.block_size, self.rope_positions)
        return _rope(x, pos, self.rope_theta, self.rope_scaling)

    def _extra_config(self) -> Dict[str, Any]:
        return {}

    def get_config(self) -> Dict[str, Any]:
        """Constructor kwargs (JSON-serialisable); ``type(gate)(**gate.get_config())`` rebuilds it."""
        cfg: Dict[str, Any] = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   head_dim=self.head_dim, block_size=self.block_size,
                                   hidden_size=self.hidden_size)
        if hasattr(self, "q_pooling"):
            cfg["q_pooling"] = list(self.q_pooling)
        cfg.update(k_pooling=list(self.k_pooling), use_rope=self.use_rope, rope_theta=self.rope_theta,
                   bias=self.bias, rope_positions=self.rope_positions,
                   rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
                   **self._extra_config())
        return cfg

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.get_config().items())


# --------------------------------------------------------------------------------------------------
# The prefill gate
# --------------------------------------------------------------------------------------------------
K_HEADS = ("kv", "q")


class SeerGate(_BlockGate):
    """SeerAttention's block gate for prefill: scores every (query block, key block) pair.

    Pipeline, per block of ``block_size`` tokens: pool q with each of ``q_pooling`` and k with each
    of ``k_pooling`` (features concatenated in that order: ``D * len(pooling)``), project q per
    query head and k per KV head (or per query head, ``k_heads="q"``) to ``hidden_size`` (batched
    weights ``[H, in, hidden]``), apply RoPE at the blocks' start positions (see the module
    docstring), then ``logits[b, h, r, c] = q_h[r] . k_{h // group}[c] / sqrt(hidden_size)``.

    Block-causal mask (bottom-right): key block ``c`` is allowed for query block ``r`` iff its first
    key ``c*b`` is visible to the last query of block r, i.e. ``c*b <= min((r+1)*b, Sq) - 1 + Sk - Sq``
    -- exactly the blocks that intersect the causal region. Example, ``Sq = Sk = 3 blocks``::

        r\\c 0 1 2          Sq = 2 blocks, Sk = 3 blocks (queries are the last 2 blocks):
        0   1 0 0          r\\c 0 1 2
        1   1 1 0          0   1 1 0
        2   1 1 1          1   1 1 1

    Disallowed entries are ``-inf``; a query block that sees nothing (only possible when
    ``Sq > Sk``) is a row of ``-inf``.

    Args:
        num_heads, num_kv_heads, head_dim: the attention layer's ``Hq``, ``Hkv``, ``D``.
        block_size: tokens per block (the layout's block size; 16/32/64/128 for the kernels).
        hidden_size: the gate's own feature size per head.
        q_pooling, k_pooling: pooling modes from ``("avg", "max", "min")``.
        use_rope, rope_theta: RoPE inside the gate, at block start positions.
        bias: the projections have a bias (ours; the authors' have none).
        q_proj: project the pooled queries (``q_weight [Hq, D * len(q_pooling), hidden]``). False:
            the pooled queries are used as they are (the authors' gate when it has one q pooling
            and ``hidden_size == head_dim``), so ``hidden_size`` must equal
            ``head_dim * len(q_pooling)``.
        k_heads: ``"kv"``: one K projection per KV head, shared by its query heads (ours, and the
            authors' when they project q); ``"q"``: one per *query* head, applied to its KV head's
            pooled keys (the authors' gate without a q projection).
        rope_positions: ``"block"`` (ours) or ``"token"`` (the authors'); see the module docstring.
        rope_scaling: None, or the model's Hugging Face ``rope_scaling`` of type ``"linear"`` or
            ``"llama3"`` (the authors' gates rotate with their model's scaled frequencies, e.g.
            Llama-3.1's ``llama3`` scaling).

    Example::

        >>> gate = SeerGate(4, 2, 32, block_size=16, hidden_size=32)
        >>> q, k = torch.randn(2, 4, 40, 32), torch.randn(2, 2, 50, 32)   # Sq != Sk
        >>> logits = gate(q, k)                                           # [2, 4, 3, 4] float32
        >>> torch.isinf(logits[0, 0]).int().tolist()
        [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    """

    _LEGACY_DEFAULTS = {"bias": True, "q_proj": True, "k_heads": "kv", "rope_positions": "block", "rope_scaling": None}

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 64,
        hidden_size: int = 128,
        q_pooling: Sequence[str] = ("avg",),
        k_pooling: Sequence[str] = ("max", "min", "avg"),
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        bias: bool = True,
        q_proj: bool = True,
        k_heads: str = "kv",
        rope_positions: str = "block",
        rope_scaling: Optional[Dict[str, Any]] = None,
    ) -> None:
        _check_common_kwargs(num_heads, num_kv_heads, head_dim, block_size, hidden_size, use_rope, rope_theta)
        modes = _check_pooling("q_pooling", q_pooling)
        self_q_proj = _check_bool("q_proj", q_proj)
        _check_choice("k_heads", k_heads, K_HEADS)
        if not self_q_proj and hidden_size != head_dim * len(modes):
            raise ValueError(f"q_proj=False uses the pooled queries as they are, so hidden_size must be "
                             f"head_dim * len(q_pooling) = {head_dim * len(modes)}, got {hidden_size}")
        q_shape = (num_heads, head_dim * len(modes)) if self_q_proj else None
        super().__init__(num_heads, num_kv_heads, head_dim, block_size, hidden_size, k_pooling, use_rope,
                         rope_theta, q_shape=q_shape, k_heads=num_heads if k_heads == "q" else num_kv_heads,
                         bias=bias, rope_positions=rope_positions, q_pooling=modes, rope_scaling=rope_scaling)
        self.q_proj = self_q_proj
        self.k_heads = k_heads

    def _extra_config(self) -> Dict[str, Any]:
        return {"q_proj": self.q_proj, "k_heads": self.k_heads}

    def block_mask(self, seq_q: int, seq_k: int, device=None) -> torch.Tensor:
        """The gate's block-causal mask, bool ``[Mq, Mk]`` (True = allowed), bottom-right aligned.

        Example::

            >>> SeerGate(2, 1, 8, block_size=16).block_mask(24, 40).int().tolist()
            [[1, 1, 0], [1, 1, 1]]
        """
        b = self.block_size
        return causal_block_mask(ceil_div(seq_q, b), ceil_div(seq_k, b), b, seq_q, seq_k, device)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Gate logits for every (query block, key block) pair.

        Args:
            q: ``[B, Hq, Sq, D]`` pre-RoPE queries (any float dtype; pooled in float32).
            k: ``[B, Hkv, Sk, D]`` pre-RoPE keys.
            position_ids: optional ``[Sq]`` or ``[B, Sq]`` integer absolute positions of the query
                tokens (RoPE only); default ``Sk - Sq .. Sk - 1``.

        Returns:
            float32 ``[B, Hq, ceil(Sq/b), ceil(Sk/b)]``, ``-inf`` outside the block-causal mask.

        Example::

            >>> gate = SeerGate(2, 1, 16, block_size=16, hidden_size=16)
            >>> gate(torch.randn(1, 2, 33, 16), torch.randn(1, 1, 33, 16)).shape
            torch.Size([1, 2, 3, 3])
        """
        _check_qk(q, k, self.num_heads, self.num_kv_heads, self.head_dim)
        B, Hq, Sq, _ = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        b = self.block_size
        mq, mk = ceil_div(Sq, b), ceil_div(Sk, b)
        qf = _pool_blocks(q, b, self.q_pooling)  # [B, Hq, Mq, D * nq]
        if self.q_weight is not None:
            qf = _project(qf, self.q_weight, self.q_bias)  # [B, Hq, Mq, hid]
        kp = _pool_blocks(k, b, self.k_pooling)  # [B, Hkv, Mk, D * nk]
        if self.k_heads == "q":  # each query head projects its KV head's pooled keys with its own weights
            kp = _repeat_heads(kp, Hq // Hkv)
        kf = _project(kp, self.k_weight, self.k_bias)  # [B, Hkv or Hq, Mk, hid]
        qpos = _query_positions(position_ids, B, Sq, Sk, q.device)  # [Bp, Sq] (validated either way)
        if self.use_rope:
            key0 = qpos[:, -1:] - (Sk - 1)  # position of key 0, [Bp, 1]
            qf = self._rotate(qf, qpos[:, ::b])  # each query block at its first token's position
            kf = self._rotate(kf, key0 + torch.arange(mk, device=q.device) * b)
        if kf.shape[1] == Hq:
            logits = torch.einsum("bhmd,bhnd->bhmn", qf, kf)
        else:
            group = Hq // Hkv
            logits = torch.einsum("bkgmd,bknd->bkgmn", qf.reshape(B, Hkv, group, mq, -1), kf)
        logits = logits.reshape(B, Hq, mq, mk) * (1.0 / math.sqrt(self.hidden_size))
        return logits.masked_fill(~self.block_mask(Sq, Sk, q.device), float("-inf"))


# --------------------------------------------------------------------------------------------------
# Distillation loss
# --------------------------------------------------------------------------------------------------
def _check_loss_inputs(logits, target) -> None:
    """What both distillation losses need of ``logits`` and ``target``: floating-point tensors of
    one shape on one device (TypeError/ValueError naming the argument)."""
    for name, t in (("logits", logits), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if logits.device != target.device:
        raise ValueError(f"logits and target must be on one device, got {logits.device} and {target.device}")


def distillation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(target || softmax(logits))`` along the last dim.

    Rows whose target has no mass (sum 0, e.g. query blocks that see nothing) are ignored; the
    result is 0 when no row has mass. Entries with ``target == 0`` contribute nothing
    (``0 * log 0 = 0``), even where ``logits`` is ``-inf`` (masked blocks): no NaN in the value or
    the gradient. An entry with ``target > 0`` but ``logits = -inf`` gives ``+inf`` (the gate
    forbids a block the teacher attends to -- a mismatched mask, not a numerical accident).
    Differentiable w.r.t. ``logits``; computed in float32.

    Args:
        logits: ``[..., M]`` gate logits (e.g. ``[B, Hq, Mq, Mk]``), ``-inf`` allowed.
        target: same shape, each row a distribution or all zeros (e.g. from
            :func:`~sparse_attn.patterns.attention_block_map`).

    Returns:
        a float32 scalar.

    Example::

        >>> logits = torch.tensor([[0.0, float("-inf")], [1.0, 2.0], [float("-inf")] * 2])
        >>> target = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
        >>> distillation_loss(logits, target)      # row 0: KL 0; row 2 has no mass: ignored
        tensor(0.0601)
    """
    _check_loss_inputs(logits, target)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension")
    x = logits.float()
    t = target.detach().float()
    valid = t.sum(dim=-1) > 0  # [...]
    # Rows with no target mass may be all -inf: give them harmless logits so that neither the
    # log-softmax nor its backward ever sees an all -inf row (its gradient would be NaN).
    x = torch.where(valid[..., None], x, torch.zeros_like(x))
    logp = torch.log_softmax(x, dim=-1)
    logp = logp.masked_fill(t <= 0, 0.0)  # 0 * log q := 0, also where q = 0
    row = torch.xlogy(t, t).sum(dim=-1) - (t * logp).sum(dim=-1)
    row = torch.where(valid, row, torch.zeros_like(row))
    return row.sum() / valid.sum().clamp(min=1).to(row.dtype)


def seerattention_loss(logits: torch.Tensor, target: torch.Tensor, *, drop_first: float = 0.25) -> torch.Tensor:
    """The SeerAttention authors' distillation loss: ``KL(target || softmax(logits))`` averaged over
    *all elements* after dropping the first rows.

    Row ``r`` is a query block (prefill, ``[B, H, Mq, Mk]``) or a query token (decode,
    ``[B, Hkv, Sq, Mk]``). The first ``int(rows * drop_first)`` rows are dropped (the authors' prefill
    drops ``Mq // 4``, "for training stability"; their decode drops ``int(S * loss_slice_ratio)``
    with a default ratio of 0), then the pointwise ``target * (log target - log_softmax(logits))``
    (0 where ``target == 0``) is averaged over every remaining element, masked blocks and rows
    without target mass included -- ``torch.nn.KLDivLoss()``'s default ``"mean"`` reduction.
    Compare :func:`distillation_loss` (ours): the mean over rows *with target mass* of each row's KL
    (a sum over its ``Mk`` entries), no rows dropped. The authors' per-element mean is about ``Mk``
    times smaller, so its scale (and, under gradient clipping, its step size) changes with the
    sequence length; ours does not. The authors also multiply the loss by ``gate_loss_scale = 10``,
    which AdamW ignores (up to eps and gradient clipping); not done here.

    Masked entries (``-inf`` logits, ``target == 0``) contribute 0 and no NaN, also in whole rows of
    ``-inf`` (a decode token in block 0). Differentiable w.r.t. ``logits``; float32.

    Args:
        logits: ``[..., rows, M]`` gate logits, ``-inf`` allowed.
        target: same shape, rows summing to 1 or 0.
        drop_first: fraction of the rows (dim -2) to drop, in ``[0, 1)``.

    Returns:
        a float32 scalar (0 when nothing is left).

    Example::

        >>> logits, target = torch.zeros(1, 1, 4, 2), torch.full((1, 1, 4, 2), 0.5)
        >>> seerattention_loss(logits, target)          # KL 0 everywhere
        tensor(0.)
    """
    _check_loss_inputs(logits, target)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., rows, M], got shape {tuple(logits.shape)}")
    if isinstance(drop_first, bool) or not isinstance(drop_first, (int, float)) or not 0.0 <= drop_first < 1.0:
        raise ValueError(f"drop_first must be a number in [0, 1), got {drop_first!r}")
    start = int(logits.shape[-2] * drop_first)
    x = logits[..., start:, :].float()
    t = target[..., start:, :].detach().float()
    if t.numel() == 0:
        return x.sum() * 0.0
    # a row of only -inf (nothing allowed, so no target mass) gets harmless logits: no NaN forward or back
    dead = torch.isneginf(x).all(dim=-1, keepdim=True)
    x = torch.where(dead, torch.zeros_like(x), x)
    logp = torch.log_softmax(x, dim=-1).masked_fill(t <= 0, 0.0)
    return (torch.xlogy(t, t) - t * logp).sum() / t.numel()

