"""``SparseAttention``: a self-contained causal attention layer (QKV/O projections, RoPE, GQA, a
KV cache) whose attention runs through a pattern module. For people writing their own model, and
the layer the Megatron / vLLM adapters build on.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..rope import apply_rope, rope_cos_sin
from .functional import pattern_attention
from .patterns import AttentionPattern, AttentionSpec
from .registry import build_pattern

__all__ = ["SparseAttention", "KVCache", "rope_cos_sin", "apply_rope"]


class KVCache:
    """A growing per-layer key/value cache, ``[B, Hkv, S, D]`` each (post-RoPE keys).

    Example::

        >>> cache = KVCache()
        >>> k, v = cache.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
        >>> cache.seq_len, k.shape[2]
        (5, 5)
    """

    def __init__(self) -> None:
        self.key: Optional[Tensor] = None
        self.value: Optional[Tensor] = None

    @property
    def seq_len(self) -> int:
        """Tokens held so far."""
        return 0 if self.key is None else self.key.shape[2]

    def update(self, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
        """Append ``key, value [B, Hkv, S_new, D]``; return the whole cache ``[B, Hkv, S, D]`` each."""
        if self.key is None:
            self.key, self.value = key, value
        else:
            if key.shape[:2] != self.key.shape[:2] or key.shape[3] != self.key.shape[3]:
                raise ValueError(f"key {tuple(key.shape)} does not fit the cache {tuple(self.key.shape)}")
            self.key = torch.cat((self.key, key), dim=2)
            self.value = torch.cat((self.value, value), dim=2)
        return self.key, self.value

    def reset(self) -> None:
        """Empty the cache."""
        self.key = self.value = None


class SparseAttention(nn.Module):
    """Causal multi-head attention with GQA and RoPE whose attention runs through a pattern.

    ``x [B, S, hidden_size] -> [B, S, hidden_size]``: ``q = x Wq`` (``Hq`` heads of ``head_dim``),
    ``k, v = x Wk, x Wv`` (``Hkv`` heads), RoPE on q and k at ``position_ids``, then
    :func:`~sparse_attn.modules.pattern_attention` (bottom-right causal; the pattern's layout),
    then ``Wo``. With a :class:`KVCache`, each call appends its keys and attends to everything
    cached: prefill once, then decode a token at a time (default positions continue the cache).

    Args:
        hidden_size: model width.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (``Hq % Hkv == 0``); default ``num_heads``.
        pattern: a method name from :data:`~sparse_attn.modules.PATTERNS` (built with
            ``pattern_options``) or an :class:`~sparse_attn.modules.AttentionPattern` instance.
        pattern_options: options for a named pattern (e.g. ``dict(block_size=64, vert_stride=8)``).
        head_dim: default ``hidden_size // num_heads``.
        rope_theta: RoPE base.
        bias: biases on the q/k/v projections (the output projection has none).
        layer_idx: recorded in the pattern's :class:`~sparse_attn.modules.AttentionSpec`.

    Example::

        >>> attn = SparseAttention(256, 8, 2, pattern="s2", pattern_options=dict(block_size=16, local_blocks=2))
        >>> x = torch.randn(2, 100, 256)
        >>> attn(x).shape
        torch.Size([2, 100, 256])
        >>> cache = KVCache(); _ = attn(x[:, :99], cache=cache); attn(x[:, 99:], cache=cache).shape
        torch.Size([2, 1, 256])
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        *,
        pattern: Union[str, AttentionPattern] = "dense",
        pattern_options: Optional[Dict[str, Any]] = None,
        head_dim: Optional[int] = None,
        rope_theta: float = 10000.0,
        bias: bool = False,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) is not a multiple of num_heads ({num_heads}); "
                                 "give head_dim")
            head_dim = hidden_size // num_heads
        self.spec = AttentionSpec(num_heads, num_kv_heads, int(head_dim), float(rope_theta), int(layer_idx))
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = int(head_dim)
        self.rope_theta = float(rope_theta)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        if isinstance(pattern, str):
            pattern = build_pattern(pattern, self.spec, **(pattern_options or {}))
        elif not isinstance(pattern, AttentionPattern):
            raise TypeError(f"pattern must be a method name or an AttentionPattern, got {type(pattern).__name__}")
        elif pattern_options:
            raise ValueError("pattern_options only apply to a pattern given by name")
        self.pattern = pattern

    def forward(
        self,
        x: Tensor,
        *,
        position_ids: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Attention over ``x [B, S, hidden_size]`` (and the cache, if given).

        Args:
            x: the layer input.
            position_ids: ``[S]`` or ``[B, S]`` integer positions for RoPE; default
                ``cache.seq_len + arange(S)``.
            cache: a :class:`KVCache` to read and extend.
            attn_mask: optional 4-D boolean/additive mask ``[B|1, 1|Hq, S, Sk]`` holding the causal
                rule too (padding); it switches to the exact masked path
                (:func:`~sparse_attn.modules.masked_attention`).

        Returns:
            ``[B, S, hidden_size]``.
        """
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, S, {self.hidden_size}], got {tuple(x.shape)}")
        b, s, _ = x.shape
        past = 0 if cache is None else cache.seq_len
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device)
        elif position_ids.shape[-1] != s:
            raise ValueError(f"position_ids must end in S={s}, got {tuple(position_ids.shape)}")
        q_pre = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k_pre = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)
        q, k = apply_rope(q_pre, cos, sin), apply_rope(k_pre, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        out = pattern_attention(self.pattern, q, k, v, attn_mask=attn_mask, q_pre=q_pre, k_pre=k_pre,
                                position_ids=position_ids)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, rope_theta={self.rope_theta}")
