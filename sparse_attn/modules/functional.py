"""Run attention through a pattern module: sparse op when it can, exact masked path when it must.

:func:`pattern_attention` is shared by :class:`~sparse_attn.modules.SparseAttention` and the model
integrations (Hugging Face, and the Megatron / vLLM adapters), so every front end has one policy:

* no element mask (the usual case: no padding, plain causal): :func:`sparse_attn.sparse_attention`
  with the pattern's layout, bottom-right causal -- the fast path;
* an element mask (padding, packed sequences, sliding windows, a user 4-D mask): the block layout
  cannot express per-token masks, so :func:`masked_attention` computes exactly
  ``softmax(QK^T + mask) V`` over ``layout AND mask`` with PyTorch SDPA, a chunk of query rows at a
  time (dense cost, sparse result; rows that see nothing give 0). Layouts place the queries on the
  last ``Sq`` keys; when the mask shows otherwise (its last query cannot see the last key, as with
  a static cache's empty slots) that sequence runs with the mask alone (dense);
* ``pattern.distill``: the pattern's distillation forward (dense output, loss kept on the pattern).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import BlockSparseLayout
from ..ops import sparse_attention
from .patterns import AttentionPattern

__all__ = ["pattern_attention", "masked_attention"]

# Elements of the [B, Hq, chunk, Sk] element mask built at once by the masked path.
_MASK_CHUNK_ELEMENTS = 1 << 24


def _repeat_kv(x: Tensor, group: int) -> Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * group, S, D]`` (query head ``h`` reads KV head ``h // group``)."""
    if group == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)


def _visible(mask: Tensor) -> Tensor:
    """Boolean "may attend" view of a boolean or additive float mask."""
    return mask if mask.dtype == torch.bool else mask > float("-inf")


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Optional[BlockSparseLayout],
    attn_mask: Tensor,
    *,
    scale: Optional[float] = None,
    layout_applies: Optional[Tensor] = None,
) -> Tensor:
    """Exact attention over the keys that both ``layout`` and ``attn_mask`` allow.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` (GQA: query head ``h`` reads KV head
            ``h // (Hq // Hkv)``).
        layout: a :class:`BlockSparseLayout` for ``(Sq, Sk)``, or None (only the mask counts).
        attn_mask: broadcastable to ``[B, Hq, Sq, Sk]``: boolean (True = may attend) or additive
            float (``-inf`` = may not). It carries the causal rule itself (nothing is added here),
            e.g. the 4-D mask Hugging Face builds from a padding mask.
        scale: softmax scale, default ``D ** -0.5``.
        layout_applies: optional bool ``[B]`` (or ``[1]``): where False, that sequence ignores the
            layout (mask only). On the device: no host synchronisation.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype; a row that may see no key gives 0. Differentiable.

    Example::

        >>> q = torch.randn(2, 4, 40, 16); k = v = torch.randn(2, 2, 40, 16)
        >>> pad = torch.ones(2, 40, dtype=torch.bool); pad[1, :7] = False      # left padding
        >>> mask = torch.ones(40, 40, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
        >>> masked_attention(q, k, v, None, mask).shape
        torch.Size([2, 4, 40, 16])
    """
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dim() != 4:
        raise ValueError(f"attn_mask must be 4-D (broadcastable to [B, Hq, Sq, Sk]), got {tuple(attn_mask.shape)}")
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if attn_mask.shape[-1] != sk or attn_mask.shape[-2] not in (1, sq):
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not fit Sq={sq}, Sk={sk}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    group = hq // hkv
    kx, vx = _repeat_kv(k, group), _repeat_kv(v, group)
    if layout is None:
        out = F.scaled_dot_product_attention(q, kx, vx, attn_mask=attn_mask, scale=scale)
        return torch.where(_visible(attn_mask).any(-1, keepdim=True), out, out.new_zeros(()))

    block_mask = layout.to_block_mask()  # [Bl, Hl, Mq, Mk]
    hl = block_mask.shape[1]
    bq, bk = layout.block_size
    cols = torch.arange(sk, device=q.device) // bk
    step = max(1, min(sq, _MASK_CHUNK_ELEMENTS // max(1, b * hq * sk)))
    outs = []
    for i0 in range(0, sq, step):
        rows = torch.arange(i0, min(i0 + step, sq), device=q.device)
        elem = block_mask[:, :, rows // bq][:, :, :, cols]  # [Bl, Hl, C, Sk]
        if hl not in (1, hq):
            elem = elem.repeat_interleave(hq // hl, dim=1)
        if layout_applies is not None:
            elem = elem | ~layout_applies.view(-1, 1, 1, 1)
        m = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[:, :, i0 : i0 + step]
        comb = (m & elem) if m.dtype == torch.bool else m.masked_fill(~elem, float("-inf"))
        out = F.scaled_dot_product_attention(q[:, :, i0 : i0 + step], kx, vx, attn_mask=comb, scale=scale)
        outs.append(torch.where(_visible(comb).any(-1, keepdim=True), out, out.new_zeros(())))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def pattern_attention(
    pattern: Optional[AttentionPattern],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    q_pre: Optional[Tensor] = None,
    k_pre: Optional[Tensor] = None,
    position_ids: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Causal attention of ``q`` over ``k, v`` with the blocks ``pattern`` selects.

    Args:
        pattern: an :class:`~sparse_attn.modules.AttentionPattern` (None = dense).
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]``, post-RoPE, ``Sq <= Sk`` (queries are the
            last ``Sq`` positions: bottom-right causal, so decode and chunked prefill are right).
        attn_mask: None (plain bottom-right causal: the sparse op runs), or a 4-D boolean/additive
            mask that already holds the causal rule (padding etc.: the exact masked path runs, see
            :func:`masked_attention`).
        q_pre, k_pre: pre-RoPE q and this call's pre-RoPE keys, for patterns that need them.
        position_ids: ``[Sq]`` or ``[B, Sq]`` absolute positions of the queries (for patterns).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, Hq, Sq, D]`` in q's dtype.

    Example::

        >>> from sparse_attn.modules import S2Pattern, AttentionSpec
        >>> p = S2Pattern.from_spec(AttentionSpec(4, 2, 16), block_size=16, local_blocks=2, vert_stride=4)
        >>> q = torch.randn(1, 4, 100, 16); k = v = torch.randn(1, 2, 100, 16)
        >>> pattern_attention(p, q, k, v).shape
        torch.Size([1, 4, 100, 16])
    """
    if pattern is not None and pattern.distill:
        if attn_mask is not None:
            raise ValueError("distillation runs on whole unpadded sequences: attn_mask must be None")
        return pattern.distillation_forward(q, k, v, q_pre=q_pre, k_pre=k_pre, position_ids=position_ids,
                                            scale=scale)
    layout = None
    if pattern is not None:
        layout = pattern(q, k, q_pre=q_pre, k_pre=k_pre, position_ids=position_ids)
    backend = "auto" if pattern is None else pattern.backend
    if attn_mask is None:
        return sparse_attention(q, k, v, layout, causal=True, scale=scale, backend=backend)
    applies = None
    if layout is not None and k.shape[2] > q.shape[2]:
        # Layouts put the queries on the last Sq keys. A mask whose last query cannot see the
        # last key says otherwise (a static cache's empty slots): the layout would be misplaced,
        # so that sequence runs dense (mask only).
        last = _visible(attn_mask[..., -1, -1])  # [B|1, H|1]
        applies = last.reshape(last.shape[0], -1).all(-1)
    return masked_attention(q, k, v, layout, attn_mask, scale=scale, layout_applies=applies)
