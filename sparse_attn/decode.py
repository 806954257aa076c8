"""``sparse_decode()``: block-sparse attention of a few new query tokens over a KV cache.

Decode is memory-bound: one to sixteen new query rows per sequence read a long cache, so a sparse
pattern pays only if the kernel reads just the kept key blocks, once per GQA group. The kernels
(Triton in ``triton_kernels/decode.py``, CUDA C++ in ``csrc/decode/``) split each
(sequence, KV head)'s kept blocks across programs (flash-decoding) and merge the partial results
by their log-sum-exp; every query head of a group and every new row share one tile.

The rule. With ``G = Hq // Hkv``, query head ``hq`` reads KV head ``h = hq // G``. Sequence
``b`` holds ``L = cache_seqlens[b]`` tokens (the ``Sq`` new ones included), so its query row
``i`` sits at position ``p = L - Sq + i`` and sees key ``j`` iff ``j <= p`` and the key's block
``c = j // block_size`` is kept for ``(b, h)``:

* ``kv_blocks=None``: every block (dense decode);
* ``kv_blocks=(kv_num, kv_idx)``: ``c`` is one of ``kv_idx[b, h, :kv_num[b, h]]``, or ``c`` is
  the row's own block ``p // block_size`` (a token always sees its own block);
* ``kv_blocks=S2Config(...)``: the S2 rule in closed form (no list is built): ``c`` is in the
  row's window (``p // block_size - c < local_blocks``) or on the head's stride
  (``c % vert_stride == r_h``, :func:`sparse_attn.patterns.s2.stride_residue` with
  ``num_heads = Hkv``, ``num_query_heads = Hq``); the last ``num_dense_heads`` KV heads keep
  every block.

A row that sees nothing (``L = 0``, or ``p < 0`` when ``L < Sq``) gets output 0 and lse ``-inf``.

Caches. Contiguous: ``k_cache[b, h, j]``, ``[B, Hkv, S_max, D]`` (any strides with a unit last
one, so ``[B, S, H, D]`` storage passed as ``.transpose(1, 2)`` is free). Paged (vLLM's and
SGLang's layout): pools ``[num_pages, page_size, Hkv, D]`` and ``block_table [B, max_pages]``;
key ``j`` of sequence ``b`` is row ``j % page_size`` of page ``block_table[b, j // page_size]``.
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _cuda
from .layout import SUPPORTED_BLOCK_SIZES, ceil_div
from .ops import check_flag, check_qkv, check_scale, resolve_backend
from .patterns.s2 import S2Config, stride_residue
from .reference import reference_forward

__all__ = ["sparse_decode", "reference_decode", "DECODE_MAX_SQ", "decode_backends", "cuda_ready", "cuda_supports"]

DECODE_MAX_SQ = 16  # the most new query rows per sequence a decode call takes
# sparse_attention() hands calls of at most this many query rows to the decode kernels. One: the
# decode kernels share a tile between rows and do not contain non-finite values the way the
# op's kernels do (a NaN at a key that row i+1 sees and row i does not would reach row i through
# 0 * NaN); with one row per sequence every row of a tile sees the same keys, so nothing can leak.
ROUTE_MAX_SQ = 1
PAGE_SIZES = (16, 32, 64, 128, 256)
CUDA_HEAD_DIMS = (64, 128, 256)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
# CPU tensors with backend="cuda" run the CUDA C++ kernel under the host shim of the CUDA
# execution model (test infrastructure: slow, and blind to timing and memory-model races).
_EMULATE_CUDA = os.environ.get("SPARSE_ATTN_CUDA_EMULATE", "0") not in ("", "0")
# Debug: check the contents of every kv_blocks list (a host read per call), like the op's layouts.
_CHECK_LISTS = os.environ.get("SPARSE_ATTN_CHECK_LAYOUTS", "0") not in ("", "0")

KVBlocks = Union[None, Tuple[Tensor, Tensor], S2Config]


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------
def _gather_sequence(cache: Tensor, b: int, length: int, block_table: Optional[Tensor]) -> Tensor:
    """The first ``length`` keys (or values) of sequence ``b``: ``[Hkv, length, D]``."""
    if block_table is None:
        return cache[b, :, :length]
    page_size, num_pages = cache.shape[1], cache.shape[0]
    pages = block_table[b, : ceil_div(length, page_size)].long().clamp(0, num_pages - 1)
    return cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:length].transpose(0, 1)


def _row_blocks(b: int, hkv: int, sq: int, length: int, bs: int, kv_num, kv_idx, s2_residues, s2_local: int,
                s2_stride: int, own_block: bool, device) -> Optional[Tensor]:
    """Boolean ``[1, Hkv, Sq, ceil(length / bs)]``: which key blocks each new row keeps (None: all)."""
    nblocks = ceil_div(length, bs)
    rows = torch.arange(sq, device=device)
    own = ((length - sq + rows).clamp(min=0) // bs)[None, :, None]  # [1, Sq, 1]
    cols = torch.arange(nblocks, device=device)[None, None, :]
    if s2_residues is not None:
        r = s2_residues.to(device=device, dtype=torch.long)[:, None, None]
        keep = (r < 0) | (own - cols < s2_local) | (cols % s2_stride == r)
    elif kv_num is not None:
        n = kv_num[b].long().clamp(0, kv_idx.shape[-1])[:, None]  # [Hkv, 1]
        ids = kv_idx[b].long()
        valid = (torch.arange(ids.shape[-1], device=device)[None, :] < n) & (ids >= 0) & (ids < nblocks)
        listed = torch.zeros(hkv, nblocks + 1, dtype=torch.bool, device=device)
        listed.scatter_(1, torch.where(valid, ids, nblocks), True)  # invalid entries land in a spare column
        keep = listed[:, None, :nblocks].expand(hkv, sq, nblocks)
        if own_block:
            keep = keep | (cols == own)
    else:
        return None
    return keep.expand(hkv, sq, nblocks)[None]


def reference_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     block_table: Optional[Tensor], kv_num: Optional[Tensor], kv_idx: Optional[Tensor],
                     s2_residues: Optional[Tensor], s2_local: int, s2_stride: int, block_size: int, scale: float,
                     own_block: bool) -> Tuple[Tensor, Tensor]:
    """The exact decode (the module docstring's rule), one sequence at a time through
    :func:`sparse_attn.reference.reference_forward` with one-row query blocks. The backends'
    launcher signature; returns ``(out [B, Hq, Sq, D], lse [B, Hq, Sq])`` (lse fp32, fp64 for fp64).
    Reads the lengths on the host: the oracle, not a hot path."""
    bsz, hq, sq, d = q.shape
    paged = block_table is not None
    hkv = k_cache.shape[2] if paged else k_cache.shape[1]
    cap = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(bsz, hq, sq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((bsz, hq, sq), float("-inf"), dtype=acc, device=q.device)
    for b, length in enumerate(cache_seqlens.tolist()):
        length = max(0, min(int(length), cap))
        if length == 0:
            continue
        k = _gather_sequence(k_cache, b, length, block_table)[None]
        v = _gather_sequence(v_cache, b, length, block_table)[None]
        mask = _row_blocks(b, hkv, sq, length, block_size, kv_num, kv_idx, s2_residues, s2_local, s2_stride,
                           own_block, q.device)
        # one-row query blocks give each new row its own block rule; causal is bottom-right aligned
        # (row i sees j <= i + length - Sq), exactly the decode position rule
        o, l = reference_forward(q[b : b + 1], k, v, mask, (1, block_size), True, scale)
        out[b], lse[b] = o[0], l[0].to(acc)
    return out, lse


# --------------------------------------------------------------------------------------------
# Backends and the custom op
# --------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def cuda_ready() -> bool:
    """Whether the CUDA C++ decode kernel is built and loaded here (nothing is compiled to find
    out): what ``backend="auto"`` prefers on CUDA tensors."""
    return _cuda.cuda_loaded()


@torch.compiler.assume_constant_result
def _cuda_unavailable() -> str:
    """Why ``backend="cuda"`` cannot run on a CUDA device ("" if it can; may JIT-build it once)."""
    return _cuda.cuda_available()[1] or ("" if _cuda.cuda_available()[0] else "unknown")


def decode_backends(device: Union[str, torch.device] = "cuda") -> Tuple[str, ...]:
    """The backends ``sparse_decode`` can run on ``device`` here without building anything
    (``"cuda"`` when the CUDA C++ extension is loaded; always ``"reference"``)."""
    from .ops import available_backends

    device = torch.device(device)
    out = list(available_backends(device))
    if device.type == "cuda" and cuda_ready():
        out.insert(0, "cuda")
    elif device.type == "cpu" and _EMULATE_CUDA:
        out.insert(0, "cuda")
    return tuple(out)


def resolve_cuda(device: torch.device) -> str:
    """``"cuda"`` if the CUDA C++ kernels can run on ``device``, else an error naming why."""
    if device.type == "cuda":
        why = _cuda_unavailable()
        if why:
            raise RuntimeError(f"backend='cuda': the CUDA C++ extension is not available ({why}); "
                               "use backend='auto' or 'triton'")
    elif not (device.type == "cpu" and _EMULATE_CUDA):
        raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}; use backend='reference' (or 'triton' "
                         "with TRITON_INTERPRET=1 set before importing triton). CPU runs of the CUDA kernel are "
                         "emulated for tests only (SPARSE_ATTN_CUDA_EMULATE=1)")
    return "cuda"


def cuda_supports(q: Tensor) -> bool:
    """Whether the CUDA C++ kernel takes ``q``'s dtype and head dim (what ``"auto"`` checks)."""
    return q.dtype in _CUDA_DTYPES and q.shape[-1] in CUDA_HEAD_DIMS


def _resolve(backend: str, q: Tensor) -> str:
    if backend == "auto" and q.is_cuda and cuda_supports(q) and cuda_ready():
        return "cuda"
    return resolve_backend(backend, q.device)


def _check_cuda_inputs(q: Tensor) -> None:
    if q.dtype not in _CUDA_DTYPES:
        raise TypeError(f"backend='cuda' runs fp16 and bf16, got {q.dtype}; use backend='triton' or 'reference'")
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        raise ValueError(f"backend='cuda' supports head dims {CUDA_HEAD_DIMS}, got {q.shape[-1]}; "
                         "use backend='triton'")


@torch.library.custom_op("sparse_attn::sparse_decode", mutates_args=())
def _sparse_decode_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor],
    kv_num: Optional[Tensor],
    kv_idx: Optional[Tensor],
    s2_residues: Optional[Tensor],
    s2_local: int,
    s2_stride: int,
    block_size: int,
    scale: float,
    own_block: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    args = (q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx, s2_residues, s2_local, s2_stride,
            block_size, scale, own_block)
    if backend == "triton":
        return importlib.import_module("sparse_attn.triton_kernels.decode").sparse_decode_fwd(*args)
    if backend == "cuda":
        return _cuda.decode_fwd_cuda(*args) if q.is_cuda else _cuda.decode_fwd_emulated(*args)
    return reference_decode(*args)


