"""The block max-pooled attention map: SeerAttention's distillation target.

With ``P = softmax(q k^T * scale)`` over the keys a query may see, the map keeps, per
(query block ``r``, key block ``c``), the largest probability of the block,
``M[r, c] = max_{i in r, j in c} P[i, j]``, then divides each row of ``M`` by its sum (a
row of zeros -- query rows that see no key -- stays zeros). A learned gate is trained to
predict it (``KL(M || softmax(gate logits))``).

Backends: a Triton kernel on CUDA (two passes over the keys in one program: softmax
statistics, then the per-block maxima of the normalised probabilities; memory
O(Mq * Mk) beyond the inputs), and a chunked PyTorch path everywhere else (``chunk`` query
rows at a time, O(chunk * Sk) memory, never ``Sq x Sk``). Both are targets, not layers:
they run without autograd.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..layout import SUPPORTED_BLOCK_SIZES, ceil_div
from ..ops import resolve_backend, check_qkv

__all__ = ["attention_block_map", "block_map_reference"]

_BACKENDS = ("auto", "triton", "reference")
_REDUCTIONS = (None, "max")
# Elements of the [B, Hq, chunk, Sk] probability tile the reference keeps at once.
_CHUNK_ELEMENTS = 1 << 22


def _normalise_rows(m: Tensor) -> Tensor:
    """Divide each row (last dim) by its sum; all-zero rows stay zero."""
    total = m.sum(-1, keepdim=True)
    return torch.where(total > 0, m / torch.where(total > 0, total, 1.0), 0.0)


# --------------------------------------------------------------------------------------------
# The chunked PyTorch path (CPU, and the reference the kernel is tested against)
# --------------------------------------------------------------------------------------------
def block_map_reference(
    q: Tensor,
    k: Tensor,
    v: Optional[Tensor] = None,
    *,
    block_size: int = 64,
    causal: bool = True,
    scale: Optional[float] = None,
    pool_queries: bool = True,
    reduce_gqa: Optional[str] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The map (and, with ``v``, the attention output) in plain PyTorch, ``chunk_size`` query
    rows at a time. No validation and no autograd: use :func:`attention_block_map`.

    Args:
        q: ``[B, Hq, Sq, D]``; k: ``[B, Hkv, Sk, D]``; v: like ``k`` or None.
        block_size, causal, scale, pool_queries, reduce_gqa: as in :func:`attention_block_map`.
        chunk_size: query rows per chunk (rounded down to a multiple of ``block_size`` when
            pooling); default about 4M probabilities per chunk. Memory is O(chunk * Sk).

    Returns:
        ``(map, out)``: the row-normalised float32 map (shape as in
        :func:`attention_block_map`) and ``out [B, Hq, Sq, D]`` in q's dtype, or None
        without ``v``. Accumulates in fp32 (fp64 for fp64 inputs).

    Example::

        >>> q, k = torch.randn(1, 4, 100, 32), torch.randn(1, 2, 100, 32)
        >>> m, _ = block_map_reference(q, k, block_size=32)
        >>> m.shape
        torch.Size([1, 4, 4, 4])
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mq, mk = ceil_div(sq, block_size), ceil_div(sk, block_size)
    h_out = hkv if reduce_gqa == "max" else hq
    raw = torch.zeros(b, h_out, mq if pool_queries else sq, mk, dtype=acc, device=q.device)
    out = None if v is None else torch.empty(b, hq, sq, d, dtype=q.dtype, device=q.device)
    if sq == 0 or sk == 0 or b * hq == 0:
        if out is not None:
            out.zero_()
        return raw.float(), out

    step = chunk_size if chunk_size is not None else _CHUNK_ELEMENTS // max(1, b * hq * sk)
    step = max(1, min(sq, int(step)))
    if pool_queries:  # whole query blocks per chunk
        step = max(block_size, step - step % block_size)
    k_t = k.to(acc).transpose(-1, -2)  # [B, Hkv, D, Sk]; a GQA group shares it, never repeated
    v_f = None if v is None else v.to(acc)
    cols = torch.arange(sk, device=q.device)
    pad_k = mk * block_size - sk
    for i0 in range(0, sq, step):
        i1 = min(i0 + step, sq)
        c = i1 - i0
        # The group's query heads are consecutive: [B, Hq, c, D] -> [B, Hkv, G*c, D].
        q_c = q[:, :, i0:i1].to(acc).reshape(b, hkv, group * c, d)
        s = torch.matmul(q_c, k_t).view(b, hkv, group, c, sk) * scale
        if causal:
            rows = torch.arange(i0, i1, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + (sk - sq), float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # -inf on rows that see nothing
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse))  # exactly 0 there
        del s
        if v_f is not None:
            out[:, :, i0:i1] = torch.matmul(p.view(b, hkv, group * c, sk), v_f).view(b, hq, c, d).to(q.dtype)
        # max over the keys of each key block (p >= 0, so zero padding is neutral)
        p_blk = torch.nn.functional.pad(p, (0, pad_k)).view(b, hkv, group, c, mk, block_size).amax(-1)
        del p
        if reduce_gqa == "max":
            p_blk = p_blk.amax(2)
        p_blk = p_blk.reshape(b, h_out, c, mk)
        if pool_queries:
            n_r = ceil_div(c, block_size)
            p_blk = torch.nn.functional.pad(p_blk, (0, 0, 0, n_r * block_size - c))
            r0 = i0 // block_size
            raw[:, :, r0:r0 + n_r] = p_blk.view(b, h_out, n_r, block_size, mk).amax(3)
        else:
            raw[:, :, i0:i1] = p_blk
    return _normalise_rows(raw).float(), out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, block_size, causal, scale, pool_queries, reduce_gqa, return_output, backend):
    if not isinstance(return_output, bool):
        raise TypeError(f"return_output must be a bool, got {type(return_output).__name__}")
    if return_output and v is None:
        raise ValueError("return_output=True needs v (the values, shaped like k)")
    if v is not None and not return_output:
        raise ValueError("v is only used with return_output=True; pass return_output=True or drop v")
    check_qkv(q, k, v, backend)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {block_size!r}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    for name, flag in (("causal", causal), ("pool_queries", pool_queries)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if reduce_gqa not in _REDUCTIONS:
        raise ValueError(f"reduce_gqa must be None or 'max', got {reduce_gqa!r}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def attention_block_map(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int = 64,
    causal: bool = True,
    scale: Optional[float] = None,
    pool_queries: bool = True,
    reduce_gqa: Optional[str] = None,
    exclude_own_block: bool = False,
    return_output: bool = False,
    v: Optional[Tensor] = None,
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Row-normalised block max-pooled softmax map (SeerAttention's training target).

    With ``P = softmax(q k^T * scale)`` over the keys each query may see,
    ``M[r, c] = max over query rows i of block r and keys j of block c of P[i, j]``; each
    row of ``M`` is then divided by its sum (a row of zeros stays zeros). Blocks are
    ``block_size`` tokens, the last one of each axis may be partial.

    Args:
        q: ``[B, Hq, Sq, D]``; k: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA: query
            head ``h`` reads key head ``h // (Hq // Hkv)``; K is never repeated). fp16,
            bf16, fp32 (fp64 with ``backend="reference"``). Unit-last-stride views (e.g.
            ``[B, S, H, D]`` storage passed as ``.transpose(1, 2)``) are used in place.
        block_size: 16, 32, 64 or 128 (query and key blocks alike).
        causal: bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (Sk - Sq)``.
            For ``Sq = 2, Sk = 4``::

                1 1 1 0
                1 1 1 1

            With ``Sq > Sk`` the first ``Sq - Sk`` queries see nothing: their rows are 0.
        scale: softmax scale, default ``D ** -0.5``.
        pool_queries: True: the map above, ``[B, Hq, Mq, Mk]``. False: one row per query
            token, ``map[.., i, c] = max over keys j of block c of P[i, j]``, then
            row-normalised, ``[B, Hq, Sq, Mk]`` (the target of a decode gate).
        reduce_gqa: None, or "max": take the max over each GQA group's ``Hq // Hkv`` query
            heads (of the un-normalised maxima) and *then* normalise the rows, giving
            ``[B, Hkv, Mq, Mk]`` / ``[B, Hkv, Sq, Mk]`` (a target shared by the group).
        exclude_own_block: only with ``pool_queries=False``: SeerAttention-R's decode target. The
            row of query ``i`` (key index ``p = i + Sk - Sq``) keeps only the key blocks
            ``c < p // block_size`` -- its own block and later ones are set to 0 -- and is
            renormalised over them; a query of block 0 (nothing before its own block) gets a row
            of zeros. The maxima are still those of the full causal softmax (the own block's
            keys stay in the normaliser), as in the authors' kernel. For ``Sq = 1, Sk = 9``,
            block 4: ``[m0, m1, 0] / (m0 + m1)``.
        return_output: also return the dense (causal) softmax attention output
            ``[B, Hq, Sq, D]`` in q's dtype, computed in the same pass; needs ``v``.
        v: ``[B, Hkv, Sk, D]``, only with ``return_output=True``.
        backend: "auto" (Triton on CUDA tensors, the chunked PyTorch path otherwise),
            "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``) or "reference".

    Returns:
        ``map`` (float32, ``Mq = ceil(Sq / block_size)``, ``Mk = ceil(Sk / block_size)``), or
        ``(map, out)`` with ``return_output=True``.

    Not differentiable: this is a target. Inputs are detached and it runs under
    ``torch.no_grad()``; the output is detached too (use :func:`sparse_attn.sparse_attention`
    for a differentiable one). Memory beyond inputs and outputs: O(Mq * Mk) per (batch, head)
    on the kernel path, O(chunk * Sk) on the PyTorch path; never O(Sq * Sk).

    Example::

        >>> q = torch.randn(1, 4, 200, 64); k = v = torch.randn(1, 2, 200, 64)
        >>> m = attention_block_map(q, k, block_size=64)
        >>> m.shape, bool(torch.allclose(m.sum(-1), torch.ones(1, 4, 4)))
        (torch.Size([1, 4, 4, 4]), True)
        >>> m1, out = attention_block_map(q, k, pool_queries=False, reduce_gqa="max", return_output=True, v=v)
        >>> m1.shape, out.shape
        (torch.Size([1, 2, 200, 4]), torch.Size([1, 4, 200, 64]))
        >>> m2 = attention_block_map(q, k, pool_queries=False, reduce_gqa="max", exclude_own_block=True)
        >>> m2[0, 0, 70].tolist()[1:]                  # token 70 is in block 1: only block 0 is kept
        [0.0, 0.0, 0.0]
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    resolved = resolve_backend(backend, q.device)
    _check_inputs(q, k, v, block_size, causal, scale, pool_queries, reduce_gqa, return_output, resolved)
    if not isinstance(exclude_own_block, bool):
        raise TypeError(f"exclude_own_block must be a bool, got {type(exclude_own_block).__name__}")
    if exclude_own_block and pool_queries:
        raise ValueError("exclude_own_block=True is a per-token (decode) target: it needs pool_queries=False")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0:
        resolved = "reference"  # nothing for a kernel to do
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        v = None if v is None else v.detach()
        if resolved == "triton":
            q, k, v = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            kernels = importlib.import_module("sparse_attn.triton_kernels.block_map")
            raw, out = kernels.block_map_fwd(q, k, v, block_size, causal, scale, pool_queries, reduce_gqa == "max")
            block_map = _normalise_rows(raw)
        else:
            block_map, out = block_map_reference(q, k, v, block_size=block_size, causal=causal, scale=scale,
                                                 pool_queries=pool_queries, reduce_gqa=reduce_gqa)
        if exclude_own_block:
            block_map = _exclude_own_block(block_map, block_size, k.shape[2])
    return (block_map, out) if return_output else block_map


def _exclude_own_block(m: Tensor, block_size: int, seq_k: int) -> Tensor:
    """Per-token map ``[B, H, Sq, Mk]`` -> the same with each row's own key block and later ones
    zeroed, renormalised (a row that keeps nothing is zeros). Renormalising the normalised row
    equals normalising the raw maxima over the kept blocks."""
    sq, mk = m.shape[2], m.shape[3]
    own = torch.div(torch.arange(sq, device=m.device) + (seq_k - sq), block_size, rounding_mode="floor")
    keep = torch.arange(mk, device=m.device)[None, :] < own[:, None]  # [Sq, Mk]
    return _normalise_rows(m * keep)
