"""Run attention through a pattern module: sparse op when it can, exact masked path when it must.

:func:`pattern_attention` is shared by :class:`~sparse_attn.modules.SparseAttention` and the model
integrations (Hugging Face, and the Megatron / vLLM adapters), so every front end has one policy:

* no element mask (the usual case: no padding, plain causal): :func:`sparse_attn.sparse_attention`
  with the pattern's layout, bottom-right causal -- the fast path; decode-shaped calls (a few new
  tokens over a KV cache: ``1 <= Sq <= 16``, ``Sq < Sk``, no gradient needed) run on
  :func:`sparse_attn.sparse_decode` with the pattern's ``kv_blocks`` (None: dense; Seer: its decode
  gate's block lists; S2: its config in closed form), so only the kept blocks are read; a pattern
  without such a form (``block_mask``) keeps the layout path;
* a left-padding mask (each sequence: padding keys first, then plain bottom-right causal -- what
  a padded ``generate()`` batch gives), for patterns whose layout depends only on the sequence
  (``pattern.per_sequence``: dense, S2, block_mask): the sparse op runs once per distinct padding
  on the unpadded tokens, with the layout anchored at the first real token, so a padded prompt
  gets exactly what it gets alone (padding query rows give 0); see :func:`left_padding`;
* any other element mask (packed sequences, sliding windows, a user 4-D mask; Seer with padding;
  under ``torch.compile``): the block layout cannot express per-token masks, so
  :func:`masked_attention` computes exactly
  ``softmax(QK^T + mask) V`` over ``layout AND mask`` with PyTorch SDPA, a chunk of query rows at a
  time (dense cost, sparse result; rows that see nothing give 0). Layouts place the queries on the
  last ``Sq`` keys; when the mask shows otherwise (its last query cannot see the last key, as with
  a static cache's empty slots) that sequence runs with the mask alone (dense);
* ``pattern.distill``: the pattern's distillation forward (dense output, loss kept on the pattern).
"""

from __future__ import annotations

import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decode import DECODE_MAX_SQ, sparse_decode
from ..layout import BlockSparseLayout
from ..ops import sparse_attention
from ..patterns.s2 import S2Config
from ..reference import expand_kv, block_rows
from .patterns import AttentionPattern

__all__ = ["pattern_attention", "masked_attention", "left_padding"]