@_sparse_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx, s2_residues, s2_local, s2_stride, block_size,
      scale, own_block, backend):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _int_tensor(name: str, t, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor (int32), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t.to(torch.int32)


def _check_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table, resolved: str) -> Tensor:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"a paged {name} must be 4-D [num_pages, page_size, Hkv, D], got shape {tuple(t.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    num_pages, page_size, hkv, d = k_cache.shape
    # the shared q/k/v checks, on a one-page view that has the [B, Hkv, S, D] form
    view = k_cache[:1].permute(0, 2, 1, 3).expand(q.shape[0], hkv, page_size, d)
    try:
        check_qkv(q, view, v_cache[:1].permute(0, 2, 1, 3).expand(q.shape[0], hkv, page_size, d), resolved)
    except ValueError as e:
        raise ValueError(f"{e} (block_table is given, so k_cache/v_cache are read as paged pools "
                         f"[num_pages, page_size, Hkv, D] = {tuple(k_cache.shape)})") from None
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page_size (k_cache.shape[1]) must be one of {PAGE_SIZES}, got {page_size}")
    if num_pages == 0:
        raise ValueError("the paged cache has no pages (k_cache.shape[0] == 0)")
    block_table = _int_tensor("block_table", block_table, q.device)
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be [B={q.shape[0]}, max_pages], got shape {tuple(block_table.shape)}")
    return block_table


