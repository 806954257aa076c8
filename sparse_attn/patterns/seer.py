"""SeerAttention's learned block gate, its distillation loss, and safetensors save/load of gates.

SeerAttention ("SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs") attaches a small
gate to each attention layer of a frozen model. The gate pools the layer's (pre-RoPE) queries and
keys per block, projects them into a small space of its own, applies RoPE there at *block*
positions, and scores every (query block, key block) pair. The scores go to
:func:`~sparse_attn.patterns.select_blocks`, which turns them into a layout. The gate is trained by
self-distillation against the block max-pooled attention map of the frozen model
(:func:`~sparse_attn.patterns.attention_block_map`) with :func:`distillation_loss`.

Conventions shared by :class:`SeerGate` and :class:`SeerDecodeGate` (module ``seer_decode``):

* ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]``, GQA by index (query head ``h`` uses key head
  ``h // (Hq // Hkv)``); K projections are never repeated in memory, only broadcast.
* Blocks are aligned to the start of each tensor (query block ``r`` = query rows
  ``[r*b, (r+1)*b)``, key block ``c`` = keys ``[c*b, (c+1)*b)``); a partial last block is pooled
  over its real tokens only.
* Masking is bottom-right causal on tensor indices, as everywhere in the package: query ``i`` sees
  key ``j`` iff ``j <= i + (Sk - Sq)``. ``position_ids`` never change the mask, only RoPE.
* Positions. ``position_ids`` (``[Sq]`` or ``[B, Sq]``, integer) are the absolute positions of the
  query tokens; by default the queries are the last ``Sq`` of the positions ``0 .. Sk-1``. The keys
  are taken to be contiguous and to end at the last query's position, so key ``j`` sits at
  ``position_ids[:, -1] - (Sk - 1) + j`` (this is what chunked prefill, decode and left-padded
  batches give). A block's RoPE position is *the position of its first token divided by the block
  size* (a float): for aligned blocks it is the block index, as in the paper, and the relative
  position of two blocks is exactly their token distance in blocks. RoPE is applied to the
  projected features (``hidden_size`` dims, rotate-half pairing), so the logits depend only on
  relative positions.

Example::

    >>> gate = SeerGate(num_heads=8, num_kv_heads=2, head_dim=64, block_size=64)
    >>> q, k = torch.randn(1, 8, 300, 64), torch.randn(1, 2, 300, 64)
    >>> gate(q, k).shape                     # [B, Hq, Mq, Mk], -inf above the block diagonal
    torch.Size([1, 8, 5, 5])
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _files
from ..layout import _ceil_div
from ..rope import apply_rope, rope_cos_sin
from .select import causal_block_mask

__all__ = ["SeerGate", "SeerDecodeGate", "distillation_loss", "save_gates", "load_gates"]

POOLING_MODES = ("avg", "max", "min")


def __getattr__(name: str):
    # SeerDecodeGate lives in seer_decode.py, which imports the helpers below; resolving it lazily
    # keeps either import order free of cycles.
    if name == "SeerDecodeGate":
        from .seer_decode import SeerDecodeGate

        return SeerDecodeGate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

GATES_CONFIG = "gates_config.json"
GATES_WEIGHTS = "gates.safetensors"  # the weights file of format version 1 (still read; version 2 names its own)
_FORMAT = "sparse_attn.gates"
_FORMAT_VERSION = 2  # 2: a content-addressed weights file, named with its size and SHA-256 by the JSON


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
    M = _ceil_div(S, block_size)
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


def _init_heads_linear(weight: torch.Tensor, bias: torch.Tensor) -> None:
    """nn.Linear's default init, per head: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        bias.uniform_(-bound, bound)


