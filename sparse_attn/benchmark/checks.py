"""Cross-kernel correctness checks run inside the benchmark.

Every timed kernel's forward output and gradients are compared with an oracle:

* a layout covering every causal block (the ``dense`` pattern) and every dense peer: the
  SDPA baseline of the run;
* otherwise: our exact reference backend (``backend="reference"``) on the same layout, over the
  whole sequence up to ``--check-full-max-seq``, beyond that on the last ``--check-rows`` query
  rows (forward output and dQ of those rows; dK/dV need every row and are not checked there).

Tolerances: forward ``|a - b| <= atol + rtol |ref|``; gradients
``|a - b| <= g_atol max|ref| + g_rtol |ref|`` (gradient scales grow with the sequence).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..layout import BlockSparseLayout
from ..ops import sparse_attention
from .registry import Case

__all__ = ["TOLS", "compare", "reference_outputs", "check_rows"]

TOLS = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2, g_atol=5e-2, g_rtol=5e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3, g_atol=1e-2, g_rtol=1e-2),
    torch.float32: dict(atol=1e-4, rtol=1e-4, g_atol=1e-4, g_rtol=1e-3),
}


def compare(a: torch.Tensor, b: torch.Tensor, tol: Dict[str, float], grad: bool) -> Tuple[float, bool]:
    """``(max |a - b|, within tolerance and finite)`` for ``a`` against the reference ``b``.

    Example::

        >>> compare(torch.ones(3), torch.ones(3) + 1e-6, TOLS[torch.float32], grad=False)[1]
        True
    """
    if a.shape != b.shape:
        raise ValueError(f"compare: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    if grad:
        bound = tol["g_atol"] * b.abs().max() + tol["g_rtol"] * b.abs()
    else:
        bound = tol["atol"] + tol["rtol"] * b.abs()
    ok = bool((diff <= bound).all()) and bool(torch.isfinite(a).all())
    return (float(diff.max()) if diff.numel() else 0.0), ok


def reference_outputs(case: Case, mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      dout: torch.Tensor, rows: Optional[int] = None) -> Dict[str, Any]:
    """Our exact reference on the case's block mask, over all query rows or only the last ``rows``.

    Args:
        case: the case (block size, sequence length).
        mask: bool ``[Bl, Hl, Mq, Mk]``, the layout's block mask.
        q ``[B, Hq, S, D]``, k, v ``[B, Hkv, S, D]``, dout ``[B, Hq, S, D]``.
        rows: ``None`` = full check. Else at least the last ``rows`` query rows, starting at a
            query-block boundary (bottom-right causal alignment keeps the sub-problem exact).

    Returns:
        ``{"out": [B, Hq, n, D], "grads": (dq, dk, dv) | (dq_rows,), "rows": n or None}``.

    Example::

        >>> case = Case("dense", 64, None, 1, 2, 1, 16, 16, "fp32")
        >>> q = torch.randn(1, 2, 64, 16); k = v = torch.randn(1, 1, 64, 16)
        >>> ref = reference_outputs(case, torch.ones(1, 1, 4, 4, dtype=torch.bool), q, k, v, q, rows=20)
        >>> ref["out"].shape, ref["rows"]
        (torch.Size([1, 2, 32, 16]), 32)
    """
    s, bs = case.seq, case.block
    mq = mask.shape[2]
    if rows is None or rows >= s:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        layout = BlockSparseLayout.from_block_mask(mask, bs, s, s)
        out = sparse_attention(qq, kk, vv, layout, causal=True, backend="reference")
        grads = torch.autograd.grad(out, (qq, kk, vv), dout)
        return dict(out=out.detach(), grads=tuple(g.detach() for g in grads), rows=None)
    r0 = min(max(0, (s - int(rows)) // bs), mq - 1)  # first query block of the window
    n = s - r0 * bs
    qq = q.detach()[:, :, -n:].requires_grad_()
    layout = BlockSparseLayout.from_block_mask(mask[:, :, r0:].contiguous(), bs, n, s)
    out = sparse_attention(qq, k.detach(), v.detach(), layout, causal=True, backend="reference")
    (dq,) = torch.autograd.grad(out, (qq,), dout[:, :, -n:])
    return dict(out=out.detach(), grads=(dq.detach(),), rows=n)


def _restrict(outputs: Dict[str, Any], n: Optional[int]) -> Dict[str, Any]:
    """A kernel's outputs cut to what a partial reference covers (last ``n`` rows; dQ only)."""
    if n is None:
        return outputs
    grads = outputs.get("grads")
    return dict(out=outputs["out"][:, :, -n:], grads=None if grads is None else (grads[0][:, :, -n:],))


def check_rows(rows: List[Dict[str, Any]], outputs: Dict[str, Dict[str, Any]], oracle: Optional[str],
               oracle_outputs: Optional[Dict[str, Any]], tol: Dict[str, float]) -> None:
    """Fill ``check``, ``check_ref`` and ``max_err`` of timed rows whose kernel has outputs.

    Args:
        rows: result rows (``kernel``, ``pass``, ``status``); ``fwd`` rows compare the output,
            ``bwd`` / ``fwd_bwd`` rows the gradients.
        outputs: ``{kernel: {"out": Tensor, "grads": tuple | None}}``.
        oracle: the oracle's name (``check_ref``), e.g. ``"sdpa_flash"`` or ``"reference"``.
        oracle_outputs: its outputs (``rows`` = partial: compare the last rows and dQ only).
        tol: an entry of :data:`TOLS`.

    Example::

        >>> row = {"kernel": "k", "pass": "fwd", "status": "ok"}
        >>> check_rows([row], {"k": {"out": torch.ones(1, 1, 2, 2)}}, "ref",
        ...            {"out": torch.ones(1, 1, 2, 2), "grads": None}, TOLS[torch.float32])
        >>> row["check"], row["check_ref"]
        ('ok', 'ref')
    """
    n = None if oracle_outputs is None else oracle_outputs.get("rows")
    for row in rows:
        if row.get("status") != "ok" or row["kernel"] not in outputs or row["kernel"] == oracle:
            continue
        mine = _restrict(outputs[row["kernel"]], n)
        what = "out" if row["pass"] == "fwd" else "grads"
        if oracle_outputs is None or mine.get(what) is None or oracle_outputs.get(what) is None:
            row.update(check="n/a", check_ref=oracle)
            continue
        if what == "out":
            err, ok = compare(mine["out"], oracle_outputs["out"], tol, grad=False)
        else:
            res = [compare(a, b, tol, grad=True) for a, b in zip(mine["grads"], oracle_outputs["grads"])]
            err, ok = max(e for e, _ in res), all(o for _, o in res)
        ref = oracle if n is None else f"{oracle} (last {n} rows{', dq' if what == 'grads' else ''})"
        row.update(check="ok" if ok else "FAIL", check_ref=ref, max_err=err)