# (S2Config, Hkv, Hq, device) -> the residues tensor: built once, so a decode step over an S2
# config makes no host-to-device copy (which would also break CUDA-graph capture).
_RESIDUES: Dict[Tuple[S2Config, int, int, torch.device], Tensor] = {}


def _s2_residues(cfg: S2Config, hkv: int, hq: int, device: torch.device) -> Tensor:
    """int32 ``[Hkv]``: each KV head's stride residue (:func:`stride_residue`), -1 for the dense heads."""
    key = (cfg, hkv, hq, device)
    cached = None if torch.compiler.is_compiling() else _RESIDUES.get(key)
    if cached is not None:
        return cached
    sharded = hkv - cfg.num_dense_heads
    residues = [stride_residue(h, hkv, cfg.vert_stride, cfg.homo_head, cfg.head_sliding_offset,
                               num_query_heads=hq, kv_start_block=cfg.kv_start_position // cfg.block_size)
                if h < sharded else -1 for h in range(hkv)]
    res = torch.tensor(residues, dtype=torch.int32).to(device)
    if not torch.compiler.is_compiling():  # traced code gets the tensor as a constant instead
        _RESIDUES[key] = res
    return res


def _check_kv_blocks(kv_blocks, q: Tensor, hkv: int, block_size: Optional[int], cap: int):
    """``(kv_num, kv_idx, s2_residues, s2_local, s2_stride, block_size)`` from ``kv_blocks``."""
    bsz, hq = q.shape[0], q.shape[1]
    if isinstance(kv_blocks, S2Config):
        cfg = kv_blocks
        if block_size is not None and block_size != cfg.block_size:
            raise ValueError(f"block_size={block_size} differs from the S2Config's block_size={cfg.block_size}; "
                             "omit block_size (the config's is used)")
        if cfg.position_type(True) != "absolute" or not isinstance(cfg.local_blocks, int) or cfg.local_blocks < 1:
            raise ValueError("sparse_decode takes the causal absolute S2 rule: vert_position_type None or "
                             f"'absolute' and an int local_blocks >= 1 (got {cfg.vert_position_type!r}, "
                             f"{cfg.local_blocks!r})")
        cfg.check_heads(hkv, hq)
        return None, None, _s2_residues(cfg, hkv, hq, q.device), cfg.local_blocks, cfg.vert_stride, cfg.block_size
    bs = 64 if block_size is None else block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if kv_blocks is None:
        return None, None, None, 1, 1, bs
    if not isinstance(kv_blocks, (tuple, list)) or len(kv_blocks) != 2:
        raise TypeError("kv_blocks must be None, a pair (kv_num [B, Hkv], kv_idx [B, Hkv, N]) or an S2Config, "
                        f"got {type(kv_blocks).__name__}")
    kv_num = _int_tensor("kv_num", kv_blocks[0], q.device)
    kv_idx = _int_tensor("kv_idx", kv_blocks[1], q.device)
    if kv_num.dim() != 2 or kv_num.shape[0] not in (1, bsz) or kv_num.shape[1] not in (1, hkv):
        raise ValueError(f"kv_num must be [B={bsz}, Hkv={hkv}] (1 broadcasts), got shape {tuple(kv_num.shape)}")
    if kv_idx.dim() != 3 or kv_idx.shape[0] not in (1, bsz) or kv_idx.shape[1] not in (1, hkv):
        raise ValueError(f"kv_idx must be [B={bsz}, Hkv={hkv}, N] (1 broadcasts), got shape {tuple(kv_idx.shape)}")
    kv_num, kv_idx = kv_num.expand(bsz, hkv), kv_idx.expand(bsz, hkv, kv_idx.shape[2])
    if _CHECK_LISTS:
        _check_list_contents(kv_num, kv_idx, ceil_div(cap, bs))
    return kv_num, kv_idx, None, 1, 1, bs


def _check_list_contents(kv_num: Tensor, kv_idx: Tensor, nblocks: int) -> None:
    """Debug (``SPARSE_ATTN_CHECK_LAYOUTS=1``, a host read): counts in ``[0, N]``, listed ids in
    ``[0, nblocks)`` and strictly ascending. Without it the kernels clamp counts and skip ids out of
    range, so bad lists give wrong numbers but never a read outside the cache."""
    n = kv_idx.shape[-1]
    if bool(((kv_num < 0) | (kv_num > n)).any()):
        raise ValueError(f"kv_num must lie in [0, N={n}]")
    valid = torch.arange(n, device=kv_idx.device) < kv_num[..., None].long()
    ids = kv_idx.long()
    if bool((valid & ((ids < 0) | (ids >= nblocks))).any()):
        raise ValueError(f"kv_idx holds block ids outside [0, {nblocks})")
    if n > 1 and bool((valid[..., 1:] & (ids[..., 1:] <= ids[..., :-1])).any()):
        raise ValueError("kv_idx must be strictly ascending within each row's kv_num entries")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def sparse_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor] = None,
    kv_blocks: KVBlocks = None,
    block_size: Optional[int] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of ``Sq`` new query rows per sequence over a (block-sparse) KV cache. Inference
    only (no autograd); ``torch.compile`` traces it as the op ``sparse_attn::sparse_decode``.

    Args:
        q: ``[B, Hq, Sq, D]``, ``1 <= Sq <= 16`` (decode; speculative / multi-token decode);
            fp16, bf16 or fp32 (fp64 on the reference; fp16/bf16 and D in 64/128/256 on "cuda").
        k_cache, v_cache: contiguous ``[B, Hkv, S_max, D]``, or, with ``block_table``, paged
            pools ``[num_pages, page_size, Hkv, D]`` (page_size 16..256, a power of two).
            ``Hq % Hkv == 0``; q's dtype and device.
        cache_seqlens: ``[B]`` integer (int32): tokens in each sequence's cache, the ``Sq`` new
            ones included. Values past the cache's capacity are cut to it.
        block_table: ``[B, max_pages]`` integer page ids, for the paged form.
        kv_blocks: ``None`` (dense), ``(kv_num [B, Hkv], kv_idx [B, Hkv, N])`` -- per
            (sequence, KV head) the count and the strictly ascending ids of the kept key blocks
            (a dim of 1 broadcasts) -- or an :class:`~sparse_attn.patterns.s2.S2Config` (causal,
            absolute), applied in closed form. The row's own block is always kept.
        block_size: the key-block size the lists count in (16, 32, 64, 128); default 64, or the
            S2Config's.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]`` (natural log, fp32).
        backend: ``"auto"`` (CUDA tensors: the CUDA C++ kernel when it is built and loaded -- the
            prebuilt ``sparse_attn._C``, or after ``sparse_attn._cuda.load_cuda()`` -- else Triton;
            CPU: the reference), ``"cuda"`` (JIT-builds the extension on first use if it is not
            prebuilt), ``"triton"`` or ``"reference"``.

    Returns:
        ``out [B, Hq, Sq, D]`` (q's dtype), or ``(out, lse)``. A row that sees no key gets 0 and
        lse ``-inf``. A NaN or infinity in the cache reaches the rows that keep its key and, when
        ``Sq > 1``, may reach the sequence's other new rows too (the kernels share a tile between
        rows and multiply masked terms by 0); :func:`sparse_attention` contains them row by row.

    Example (two sequences of 100 and 37 tokens, one new token each, every 4th block kept)::

        >>> q = torch.randn(2, 8, 1, 64); k = v = torch.randn(2, 2, 128, 64)
        >>> lens = torch.tensor([100, 37], dtype=torch.int32)
        >>> kv_num = torch.full((2, 2), 1, dtype=torch.int32)
        >>> kv_idx = torch.zeros(2, 2, 1, dtype=torch.int32)
        >>> sparse_decode(q, k, v, lens, kv_blocks=(kv_num, kv_idx), block_size=16).shape
        torch.Size([2, 8, 1, 64])
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, Hq, Sq, D], got shape {tuple(q.shape)}")
    resolved = _resolve(backend, q)
    if not 1 <= q.shape[2] <= DECODE_MAX_SQ:
        raise ValueError(f"q must hold 1..{DECODE_MAX_SQ} new rows per sequence (Sq), got {q.shape[2]}; "
                         "use sparse_attention for prefill")
    if block_table is None:
        check_qkv(q, k_cache, v_cache, resolved)
        hkv, cap = k_cache.shape[1], k_cache.shape[2]
    else:
        block_table = _check_paged(q, k_cache, v_cache, block_table, resolved)
        hkv, cap = k_cache.shape[2], block_table.shape[1] * k_cache.shape[1]
    cache_seqlens = _int_tensor("cache_seqlens", cache_seqlens, q.device)
    if cache_seqlens.shape != (q.shape[0],):
        raise ValueError(f"cache_seqlens must be [B={q.shape[0]}], got shape {tuple(cache_seqlens.shape)}")
    kv_num, kv_idx, residues, local, stride, bs = _check_kv_blocks(kv_blocks, q, hkv, block_size, cap)
    scale = check_scale(scale, q.shape[-1])
    return_lse = check_flag("return_lse", return_lse)
    if resolved == "cuda":
        _check_cuda_inputs(q)
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    out, lse = _sparse_decode_op(q, k_cache, v_cache, cache_seqlens.contiguous(), block_table, kv_num, kv_idx,
                                 residues, local, stride, bs, scale, True, resolved)
    return (out, lse) if return_lse else out


