"""Non-finite containment: a NaN or infinity reaches only the outputs that depend on it.

A masked probability is an exact 0, but ``0 * nan`` is NaN: without care, one NaN in V reaches
every row of a kernel tile (or, in a dense PyTorch matmul, every row), including rows the mask
hides that key from. The promise tested here, for every backend: a row's output, lse and dQ, and
a key's dK/dV, are what an fp64 oracle gives that *never multiplies a masked term* -- finite and
close where the oracle is finite, non-finite where it is not.

The poison is put at every position class: in Q, K, V, dO and dlse; at keys hidden from some rows
by the layout and from earlier rows by causality; and past the sequence end (the tensors are views
of larger buffers whose tail holds the poison, which no backend may read). Values: NaN, +inf, -inf.
"""

from __future__ import annotations

import itertools
from typing import Dict, Optional, Tuple

import pytest
import torch

from helpers import element_mask, random_block_mask
from sparse_attn import BlockSparseLayout, available_backends, sparse_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# NaN arithmetic in the Triton interpreter's numpy makes numpy warn; expected here
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
BACKENDS = [b for b in ("reference", "triton") if b in available_backends(DEVICE)]
POISONS = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
NAMES = ("out", "lse", "dq", "dk", "dv")
TOL = {torch.float32: 2e-4, torch.float16: 2e-2}


def _oracle(q, k, v, allowed, scale, do, dlse) -> Dict[str, torch.Tensor]:
    """fp64 attention and its gradients that never multiply a masked term (every product is
    masked elementwise before it is summed). ``allowed [., Hq, Sq, Sk]``; K/V are GQA-expanded."""
    q, k, v, do, dlse = (t.double() for t in (q, k, v, do, dlse))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    keep = allowed.expand(q.shape[0], q.shape[1], -1, -1)

    def masked_sum(a, b, dim):  # sum over `dim` of a * b, masked terms dropped *before* the sum
        return torch.where(keep.unsqueeze(-1), a * b, 0.0).sum(dim)

    s = torch.where(keep, q @ k.transpose(-1, -2) * scale, float("-inf"))
    lse = torch.logsumexp(s, -1)
    # a term whose score is -inf (masked, or -inf by value) has probability 0 and is dropped like
    # a masked one: its 0 never meets the values (so 0 * inf is not formed)
    keep = keep & (s != float("-inf"))
    # a row whose visible scores are all -inf counts as empty (output 0, lse -inf), as in the op
    p = torch.where(keep & (lse != float("-inf")).unsqueeze(-1), torch.exp(s - lse.unsqueeze(-1)), 0.0)
    out = masked_sum(p.unsqueeze(-1), v.unsqueeze(2), 3)  # [B, H, Sq, D]
    dp = do @ v.transpose(-1, -2)
    delta = torch.where(keep, p * dp, 0.0).sum(-1) - dlse
    ds = torch.where(keep, p * (dp - delta.unsqueeze(-1)), 0.0)
    dq = masked_sum(ds.unsqueeze(-1), k.unsqueeze(2), 3) * scale
    dk = masked_sum(ds.unsqueeze(-1), q.unsqueeze(3), 2) * scale
    dv = masked_sum(p.unsqueeze(-1), do.unsqueeze(3), 2)
    B, Hkv, Sk, D = dk.shape[0], dk.shape[1] // group, dk.shape[2], dk.shape[3]
    dk = dk.view(B, Hkv, group, Sk, D).sum(2)
    dv = dv.view(B, Hkv, group, Sk, D).sum(2)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)


def _run(backend, q, k, v, layout, causal, scale, do, dlse) -> Dict[str, torch.Tensor]:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = sparse_attention(q, k, v, layout, causal=causal, scale=scale, return_lse=True, backend=backend)
    torch.autograd.backward((out, lse), (do, dlse))
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


def _check(got, want, dtype, label) -> None:
    for name in NAMES:
        g, w = got[name].double().cpu(), want[name].cpu()
        fin = torch.isfinite(w)
        leaked = fin & ~torch.isfinite(g)
        assert not leaked.any(), (f"{label}: {name} has {int(leaked.sum())} non-finite elements where the oracle "
                                  f"is finite (first at {leaked.nonzero()[0].tolist()})")
        lost = ~fin & torch.isfinite(g)
        assert not lost.any(), (f"{label}: {name} has {int(lost.sum())} finite elements where the oracle is "
                                f"non-finite (first at {lost.nonzero()[0].tolist()}): a visible NaN/inf was dropped")
        err = (g[fin] - w[fin]).abs() / (1.0 + w[fin].abs())
        assert err.numel() == 0 or float(err.max()) <= TOL[dtype], f"{label}: {name} max error {float(err.max()):.3g}"


