"""``sparse_attention()``: validation, backend dispatch, and the ``torch.library`` custom op.

The op ``sparse_attn::sparse_attention`` (and its backward,
``sparse_attn::sparse_attention_backward``) take the layout as plain tensors so that
``torch.compile(fullgraph=True)`` traces straight through them; ``register_fake`` gives
their output shapes and ``register_autograd`` wires the backward.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .layout import BlockSparseLayout, ceil_div, rows_to_mask
from .reference import reference_backward, reference_forward

__all__ = ["sparse_attention", "BACKENDS", "available_backends"]

BACKENDS = ("auto", "triton", "cuda", "reference")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = 256  # the kernels' largest head dim
# Largest |scale| accepted: log2(e) * scale must stay far inside fp32 so that scores of ordinary
# size (|q.k| up to ~1e8) cannot overflow; 3e38 used to pass the finiteness check and give NaN.
_MAX_SCALE = 1e30

try:  # a numpy bool is a fine flag too
    import numpy as _np

    _BOOL_TYPES: tuple = (bool, _np.bool_)
except ImportError:  # pragma: no cover - numpy is optional
    _BOOL_TYPES = (bool,)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
# Read once at import (Triton itself reads TRITON_INTERPRET when kernels are defined), which
# also keeps these checks free of work that torch.compile would have to trace.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Debug: validate the contents of every layout the op receives (a host read per call).
_CHECK_LAYOUTS = os.environ.get("SPARSE_ATTN_CHECK_LAYOUTS", "0") not in ("", "0")


def available_backends(device: Union[str, torch.device] = "cuda") -> Tuple[str, ...]:
    """The backends that can run on ``device`` in this process (always includes "reference")."""
    device = torch.device(device)
    out = []
    if _HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and _INTERPRET)):
        out.append("triton")
    out.append("reference")
    return tuple(out)


def resolve_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _HAS_TRITON else "reference"
    if backend == "cuda":  # the CUDA C++ kernels (csrc/): decode only
        from .decode import resolve_cuda

        return resolve_cuda(device)
    if backend == "triton":
        if not _HAS_TRITON:
            raise RuntimeError("backend='triton' needs the `triton` package, which is not importable")
        if device.type == "cpu" and not _INTERPRET:
            raise ValueError(
                "backend='triton' on CPU tensors runs under Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing triton, or use backend='reference'"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA (or CPU under TRITON_INTERPRET=1), got {device}")
    return backend


def _triton_module(name: str):
    return importlib.import_module(f"sparse_attn.triton_kernels.{name}")


# --------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_mask(kv_num: Optional[Tensor], kv_idx: Optional[Tensor], seq_k: int, block_k: int):
    return None if kv_num is None else rows_to_mask(kv_num, kv_idx, ceil_div(seq_k, block_k))


@torch.library.custom_op("sparse_attn::sparse_attention", mutates_args=())
def _sparse_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num: Optional[Tensor],
    kv_idx: Optional[Tensor],
    q_num: Optional[Tensor],
    q_idx: Optional[Tensor],
    block_q: int,
    block_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(out, lse, stats)``: ``stats`` is what the backend's backward needs besides ``lse``
    (Triton: ``[B, Hq, Sq, 2]`` fp32 row max and log2 row sum; the reference: an empty tensor)."""
    if backend == "triton":
        return _triton_module("block_sparse_fwd").block_sparse_attn_fwd(
            q, k, v, kv_num, kv_idx, block_q, block_k, causal, scale
        )
    out, lse = reference_forward(q, k, v, _block_mask(kv_num, kv_idx, k.shape[2], block_k), (block_q, block_k),
                                 causal, scale)
    return out, lse, lse.new_empty(0)


@_sparse_attention_op.register_fake
def _(q, k, v, kv_num, kv_idx, q_num, q_idx, block_q, block_k, causal, scale, backend):
    b, hq, sq, d = q.shape
    lse = q.new_empty((b, hq, sq), dtype=_lse_dtype(q.dtype))
    stats = q.new_empty((b, hq, sq, 2), dtype=torch.float32) if backend == "triton" else lse.new_empty(0)
    return q.new_empty(b, hq, sq, d), lse, stats