def decode_shaped(q: Tensor, k: Tensor, layout, causal: bool, resolved: str) -> bool:
    """Whether a :func:`sparse_attention` call can run on the decode kernel instead: one query row
    (:data:`ROUTE_MAX_SQ`), causal, no gradient to compute, a kernel backend, and a layout (if any)
    with one query block row listing blocks per KV head (or shared)."""
    sq, hkv = q.shape[2], k.shape[1]
    if resolved not in ("triton", "cuda") or not causal or not 1 <= sq <= ROUTE_MAX_SQ or k.shape[2] == 0:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    if resolved == "cuda" and not cuda_supports(q):
        return False
    if layout is None:
        return True
    return (layout.num_query_blocks == 1 and layout.shape[1] in (1, hkv)
            and layout.block_size[1] in SUPPORTED_BLOCK_SIZES)


def decode_from_attention(q: Tensor, k: Tensor, v: Tensor, layout, scale: float, resolved: str):
    """:func:`sparse_attention`'s result for a call :func:`decode_shaped` accepted: ``(out, lse)``.
    Every sequence holds ``Sk`` keys and the layout's row is used as it is (no own-block rule)."""
    bsz, hkv, sk = k.shape[0], k.shape[1], k.shape[2]
    lens = torch.full((bsz,), sk, dtype=torch.int32, device=q.device)
    if layout is None:
        kv_num = kv_idx = None
        bs = 64
    else:
        kv_num = layout.kv_num[:, :, 0].expand(bsz, hkv)
        kv_idx = layout.kv_idx[:, :, 0].expand(bsz, hkv, layout.kv_idx.shape[-1])
        bs = layout.block_size[1]
    return _sparse_decode_op(q, k, v, lens, None, kv_num, kv_idx, None, 1, 1, bs, scale, False, resolved)
