"""Command line and main loop of the benchmark (``sparse-attn bench``, ``bench/run.py``)."""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import report
from .checks import TOLS, check_rows, reference_outputs
from .decode import DECODE_CPU_OVERRIDES, DECODE_KERNELS, DECODE_PRESETS
from .metrics import fill_rates, layout_stats, pair_counts, peak_tflops, speedups
from .peers import CPU_KERNELS, CUDA_KERNELS, KERNELS, KernelSpec
from .registry import DTYPES, PATTERNS, Case, build_cases
from .timing import FLEX_COMPILE_EST_S, Env, split_passes, time_passes

__all__ = ["main", "parse_args", "PRESETS"]

# Suites. Values the command line does not set come from here (then from CPU_OVERRIDES with --cpu).
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": dict(seqs=[4096, 8192, 16384, 32768, 65536], patterns=["dense", "random", "s2", "seer_topk"],
                    densities=[0.5, 0.2, 0.1, 0.05], heads=8, gqa=[1, 4], head_dims=[128], dtypes=["bf16"],
                    block=128, kernels=CUDA_KERNELS, passes=["fwd", "bwd", "fwd_bwd"], s2_local_blocks=16,
                    s2_strides=[8, 16], warmup=25, rep=100, budget_s=None),
    # gpu_check.sh: the targets (dense-equivalent, 10% at 32k, vs flex) in < 5 min on an H100.
    "quick": dict(seqs=[8192, 32768], patterns=["dense", "random", "s2", "seer_topk"], densities=[0.5, 0.1],
                  heads=8, gqa=[1], head_dims=[128], dtypes=["bf16"], block=128, kernels=CUDA_KERNELS,
                  passes=["fwd", "bwd", "fwd_bwd"], s2_local_blocks=16, s2_strides=[8], warmup=10, rep=30,
                  budget_s=150.0),
    # Issue 5: S2 forward/backward against SDPA-flash at long context.
    "s2": dict(seqs=[8192, 16384, 32768, 65536, 131072], patterns=["s2"], densities=[0.1], heads=8, gqa=[1],
               head_dims=[128], dtypes=["bf16"], block=64, kernels=["sdpa_flash", "ours_triton"],
               passes=["fwd", "bwd", "fwd_bwd"], s2_local_blocks=16, s2_strides=[8, 16], warmup=10, rep=50,
               budget_s=None),
}
# Past HARD_STOP x --budget-s no new case starts (its rows are "skipped"), so a run stays inside the
# timeout gpu_check.sh gives it (quick: 150 s budget -> 188 s < 200 s timeout).
HARD_STOP = 1.25

