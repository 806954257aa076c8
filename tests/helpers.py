"""Small shared helpers for the sparse_attn tests (importable as ``from helpers import ...``).

Everything here is deliberately naive and independent of ``sparse_attn``: the element
mask is built by plain block expansion, and ``naive_attention`` materialises the whole
``[Sq, Sk]`` score matrix, so it can serve as an oracle for the reference and kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "TOLERANCES",
    "tolerances",
    "random_block_mask",
    "element_mask",
    "naive_attention",
    "make_qkv",
    "assert_no_nan",
    "assert_rows_within",
    "run_fwd_bwd",
    "assert_matches_reference",
    "s2_rule_mask",
    "page_pool",
    "random_block_lists",
]

# Per-dtype tolerances for outputs / lse and for gradients, when comparing a result
# computed in ``dtype`` (with fp32 accumulation) against an fp64 oracle.
TOLERANCES = {
    torch.float64: {"out": dict(atol=1e-10, rtol=1e-10), "grad": dict(atol=1e-9, rtol=1e-9)},
    torch.float32: {"out": dict(atol=2e-5, rtol=2e-5), "grad": dict(atol=1e-4, rtol=1e-4)},
    torch.float16: {"out": dict(atol=2e-3, rtol=2e-3), "grad": dict(atol=1e-2, rtol=1e-2)},
    torch.bfloat16: {"out": dict(atol=1.6e-2, rtol=1.6e-2), "grad": dict(atol=6e-2, rtol=5e-2)},
}


def tolerances(dtype: torch.dtype, kind: str = "out") -> dict:
    """``dict(atol=..., rtol=...)`` for ``kind`` in {"out", "grad"} (use "out" for lse too)."""
    return dict(TOLERANCES[dtype][kind])


def random_block_mask(
    Bl: int,
    Hl: int,
    Mq: int,
    Mk: int,
    density: float = 0.5,
    generator: Optional[torch.Generator] = None,
    ensure_empty_rows: bool = True,
    ensure_full_rows: bool = False,
    device=None,
) -> torch.Tensor:
    """Random boolean block mask ``[Bl, Hl, Mq, Mk]``.

    With ``ensure_empty_rows`` (and ``Mq >= 2``) one random query-block row of every
    ``(b, h)`` (never row 0) is cleared, so the "row sees nothing" path is always
    exercised. With ``ensure_full_rows`` another row (a different one; needs ``Mq >= 3``
    when empty rows are also requested) is set entirely.
    """
    mask = torch.rand(Bl, Hl, Mq, Mk, generator=generator) < density
    for b in range(Bl):
        for h in range(Hl):
            empty = None
            if ensure_empty_rows and Mq >= 2:
                empty = int(torch.randint(1, Mq, (1,), generator=generator))
                mask[b, h, empty] = False
            if ensure_full_rows:
                full = Mq - 1 if empty is None else (empty + 1 if empty + 1 < Mq else 1)
                if full != empty:
                    mask[b, h, full] = True
    return mask.to(device) if device is not None else mask


def element_mask(
    block_mask: Optional[torch.Tensor],
    bq: int,
    bk: int,
    Sq: int,
    Sk: int,
    Hq: int,
    causal: bool,
) -> torch.Tensor:
    """Boolean ``[Bl, Hq, Sq, Sk]`` mask of which key each query may see (``Bl``/heads
    of size 1 when the block mask is shared / ``None``).

    Query ``i`` sees key ``j`` iff block ``(i // bq, j // bk)`` is kept and, if causal,
    ``j <= i + (Sk - Sq)``. A layout with ``Hl`` heads, ``1 < Hl < Hq``, is shared by
    groups of ``Hq // Hl`` consecutive query heads.
    """
    if block_mask is None:
        m = torch.ones(1, 1, Sq, Sk, dtype=torch.bool)
    else:
        bm = block_mask.bool()
        Bl, Hl, Mq, Mk = bm.shape
        assert Mq == -(-Sq // bq) and Mk == -(-Sk // bk), "block mask does not fit the sequence lengths"
        m = bm.repeat_interleave(bq, dim=2)[:, :, :Sq].repeat_interleave(bk, dim=3)[:, :, :, :Sk]
        if Hl not in (1, Hq):
            assert Hq % Hl == 0
            m = m.repeat_interleave(Hq // Hl, dim=1)
    if causal:
        i = torch.arange(Sq, device=m.device)[:, None]
        j = torch.arange(Sk, device=m.device)[None, :]
        m = m & (j <= i + (Sk - Sq))
    return m.contiguous()


def naive_attention(q, k, v, elem_mask=None, scale=None, return_lse=False):
    """Dense masked softmax attention (materialises all ``[Sq, Sk]`` scores), in the dtype
    of the inputs; differentiable (no NaN in forward or backward on empty rows).

    ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` (GQA: key head ``h // (Hq // Hkv)``),
    ``elem_mask`` broadcastable to ``[B, Hq, Sq, Sk]`` (True = may attend) or None.
    Rows that see nothing give output 0 and lse ``-inf``.
    Returns ``out`` (or ``(out, lse)`` with ``return_lse=True``).
    """
    Hq, D = q.shape[1], q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    group = Hq // k.shape[1]
    kx = k.repeat_interleave(group, dim=1)
    vx = v.repeat_interleave(group, dim=1)
    s = (q @ kx.transpose(-1, -2)) * scale
    if elem_mask is not None:
        s = s.masked_fill(~elem_mask.to(s.device), float("-inf"))
    row_max = s.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    empty = denom == 0
    safe = torch.where(empty, torch.ones_like(denom), denom)
    p = e / safe
    out = p @ vx
    if not return_lse:
        return out
    lse = (row_max + torch.log(safe)).squeeze(-1)
    lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return out, lse


def make_qkv(
    B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, device="cpu", generator=None, requires_grad=False, scale=1.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q ``[B, Hq, Sq, D]``, k, v ``[B, Hkv, Sk, D]`` (drawn in fp32 on the CPU,
    then cast and moved, so every dtype sees the same values up to rounding)."""
    q = torch.randn(B, Hq, Sq, D, generator=generator) * scale
    k = torch.randn(B, Hkv, Sk, D, generator=generator) * scale
    v = torch.randn(B, Hkv, Sk, D, generator=generator)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v))


def assert_no_nan(*tensors, names=None):
    for i, t in enumerate(tensors):
        if t is None:
            continue
        name = names[i] if names else f"tensor {i}"
        assert not torch.isnan(t).any(), f"{name} contains NaN"


# Per-element floor of the row criterion, in units of the row's largest reference magnitude.
_ROW_FLOOR = {torch.float64: 1e-12, torch.float32: 4 * 2.0 ** -23, torch.float16: 4 * 2.0 ** -10,
              torch.bfloat16: 4 * 2.0 ** -7}


def assert_rows_within(name: str, got: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor,
                       dtype: torch.dtype, factor: float = 2.0) -> None:
    """flash-attn's criterion, per row: ``max|got - ref| <= factor * max|same_dtype - ref| + floor``
    over each row's last dim, where ``ref`` is the fp64 oracle and ``same_dtype`` PyTorch's own
    computation in the inputs' dtype. ``floor`` is a few ulps of ``dtype`` times the row's largest
    reference value (plus 1e-6), so rows where PyTorch happens to be exact do not fail on
    rounding. A dropped or extra block moves its rows far past this; a global norm would not see it.
    For ``lse`` (fp32 in every dtype) pass ``[..., 1]``-shaped tensors and ``dtype=torch.float32``.
    """
    g, p, r = (t.detach().double().cpu() for t in (got, same_dtype, ref))
    finite = torch.isfinite(r)
    assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite entries differ from the reference"
    g, p, r = (torch.where(finite, t, torch.zeros_like(t)) for t in (g, p, r))
    ours = (g - r).abs().amax(-1)
    theirs = (p - r).abs().amax(-1)
    floor = _ROW_FLOOR[dtype] * r.abs().amax(-1) + 1e-6
    bad = ours > factor * theirs + floor
    if bad.any():
        i = tuple(int(x) for x in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} rows out of {bad.numel()} exceed {factor}x PyTorch's "
                             f"same-dtype error; first at {i}: ours {ours[i]:.3e}, PyTorch {theirs[i]:.3e}, "
                             f"floor {floor[i]:.3e}")


def run_fwd_bwd(fn, q, k, v, do, dlse):
    """``fn(q, k, v) -> (out, lse)`` on fresh leaf copies, then backward of
    ``<out, do> + <lse, dlse>`` (``-inf`` lse entries contribute 0). Returns
    ``(out, lse, dq, dk, dv)``."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.float() * do.float()).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * dlse).sum()
    loss.backward()
    return out, lse, q.grad, k.grad, v.grad


def assert_matches_reference(q, k, v, layout, ref_layout, causal, backend):
    """``sparse_attention(q, k, v, layout)`` on ``backend`` equals ``reference_attention`` with
    ``ref_layout`` (the same mask in another form), forward and the gradients of
    ``sum(out ** 2)`` (q, k, v are leaves with ``requires_grad``)."""
    from sparse_attn import reference_attention, sparse_attention

    out = sparse_attention(q, k, v, layout, causal=causal, backend=backend)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = reference_attention(q, k, v, ref_layout, causal=causal)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-4, rtol=1e-4)


def s2_rule_mask(num_heads, seq_q, seq_k, block_size, local_blocks, vert_stride, *, num_kv_heads=None,
                 homo_head=False, num_dense_heads=0, head_sliding_offset=0, kv_start_position=0,
                 vert_position_type=None, causal=True, heads=None):
    """The S2-Attention rule as DKernel defines it (``get_sparse_attn_mask``), one (head, query
    block, key block) at a time: bool ``[1, Hp, Mq, Mk]`` for pattern heads ``heads`` (default all
    of them; pattern heads are the KV heads when ``num_kv_heads`` is given, else the query heads,
    and the head step is ``max(1, vert_stride // num_heads)`` with ``num_heads`` the query heads).
    Queries are the last ``seq_q`` keys, a query block placed by its first token. The one S2 oracle
    of the test-suite."""
    bs = block_size
    mq, mk = -(-seq_q // bs), -(-seq_k // bs)
    n_pattern = num_kv_heads or num_heads
    heads = range(n_pattern) if heads is None else range(*heads)
    if vert_position_type is None:
        vert_position_type = "absolute" if causal else "relative"
    if causal:
        left, right = local_blocks, 1
    elif isinstance(local_blocks, int):
        left = right = local_blocks
    else:
        left, right = local_blocks
    step = max(1, vert_stride // num_heads)  # query heads, whatever the pattern is defined over
    kv0 = kv_start_position // bs
    out = torch.zeros(1, len(heads), mq, mk, dtype=torch.bool)
    for a, h in enumerate(heads):
        shift = 0 if homo_head else h * step
        for r in range(mq):
            q = kv0 + (seq_k - seq_q + r * bs) // bs  # absolute block of the row's first query token
            for c in range(mk):
                k = kv0 + c
                if h >= n_pattern - num_dense_heads:
                    keep = True
                elif vert_position_type == "relative":
                    keep = (max(0, q - k - left + 1) + max(0, k - q - right + 1)) % vert_stride == 0
                else:
                    local = q - k < left and k - q < right
                    keep = local or (k + shift + head_sliding_offset) % vert_stride == 0
                out[0, a, r, c] = keep and (q >= k or not causal)
    return out


def page_pool(cache, page_size, gen, extra_pages=0):
    """``cache [B, Hkv, S, D]`` as a shuffled page pool ``[P, page_size, Hkv, D]`` and its
    ``block_table [B, ceil(S / page_size)]`` int32: the pages are ``torch.randperm(P, generator=gen)``
    in order, ``P = B * ceil(S / page_size) + extra_pages``; NaN in pages no sequence owns and
    past ``S`` in each sequence's last page."""
    bsz, hkv, s, d = cache.shape
    per_seq = -(-s // page_size)
    total = bsz * per_seq + extra_pages
    perm = torch.randperm(total, generator=gen)
    pool = torch.full((total, page_size, hkv, d), float("nan"), dtype=cache.dtype)
    table = torch.empty(bsz, per_seq, dtype=torch.int32)
    padded = torch.full((bsz, hkv, per_seq * page_size, d), float("nan"), dtype=cache.dtype)
    padded[:, :, :s] = cache
    for b in range(bsz):
        for pg in range(per_seq):
            pid = int(perm[b * per_seq + pg])
            table[b, pg] = pid
            pool[pid] = padded[b, :, pg * page_size : (pg + 1) * page_size].transpose(0, 1)
    return pool, table


def random_block_lists(bsz, hkv, nblocks, n, gen):
    """Decode block lists ``(kv_num [B, Hkv], kv_idx [B, Hkv, n])`` int32: up to ``n`` (at most
    ``nblocks``) random blocks of ``[0, nblocks)``, ascending; (0, 0) is empty; the entries past
    each count are garbage (-7)."""
    kv_num = torch.randint(0, n + 1, (bsz, hkv), generator=gen, dtype=torch.int32)
    kv_num[0, 0] = 0
    kv_idx = torch.full((bsz, hkv, n), -7, dtype=torch.int32)
    for b in range(bsz):
        for h in range(hkv):
            m = min(int(kv_num[b, h]), nblocks)
            kv_num[b, h] = m
            kv_idx[b, h, :m] = torch.randperm(nblocks, generator=gen)[:m].sort().values
    return kv_num, kv_idx
