#!/usr/bin/env python
"""Benchmark runner for ``sparse_attn``: our block-sparse kernels vs SDPA-flash and FlexAttention.

Structure (meant to grow into a registry of peers and patterns):

* ``build_cases(args)`` -> a list of case dicts (one per sequence length x density);
* ``KERNELS`` -> ``{name: run_case}``; each ``run_case(case, data, env)`` times one kernel's
  forward and backward on one case and returns result rows (an exception becomes an error
  row, it never ends the run);
* ``check_case`` compares forward outputs / gradients between kernels;
* ``write_outputs`` writes JSON + CSV + markdown (rewritten after every case, so a run that is
  cut short still leaves its results); ``markdown_table`` is also printed to stdout.

CUDA mode (default): bf16, D=128, B=1, Hq=Hkv=H, causal, block 128, timed with
``triton.testing.do_bench`` (median and 20/80 quantiles, L2 flushed per call).
``--cpu``: a smoke run of the whole harness on tiny CPU shapes (fp32, S=256, D=64, H=2,
block 64, our ``backend="reference"``, SDPA math, eager flex), timed with
``time.perf_counter``; its numbers are NOT speed claims.

Usage::

    PYTHONPATH=. python bench/run.py --quick --out bench/results
    PYTHONPATH=. python bench/run.py --cpu --out /tmp/benchout
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparse_attn import BlockSparseLayout, sparse_attention  # noqa: E402
from sparse_attn.layout import compress_block_mask  # noqa: E402

# Columns of every result row, in CSV / JSON order.
COLUMNS = [
    "seq", "density", "blocks_frac", "blocks_frac_all", "kernel", "pass", "ms", "ms_p20", "ms_p80",
    "tflops", "speedup_vs_sdpa", "layout_ms", "check_ref", "max_err", "check", "first_call_s",
    "bwd_method", "batch", "heads", "head_dim", "block", "dtype", "pairs", "flops", "error",
]

BWD_RETAIN = "autograd.grad(retain_graph=True) on a saved graph"
BWD_SUBTRACT = "time(fwd+bwd) - time(fwd)"
BASELINE = "sdpa_flash"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Tolerances of the cross-kernel checks: forward elementwise |a-b| <= atol + rtol*|ref|;
# gradients elementwise |a-b| <= g_atol * max|ref| + g_rtol * |ref| (gradient scales grow with S).
TOLS = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2, g_atol=5e-2, g_rtol=5e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3, g_atol=1e-2, g_rtol=1e-2),
    torch.float32: dict(atol=1e-4, rtol=1e-4, g_atol=1e-4, g_rtol=1e-3),
}


# ------------------------------------------------------------------------------------------------
# Environment: device, timer, peers' settings
# ------------------------------------------------------------------------------------------------
class Env:
    """What differs between the CUDA benchmark and the CPU smoke run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cpu = bool(args.cpu)
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda")
        self.dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if self.cpu else torch.bfloat16)
        self.ours_backend = "reference" if self.cpu else "triton"
        self.quick = bool(args.quick)
        if self.cpu:
            self.warmup, self.rep = 1, 3  # CPU: warm-up calls, timed calls
        elif self.quick:
            self.warmup, self.rep = 10, 50  # do_bench milliseconds
        else:
            self.warmup, self.rep = 25, 200
        self.budget_s: Optional[float] = args.budget_s
        self.t0 = time.perf_counter()
        self.cache: Dict[Any, Any] = {}  # per-seq: inputs, SDPA results, flex mask buffers
        self._flex_fn: Optional[Callable] = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s

    def bench(self, fn: Callable[[], Any]) -> Tuple[float, float, float]:
        """(median, p20, p80) milliseconds of ``fn()``."""
        if self.device.type == "cuda":
            import triton.testing

            res = triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep, quantiles=[0.5, 0.2, 0.8])
            return float(res[0]), float(res[1]), float(res[2])
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.rep):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        return float(q[0]), float(q[1]), float(q[2])

    def flex_fn(self) -> Callable:
        """``torch.compile(flex_attention)`` once per process (static shapes: one compile per
        sequence length) on CUDA; eager flex on CPU (compiling on 2 CPU cores is too slow for a
        smoke run)."""
        if self._flex_fn is None:
            from torch.nn.attention.flex_attention import flex_attention

            if self.cpu:
                self._flex_fn = flex_attention
            else:
                import torch._dynamo

                cfg = torch._dynamo.config
                for name in ("cache_size_limit", "recompile_limit"):
                    if hasattr(cfg, name):
                        setattr(cfg, name, max(int(getattr(cfg, name)), 64))
                self._flex_fn = torch.compile(flex_attention, dynamic=False)
        return self._flex_fn