# --cpu: tiny shapes (an odd length, GQA), fp32, the reference backend, SDPA math, eager flex.
CPU_OVERRIDES: Dict[str, Any] = dict(seqs=[256, 200], densities=[0.5, 0.2], heads=4, gqa=[2], head_dims=[32],
                                     dtypes=["fp32"], block=32, kernels=CPU_KERNELS, s2_local_blocks=2,
                                     s2_strides=[4], warmup=1, rep=3, budget_s=None)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; unset options come from the suite preset (and ``--cpu``).

    Example::

        >>> a = parse_args(["--cpu", "--seqs", "128"])
        >>> a.seqs, a.kernels[0], a.block
        ([128], 'sdpa_math', 32)
    """
    p = argparse.ArgumentParser(
        prog="sparse-attn bench",
        description="Block-sparse attention benchmark: our kernels vs SDPA, FlexAttention and flash-attn "
                    "(prefill: the default; decode over a KV cache: --decode).",
        epilog="patterns: " + "; ".join(f"{n}: {s.description}" for n, s in PATTERNS.items())
        + ". kernels: " + "; ".join(f"{n}: {s.description}" for n, s in KERNELS.items())
        + ". decode kernels (--decode): " + "; ".join(f"{n}: {s.description}" for n, s in DECODE_KERNELS.items()))
    p.add_argument("--suite", choices=sorted(PRESETS) + sorted(DECODE_PRESETS), default=None,
                   help="preset (default: default; with --decode: decode)")
    p.add_argument("--quick", action="store_true",
                   help="same as --suite quick, or --suite decode_quick with --decode (used by bench/gpu_check.sh)")
    p.add_argument("--decode", action="store_true",
                   help="the decode family: sparse_decode over a KV cache (same as --suite decode)")
    p.add_argument("--cpu", action="store_true",
                   help="smoke run on CPU: tiny shapes, reference backend, SDPA math, eager flex; NOT speed claims")
    p.add_argument("--seqs", type=int, nargs="+")
    p.add_argument("--patterns", nargs="+", choices=sorted(PATTERNS))
    p.add_argument("--densities", type=float, nargs="+", help="for patterns that take a density")
    p.add_argument("--heads", type=int, help="query heads Hq")
    p.add_argument("--gqa", type=int, nargs="+", help="GQA ratios Hq/Hkv (1 = MHA)")
    p.add_argument("--head-dims", type=int, nargs="+")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--block", type=int, help="layout block size (16/32/64/128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kernels", nargs="+", choices=sorted(set(KERNELS) | set(DECODE_KERNELS)))
    p.add_argument("--passes", nargs="+", choices=["fwd", "bwd", "fwd_bwd"])
    p.add_argument("--s2-local-blocks", type=int, help="S2: local window in blocks")
    p.add_argument("--s2-strides", type=int, nargs="+", help="S2: vertical strides, one case each")
    p.add_argument("--warmup", type=int, help="do_bench warm-up ms (CPU: untimed calls)")
    p.add_argument("--rep", type=int, help="do_bench repetition ms (CPU: timed calls)")
    p.add_argument("--budget-s", type=float,
                   help="after this many seconds only ours and the SDPA baseline run (no new flex compile is "
                        "started that would cross it); after 1.25x no new case starts (quick: 150)")
    p.add_argument("--check-full-max-seq", type=int, default=16384,
                   help="reference checks cover every row up to this length, else the last --check-rows")
    p.add_argument("--check-rows", type=int, default=1024)
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--peak-tflops", type=float,
                   help="dense peak TFLOP/s for the roofline column (default: the built-in table by GPU name)")
    p.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("decode (--decode)")
    d.add_argument("--batches", type=int, nargs="+", help="decode: batch sizes")
    d.add_argument("--contexts", type=int, nargs="+", help="decode: tokens in each sequence's cache")
    d.add_argument("--keeps", type=float, nargs="+", help="decode: kept fraction of the key blocks (1 = dense)")
    d.add_argument("--layouts", nargs="+", choices=["contiguous", "paged"], help="decode: cache layouts")
    d.add_argument("--page-sizes", type=int, nargs="+", help="decode: page sizes of the paged cache")
    d.add_argument("--sqs", type=int, nargs="+", help="decode: new query rows per sequence (1; 2..16 speculative)")
    d.add_argument("--selection", choices=["spread", "random"],
                   help="decode: how the older kept blocks are chosen (the recent window is always kept)")
    d.add_argument("--recent-blocks", type=int, help="decode: the recent window, in blocks")
    d.add_argument("--check-batch", type=int, help="decode: sequences checked against the reference (GPU runs)")
    d.add_argument("--hbm-tbs", type=float,
                   help="decode: HBM bandwidth (TB/s) for bw_frac (default: the built-in table by GPU name)")
    p.add_argument("--out", default="bench_results",
                   help="output directory (default ./bench_results, under the current directory)")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.suite is None:
        args.suite = ("decode_quick" if args.quick else "decode") if args.decode else (
            "quick" if args.quick else "default")
    elif args.decode and args.suite not in DECODE_PRESETS:
        p.error(f"--suite {args.suite} is not a decode suite ({sorted(DECODE_PRESETS)})")
    elif args.quick and args.suite not in ("quick", "decode_quick"):
        p.error(f"--suite {args.suite} contradicts --quick")
    decode = args.suite in DECODE_PRESETS
    args.decode = decode
    mode_opts = (("seqs", "patterns", "densities", "s2_local_blocks", "s2_strides") if decode else
                 ("batches", "contexts", "keeps", "layouts", "page_sizes", "sqs", "selection", "recent_blocks",
                  "check_batch", "hbm_tbs"))
    wrong = [f"--{o.replace('_', '-')}" for o in mode_opts if getattr(args, o) is not None]
    if wrong:
        p.error(f"{', '.join(wrong)}: not options of the {'decode' if decode else 'prefill'} family")
    if decode:
        preset = dict(DECODE_PRESETS[args.suite])
        if args.cpu:
            preset.update(DECODE_CPU_OVERRIDES)
        bad = [k for k in (args.kernels or []) if k not in DECODE_KERNELS]
        if bad:
            p.error(f"--kernels {bad}: not decode kernels (decode: {sorted(DECODE_KERNELS)})")
    else:
        preset = dict(PRESETS[args.suite])
        if args.cpu:
            preset.update(CPU_OVERRIDES)
            if args.suite == "s2":
                preset["kernels"] = ["sdpa_math", "ours_reference"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    args.passes = split_passes(args.passes)
    for name in ("heads", "block", "batch", "warmup", "rep", "check_rows"):
        if getattr(args, name) < (0 if name in ("warmup",) else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if decode and args.check_batch is not None and args.check_batch < 1:
        p.error(f"--check-batch must be positive, got {args.check_batch}")
    if decode and args.hbm_tbs is not None and not args.hbm_tbs > 0:
        p.error(f"--hbm-tbs must be positive, got {args.hbm_tbs}")
    return args


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
def _base_row(case: Case, kernel: str, pass_: str, suite: str) -> Dict[str, Any]:
    row: Dict[str, Any] = {c: None for c in report.COLUMNS}
    row.update(suite=suite, pattern=case.pattern, pattern_args=case.args_str, seq=case.seq, density=case.density,
               kernel=kernel, batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
               block=case.block, dtype=case.dtype, **{"pass": pass_})
    return row


def _rows_for(case: Case, spec: KernelSpec, passes: Sequence[str], suite: str, stats: Dict[str, Any],
              results: Dict[str, Dict[str, Any]], extra: Dict[str, Any], peak: Optional[float]) -> List[Dict[str, Any]]:
    rows = []
    for p in passes:
        row = _base_row(case, spec.name, p, suite)
        if spec.kind == "dense":
            row.update(pattern="dense", pattern_args="", density=None, block=None)
        row.update(pairs=stats["pairs"], dense_pairs=stats["dense_pairs"], blocks_frac=stats["blocks_frac"])
        row.update({k: v for k, v in extra.items() if (k in row or k == "note") and k != "work_ratio"})
        if "work_ratio" in extra:  # per pass: the worst kernel the pass launches
            row["work_ratio"] = extra["work_ratio"][p]
        res = dict(results.get(p) or dict(error="not measured"))
        status = res.pop("status", None) or ("ok" if "ms" in res else "error")
        if "note" in res and row.get("note"):
            res["note"] = f"{row['note']}; {res['note']}"
        row.update(res, status=status)
        fill_rates(row, peak)
        rows.append(row)
    return rows


def _dense_stats(case: Case) -> Dict[str, Any]:
    pairs = case.seq * (case.seq + 1) // 2 * case.batch * case.heads  # causal, Sq == Sk
    return dict(pairs=pairs, dense_pairs=pairs, blocks_frac=1.0)


# ------------------------------------------------------------------------------------------------
# Running one kernel on one case
# ------------------------------------------------------------------------------------------------
class _Interrupted(BaseException):
    """SIGTERM (e.g. from ``timeout``): a BaseException, so no ``except Exception`` swallows it."""


def _run_kernel(spec: KernelSpec, case: Case, data: Dict[str, Any], inputs: Dict[str, torch.Tensor], env: Env,
                args: argparse.Namespace, always: bool) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any],
                                                                 Optional[Dict[str, Any]]]:
    """``(results per pass, row fields, outputs or None)``; never raises (except on interrupt)."""
    def every(**fields: Any) -> Dict[str, Dict[str, Any]]:
        return {p: dict(fields) for p in args.passes}

    gate = _gate(spec, case, env, always)
    if gate is not None:
        return every(**gate), {}, None
    key = spec.compile_key(case) if spec.compile_key else None
    try:
        attn, extra = spec.prepare(env, case, data)
        results, outputs = time_passes(env, attn, inputs["q"], inputs["k"], inputs["v"], inputs["dout"], args.passes)
        if key is not None:
            env.compiled.add(key)
        for res in results.values():  # e.g. FlexAttention's backward on CPU: unsupported, not broken
            if str(res.get("error", "")).startswith("NotImplementedError"):
                res.update(status="skipped", error=f"skipped: not available on {env.device.type}: "
                                                   f"{res['error'].split(': ', 1)[-1]}"[:300])
                res.pop("traceback", None)
    except _Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - a failing kernel is a row, not the end of the run
        results, extra, outputs = every(**_error_fields(exc)), {}, None
    _settle_cuda(env, outputs is None or any("error" in r for r in results.values()))
    return results, extra, outputs


def _gate(spec: Any, case: Any, env: Env, always: bool) -> Optional[Dict[str, str]]:
    """Why ``spec`` does not run on ``case`` -- the row fields ``{"error": ...}`` (a broken probe)
    or ``{"status": "skipped", "error": ...}`` (the probe's reason, the time budget spent, or a new
    compile that would exceed it; ``always`` kernels ignore the budget) -- or None: run it. Shared
    by the prefill (:class:`KernelSpec`) and decode kernels."""
    try:
        reason = spec.probe(env, case)
    except Exception as exc:  # noqa: BLE001 - a broken probe is the kernel's error, not the run's
        return dict(error=f"probe failed: {type(exc).__name__}: {exc}"[:300])
    if reason:
        return dict(status="skipped", error=f"skipped: {reason}")
    if not always and env.over_budget():
        return dict(status="skipped", error=f"skipped: time budget ({env.budget_s:.0f}s) spent")
    key = spec.compile_key(case) if spec.compile_key else None
    if not always and key is not None and key not in env.compiled and env.over_budget(extra_s=FLEX_COMPILE_EST_S):
        return dict(status="skipped",
                    error=f"skipped: a new compile (~{FLEX_COMPILE_EST_S:.0f}s) would exceed the time budget")
    return None


def _error_fields(exc: BaseException) -> Dict[str, str]:
    """``error`` (type and first line, at most 300 characters) and ``traceback`` (the last 4000) of
    a kernel's exception, for its row; call inside the ``except``."""
    text = str(exc).strip().splitlines()
    return dict(error=f"{type(exc).__name__}: {text[0] if text else ''}"[:300],
                traceback=traceback.format_exc()[-4000:])


