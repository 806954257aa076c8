"""Rotary position embeddings (Llama / Hugging Face convention), shared by the attention modules
and the Seer gates (which rotate pooled block features at block positions). Torch only.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["rope_cos_sin", "apply_rope"]


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
                 ) -> Tuple[Tensor, Tensor]:
    """Rotary embedding tables for integer ``positions [..., S]``: ``cos, sin [..., S, head_dim]``.

    Llama / Hugging Face convention: frequencies ``theta ** (-2i / D)`` for ``i < D/2``, each used
    for dims ``i`` and ``i + D/2`` (rotate-half pairing). Computed in fp32, returned in ``dtype``.

    Example::

        >>> cos, sin = rope_cos_sin(torch.arange(10), 64)
        >>> cos.shape
        torch.Size([10, 64])
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., S, D/2]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, S, D]`` by ``cos, sin`` (``[S, D]`` or ``[B, S, D]``), rotate-half pairing.

    Example::

        >>> x = torch.randn(1, 2, 10, 64); cos, sin = rope_cos_sin(torch.arange(10), 64)
        >>> torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
        True
    """
    if cos.dim() == 3:  # [B, S, D] -> [B, 1, S, D]
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
