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

import json
import math
import os
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

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

GATES_WEIGHTS = "gates.safetensors"
GATES_CONFIG = "gates_config.json"
_FORMAT = "sparse_attn.gates"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by seer_decode.py)
# --------------------------------------------------------------------------------------------------
def _check_pooling(name: str, pooling: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    if isinstance(pooling, str):
        pooling = (pooling,)
    try:
        modes = tuple(pooling)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of pooling names, got {pooling!r}") from None
    if not modes:
        raise ValueError(f"{name} must name at least one pooling mode")
    for m in modes:
        if m not in POOLING_MODES:
            raise ValueError(f"{name} entries must be one of {POOLING_MODES}, got {m!r}")
    return modes


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _check_common_kwargs(num_heads, num_kv_heads, head_dim, block_size, hidden_size, use_rope, rope_theta):
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
    if use_rope and hidden_size % 2:
        raise ValueError(f"hidden_size must be even when use_rope=True, got {hidden_size}")
    if not isinstance(rope_theta, (int, float)) or isinstance(rope_theta, bool) or rope_theta <= 0:
        raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")


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


def _build(node: Any, where: str) -> nn.Module:
    if not isinstance(node, dict) or "class" not in node:
        raise ValueError(f"{GATES_CONFIG}: entry gates{where} is not a module description")
    cls_name = node["class"]
    if cls_name == "torch.nn.ModuleDict":
        return nn.ModuleDict({k: _build(v, f"{where}.{k}") for k, v in node.get("children", {}).items()})
    if cls_name == "torch.nn.ModuleList":
        return nn.ModuleList([_build(v, f"{where}.{i}") for i, v in enumerate(node.get("children", []))])
    classes = _gate_classes()
    if cls_name not in classes:
        raise ValueError(f"{GATES_CONFIG}: unknown class {cls_name!r} at gates{where}")
    return classes[cls_name](**node.get("kwargs", {}))


def save_gates(path: Union[str, os.PathLike], gates: nn.Module, config: Optional[Dict[str, Any]] = None) -> None:
    """Save gates to a directory: ``gates.safetensors`` (the state dict) + ``gates_config.json``.

    The JSON holds everything needed to rebuild the modules (class name and constructor kwargs of
    every gate, nested in ``nn.ModuleDict`` / ``nn.ModuleList`` containers, e.g. a dict keyed by
    layer index holding ``{"prefill": SeerGate, "decode": SeerDecodeGate}``) and the caller's
    ``config`` (JSON-serialisable: base model name, training settings, ...). Nothing is pickled.

    Args:
        path: directory (created if missing; existing files of these two names are replaced).
        gates: a gate, or containers of gates.
        config: free-form JSON-serialisable dict, returned by :func:`load_gates`.

    Example::

        >>> gates = nn.ModuleDict({"0": nn.ModuleDict({"prefill": SeerGate(4, 2, 32)})})
        >>> save_gates("out/gates", gates, {"base_model": "tiny-llama"})
        >>> loaded, config = load_gates("out/gates")
    """
    from safetensors.torch import save_file

    if not isinstance(gates, nn.Module):
        raise TypeError(f"gates must be an nn.Module, got {type(gates).__name__}")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    tree = _describe(gates, "")
    try:
        text = json.dumps({"format": _FORMAT, "version": _FORMAT_VERSION, "modules": tree, "config": config}, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(f"config must be JSON-serialisable: {e}") from None
    # clone: safetensors refuses tensors that share storage (a gate reused under two names)
    state = gates.state_dict()
    tensors = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format) for name, t in state.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, GATES_WEIGHTS), metadata={"format": _FORMAT})
    with open(os.path.join(path, GATES_CONFIG), "w", encoding="utf-8") as f:
        f.write(text + "\n")


def load_gates(
    path: Union[str, os.PathLike], *, device: Optional[Union[str, torch.device]] = None
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load gates saved by :func:`save_gates`: ``(gates, config)``.

    The modules are rebuilt from the JSON, then the tensors are loaded (strictly: a missing or
    unexpected tensor is an error) keeping the saved dtype, on ``device`` (default CPU).

    Example::

        >>> gates, config = load_gates("out/gates", device="cuda")
        >>> gates["0"]["prefill"](q, k)      # logits [B, Hq, Mq, Mk]
    """
    from safetensors.torch import load_file

    cfg_file, weights_file = os.path.join(path, GATES_CONFIG), os.path.join(path, GATES_WEIGHTS)
    for f in (cfg_file, weights_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"path must be a directory written by save_gates; missing {f}")
    with open(cfg_file, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{cfg_file} is not a sparse_attn gates config")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format version {meta.get('version')}, this code reads {_FORMAT_VERSION}")
    gates = _build(meta["modules"], "")
    device = torch.device("cpu" if device is None else device)
    state = load_file(weights_file, device=str(device))
    gates.load_state_dict(state, strict=True, assign=True)
    return gates.to(device), meta.get("config", {})