def _settle_cuda(env: Env, failed: bool) -> None:
    """After a kernel on CUDA: synchronize, and free the cache after a failure (e.g. out of memory)."""
    if env.device.type == "cuda":
        try:
            torch.cuda.synchronize()
            if failed:
                torch.cuda.empty_cache()  # e.g. after an out-of-memory error
        except Exception:  # noqa: BLE001 - a sticky CUDA error: the next rows will say so
            traceback.print_exc()


def _inputs(case: Case, env: Env) -> Dict[str, torch.Tensor]:
    gen = torch.Generator(device=env.device).manual_seed(case.seed * 7919 + case.seq)
    dt = case.torch_dtype

    def rnd(h: int, grad: bool) -> torch.Tensor:
        t = torch.randn(case.batch, h, case.seq, case.head_dim, generator=gen, device=env.device, dtype=torch.float32)
        return t.to(dt).requires_grad_(grad)

    return dict(q=rnd(case.heads, True), k=rnd(case.kv_heads, True), v=rnd(case.kv_heads, True),
                dout=rnd(case.heads, False))


def _prepare_case(case: Case, env: Env) -> Dict[str, Any]:
    build = PATTERNS[case.pattern].build(case, env.device, env.sync)
    counts, _ = pair_counts(case.seq, case.seq, case.block, case.block, True, env.device)
    mask = build.layout.to_block_mask()
    data = dict(layout=build.layout, mask=mask, counts=counts, layout_ms=build.layout_ms,
                layout_uncached_ms=build.layout_uncached_ms, note=build.note)
    data["stats"] = layout_stats(mask, counts, case.batch, case.heads)
    return data