def _project(feat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-head linear: ``feat [B, H, N, in]``, ``weight [H, in, out]``, ``bias [H, out]`` ->
    float32 ``[B, H, N, out]``."""
    out = torch.einsum("bhni,hio->bhno", feat.to(weight.dtype), weight) + bias[:, None, :]
    return out.float()


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of float32 ``x [B, H, N, dim]`` at float32 positions ``pos [Bp, N]``
    (``Bp`` is 1 or B; positions in blocks). Tables are computed on the fly, never a buffer, so
    casting the module to bf16 cannot degrade them."""
    cos, sin = rope_cos_sin(pos, x.shape[-1], theta)  # [Bp, N, dim]
    return apply_rope(x, cos, sin)


def _block_pos(token_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Integer token positions -> float32 block positions (``pos / block_size``)."""
    return token_pos.to(torch.float32) / block_size


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
    (``q_weight [Hq', in_q, hidden]``, ``k_weight [Hkv, D * len(k_pooling), hidden]``, biases),
    their initialisation and the JSON config. Subclasses give the query projection's shape."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, hidden_size: int,
                 k_pooling: Sequence[str], use_rope: bool, rope_theta: float,
                 q_pooling: Optional[Sequence[str]] = None) -> None:
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
        q_heads, q_in = self._query_projection_shape()
        self.q_weight = nn.Parameter(torch.empty(q_heads, q_in, hidden_size))
        self.q_bias = nn.Parameter(torch.empty(q_heads, hidden_size))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * len(self.k_pooling), hidden_size))
        self.k_bias = nn.Parameter(torch.empty(num_kv_heads, hidden_size))
        self.reset_parameters()

    def _query_projection_shape(self) -> Tuple[int, int]:
        """``(heads, input features)`` of the query projection."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per projection head."""
        _init_heads_linear(self.q_weight, self.q_bias)
        _init_heads_linear(self.k_weight, self.k_bias)

    def get_config(self) -> Dict[str, Any]:
        """Constructor kwargs (JSON-serialisable); ``type(gate)(**gate.get_config())`` rebuilds it."""
        cfg: Dict[str, Any] = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   head_dim=self.head_dim, block_size=self.block_size,
                                   hidden_size=self.hidden_size)
        if hasattr(self, "q_pooling"):
            cfg["q_pooling"] = list(self.q_pooling)
        cfg.update(k_pooling=list(self.k_pooling), use_rope=self.use_rope, rope_theta=self.rope_theta)
        return cfg

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.get_config().items())


# --------------------------------------------------------------------------------------------------
# The prefill gate
# --------------------------------------------------------------------------------------------------
class SeerGate(_BlockGate):
    """SeerAttention's block gate for prefill: scores every (query block, key block) pair.

    Pipeline, per block of ``block_size`` tokens: pool q with each of ``q_pooling`` and k with each
    of ``k_pooling`` (features concatenated: ``D * len(pooling)``), project q per query head and k
    per KV head to ``hidden_size`` (batched weights ``[H, in, hidden]``), apply RoPE at block
    positions (see the module docstring), then
    ``logits[b, h, r, c] = q_h[r] . k_{h // group}[c] / sqrt(hidden_size)``.

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
        use_rope, rope_theta: RoPE inside the gate, at block positions.

    Example::

        >>> gate = SeerGate(4, 2, 32, block_size=16, hidden_size=32)
        >>> q, k = torch.randn(2, 4, 40, 32), torch.randn(2, 2, 50, 32)   # Sq != Sk
        >>> logits = gate(q, k)                                           # [2, 4, 3, 4] float32
        >>> torch.isinf(logits[0, 0]).int().tolist()
        [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    """

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
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, block_size, hidden_size, k_pooling, use_rope,
                         rope_theta, q_pooling=q_pooling)

    def _query_projection_shape(self) -> Tuple[int, int]:
        return self.num_heads, self.head_dim * len(self.q_pooling)  # per query head, pooled features

    def block_mask(self, seq_q: int, seq_k: int, device=None) -> torch.Tensor:
        """The gate's block-causal mask, bool ``[Mq, Mk]`` (True = allowed), bottom-right aligned.

        Example::

            >>> SeerGate(2, 1, 8, block_size=16).block_mask(24, 40).int().tolist()
            [[1, 1, 0], [1, 1, 1]]
        """
        b = self.block_size
        return causal_block_mask(_ceil_div(seq_q, b), _ceil_div(seq_k, b), b, seq_q, seq_k, device)

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
        mq, mk = _ceil_div(Sq, b), _ceil_div(Sk, b)
        qf = _project(_pool_blocks(q, b, self.q_pooling), self.q_weight, self.q_bias)  # [B, Hq, Mq, hid]
        kf = _project(_pool_blocks(k, b, self.k_pooling), self.k_weight, self.k_bias)  # [B, Hkv, Mk, hid]
        if self.use_rope:
            qpos = _query_positions(position_ids, B, Sq, Sk, q.device)  # [Bp, Sq]
            key0 = qpos[:, -1:] - (Sk - 1)  # position of key 0, [Bp, 1]
            qf = _rope(qf, _block_pos(qpos[:, ::b], b), self.rope_theta)
            kstart = key0 + torch.arange(mk, device=q.device) * b
            kf = _rope(kf, _block_pos(kstart, b), self.rope_theta)
        elif position_ids is not None:
            _query_positions(position_ids, B, Sq, Sk, q.device)  # still validate
        group = Hq // Hkv
        logits = torch.einsum("bkgmd,bknd->bkgmn", qf.view(B, Hkv, group, mq, -1), kf)
        logits = logits.reshape(B, Hq, mq, mk) * (1.0 / math.sqrt(self.hidden_size))
        return logits.masked_fill(~self.block_mask(Sq, Sk, q.device), float("-inf"))