# Elements of the [B, Hq, chunk, Sk] element mask built at once by the masked path.
_MASK_CHUNK_ELEMENTS = 1 << 24


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
    sk = k.shape[2]
    if attn_mask.shape[-1] != sk or attn_mask.shape[-2] not in (1, sq):
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not fit Sq={sq}, Sk={sk}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    kx, vx = expand_kv(k, hq, k.dtype), expand_kv(v, hq, v.dtype)  # SDPA with a mask wants Hq heads
    if layout is None:
        out = F.scaled_dot_product_attention(q, kx, vx, attn_mask=attn_mask, scale=scale)
        return torch.where(_visible(attn_mask).any(-1, keepdim=True), out, out.new_zeros(()))

    block_mask = layout.to_block_mask()  # [Bl, Hl, Mq, Mk]
    step = max(1, min(sq, _MASK_CHUNK_ELEMENTS // max(1, b * hq * sk)))
    outs = []
    for i0 in range(0, sq, step):
        rows = torch.arange(i0, min(i0 + step, sq), device=q.device)
        elem = block_rows(block_mask, layout.block_size, rows, sk, hq)  # [Bl, Hq|1, C, Sk]
        if layout_applies is not None:
            elem = elem | ~layout_applies.view(-1, 1, 1, 1)
        m = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[:, :, i0 : i0 + step]
        comb = (m & elem) if m.dtype == torch.bool else m.masked_fill(~elem, float("-inf"))
        out = F.scaled_dot_product_attention(q[:, :, i0 : i0 + step], kx, vx, attn_mask=comb, scale=scale)
        outs.append(torch.where(_visible(comb).any(-1, keepdim=True), out, out.new_zeros(())))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


_PADS_SEEN: dict = {}  # the last mask checked: Hugging Face hands every layer the same mask tensor


def left_padding(attn_mask: Tensor, seq_q: int, seq_k: int) -> Optional[List[int]]:
    """Per sequence, the number of leading padding keys, if ``attn_mask`` is pure left padding.

    Pure left padding: for sequence ``b`` with ``p_b`` padding keys, query ``i`` (at key position
    ``i + seq_k - seq_q``) may see key ``j`` iff ``p_b <= j <= i + seq_k - seq_q`` (so padding
    queries, at positions ``< p_b``, see nothing). Returns None for any other mask, e.g. right
    padding, packed sequences (whose first document would otherwise pass for padding), sliding
    windows, or a builder that lets padding queries see keys. Reads the mask back to the host (one sync, cached for the same unchanged mask tensor).

    Example::

        >>> pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
        >>> mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
        >>> left_padding(mask, 5, 5)
        [2, 0]
    """
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[-2:] != (seq_q, seq_k):
        return None
    # Same tensor object (a live weak reference, so never a new tensor at a recycled address), not
    # modified in place since.
    seen = _PADS_SEEN.get("ref")
    if seen is not None and seen() is attn_mask and _PADS_SEEN["version"] == attn_mask._version:
        return _PADS_SEEN["pads"]
    vis = _visible(attn_mask)[:, 0]  # [B, Sq, Sk]
    pads = (~vis[:, -1]).to(torch.int32).cumprod(-1).sum(-1)  # leading hidden keys of the last query
    i = torch.arange(seq_q, device=vis.device)[None, :, None] + (seq_k - seq_q)  # key position of query i
    j = torch.arange(seq_k, device=vis.device)[None, None, :]
    p = pads[:, None, None]
    expected = (j >= p) & (j <= i)  # padding queries (i < p) see nothing
    ok = bool((vis == expected).all())
    result = pads.tolist() if ok else None
    _PADS_SEEN.update(ref=weakref.ref(attn_mask), version=attn_mask._version, pads=result)
    return result


def _decode_call(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """A few new query rows over a longer cache (``1 <= Sq <= DECODE_MAX_SQ``, ``Sq < Sk``) and no
    gradient to compute: :func:`sparse_decode`'s job (it has no backward)."""
    sq = q.shape[2]
    if not 1 <= sq <= DECODE_MAX_SQ or sq >= k.shape[2]:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))


def _causal_attention(pattern: Optional[AttentionPattern], q: Tensor, k: Tensor, v: Tensor, *,
                      q_pre: Optional[Tensor] = None, k_pre: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Bottom-right causal attention with the pattern's blocks, no element mask: a decode-shaped
    call on :func:`sparse_decode` (every sequence holds ``Sk`` keys) when the pattern gives its
    blocks in the op's form, else :func:`sparse_attention` with its layout."""
    backend = "auto" if pattern is None else pattern.backend
    if _decode_call(q, k, v):
        blocks = None if pattern is None else pattern.kv_blocks(q, k, q_pre=q_pre, k_pre=k_pre,
                                                                position_ids=position_ids)
        if blocks is not NotImplemented:
            lens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
            block_size = None if blocks is None or isinstance(blocks, S2Config) else pattern.block_size
            return sparse_decode(q, k, v, lens, kv_blocks=blocks, block_size=block_size, scale=scale,
                                 backend=backend)
    layout = None
    if pattern is not None:
        layout = pattern(q, k, q_pre=q_pre, k_pre=k_pre, position_ids=position_ids)
    return sparse_attention(q, k, v, layout, causal=True, scale=scale, backend=backend)


def _per_sequence(pattern: AttentionPattern, q: Tensor, k: Tensor, v: Tensor, pads: List[int],
                  position_ids: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """Left-padded batch: the sparse op on each padding group's real tokens, layouts anchored at
    their first real token; padding query rows give 0."""
    b, hq, sq, d = q.shape
    off = k.shape[2] - sq
    out = q.new_zeros(q.shape)
    for p in sorted(set(pads)):
        rows = [i for i, x in enumerate(pads) if x == p]
        q0 = max(0, p - off)  # first query at or after the first real key
        if q0 >= sq:
            continue
        sel = torch.tensor(rows, device=q.device)
        qb, kb, vb = q[sel, :, q0:], k[sel, :, p:], v[sel, :, p:]
        pos = position_ids
        if pos is not None:
            pos = pos[sel, q0:] if pos.dim() == 2 and pos.shape[0] == b else pos[..., q0:]
        ob = _causal_attention(pattern, qb, kb, vb, position_ids=pos, scale=scale)
        out = out.index_put((sel,), torch.cat([ob.new_zeros(len(rows), hq, q0, d), ob], dim=2))
    return out


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
        attn_mask: None (plain bottom-right causal: the sparse op runs, the decode op for a few new
            tokens over a cache), or a 4-D boolean/additive
            mask that already holds the causal rule: left padding runs the sparse op per padding
            group (layouts anchored at the first real token), anything else the exact masked
            path (:func:`masked_attention`).
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
    if (attn_mask is not None and pattern is not None and pattern.per_sequence
            and not torch.compiler.is_compiling()):
        pads = left_padding(attn_mask, q.shape[2], k.shape[2])
        if pads is not None:
            return _per_sequence(pattern, q, k, v, pads, position_ids, scale)
    if attn_mask is None:
        return _causal_attention(pattern, q, k, v, q_pre=q_pre, k_pre=k_pre, position_ids=position_ids,
                                 scale=scale)
    layout = None
    if pattern is not None:
        layout = pattern(q, k, q_pre=q_pre, k_pre=k_pre, position_ids=position_ids)
    applies = None
    if layout is not None and k.shape[2] > q.shape[2]:
        # Layouts put the queries on the last Sq keys. A mask whose last query cannot see the
        # last key says otherwise (a static cache's empty slots): the layout would be misplaced,
        # so that sequence runs dense (mask only).
        last = _visible(attn_mask[..., -1, -1])  # [B|1, H|1]
        applies = last.reshape(last.shape[0], -1).all(-1)
    return masked_attention(q, k, v, layout, attn_mask, scale=scale, layout_applies=applies)