def _skip_all(case: Case, specs: Sequence[KernelSpec], args: argparse.Namespace, why: str,
              status: str, peak: Optional[float], dense: bool) -> List[Dict[str, Any]]:
    rows = []
    for spec in specs:
        dense_row = dense or spec.kind == "dense"
        stats = _dense_stats(case) if dense_row else dict(pairs=0, dense_pairs=0, blocks_frac=None)
        res = {p: dict(status=status, error=why) for p in args.passes}
        rows += _rows_for(case, spec, args.passes, args.suite, stats, res, {}, peak)
    return rows


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status.

    0: our kernels ran and passed their checks (skipped kernels and failing peers are reported,
    not fatal); 1: a failed correctness check or an error in one of our kernels; 2: no CUDA
    without ``--cpu``; 3: interrupted (SIGTERM, e.g. a ``timeout``; the results so far are written).

    Example::

        >>> main(["--cpu", "--seqs", "64", "--patterns", "dense", "--out", "bench_smoke"])  # doctest: +SKIP
        0
    """
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if "--static" in argv_list:  # the compile-only report: no GPU, no timing
        from .static import main as static_main

        return static_main(argv_list)
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("sparse-attn bench: CUDA is not available; use --cpu for the smoke run", file=sys.stderr)
        return 2
    if args.decode:
        from .decode import build_decode_cases, run_decode

        try:
            build_decode_cases(args)  # a grid that cannot be built fails before any output
        except ValueError as exc:
            print(f"sparse-attn bench --decode: {exc}", file=sys.stderr)
            return 2
        return run_decode(args, argv_list)
    cases = build_cases(args)
    specs = [KERNELS[n] for n in args.kernels]
    baseline = "sdpa_math" if args.cpu else "sdpa_flash"
    always = {baseline}
    env = Env(cpu=args.cpu, warmup=args.warmup, rep=args.rep, budget_s=args.budget_s)
    gpu = "cpu" if args.cpu else torch.cuda.get_device_name(env.device)
    long_names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    peaks = {d: (args.peak_tflops if args.peak_tflops else peak_tflops(gpu, long_names[d])) for d in args.dtypes}
    peak_source = ("--peak-tflops" if args.peak_tflops else
                   "built-in table by GPU name" if any(peaks.values()) else "unknown for this GPU/dtype: blank")
    timer = (f"time.perf_counter ({args.warmup} warm-up, {args.rep} timed calls)" if args.cpu else
             f"triton.testing.do_bench(warmup={args.warmup}ms, rep={args.rep}ms), median + 20/80% quantiles")
    meta = report.metadata(cpu=args.cpu, suite=args.suite, argv=list(argv if argv is not None else sys.argv[1:]),
                           baseline=baseline, peaks=peaks, peak_source=peak_source, timer=timer,
                           extra=dict(budget_s=args.budget_s, passes=args.passes, kernels=args.kernels,
                                      check=f"reference rows: all up to S={args.check_full_max_seq}, "
                                            f"else the last {args.check_rows}; tolerances {TOLS_DOC}"))
    stem = (f"bench_{report.sanitize(gpu)}_{args.suite}_{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    print(f"# sparse_attn bench: {gpu} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {str(meta['git_commit'])[:12]} | suite {args.suite} | {len(cases)} cases x "
          f"{len(specs)} kernels x {len(args.passes)} passes", flush=True)
    if not args.cpu:
        est = estimate_seconds(cases, specs, args, env)
        meta["estimated_s"] = round(est)
        budget = "none" if args.budget_s is None else f"{args.budget_s:.0f}s"
        print(f"# estimated ~{est:.0f}s on an H100-class GPU (rough; budget {budget})", flush=True)
        if args.budget_s is not None and est > args.budget_s:
            print("# over the budget: peers will be skipped once it is spent (ours and the baseline still run)",
                  flush=True)
    if args.cpu:
        print("# CPU smoke run: harness check only, numbers are NOT speed claims", flush=True)

    rows: List[Dict[str, Any]] = []
    rc_interrupted = run_groups(
        cases, lambda c: c.shape_key,
        lambda group: _run_shape(group, specs, args, env, rows, baseline, always, peaks, meta, stem),
        meta, cpu=args.cpu)
    meta["total_s"] = round(env.elapsed(), 1)
    speedups(rows, baseline)
    paths = report.write_outputs(args.out, stem, meta, rows)
    plots, plot_msg = report.write_plots(args.out, stem, rows, meta)
    print()
    print("\n".join(report.targets_summary(rows)))
    if any(r["kernel"] == "ours_triton_tuned" for r in rows):
        print("autotuned (SPARSE_ATTN_AUTOTUNE=1):")
        print("\n".join(report.targets_summary(rows, "ours_triton_tuned")))
    print()
    print(report.markdown_table(rows))
    print()
    for p in paths.values():
        print(f"wrote {p}")
    print(plot_msg)
    def ours(r: Dict[str, Any]) -> bool:
        return r["kernel"] in KERNELS and KERNELS[r["kernel"]].kind == "ours"

    failed = [r for r in rows if r.get("check") == "FAIL" and ours(r)]
    peer_failed = [r for r in rows if r.get("check") == "FAIL" and not ours(r)]
    ours_err = [r for r in rows if ours(r) and r.get("status") == "error"]
    peer_err = [r for r in rows if not ours(r) and r.get("status") == "error"]
    skipped = [r for r in rows if r.get("status") == "skipped"]
    print(f"summary: {len(rows)} rows, {len(failed)} failed checks in ours, {len(ours_err)} errors in ours, "
          f"{len(peer_failed)} failed peer checks, {len(peer_err)} peer error rows, {len(skipped)} skipped, "
          f"{meta['total_s']}s", flush=True)
    if rc_interrupted:
        return 3
    return 1 if (failed or ours_err) else 0


def estimate_seconds(cases: Sequence[Case], specs: Sequence[KernelSpec], args: argparse.Namespace,
                     env: Env) -> float:
    """A rough wall-clock estimate of a CUDA run: compiles (flex ~45 s per shape, ours ~20 s per
    block/head-dim/dtype), ``do_bench`` time per timed pass (at least ``warmup + rep`` ms, or ~8
    calls at an assumed 300 TFLOP/s), and ~1 s per case for layouts and checks. Kernels whose
    probe says they cannot run are not counted.

    Example::

        >>> a = parse_args(["--cpu", "--seqs", "64", "--patterns", "dense"])
        >>> env = Env(cpu=True, warmup=1, rep=1)
        >>> estimate_seconds(build_cases(a), [KERNELS["ours_reference"]], a, env) > 0
        True
    """
    rate = 300e12
    total, compiles, seen = 0.0, set(), set()
    for c in cases:
        dense = 4.0 * c.head_dim * c.seq * (c.seq + 1) / 2 * c.batch * c.heads
        frac = 1.0 if c.pattern == "dense" else (c.density if c.density is not None else 0.3)
        for spec in specs:
            if spec.kind == "dense" and c.shape_key in seen:
                continue
            if spec.probe(env, c):
                continue
            f = dense * (1.0 if spec.kind == "dense" else frac)
            for p in args.passes:
                total += max((args.warmup + args.rep) / 1e3, 8 * f * {"fwd": 1, "bwd": 2.5, "fwd_bwd": 3.5}[p] / rate)
            if spec.compile_key:
                compiles.add(spec.compile_key(c))
        seen.add(c.shape_key)
        total += 1.0
    ours_compiles = {(c.block, c.head_dim, c.dtype) for c in cases} if any(s.kind == "ours" for s in specs) else set()
    return total + FLEX_COMPILE_EST_S * len(compiles) + 20.0 * len(ours_compiles)


TOLS_DOC = {str(k).replace("torch.", ""): v for k, v in TOLS.items()}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_groups(cases: Sequence[Any], key: Callable[[Any], Any], run_group: Callable[[List[Any]], None],
               meta: Dict[str, Any], *, cpu: bool) -> bool:
    """A benchmark's case loop: ``run_group`` on each run of ``cases`` with the same ``key`` (the
    cases sharing inputs), ending cleanly on an interrupt: SIGTERM (e.g. from ``timeout``; handled
    in the main thread only) raises :class:`_Interrupted`, and it or Ctrl-C is recorded in
    ``meta["interrupted"]`` and announced. With ``cpu``, torch runs single-threaded meanwhile (tiny
    shapes: threads only add contention noise on a shared CI box). The handler and the thread count
    are restored either way. Returns whether the loop was interrupted (the rows so far stay with
    the caller)."""
    def on_term(signum: int, frame: Any) -> None:
        raise _Interrupted(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    try:
        for _, group in itertools.groupby(cases, key=key):
            run_group(list(group))
    except (_Interrupted, KeyboardInterrupt) as exc:
        meta["interrupted"] = f"{type(exc).__name__}: {exc}"
        print(f"\ninterrupted ({exc}); writing the results so far", flush=True)
        return True
    finally:
        torch.set_num_threads(threads)
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return False


def _run_shape(group: List[Case], specs: List[KernelSpec], args: argparse.Namespace, env: Env,
               rows: List[Dict[str, Any]], baseline: str, always: set, peaks: Dict[str, Optional[float]],
               meta: Dict[str, Any], stem: str) -> None:
    """All cases of one input shape: the dense peers once, then every case's masked kernels."""
    first = group[0]
    peak = peaks.get(first.dtype)
    tol = TOLS[first.torch_dtype]
    dense_specs = [s for s in specs if s.kind == "dense"]
    case_specs = [s for s in specs if s.kind != "dense"]
    tag = f"S={first.seq} H={first.heads}/{first.kv_heads} D={first.head_dim} {first.dtype}"
    if env.over_budget(factor=HARD_STOP):
        why = f"skipped: time budget ({env.budget_s:.0f}s x {HARD_STOP}) spent"
        print(f"[{tag}] {why}: {len(group)} cases not run", flush=True)
        rows += _skip_all(first, dense_specs, args, why, "skipped", peak, True)
        for case in group:
            rows += _skip_all(case, case_specs, args, why, "skipped", peak, False)
        return
    try:
        inputs = _inputs(first, env)
    except Exception as exc:  # noqa: BLE001
        why = f"inputs failed: {type(exc).__name__}: {exc}"[:300]
        rows += _skip_all(first, dense_specs, args, why, "error", peak, True)
        for case in group:
            rows += _skip_all(case, case_specs, args, why, "error", peak, False)
        return

    # Dense peers, once per shape; checked against the baseline.
    dense_rows: List[Dict[str, Any]] = []
    dense_outs: Dict[str, Dict[str, Any]] = {}
    for spec in sorted(dense_specs, key=lambda s: s.name != baseline):
        res, extra, outs = _run_kernel(spec, first, {}, inputs, env, args, spec.name in always)
        dense_rows += _rows_for(first, spec, args.passes, args.suite, _dense_stats(first), res, extra, peak)
        if outs is not None:
            dense_outs[spec.name] = outs
    if not args.no_check:
        check_rows(dense_rows, dense_outs, baseline, dense_outs.get(baseline), tol)
    base_outs = dense_outs.get(baseline)
    del dense_outs
    rows += dense_rows
    report.print_rows(dense_rows, tag)

    for case in group:
        t_case = time.perf_counter()
        ctag = f"{tag} {case.label}"
        if env.over_budget(factor=HARD_STOP):
            why = f"skipped: time budget ({env.budget_s:.0f}s x {HARD_STOP}) spent"
            rows += _skip_all(case, case_specs, args, why, "skipped", peak, False)
            continue
        try:
            data = _prepare_case(case, env)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows += _skip_all(case, case_specs, args, f"pattern build failed: {type(exc).__name__}: {exc}"[:300],
                              "error", peak, False)
            continue
        case_rows: List[Dict[str, Any]] = []
        outs: Dict[str, Dict[str, Any]] = {}
        for spec in case_specs:
            res, extra, o = _run_kernel(spec, case, data, inputs, env, args, spec.kind == "ours")
            if data.get("note") and spec.kind == "ours":
                extra = dict(extra, note="; ".join(x for x in (extra.get("note"), data["note"]) if x))
            case_rows += _rows_for(case, spec, args.passes, args.suite, data["stats"], res, extra, peak)
            if o is not None:
                outs[spec.name] = o
        if not args.no_check and outs:
            try:
                _check_case(case, data, inputs, case_rows, outs, base_outs, baseline, tol, args)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                for r in case_rows:
                    if r["status"] == "ok":
                        r.update(check="FAIL", check_ref=f"check crashed: {type(exc).__name__}: {exc}"[:200])
        rows += case_rows
        del outs, data
        speedups(rows, baseline)
        report.print_rows(case_rows, ctag)
        print(f"[{ctag}] case took {time.perf_counter() - t_case:.1f}s (total {env.elapsed():.1f}s)", flush=True)
        report.write_outputs(args.out, stem, meta, rows)


def _check_case(case: Case, data: Dict[str, Any], inputs: Dict[str, torch.Tensor], case_rows: List[Dict[str, Any]],
                outs: Dict[str, Dict[str, Any]], base_outs: Optional[Dict[str, Any]], baseline: str,
                tol: Dict[str, float], args: argparse.Namespace) -> None:
    """A layout with every causal block is checked against the SDPA baseline when it ran; anything
    else against the reference (whole sequence, or the last rows at long sequences)."""
    if data["stats"]["blocks_frac"] >= 1.0 and base_outs is not None:
        check_rows(case_rows, outs, baseline, base_outs, tol)
        return
    full = args.cpu or case.seq <= args.check_full_max_seq
    ref = reference_outputs(case, data["mask"], inputs["q"], inputs["k"], inputs["v"], inputs["dout"],
                            rows=None if full else args.check_rows)
    check_rows(case_rows, outs, "reference", ref, tol)