# --------------------------------------------------------------------------------------------------
# Distillation loss
# --------------------------------------------------------------------------------------------------
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
    for name, t in (("logits", logits), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension")
    if logits.device != target.device:
        raise ValueError(f"logits and target must be on one device, got {logits.device} and {target.device}")
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


# --------------------------------------------------------------------------------------------------
# Save / load (safetensors + JSON, never pickle)
# --------------------------------------------------------------------------------------------------
_CONTAINERS = {"torch.nn.ModuleDict": nn.ModuleDict, "torch.nn.ModuleList": nn.ModuleList}
_WEIGHTS_NAME = re.compile(r"gates-[0-9a-f]{16}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_CONFIG_BYTES = 16 << 20  # a gates_config.json is a few hundred bytes per layer
_MAX_GATES = 4096  # gates in one file (a model has one or two per layer)
_MAX_TREE_DEPTH = 8  # containers nested in containers
_GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _gate_classes() -> Dict[str, type]:
    from .seer_decode import SeerDecodeGate

    return {"SeerGate": SeerGate, "SeerDecodeGate": SeerDecodeGate}


def _describe(module: nn.Module, where: str) -> Dict[str, Any]:
    """JSON tree that rebuilds ``module``: containers with children, gates with kwargs."""
    classes = _gate_classes()
    name = type(module).__name__
    if name in classes and type(module) is classes[name]:
        return {"class": name, "kwargs": module.get_config()}
    if type(module) is nn.ModuleDict:
        children = {k: _describe(m, f"{where}.{k}") for k, m in module.items()}
        return {"class": "torch.nn.ModuleDict", "children": children}
    if type(module) is nn.ModuleList:
        items = [_describe(m, f"{where}.{i}") for i, m in enumerate(module)]
        return {"class": "torch.nn.ModuleList", "children": items}
    raise TypeError(
        f"gates{where} is a {type(module).__name__}; save_gates stores SeerGate / SeerDecodeGate modules, "
        "optionally nested in nn.ModuleDict / nn.ModuleList"
    )


def save_gates(path: Union[str, os.PathLike], gates: nn.Module, config: Optional[Dict[str, Any]] = None) -> None:
    """Save gates to a directory, atomically: ``gates_config.json`` + ``gates-<hash>.safetensors``.

    Layout (format version 2)::

        path/gates_config.json           {"format": "sparse_attn.gates", "version": 2,
                                          "weights": {"file": ..., "size": ..., "sha256": ...},
                                          "modules": <tree>, "config": <config>}
        path/gates-<16 hex>.safetensors  the state dict, named by the first 16 hex digits of its SHA-256

    The JSON holds everything needed to rebuild the modules (class name and constructor kwargs of
    every gate, nested in ``nn.ModuleDict`` / ``nn.ModuleList`` containers, e.g. a dict keyed by
    layer index holding ``{"prefill": SeerGate, "decode": SeerDecodeGate}``), the weights file's
    name, size and hash, and the caller's ``config`` (JSON-serialisable: base model name, training
    settings, ...). Nothing is pickled.

    Crash safety: the weights go to a new file (temporary name, fsync, rename), then the JSON that
    names them replaces the old JSON in one ``os.replace`` (temporary file, fsync, replace,
    directory fsync); only then are weight files the JSON no longer names deleted (also a version-1
    ``gates.safetensors``). A crash at any point leaves the old gates or the new ones readable by
    :func:`load_gates`, never a mix, plus at most unreferenced files that the next save removes.
    One writer per directory at a time.

    Args:
        path: directory (created if missing).
        gates: a gate, or containers of gates.
        config: free-form JSON-serialisable dict (no NaN/Infinity, nested at most 63 levels),
            returned by :func:`load_gates`.

    Raises:
        TypeError / ValueError for what :func:`load_gates` would refuse (other module types,
        more than 4096 gates or containers nested more than 8 deep, such a ``config``); nothing is
        written then.

    Example::

        >>> gates = nn.ModuleDict({"0": nn.ModuleDict({"prefill": SeerGate(4, 2, 32)})})
        >>> save_gates("out/gates", gates, {"base_model": "tiny-llama"})
        >>> loaded, config = load_gates("out/gates")
    """
    from safetensors.torch import save

    if not isinstance(gates, nn.Module):
        raise TypeError(f"gates must be an nn.Module, got {type(gates).__name__}")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    tree = _describe(gates, "")
    names = [n for n, m in gates.named_modules(remove_duplicate=False) if type(m) in _gate_classes().values()]
    if len(names) > _MAX_GATES or max((n.count(".") + 1 for n in names if n), default=0) > _MAX_TREE_DEPTH:
        raise ValueError(f"save_gates stores at most {_MAX_GATES} gates in containers nested at most "
                         f"{_MAX_TREE_DEPTH} deep (load_gates refuses more)")
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"config must be JSON-serialisable (no NaN/Infinity): {e}") from None
    if _files.json_depth(config) > _files.MAX_JSON_DEPTH - 1:
        raise ValueError(f"config nests deeper than {_files.MAX_JSON_DEPTH - 1} levels; load_gates would refuse it")
    # clone: safetensors refuses tensors that share storage (a gate reused under two names)
    state = gates.state_dict()
    tensors = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format) for name, t in state.items()}
    payload = save(tensors, metadata={"format": _FORMAT})
    digest = _files.sha256_bytes(payload)
    weights = f"gates-{digest[:16]}.safetensors"
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION,
            "weights": {"file": weights, "size": len(payload), "sha256": digest}, "modules": tree, "config": config}
    text = (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode("utf-8")
    if len(text) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{GATES_CONFIG} would be {len(text)} bytes, more than load_gates reads ({_MAX_CONFIG_BYTES})")
    path = os.fspath(path)
    _files.make_dirs(path)
    _files.atomic_write(os.path.join(path, weights), payload)  # a new name: the old JSON still names the old file
    _files.atomic_write(os.path.join(path, GATES_CONFIG), text)  # the commit point
    for name in sorted(os.listdir(path)):  # what no JSON names any more, and leftovers of crashed saves
        stale = name != weights and (_WEIGHTS_NAME.fullmatch(name) or name == GATES_WEIGHTS)
        if stale or _files.is_temp_name(name, "gates"):
            _files.remove(os.path.join(path, name))


class _MetaFactories(TorchDispatchMode):
    """Inside, every op that takes a ``device`` (the factories: empty, zeros, rand, ...) makes a
    ``meta`` tensor: modules get their shapes but no memory. Unlike ``with torch.device("meta")``
    this acts at the dispatcher, so a wrapped ``torch.empty`` cannot bypass it (torch's device
    context recognises factory functions by identity, cached at first use)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def _model_dims(model_dims: Any) -> Optional[Dict[str, int]]:
    if model_dims is None:
        return None
    keys = ("num_heads", "num_kv_heads", "head_dim")
    if isinstance(model_dims, dict):
        dims = {k: model_dims.get(k) for k in keys}
    else:
        dims = {k: getattr(model_dims, k, None) for k in keys}
    for k, v in dims.items():
        _check_positive_int(f"model_dims[{k!r}]", v)
    return dims


def _weights_entry(meta: Any, path: str, cfg_file: str) -> Tuple[str, Optional[Tuple[int, str]]]:
    """Check the JSON's top level; ``(weights file, (size, sha256) or None for version 1)``."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _files.CorruptFileError(cfg_file, "is not a sparse_attn gates config (no format 'sparse_attn.gates')")
    version = meta.get("version")
    if type(version) is not int or version not in (1, _FORMAT_VERSION):
        raise _files.CorruptFileError(cfg_file, f"has format version {str(version)[:20]!r}; this code reads 1 and "
                                                f"{_FORMAT_VERSION}")
    keys = {"format", "version", "modules", "config"} | ({"weights"} if version >= 2 else set())
    if set(meta) != keys:
        raise _files.CorruptFileError(cfg_file, f"top-level keys must be {sorted(keys)}, got {sorted(meta)[:10]}")
    if not isinstance(meta["config"], dict):
        raise _files.CorruptFileError(cfg_file, "'config' must be a JSON object")
    if version == 1:
        return os.path.join(path, GATES_WEIGHTS), None
    w = meta["weights"]
    if not isinstance(w, dict) or set(w) != {"file", "size", "sha256"}:
        raise _files.CorruptFileError(cfg_file, "'weights' must be an object with exactly file, size, sha256")
    name, size, digest = w["file"], w["size"], w["sha256"]
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise _files.CorruptFileError(cfg_file, "'weights.sha256' must be 64 lowercase hex digits")
    if not isinstance(name, str) or name != f"gates-{digest[:16]}.safetensors":
        raise _files.CorruptFileError(cfg_file, f"'weights.file' must be gates-<first 16 hex digits of sha256>"
                                                f".safetensors, got {str(name)[:80]!r}")
    if type(size) is not int or size < 8:
        raise _files.CorruptFileError(cfg_file, f"'weights.size' must be an int >= 8, got {str(size)[:20]!r}")
    return os.path.join(path, name), (size, digest)


def _build(node: Any, where: str, cfg_file: str, dims: Optional[Dict[str, int]], count: list, depth: int = 0
           ) -> nn.Module:
    """Rebuild the module tree of a gates JSON (call under :class:`_MetaFactories`: nothing is
    allocated); every problem is a CorruptFileError naming ``cfg_file`` and the entry."""

    def bad(msg: str) -> Exception:
        return _files.CorruptFileError(cfg_file, f"gates{where}: {msg}")

    if depth > _MAX_TREE_DEPTH:
        raise bad(f"modules nest deeper than {_MAX_TREE_DEPTH} levels")
    if not isinstance(node, dict) or not isinstance(node.get("class"), str):
        raise bad("is not a module description (an object with a 'class' string)")
    cls_name = node["class"]
    if cls_name in _CONTAINERS:
        if set(node) != {"class", "children"}:
            raise bad(f"a {cls_name} entry must have exactly 'class' and 'children', got {sorted(node)[:10]}")
        children = node["children"]
        try:
            if cls_name == "torch.nn.ModuleDict":
                if not isinstance(children, dict):
                    raise bad("'children' of a ModuleDict must be a JSON object")
                return nn.ModuleDict({k: _build(v, f"{where}.{k}", cfg_file, dims, count, depth + 1)
                                      for k, v in children.items()})
            if not isinstance(children, list):
                raise bad("'children' of a ModuleList must be a JSON list")
            return nn.ModuleList([_build(v, f"{where}.{i}", cfg_file, dims, count, depth + 1)
                                  for i, v in enumerate(children)])
        except (KeyError, TypeError) as e:  # a child name nn.Module refuses ("a.b", "", "training")
            raise bad(f"bad child name ({e})"[:300]) from None
    classes = _gate_classes()
    if cls_name not in classes:
        raise _files.CorruptFileError(cfg_file, f"unknown class {cls_name[:100]!r} at gates{where}")
    count[0] += 1
    if count[0] > _MAX_GATES:
        raise bad(f"more than {_MAX_GATES} gates")
    if set(node) != {"class", "kwargs"}:
        raise bad(f"a {cls_name} entry must have exactly 'class' and 'kwargs', got {sorted(node)[:10]}")
    kwargs = node["kwargs"]
    if not isinstance(kwargs, dict):
        raise bad("'kwargs' must be a JSON object")
    names = set(inspect.signature(classes[cls_name].__init__).parameters) - {"self"}
    if set(kwargs) != names:
        raise bad(f"{cls_name} kwargs must be exactly {sorted(names)}; missing {sorted(names - set(kwargs))}, "
                  f"unexpected {sorted(set(kwargs) - names)[:5]}"[:400])
    try:
        if dims is not None:
            check_gate_options(kwargs, **dims, where=f"gates{where}")
        return classes[cls_name](**kwargs)
    except (TypeError, ValueError, AttributeError) as e:  # AttributeError: SeerGate(q_pooling=None)
        raise bad(str(e)[:300]) from None


def _check_tensors(gates: nn.Module, header: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], weights_file: str,
                   cfg_file: str) -> None:
    """The safetensors header must hold exactly the modules' tensors, with their shapes, in a
    floating dtype, one dtype per gate."""
    want = {name: tuple(t.shape) for name, t in gates.state_dict(keep_vars=True).items()}
    missing, unexpected = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing or unexpected:
        raise _files.CorruptFileError(weights_file, f"tensors do not match {cfg_file}: missing {missing[:4]}, "
                                                    f"unexpected {[n[:60] for n in unexpected[:4]]}")
    for name, shape in want.items():
        dtype, got = header[name]
        if got != shape:
            raise _files.CorruptFileError(weights_file, f"tensor {name!r} has shape {list(got)}, but {cfg_file} "
                                                        f"declares {list(shape)}")
        if dtype not in _GATE_DTYPES:
            raise _files.CorruptFileError(weights_file, f"tensor {name!r} has dtype {dtype}; gate weights are "
                                                        "floating point")
    classes = tuple(_gate_classes().values())
    for prefix, module in gates.named_modules():
        if isinstance(module, classes):
            dtypes = {header[f"{prefix}.{n}" if prefix else n][0] for n, _ in module.named_parameters()}
            if len(dtypes) > 1:
                raise _files.CorruptFileError(weights_file, f"gate {prefix or '(root)'!r} mixes dtypes "
                                                            f"{sorted(map(str, dtypes))}")