def _padded(t: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    """``t`` as a view of a larger ``[B, H, S + rows, D]`` buffer whose extra rows hold ``fill``."""
    buf = torch.full((t.shape[0], t.shape[1], t.shape[2] + rows, t.shape[3]), fill, dtype=t.dtype, device=t.device)
    buf[:, :, : t.shape[2]] = t
    return buf[:, :, : t.shape[2]]


CASES = {
    # name: (Hq, Hkv, Sq, Sk, D, block, Hl, causal, dense)
    "layout16-causal": (2, 1, 40, 56, 16, 16, 2, True, False),  # 32-wide tiles hold 2x2 layout blocks (bits)
    "layout32-noncausal": (2, 2, 33, 45, 16, 32, 1, False, False),
    "dense-causal": (2, 1, 37, 37, 16, 16, 1, True, True),  # the kernels' dense walk, diagonal tiles only masked
}


def _setup(case: str, dtype):
    Hq, Hkv, Sq, Sk, D, block, Hl, causal, dense = CASES[case]
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(1, Hq, Sq, D, generator=g)
    k = torch.randn(1, Hkv, Sk, D, generator=g)
    v = torch.randn(1, Hkv, Sk, D, generator=g)
    do = torch.randn(1, Hq, Sq, D, generator=g)
    dlse = torch.randn(1, Hq, Sq, generator=g)
    Mq, Mk = -(-Sq // block), -(-Sk // block)
    if dense:
        mask = torch.ones(1, 1, Mq, Mk, dtype=torch.bool)
    else:
        mask = random_block_mask(1, Hl, Mq, Mk, density=0.6, generator=g)
    layout = BlockSparseLayout.from_block_mask(mask.to(DEVICE), block, Sq, Sk)
    allowed = element_mask(mask, block, block, Sq, Sk, Hq, causal)
    ts = [t.to(DEVICE, dtype) for t in (q, k, v, do)] + [dlse.to(DEVICE)]
    return ts, layout, allowed, causal


def _positions(allowed: torch.Tensor, tensor: str, shape: Tuple[int, ...]):
    """Poison sites: for key-side tensors, keys hidden from some rows by the layout and by
    causality yet seen by others (plus the first and last key); for row-side tensors, a row that
    sees something, one that sees nothing (if any) and the last row."""
    seen_by = allowed[0].any(0)  # [Sq, Sk] over heads
    if tensor in ("k", "v"):
        hidden_some = (~allowed[0]).any(0).any(0) & seen_by.any(0)  # [Sk]
        keys = hidden_some.nonzero().flatten().tolist()
        picks = sorted({0, shape[2] - 1, keys[0], keys[len(keys) // 2], keys[-1]})
    else:
        rows_seen = allowed[0].any(-1).any(0)
        rows = rows_seen.nonzero().flatten().tolist()
        empty = (~allowed[0].any(-1)).all(0).nonzero().flatten().tolist()
        picks = sorted({rows[len(rows) // 2], shape[2] - 1, *(empty[:1])})
    return [(p, (p * 7) % shape[-1]) for p in picks]  # (row of the tensor, column)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_poison_reaches_only_dependent_outputs(backend, case):
    dtype = torch.float32
    (q, k, v, do, dlse), layout, allowed, causal = _setup(case, dtype)
    scale = 0.3
    checked = mixed = 0
    for tensor, poison in itertools.product(("q", "k", "v", "do", "dlse"), POISONS):
        ts = dict(q=q, k=k, v=v, do=do, dlse=dlse)
        t = ts[tensor]
        sites = _positions(allowed, tensor, t.shape if t.dim() == 4 else (*t.shape, 1))
        for row, col in sites:
            bad = {n: x.clone() for n, x in ts.items()}
            h = (row * 5) % t.shape[1]
            if tensor == "dlse":
                bad[tensor][0, h, row] = POISONS[poison]
            else:
                bad[tensor][0, h, row, col] = POISONS[poison]
            want = _oracle(bad["q"].cpu(), bad["k"].cpu(), bad["v"].cpu(), allowed, scale, bad["do"].cpu(),
                           bad["dlse"].cpu())
            got = _run(backend, bad["q"], bad["k"], bad["v"], layout, causal, scale, bad["do"], bad["dlse"])
            label = f"{case} {backend}: {poison} at {tensor}[0, {h}, {row}" + ("]" if tensor == "dlse" else f", {col}]")
            _check(got, want, dtype, label)
            # every site poisons something; most also leave something finite (a key every row
            # sees, like key 0 of a dense causal case, may rightly poison everything)
            assert any((~torch.isfinite(want[n])).any() for n in NAMES), label
            mixed += all(torch.isfinite(want[n]).any() for n in ("out", "lse", "dq"))
            checked += 1
    assert checked >= 5 * 3 * 2 and mixed >= checked // 2, (checked, mixed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", sorted(POISONS))
def test_values_past_the_sequence_end_are_never_read(backend, poison):
    """Q/K/V/dO are views of buffers whose rows past Sq/Sk hold the poison: nothing may change."""
    dtype = torch.float32
    (q, k, v, do, dlse), layout, allowed, causal = _setup("layout16-causal", dtype)
    fill = POISONS[poison]
    want = _run(backend, q, k, v, layout, causal, None, do, dlse)
    qp, kp, vp, dop = (_padded(t, 9, fill) for t in (q, k, v, do))
    got = _run(backend, qp, kp, vp, layout, causal, None, dop, dlse)
    assert torch.isfinite(want["out"]).all() and (want["lse"] > float("-inf")).any()
    for name in NAMES:  # bitwise equal: the padded buffers change only strides
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_contained(backend):
    """The contained products also in fp16 (the kernels' value operand is converted there)."""
    dtype = torch.float16
    (q, k, v, do, dlse), layout, allowed, causal = _setup("layout16-causal", dtype)
    keys = ((~allowed[0]).any(0).any(0) & allowed[0].any(0).any(0)).nonzero().flatten().tolist()
    for tensor, poison in itertools.product(("k", "v"), POISONS):
        bad = dict(q=q.clone(), k=k.clone(), v=v.clone())
        bad[tensor][0, 0, keys[len(keys) // 2], 3] = POISONS[poison]
        want = _oracle(bad["q"].cpu(), bad["k"].cpu(), bad["v"].cpu(), allowed, None or q.shape[-1] ** -0.5,
                       do.cpu(), dlse.cpu())
        got = _run(backend, bad["q"], bad["k"], bad["v"], layout, causal, None, do, dlse)
        _check(got, want, dtype, f"fp16 {backend}: {poison} in {tensor}")