# ------------------------------------------------------------------------------------------------
# Cases and their data
# ------------------------------------------------------------------------------------------------
def build_cases(args: argparse.Namespace, env: Env) -> List[Dict[str, Any]]:
    """One case dict per (seq, density); seq outer so inputs and compiles are reused per seq."""
    cases = []
    for seq in args.seqs:
        for density in args.densities:
            cases.append(dict(
                pattern="random", seq=int(seq), density=float(density), batch=1, heads=int(args.heads),
                head_dim=int(args.head_dim), block=int(args.block), causal=True,
                dtype=str(env.dtype).replace("torch.", ""), seed=int(args.seed),
            ))
    return cases


def random_block_mask(case: Dict[str, Any]) -> torch.Tensor:
    """bool [H, Mq, Mk] (CPU): Bernoulli(density) blocks, density 1.0 = all ones, and for every
    query block the key block holding its first row's last visible key (the diagonal block when
    Sq == Sk) always kept, so no query row is left without keys."""
    s, bs, h, d = case["seq"], case["block"], case["heads"], case["density"]
    m = -(-s // bs)
    if d >= 1.0:
        return torch.ones(h, m, m, dtype=torch.bool)
    gen = torch.Generator().manual_seed(case["seed"] * 1_000_003 + s * 101 + int(round(d * 1000)))
    mask = torch.rand(h, m, m, generator=gen) < d
    rows = torch.arange(m)
    diag = ((rows * bs + (s - s)) // bs).clamp(0, m - 1)  # bottom-right aligned; Sq == Sk here
    mask[:, rows, diag] = True
    return mask


def pair_counts(seq_q: int, seq_k: int, bq: int, bk: int, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """int64 [Mq, Mk] (CPU): visible (i, j) pairs inside each block if it is kept, and each
    block's full area. Causal is bottom-right aligned: j <= i + Sk - Sq."""
    mq, mk = -(-seq_q // bq), -(-seq_k // bk)
    i = torch.arange(seq_q, dtype=torch.int64)[:, None]
    kstart = torch.arange(mk, dtype=torch.int64)[None, :] * bk
    kend = (kstart + bk).clamp(max=seq_k)
    klen = kend - kstart
    if causal:
        vis = (torch.minimum(i + (seq_k - seq_q) + 1, kend) - kstart).clamp(min=0)
        vis = torch.minimum(vis, klen)
    else:
        vis = klen.expand(seq_q, mk)
    pad = mq * bq - seq_q
    if pad:
        vis = torch.cat([vis, torch.zeros(pad, mk, dtype=torch.int64)])
    counts = vis.reshape(mq, bq, mk).sum(1)
    qlen = (torch.arange(mq, dtype=torch.int64) * bq + bq).clamp(max=seq_q) - torch.arange(mq, dtype=torch.int64) * bq
    area = qlen[:, None] * klen
    return counts, area


def get_inputs(case: Dict[str, Any], env: Env) -> Dict[str, torch.Tensor]:
    """q, k, v (requires_grad) and dout, shared by every density (and kernel) of one seq."""
    key = ("inputs", case["seq"], case["heads"], case["head_dim"], case["batch"])
    if key not in env.cache:
        for k in [k for k in env.cache if isinstance(k, tuple) and k[0] in ("inputs", "sdpa")]:
            del env.cache[k]  # keep only one seq's tensors (inputs, SDPA outputs) alive
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        gen = torch.Generator(device=env.device).manual_seed(case["seed"] + case["seq"])
        shape = (case["batch"], case["heads"], case["seq"], case["head_dim"])

        def rnd(grad: bool) -> torch.Tensor:
            t = torch.randn(shape, generator=gen, device=env.device, dtype=torch.float32).to(env.dtype)
            return t.requires_grad_(grad)

        env.cache[key] = dict(q=rnd(True), k=rnd(True), v=rnd(True), dout=rnd(False))
    return env.cache[key]


def prepare_case(case: Dict[str, Any], env: Env) -> Dict[str, Any]:
    """Inputs, block mask, our layout (and its build time), visible-pair counts."""
    s, bs, h = case["seq"], case["block"], case["heads"]
    data: Dict[str, Any] = dict(get_inputs(case, env))
    mask = random_block_mask(case)  # [H, Mq, Mk] CPU
    counts, area = pair_counts(s, s, bs, bs, case["causal"])
    causal_blocks = counts > 0
    computed = mask & causal_blocks
    data.update(mask=mask, counts=counts, area=area)
    data["pairs"] = int((computed.to(torch.int64) * counts).sum()) * case["batch"]
    data["dense_pairs"] = int(counts.sum()) * h * case["batch"]
    data["blocks_frac"] = float(computed.sum()) / max(1, int(causal_blocks.sum()) * h)
    data["blocks_frac_all"] = float(computed.sum()) / max(1, computed.numel())

    mask_dev = mask.unsqueeze(0).to(env.device)  # [1, H, Mq, Mk]
    build = lambda: BlockSparseLayout.from_block_mask(mask_dev, block_size=bs, seq_q=s, seq_k=s)  # noqa: E731
    data["layout"] = build()
    env.sync()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        build()
        env.sync()
        times.append((time.perf_counter() - t) * 1e3)
    data["layout_ms"] = sorted(times)[len(times) // 2]
    data["outputs"] = {}
    return data


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def make_row(case: Dict[str, Any], data: Dict[str, Any], kernel: str, pass_: str, **kw: Any) -> Dict[str, Any]:
    dense = kernel == BASELINE
    row = {c: None for c in COLUMNS}
    row.update(
        seq=case["seq"], density=None if dense else case["density"],
        blocks_frac=1.0 if dense else data["blocks_frac"],
        blocks_frac_all=None if dense else data["blocks_frac_all"],
        kernel=kernel, **{"pass": pass_}, batch=case["batch"], heads=case["heads"],
        head_dim=case["head_dim"], block=case["block"], dtype=case["dtype"],
    )
    pairs = data["dense_pairs"] if dense else data["pairs"]
    fwd_flops = 4 * case["heads"] * case["head_dim"] * pairs  # pairs already include the batch
    row["pairs"] = pairs
    row["flops"] = fwd_flops * (2.5 if pass_ == "bwd" else 1.0)
    row.update(kw)
    if row["ms"] is not None and row["ms"] > 0:
        row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
    return row


def error_row(case, data, kernel, pass_, exc: BaseException) -> Dict[str, Any]:
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    row = make_row(case, data, kernel, pass_, error=msg[:300])
    row["traceback"] = traceback.format_exc()[-4000:]
    return row


def time_fwd_bwd(name: str, case, data, env: Env, attn: Callable[..., torch.Tensor],
                 extra: Optional[dict] = None) -> List[Dict[str, Any]]:
    """Time ``attn(q, k, v)`` forward and its backward; store outputs/grads for the checks.

    The forward is timed with requires_grad inputs (as in training). If that forward raises
    (e.g. eager flex on CPU refuses inputs that need grad) in the CPU smoke run, it is timed on
    detached inputs instead (noted) and the backward becomes an error row.
    """
    extra = dict(extra or {})
    q, k, v, dout = data["q"], data["k"], data["v"], data["dout"]
    rows: List[Dict[str, Any]] = []
    # First call: compiles / JIT-builds (reported as first_call_s, not part of the timing).
    t = time.perf_counter()
    bwd_exc: Optional[BaseException] = None
    try:
        out = attn(q, k, v)
    except Exception as exc:  # noqa: BLE001
        if not env.cpu:
            raise  # on CUDA a second (no-grad) compile would only burn time
        bwd_exc = exc
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        try:
            out = attn(qd, kd, vd)
        except Exception:  # noqa: BLE001
            raise exc from None  # the original failure is the interesting one
        extra["note"] = "fwd timed without grad (grad inputs unsupported)"
        fwd = lambda: attn(qd, kd, vd)  # noqa: E731
    else:
        fwd = lambda: attn(q, k, v)  # noqa: E731
    grads = None
    if bwd_exc is None:
        try:
            grads = torch.autograd.grad(out, (q, k, v), dout)
        except Exception as exc:  # noqa: BLE001
            bwd_exc = exc
    env.sync()
    first_call_s = time.perf_counter() - t
    data["outputs"][name] = dict(out=out.detach(), grads=None if grads is None else tuple(g.detach() for g in grads))
    del out, grads

    try:
        ms, p20, p80 = env.bench(fwd)
        rows.append(make_row(case, data, name, "fwd", ms=ms, ms_p20=p20, ms_p80=p80,
                             first_call_s=first_call_s, **extra))
    except Exception as exc:  # noqa: BLE001
        rows.append(error_row(case, data, name, "fwd", exc))
        bwd_exc = bwd_exc or exc
    if bwd_exc is not None:
        rows.append(error_row(case, data, name, "bwd", bwd_exc))
        return rows
    extra.pop("note", None)
    try:
        out = fwd()
        bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
        try:
            bwd()
            bwd()  # a second backward on the same graph must work too
            env.sync()
            ms, p20, p80 = env.bench(bwd)
            method = BWD_RETAIN
        except Exception:  # noqa: BLE001 - e.g. a compiled graph that frees its buffers
            del out
            both = lambda: torch.autograd.grad(fwd(), (q, k, v), dout)  # noqa: E731
            b_ms, b_p20, b_p80 = env.bench(both)
            f_ms = rows[0]["ms"]
            ms, p20, p80 = b_ms - f_ms, b_p20 - f_ms, b_p80 - f_ms
            method = BWD_SUBTRACT
        rows.append(make_row(case, data, name, "bwd", ms=ms, ms_p20=p20, ms_p80=p80, bwd_method=method, **extra))
    except Exception as exc:  # noqa: BLE001
        rows.append(error_row(case, data, name, "bwd", exc))
    return rows


# ------------------------------------------------------------------------------------------------
# Kernels: run_case(case, data, env) -> rows
# ------------------------------------------------------------------------------------------------
def run_case_ours(case, data, env: Env) -> List[Dict[str, Any]]:
    q, k, v, layout = data["q"], data["k"], data["v"], data["layout"]
    backend = env.ours_backend
    attn = lambda q, k, v: sparse_attention(q, k, v, layout, causal=True, backend=backend)  # noqa: E731
    return time_fwd_bwd("ours", case, data, env, attn, extra=dict(layout_ms=data["layout_ms"]))


def run_case_sdpa(case, data, env: Env) -> List[Dict[str, Any]]:
    """Dense causal SDPA (flash backend on CUDA, math on CPU): the baseline whatever the density.
    Timed once per sequence length; the rows are emitted with the first case of that length."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    key = ("sdpa", case["seq"], case["heads"], case["head_dim"], case["batch"])
    if key in env.cache:
        rows, outputs = env.cache[key]
        if outputs is not None:
            data["outputs"][BASELINE] = outputs
        return []  # rows already reported for this seq
    backend = SDPBackend.MATH if env.cpu else SDPBackend.FLASH_ATTENTION

    def attn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # Sq == Sk: top-left == bottom-right

    try:
        rows = time_fwd_bwd(BASELINE, case, data, env, attn,
                            extra=dict(note="SDPA math backend (cpu smoke)") if env.cpu else None)
    except Exception as exc:  # noqa: BLE001
        rows = [error_row(case, data, BASELINE, "fwd", exc), error_row(case, data, BASELINE, "bwd", exc)]
    env.cache[key] = (rows, data["outputs"].get(BASELINE))
    return rows


def flex_block_mask(case, data, env: Env):
    """FlexAttention BlockMask for (the same block mask) AND causal, BLOCK_SIZE = case block.

    Built directly from the block lists (``BlockMask.from_kv_blocks``): blocks entirely visible
    are "full" (no mask_mod), kept blocks crossing the causal diagonal are "partial". The
    mask_mod indexes the block-mask tensor and applies causal, so the element mask is exact on
    its own too (eager flex evaluates it everywhere). ``create_block_mask`` would materialise
    the [B, H, S, S] mask (8.6 G elements at S=32k, H=8); it is used as a cross-check where
    that is small. The mask tensor and mask_mod are created once per sequence length (the
    tensor is refilled per density) so the compiled flex_attention is not recompiled.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    s, bs, h = case["seq"], case["block"], case["heads"]
    key = ("flexmask", s, h, bs)
    if key not in env.cache:
        for k in [k for k in env.cache if isinstance(k, tuple) and k[0] == "flexmask"]:
            del env.cache[k]
        buf = torch.zeros(data["mask"].shape, dtype=torch.bool, device=env.device)
        offset = 0  # Sk - Sq

        def mask_mod(b, hh, q_idx, kv_idx):
            return buf[hh, q_idx // bs, kv_idx // bs] & (kv_idx <= q_idx + offset)

        env.cache[key] = (buf, mask_mod)
    buf, mask_mod = env.cache[key]
    buf.copy_(data["mask"])

    kept = data["mask"] & (data["counts"] > 0)
    # "full" = every pair of a whole bs x bs block visible; edge blocks of a sequence that ends
    # inside a block stay partial (as create_block_mask does).
    full = kept & (data["counts"] == bs * bs)
    partial = kept & ~full
    kv_num, kv_idx = compress_block_mask(partial.unsqueeze(0))
    full_num, full_idx = compress_block_mask(full.unsqueeze(0))
    dev = env.device
    kwargs = dict(BLOCK_SIZE=bs, mask_mod=mask_mod)
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (s, s)
    bm = BlockMask.from_kv_blocks(kv_num.to(dev), kv_idx.to(dev), full_num.to(dev), full_idx.to(dev), **kwargs)

    note = "create_block_mask cross-check skipped (too large)"
    if case["batch"] * h * s * s <= (1 << 27):
        ref = create_block_mask(mask_mod, 1, h, s, s, device=dev, BLOCK_SIZE=bs)
        same = torch.equal(ref.to_dense().bool(), bm.to_dense().bool())
        rf, mf = ref.full_kv_num_blocks, bm.full_kv_num_blocks
        same = same and int(0 if rf is None else rf.sum()) == int(mf.sum())
        note = "create_block_mask cross-check ok" if same else "create_block_mask cross-check MISMATCH"
        if not same:
            raise RuntimeError("flex BlockMask from_kv_blocks != create_block_mask")
    return bm, note


def run_case_flex(case, data, env: Env) -> List[Dict[str, Any]]:
    try:
        bm, note = flex_block_mask(case, data, env)
        flex = env.flex_fn()
    except Exception as exc:  # noqa: BLE001
        return [error_row(case, data, "flex", "fwd", exc), error_row(case, data, "flex", "bwd", exc)]
    attn = lambda q, k, v: flex(q, k, v, block_mask=bm)  # noqa: E731
    try:
        rows = time_fwd_bwd("flex", case, data, env, attn)
    except Exception as exc:  # noqa: BLE001
        return [error_row(case, data, "flex", "fwd", exc), error_row(case, data, "flex", "bwd", exc)]
    data["flex_note"] = note
    return rows


# Kernels still run once the time budget is spent (cheap: no compile); the others are skipped.
ALWAYS_RUN = ("ours", BASELINE)

# Order matters: the baseline and peers first, so our rows can be checked against them.
KERNELS: Dict[str, Callable[[Dict[str, Any], Dict[str, Any], Env], List[Dict[str, Any]]]] = {
    BASELINE: run_case_sdpa,
    "flex": run_case_flex,
    "ours": run_case_ours,
}


# ------------------------------------------------------------------------------------------------
# Correctness checks
# ------------------------------------------------------------------------------------------------
def _compare(a: torch.Tensor, b: torch.Tensor, tol: dict, grad: bool) -> Tuple[float, bool]:
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    if grad:
        bound = tol["g_atol"] * b.abs().max() + tol["g_rtol"] * b.abs()
    else:
        bound = tol["atol"] + tol["rtol"] * b.abs()
    ok = bool((diff <= bound).all()) and bool(torch.isfinite(a).all())
    return float(diff.max()) if diff.numel() else 0.0, ok


def _reference_outputs(case, data, env: Env) -> Dict[str, Any]:
    """Our own reference backend (exact, chunked): the check of last resort."""
    q, k, v, dout = data["q"], data["k"], data["v"], data["dout"]
    out = sparse_attention(q, k, v, data["layout"], causal=True, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return dict(out=out.detach(), grads=tuple(g.detach() for g in grads))


def check_case(case, data, rows: List[Dict[str, Any]], env: Env) -> None:
    """Fill check_ref / max_err / check on ours rows and (at density 1.0) on flex rows.

    Reference for ours: SDPA at density 1.0, else flex with the same mask, else (or where that
    peer has no output / gradients) our own exact reference backend. Flex is checked vs SDPA.
    """
    outs = data["outputs"]
    tol = TOLS[env.dtype]

    def pick(candidates: List[str], what: str) -> Optional[str]:
        for c in candidates:
            if c == "reference" and "reference" not in outs:
                try:
                    outs["reference"] = _reference_outputs(case, data, env)
                except Exception as exc:  # noqa: BLE001
                    data["check_error"] = f"{type(exc).__name__}: {exc}"[:200]
                    return None
            if c in outs and outs[c].get(what) is not None:
                return c
        return None

    dense = case["density"] >= 1.0
    plans = [("ours", [BASELINE, "flex", "reference"] if dense else ["flex", "reference"])]
    if dense:
        plans.append(("flex", [BASELINE]))
    for name, candidates in plans:
        for row in rows:
            if row["kernel"] != name or row.get("error"):
                continue
            what = "out" if row["pass"] == "fwd" else "grads"
            ref = pick(candidates, what)
            if ref is None or outs.get(name, {}).get(what) is None:
                row.update(check_ref=ref, check="n/a")
                continue
            if what == "out":
                err, ok = _compare(outs[name]["out"], outs[ref]["out"], tol, grad=False)
            else:
                errs = [_compare(a, b, tol, grad=True) for a, b in zip(outs[name]["grads"], outs[ref]["grads"])]
                err, ok = max(e for e, _ in errs), all(o for _, o in errs)
            row.update(check_ref=ref, max_err=err, check="ok" if ok else "FAIL")
    if data.get("flex_note"):
        for row in rows:
            if row["kernel"] == "flex" and not row.get("error"):
                row["note"] = "; ".join(x for x in (row.get("note"), data["flex_note"]) if x)


def speedups(rows: List[Dict[str, Any]]) -> None:
    base = {(r["seq"], r["pass"]): r["ms"] for r in rows if r["kernel"] == BASELINE and r.get("ms")}
    for r in rows:
        b = base.get((r["seq"], r["pass"]))
        r["speedup_vs_sdpa"] = (b / r["ms"]) if (b and r.get("ms") and r["ms"] > 0) else None


# ------------------------------------------------------------------------------------------------
# Output writers
# ------------------------------------------------------------------------------------------------
def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def git_commit() -> Tuple[str, Optional[bool]]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown"), (bool(dirty) if sha else None)
    except Exception:  # noqa: BLE001
        return "unknown", None


def metadata(args: argparse.Namespace, env: Env) -> Dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "unavailable"
    if env.device.type == "cuda":
        gpu = torch.cuda.get_device_name(env.device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(env.device)))
    else:
        gpu, cap = "cpu", None
    commit, dirty = git_commit()
    now = _dt.datetime.now()
    return dict(
        mode="cpu-smoke" if env.cpu else ("cuda-quick" if env.quick else "cuda"),
        speed_claims=not env.cpu,
        gpu=gpu, compute_capability=cap, cpu=platform.processor() or platform.machine(),
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
        python=platform.python_version(), git_commit=commit, git_dirty=dirty,
        date=now.isoformat(timespec="seconds"), argv=sys.argv[1:],
        dtype=str(env.dtype).replace("torch.", ""), ours_backend=env.ours_backend,
        sdpa_backend="math" if env.cpu else "flash",
        flex="eager flex_attention" if env.cpu else "torch.compile(flex_attention, dynamic=False)",
        timer=("time.perf_counter (warmup %d, %d reps)" % (env.warmup, env.rep)) if env.cpu else
        ("triton.testing.do_bench(warmup=%dms, rep=%dms), median + 20/80 quantiles" % (env.warmup, env.rep)),
        fwd_timing="forward with requires_grad inputs (graph built, as in training)",
        bwd_timing=f"{BWD_RETAIN} (per row: bwd_method; fallback {BWD_SUBTRACT})",
        flops="fwd = 4*B*H*D*(visible (i,j) pairs in computed blocks); bwd = 2.5 x fwd; "
              "SDPA counts the dense causal pairs",
        density="requested block density (1.0 = all-ones layout; diagonal blocks always kept); "
                "blocks_frac = computed blocks / causal blocks, blocks_frac_all = computed / all blocks",
        check="ours vs SDPA (density 1.0) or flex (same mask) [else our reference backend]; "
              "fwd |a-b| <= atol + rtol|ref|, grads |a-b| <= g_atol max|ref| + g_rtol |ref|; tol=%s"
              % {k: v for k, v in TOLS[env.dtype].items()},
    )


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{nd}f}"
    return str(x)


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = ["seq", "density", "blocks frac", "kernel", "pass", "ms (p20-p80)", "TFLOP/s", "vs SDPA",
            "layout ms", "check", "max err", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("ms") is not None:
            ms = f"{_fmt(r['ms'])} ({_fmt(r['ms_p20'])}-{_fmt(r['ms_p80'])})"
        else:
            ms = "skipped" if str(r.get("error") or "").startswith("skipped") else "ERROR"
        check = "-" if r.get("check") is None else f"{r['check']} vs {r['check_ref']}"
        note = r.get("error") or r.get("note") or ""
        if r["pass"] == "bwd" and r.get("bwd_method") == BWD_SUBTRACT:
            note = (note + "; " if note else "") + "bwd = fwd+bwd - fwd"
        cells = [
            str(r["seq"]), "dense" if r["density"] is None else _fmt(r["density"], 2),
            _fmt(r["blocks_frac"], 3), r["kernel"], r["pass"], ms, _fmt(r.get("tflops"), 1),
            "-" if r.get("speedup_vs_sdpa") is None else f"{r['speedup_vs_sdpa']:.2f}x",
            _fmt(r.get("layout_ms"), 3), check, _fmt(r.get("max_err"), 3), note.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: str, stem: str, meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "csv", "md")}
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    tmp = {ext: p + ".tmp" for ext, p in paths.items()}
    with open(tmp["json"], "w") as f:
        json.dump(dict(meta=meta, columns=COLUMNS + extra, rows=rows), f, indent=1, default=str)
    with open(tmp["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + [c for c in extra if c != "traceback"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with open(tmp["md"], "w") as f:
        f.write(f"# sparse_attn benchmark: {meta['gpu']} ({meta['mode']})\n\n")
        if not meta["speed_claims"]:
            f.write("**CPU smoke run: checks the harness only; these numbers are NOT speed claims.**\n\n")
        for k, v in meta.items():
            f.write(f"- **{k}**: {v}\n")
        f.write("\n" + markdown_table(rows) + "\n")
    for ext in paths:
        os.replace(tmp[ext], paths[ext])
    return paths


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the gpu_check preset: full default grid, fewer repetitions, 150 s peer budget")
    p.add_argument("--cpu", action="store_true",
                   help="smoke mode on CPU: tiny shapes, reference backend, SDPA math; not speed claims")
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="default 4096 8192 16384 32768 (cpu: 256)")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.1])
    p.add_argument("--heads", type=int, default=None, help="Hq = Hkv (default 8; cpu: 2)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (cpu: 64)")
    p.add_argument("--block", type=int, default=None, help="layout block size (default 128; cpu: 64)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (cpu: fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--budget-s", type=float, default=None,
                   help="after this many seconds, only ours and SDPA still run; other peers are "
                        "reported as skipped (default: none; 150 with --quick)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="output directory")
    args = p.parse_args(argv)
    if args.cpu:
        args.seqs = args.seqs or [256]
        args.heads = args.heads or 2
        args.head_dim = args.head_dim or 64
        args.block = args.block or 64
    else:
        args.seqs = args.seqs or [4096, 8192, 16384, 32768]
        args.heads = args.heads or 8
        args.head_dim = args.head_dim or 128
        args.block = args.block or 128
        if args.quick and args.budget_s is None:
            args.budget_s = 150.0
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench/run.py: CUDA is not available; use --cpu for the smoke run", file=sys.stderr)
        return 2
    env = Env(args)
    if not env.cpu and env.dtype == torch.float32:
        print("note: SDPA flash needs fp16/bf16; fp32 runs will report SDPA as an error row", file=sys.stderr)
    meta = metadata(args, env)
    stem = f"bench_{sanitize(meta['gpu'])}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    print(f"# sparse_attn bench: {meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['git_commit'][:12]} | mode {meta['mode']}", flush=True)
    if env.cpu:
        print("# CPU smoke run: harness check only, numbers are NOT speed claims", flush=True)

    kernels = {name: fn for name, fn in KERNELS.items() if name in args.kernels}
    rows: List[Dict[str, Any]] = []
    paths: Dict[str, str] = {}
    for case in build_cases(args, env):
        tag = f"seq={case['seq']} density={case['density']}"
        t_case = time.perf_counter()
        try:
            data = prepare_case(case, env)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            for name in kernels:
                r = {c: None for c in COLUMNS}
                r.update(seq=case["seq"], density=case["density"], kernel=name, **{"pass": "fwd"},
                         error=f"case setup failed: {type(exc).__name__}: {exc}"[:300])
                rows.append(r)
            paths = write_outputs(args.out, stem, meta, rows)
            continue
        case_rows: List[Dict[str, Any]] = []
        for name, run_case in kernels.items():
            if name not in ALWAYS_RUN and env.over_budget():
                print(f"[{tag}] {name}: skipped, time budget of {env.budget_s:.0f}s spent", flush=True)
                case_rows += [make_row(case, data, name, p, error="skipped: time budget") for p in ("fwd", "bwd")]
                continue
            try:
                case_rows += run_case(case, data, env)
            except Exception as exc:  # noqa: BLE001 - a failing peer is a row, not the end of the run
                case_rows += [error_row(case, data, name, "fwd", exc), error_row(case, data, name, "bwd", exc)]
            if env.device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                    if any(r.get("error") for r in case_rows if r["kernel"] == name):
                        torch.cuda.empty_cache()  # e.g. after an out-of-memory error
                except Exception:  # noqa: BLE001 - a sticky CUDA error: the next rows will say so
                    traceback.print_exc()
        try:
            check_case(case, data, case_rows, env)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            for r in case_rows:
                if r["kernel"] == "ours":
                    r["check"] = f"check crashed: {type(exc).__name__}"
        rows += case_rows
        speedups(rows)
        for r in case_rows:
            status = r.get("error") or (f"{r['ms']:.3f} ms  {_fmt(r.get('tflops'), 1)} TFLOP/s"
                                        + (f"  check {r['check']} ({_fmt(r.get('max_err'))})" if r.get("check") else ""))
            print(f"[{tag}] {r['kernel']:>10} {r['pass']}: {status}", flush=True)
        print(f"[{tag}] case took {time.perf_counter() - t_case:.1f}s "
              f"(total {time.perf_counter() - env.t0:.1f}s)", flush=True)
        del data
        paths = write_outputs(args.out, stem, meta, rows)

    meta["total_s"] = round(time.perf_counter() - env.t0, 1)
    paths = write_outputs(args.out, stem, meta, rows)
    print()
    if env.cpu:
        print("CPU smoke run: harness check only, numbers are NOT speed claims.\n")
    for key in ("timer", "fwd_timing", "bwd_timing", "flops", "density", "check"):
        print(f"- {key}: {meta[key]}")
    print()
    print(markdown_table(rows))
    print()
    for ext, p in paths.items():
        print(f"wrote {p}")
    failed_checks = [r for r in rows if r.get("check") not in (None, "ok", "n/a")]
    ours_errors = [r for r in rows if r["kernel"] == "ours" and r.get("error")
                   and not str(r["error"]).startswith("skipped")]
    peer_errors = [r for r in rows if r["kernel"] != "ours" and r.get("error")]
    print(f"summary: {len(rows)} rows, {len(failed_checks)} failed checks, {len(ours_errors)} errors in ours, "
          f"{len(peer_errors)} peer error rows, {meta['total_s']}s")
    return 1 if (failed_checks or ours_errors) else 0


if __name__ == "__main__":
    sys.exit(main())