def load_gates(
    path: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    model_dims: Any = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load gates saved by :func:`save_gates` (format version 2, or version 1): ``(gates, config)``.

    Everything in the directory is treated as untrusted: the JSON is size- and depth-bounded and
    type-checked; the modules are built on the ``meta`` device (nothing allocated) and every
    parameter's name and shape is checked against the safetensors header (read without the data);
    the weights file's size and SHA-256 are checked against the JSON (version 2); only then are the
    tensors read, keeping the saved dtype, onto ``device`` (default CPU). A damaged or inconsistent
    file is a :class:`~sparse_attn._files.CorruptFileError` (a ``ValueError``) whose message starts
    with that file's path; a missing directory or JSON is a ``FileNotFoundError``.

    Args:
        path: a directory written by :func:`save_gates`.
        device: where the tensors go.
        model_dims: the model the gates are for (an object or dict with ``num_heads``,
            ``num_kv_heads``, ``head_dim``, e.g. an ``AttentionSpec``): every gate must have these,
            and sizes are bounded by them (:func:`check_gate_options`) before anything is built.

    Example::

        >>> gates, config = load_gates("out/gates", device="cuda")
        >>> gates["0"]["prefill"](q, k)      # logits [B, Hq, Mq, Mk]
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, GATES_CONFIG)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"path must be a directory written by save_gates; missing {cfg_file}")
    device = torch.device("cpu" if device is None else device)
    dims = _model_dims(model_dims)
    meta = _files.read_json(cfg_file, max_bytes=_MAX_CONFIG_BYTES)
    weights_file, expected = _weights_entry(meta, path, cfg_file)
    if not os.path.isfile(weights_file):
        if expected is None:
            raise FileNotFoundError(f"path must be a directory written by save_gates; missing {weights_file}")
        raise _files.CorruptFileError(weights_file, f"is missing (named by {cfg_file})")
    size = os.path.getsize(weights_file)
    if expected is not None and size != expected[0]:
        raise _files.CorruptFileError(weights_file, f"is {size} bytes, {cfg_file} says {expected[0]}")
    header = _files.safetensors_header(weights_file)
    with _MetaFactories():
        gates = _build(meta["modules"], "", cfg_file, dims, [0])
    _check_tensors(gates, header, weights_file, cfg_file)
    data = _files.read_bytes(weights_file, max_bytes=size)
    if expected is not None and _files.sha256_bytes(data) != expected[1]:
        raise _files.CorruptFileError(weights_file, f"content does not match the SHA-256 in {cfg_file}")
    state = _files.load_safetensors(data, weights_file)
    got = {name: (t.dtype, tuple(t.shape)) for name, t in state.items()}
    if got != header:  # the file changed under us
        raise _files.CorruptFileError(weights_file, "changed while it was read")
    gates.load_state_dict(state, strict=True, assign=True)
    return gates.to(device), meta["config"]