@torch.library.custom_op("sparse_attn::sparse_attention_backward", mutates_args=())
def _sparse_attention_backward_op(
    dout: Tensor,
    dlse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    stats: Tensor,
    kv_num: Optional[Tensor],
    kv_idx: Optional[Tensor],
    q_num: Optional[Tensor],
    q_idx: Optional[Tensor],
    block_q: int,
    block_k: int,
    causal: bool,
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _triton_module("block_sparse_bwd").block_sparse_attn_bwd(
            dout, dlse, q, k, v, out, lse, stats, kv_num, kv_idx, q_num, q_idx, block_q, block_k, causal, scale
        )
    return reference_backward(
        dout, dlse, q, k, v, lse, _block_mask(kv_num, kv_idx, k.shape[2], block_k), (block_q, block_k), causal, scale
    )


@_sparse_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, stats, kv_num, kv_idx, q_num, q_idx, block_q, block_k, causal, scale,
      backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_num, kv_idx, q_num, q_idx, block_q, block_k, causal, scale, backend = inputs
    out, lse, stats = output
    ctx.save_for_backward(q, k, v, out, lse, stats, kv_num, kv_idx, q_num, q_idx)
    ctx.args = (block_q, block_k, causal, scale, backend)


def _backward(ctx, dout, dlse, _dstats):
    q, k, v, out, lse, stats, kv_num, kv_idx, q_num, q_idx = ctx.saved_tensors
    if kv_num is not None and q_num is None:  # the forward saw no input needing a gradient
        raise RuntimeError("sparse_attention: backward through a call made without gradients "
                           "(the layout's transposed form was not passed); rerun it with grad enabled")
    dq, dk, dv = _sparse_attention_backward_op(
        dout, dlse, q, k, v, out, lse, stats, kv_num, kv_idx, q_num, q_idx, *ctx.args
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def check_qkv(q, k, v, backend: str) -> None:
    """The input checks shared by every entry point that takes ``q [B, Hq, Sq, D]`` and
    ``k`` (and ``v``, or None) ``[B, Hkv, Sk, D]``: tensor types, 4-D shapes, the dtypes the
    resolved ``backend`` runs (fp64 only on the reference), one device, matching batch and head
    dim, ``Hq % Hkv == 0`` and the kernels' head-dim limit. Raises TypeError/ValueError naming
    the argument."""
    kv = "k" if v is None else "k/v"
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    allowed = _KERNEL_DTYPES + ((torch.float64,) if backend == "reference" else ())
    if q.dtype not in allowed:
        raise TypeError(f"q must have dtype in {allowed} for backend={backend!r}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    b, hq, _, d = q.shape
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have one shape [B, Hkv, Sk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"{kv} batch size {k.shape[0]} does not match q's {b}")
    if k.shape[3] != d:
        raise ValueError(f"{kv} head dim {k.shape[3]} does not match q's {d}")
    if d == 0:
        raise ValueError("head dim D must be positive")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of {kv} heads ({hkv}){_layout_hint(q, k)}")
    if backend in ("triton", "cuda") and d > MAX_KERNEL_HEAD_DIM:
        raise ValueError(
            f"head dim D={d} is not supported by backend={backend!r} (at most {MAX_KERNEL_HEAD_DIM}); "
            "use backend='reference'"
        )


def check_scale(scale, head_dim: int) -> float:
    """``scale`` as a float (``head_dim ** -0.5`` for None); ValueError for a non-finite, non-real or
    overflowing one."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number, got {scale!r}")
    if abs(scale) > _MAX_SCALE:
        raise ValueError(f"|scale| must be at most {_MAX_SCALE:g} (beyond, fp32 scores overflow to inf and the "
                         f"softmax to NaN), got {scale!r}")
    return float(scale)


def check_flag(name: str, flag) -> bool:
    """``flag`` as a bool (a numpy bool too); TypeError naming ``name`` otherwise."""
    if not isinstance(flag, _BOOL_TYPES):
        raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return bool(flag)


def _layout_hint(q: Tensor, k: Tensor) -> str:
    """A hint when q/k look like ``[B, S, H, D]`` (the flash-attn layout) rather than ``[B, H, S, D]``."""
    sq, hq, sk, hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if hkv and hq % hkv == 0 and (sq, sk) != (hq, hkv):
        return (f"; if q/k are [B, S, H, D] (S={sq}, H={hq}), pass q.transpose(1, 2) etc.: "
                "sparse_attention takes [B, H, S, D]")
    return ""


def _check_layout(layout, q: Tensor, k: Tensor) -> None:
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout or None, got {type(layout).__name__}")
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    bl, hl, mq, mk = layout.shape
    bq, bk = layout.block_size
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")
    if (layout.seq_q, layout.seq_k) != (sq, sk):
        hint = _layout_hint(q, k) if (q.shape[1], k.shape[1]) == (layout.seq_q, layout.seq_k) else ""
        raise ValueError(
            f"layout was built for seq_q={layout.seq_q}, seq_k={layout.seq_k} but q/k have Sq={sq}, Sk={sk}{hint}"
        )
    if mq != ceil_div(sq, bq) or mk != ceil_div(sk, bk):
        raise ValueError(f"layout has {mq}x{mk} blocks; Sq={sq}, Sk={sk} with blocks {bq}x{bk} need "
                         f"{ceil_div(sq, bq)}x{ceil_div(sk, bk)}")
    if bl not in (1, b):
        raise ValueError(f"layout batch dim must be 1 or B={b}, got {bl}")
    if hl not in (1, hkv, hq):
        raise ValueError(f"layout head dim must be 1, Hkv={hkv} or Hq={hq}, got {hl}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: Optional[BlockSparseLayout] = None,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Block-sparse scaled-dot-product attention, differentiable.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA:
            query head ``h`` reads K/V head ``h // (Hq // Hkv)``; K/V are never repeated).
            fp16, bf16 or fp32 (fp64 with ``backend="reference"``). Any strides with a unit
            last stride are used in place (``[B, S, H, D]`` storage passed as
            ``.transpose(1, 2)`` is free); others are copied.
        layout: a :class:`BlockSparseLayout` built for ``(Sq, Sk)``; ``None`` = dense.
        causal: also mask keys after the query, bottom-right aligned: query ``i`` sees key
            ``j`` iff ``j <= i + (Sk - Sq)``. For ``Sq = 2, Sk = 4``::

                1 1 1 0
                1 1 1 1

        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]`` (fp32, natural log). It is
            differentiable too.
        backend: ``"auto"`` (fastest available on CUDA tensors, the reference on CPU),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"``, or
            ``"cuda"`` (the CUDA C++ decode kernel; decode-shaped calls only). A causal call
            with one query row and no gradient to compute runs on the split-K decode kernel
            (:func:`sparse_attn.decode.sparse_decode`, without its own-block rule) when the
            backend is a kernel one.

    Returns:
        ``out [B, Hq, Sq, D]`` in q's dtype, or ``(out, lse)``. A query row that sees no
        key gets output 0, lse ``-inf`` and zero gradients.

    Example::

        >>> q = torch.randn(1, 4, 256, 64); k = v = torch.randn(1, 2, 256, 64)
        >>> mask = torch.rand(1, 2, 4, 4) < 0.5
        >>> layout = BlockSparseLayout.from_block_mask(mask, block_size=64)
        >>> sparse_attention(q, k, v, layout).shape
        torch.Size([1, 4, 256, 64])
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    resolved = resolve_backend(backend, q.device)
    check_qkv(q, k, v, resolved)
    if layout is not None:
        _check_layout(layout, q, k)
        if _CHECK_LAYOUTS:
            layout.check()
    scale = check_scale(scale, q.shape[-1])
    causal, return_lse = check_flag("causal", causal), check_flag("return_lse", return_lse)
    if q.shape[2] == 0 or k.shape[2] == 0:
        resolved = "reference"  # nothing for a kernel to do; the reference gives the empty/zero result
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if _decode.decode_shaped(q, k, layout, causal, resolved):
        # One causal row and no gradient: the split-K decode kernel reads each K/V block once per
        # GQA group instead of once per query head (sparse_decode takes up to 16 rows).
        if backend == "auto" and q.is_cuda and _decode.cuda_supports(q) and _decode.cuda_ready():
            resolved = "cuda"
        out, lse = _decode.decode_from_attention(q, k, v, layout, scale, resolved)
        return (out, lse) if return_lse else out
    if resolved == "cuda":
        raise ValueError("backend='cuda' runs decode-shaped calls only (one causal query row, no gradient, "
                         "fp16/bf16, head dim 64/128/256, a layout with one query-block row shared by each "
                         "KV head); use backend='triton' or 'auto'")

    if layout is None:
        tensors = (None, None, None, None)
        block_q = block_k = 64
    else:
        # The transposed form only serves dK/dV: build (or pass) it only when a gradient can flow.
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        q_side = (layout.q_num, layout.q_idx) if needs_grad else (None, None)
        tensors = (layout.kv_num, layout.kv_idx, *q_side)
        block_q, block_k = layout.block_size
    out, lse, _ = _sparse_attention_op(q, k, v, *tensors, block_q, block_k, causal, float(scale), resolved)
    return (out, lse) if return_lse else out


from . import decode as _decode  # noqa: E402  (decode builds on this module's checks)
