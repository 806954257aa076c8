"""The static performance report: ``sparse-attn bench --static [--json FILE] [--md FILE] [--check]``.

Runs anywhere (no GPU): every kernel configuration the launchers can pick is compiled ahead of
time for sm_80 and sm_90 (``triton.compile`` with a ``GPUTarget``) and read back:

* ``instr``: the tensor-core instruction in the generated PTX (``wgmma`` / ``mma.sync`` /
  ``none``);
* ``regs``, ``spill_bytes`` (spill stores + loads): from ``ptxas -v``, the ptxas that ships
  with Triton (Triton's own compile step, with its flags);
* ``smem_bytes``: the shared memory the launch needs;
* ``model_ms``: a MODELLED time (``configs.model_ms``: a roofline over the chip's tensor-core
  peak, exp2 rate, L2 and HBM bandwidth) of the configuration's actual tile walk on one case,
  :data:`MODEL_CASE`. Not a measurement.

One JSON row per (kernel, cc, head dim, dtype, layout block, tile shape); ``block_q = block_k
= 0`` marks the dense launch (no layout). With ``--check`` the exit status is 1 when a row that
must be clean is not: on sm_90 (and sm_80) for head dims 64 and 128 in fp16/bf16, no spills,
shared memory within the chip, and ``wgmma`` on sm_90 wherever the tile has >= 64 query rows
(``exact`` tiles of 16/32-row layout blocks are the fallback and use ``mma.sync`` by design).

Decode (``triton_kernels/decode.py``): one ``decode`` row per (cc, head dim, dtype, row tile, mode,
cache layout) -- ``shape`` is ``dense``/``list``/``s2`` with ``-paged`` for a paged cache, the
layout block is a runtime argument (``block_q = block_k = 0``) -- and one ``decode_merge`` row per
(cc, head dim, dtype). They are compiled with the 16-byte divisibility a launch on standard
caches gets (pointers, the q/k/v strides, page and block sizes), as Triton specializes it at run
time. Decode is memory-bound: the check holds them to no spills and the shared memory limit, not to
a tensor-core instruction (``instr`` is reported). ``model_ms`` is left empty for them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "configurations", "decode_configurations", "compile_kernel", "compile_row", "check_rows", "markdown",
           "MODEL_CASE", "SMEM_LIMIT", "DECODE_KERNELS"]

CCS = (80, 90)
HEAD_DIMS = (64, 128, 256)
DTYPES = ("fp16", "bf16", "fp32")
BLOCKS = (16, 32, 64, 128)
DECODE_KERNELS = ("decode", "decode_merge")
SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block: A100 163 KiB, H100 227 KiB
ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}
# The case model_ms is computed for: 32k tokens, causal, B=1, Hq=32, Hkv=8 (Llama-3-8B-like), one
# layout shared by all heads: S2 (`patterns.strided`) with a 1024-token window and vertical stride
# 10, about 0.1 of the causal triangle at every block size.
MODEL_CASE = dict(seq=32768, batch=1, heads=32, kv_heads=8, window_tokens=1024, vert_stride=10, causal=True)
KEYS = ("kernel", "cc", "head_dim", "dtype", "block_q", "block_k", "tile_m", "tile_n", "num_warps", "num_stages",
        "instr", "regs", "spill_bytes", "smem_bytes", "model_ms")


def configurations(ccs: Sequence[int] = CCS, head_dims: Sequence[int] = HEAD_DIMS, dtypes: Sequence[str] = DTYPES,
                   blocks: Sequence[int] = BLOCKS, kernels: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Every (kernel, chip, head dim, dtype, layout block, tiles) a launcher can pick: each tile
    shape of ``configs.candidates`` for square layout blocks, plus the dense launch, then the decode
    rows (:func:`decode_configurations`). ``kernels``: keep only these (default: all)."""
    from ..triton_kernels.configs import KERNELS, _strip, candidates, dense_tiles

    out = []
    for cc in ccs:
        family = "hopper" if cc >= 90 else "ampere"
        for d in head_dims:
            for dt in dtypes:
                for kernel in KERNELS:
                    dense = dense_tiles(family, kernel, d, ELEM[dt])
                    out.append(dict(kernel=kernel, cc=cc, head_dim=d, dtype=dt, block_q=0, block_k=0,
                                    shape="dense", tiles=_strip(dense)))
                    for b in blocks:
                        for c in candidates(family, kernel, d, ELEM[dt], b, b):
                            out.append(dict(kernel=kernel, cc=cc, head_dim=d, dtype=dt, block_q=b, block_k=b,
                                            shape="/".join(c["aliases"]), tiles=_strip(c)))
    out += decode_configurations(ccs, head_dims, dtypes)
    return [r for r in out if kernels is None or r["kernel"] in kernels]


def decode_configurations(ccs: Sequence[int] = CCS, head_dims: Sequence[int] = HEAD_DIMS,
                          dtypes: Sequence[str] = DTYPES) -> List[Dict[str, Any]]:
    """Every decode launch (``triton_kernels/decode.py``): per chip, head dim and dtype, each row
    tile of the table in each mode (dense, list, S2) on a contiguous and a paged cache, plus the
    merge kernel. The layout block is a runtime argument of these kernels (``block_q = 0``)."""
    from ..triton_kernels import decode as dec
    from ..triton_kernels.configs import block_d

    out = []
    for cc in ccs:
        family = "hopper" if cc >= 90 else "ampere"
        for d in head_dims:
            for dt in dtypes:
                for bm in dec.row_tiles(family, ELEM[dt]):
                    t = dec.decode_tile(family, d, ELEM[dt], bm)
                    for mode in dec.MODES:
                        for paged in (False, True):
                            tiles = dict(BLOCK_D=block_d(d), BLOCK_M=bm, BLOCK_N=t.block_n, num_warps=t.num_warps,
                                         num_stages=t.num_stages)
                            out.append(dict(kernel="decode", cc=cc, head_dim=d, dtype=dt, block_q=0, block_k=0,
                                            shape=mode + ("-paged" if paged else ""), tiles=tiles))
                out.append(dict(kernel="decode_merge", cc=cc, head_dim=d, dtype=dt, block_q=0, block_k=0,
                                shape="merge", tiles=dict(BLOCK_D=block_d(d), BLOCK_M=dec.MERGE_CHUNK,
                                                          BLOCK_N=dec.MAX_SPLITS, num_warps=dec.MERGE_WARPS,
                                                          num_stages=1)))
    return out


def _signature(kernel: str, dtype: str, has_bits: bool) -> Tuple[Any, Dict[str, str]]:
    from ..triton_kernels import block_sparse_bwd as bwd, block_sparse_fwd as fwd

    ptr = "*" + dtype
    plan = dict(P_NUM="*i32", P_IDX="*i32", P_BITS="*i64" if has_bits else "*i32")
    if kernel == "fwd":
        return fwd._fwd_kernel, dict(Q=ptr, K=ptr, V=ptr, O=ptr, LSE="*fp32", STATS="*fp32", FLAG="*i32",
                                     qk_scale="fp32", **plan)
    common = dict(Q=ptr, K=ptr, V=ptr, DO=ptr, STATS="*fp32", DELTA="*fp32", FLAG="*i32", qk_scale="fp32",
                  scale="fp32", **plan)
    if kernel == "dq":
        return bwd._bwd_dq_kernel, dict(DQ=ptr, **common)
    return bwd._bwd_dkdv_kernel, dict(DK=ptr, DV=ptr, **common)


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_kernel(fn: Any, types: Dict[str, str], consts: Dict[str, Any], cc: int, num_warps: int,
                   num_stages: int, divisible: Sequence[str] = ()) -> Dict[str, Any]:
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<cc>`` (no GPU needed): ``types`` maps
    argument names to Triton types (others default to ``i32``), ``consts`` gives the constexprs
    (``None`` for pointers a variant never reads), ``divisible`` the arguments to specialize as
    multiples of 16 (bytes for pointers), as Triton does at run time for such values. Returns
    ``instr`` (from the PTX), ``regs``, ``spill_bytes`` (ptxas -v), ``smem_bytes`` and
    ``compile_s``. Needs ``TRITON_INTERPRET`` unset. Each call compiles afresh (a private cache
    directory), so ptxas always runs and reports."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n not in consts}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()},
                    attrs=attrs)
    log = io.StringIO()
    saved = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_CACHE_DIR")}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sparse_attn_static_") as cache:
        os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache)
        try:
            with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                          options=dict(num_warps=num_warps, num_stages=num_stages))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    ptx = compiled.asm["ptx"]
    regs = _REGS.findall(log.getvalue())
    if not regs:
        raise RuntimeError("no ptxas -v output in the compile log")
    return dict(instr="wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none",
                regs=int(regs[-1]), spill_bytes=sum(int(a) + int(b) for a, b in _PTXAS.findall(log.getvalue())),
                smem_bytes=int(compiled.metadata.shared), compile_s=round(time.perf_counter() - t0, 2))


def compile_row(row: Dict[str, Any], causal: bool = True, contain: bool = False) -> Dict[str, Any]:
    """Compile one configuration (see :func:`configurations`) and fill ``instr``, ``regs``,
    ``spill_bytes``, ``smem_bytes`` (and ``compile_s``). ``contain`` compiles the variant that runs
    only when an input holds a NaN/inf (``triton_kernels.common.nonfinite_flag``); the report and
    its checks are about the plain variant, the one finite inputs run."""
    if row["kernel"] in DECODE_KERNELS:
        return _compile_decode_row(row)
    tiles = dict(row["tiles"])
    warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
    dense = row["block_q"] == 0
    from ..triton_kernels.common import walk_flags

    n_blocks = 1 if dense else max(1, tiles["BLOCK_M"] // tiles["BQ"]) * max(1, tiles["BLOCK_N"] // tiles["BK"])
    fn, types = _signature(row["kernel"], row["dtype"], n_blocks > 1)
    consts = dict(HEAD_DIM=row["head_dim"], CAUSAL=causal, DENSE=dense, UPCAST=False, CONTAIN=contain,
                  DOT_PREC="ieee" if row["dtype"] == "fp32" else "tf32", **walk_flags(tiles, n_blocks), **tiles)
    if dense:
        consts.update(P_NUM=None, P_IDX=None, P_BITS=None)
    out = dict(row)
    out.update(compile_kernel(fn, types, consts, row["cc"], warps, stages))
    return out


# What a launch on standard caches (16-bit, head dim a multiple of 8, torch allocations) has
# 16-divisible: every pointer, the q/k/v strides, the page and layout block sizes.
_DECODE_POINTERS = ("Q", "K", "V", "O", "LSE", "O_PART", "LSE_PART", "SEQLENS", "BT", "NUM", "IDX", "RES")
_DECODE_DIVISIBLE = _DECODE_POINTERS + ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kn", "stride_kh",
                                        "stride_vb", "stride_vn", "stride_vh", "page_size", "block_size")


def _compile_decode_row(row: Dict[str, Any]) -> Dict[str, Any]:
    from ..triton_kernels import decode as dec

    tiles = dict(row["tiles"])
    warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
    ptr = "*" + row["dtype"]
    if row["kernel"] == "decode_merge":
        fn = dec._merge_kernel
        types = dict(O_PART="*fp32", LSE_PART="*fp32", O=ptr, LSE="*fp32")
        consts = dict(HEAD_DIM=row["head_dim"], BLOCK_D=tiles["BLOCK_D"], BLOCK_S=tiles["BLOCK_N"],
                      CHUNK=tiles["BLOCK_M"])
        divisible: Tuple[str, ...] = ("O_PART", "LSE_PART", "O", "LSE")
    else:
        fn = dec._decode_split_kernel
        mode, paged = row["shape"].split("-")[0], row["shape"].endswith("-paged")
        types = dict(Q=ptr, K=ptr, V=ptr, O=ptr, LSE="*fp32", O_PART="*fp32", LSE_PART="*fp32", SEQLENS="*i32",
                     BT="*i32", NUM="*i32", IDX="*i32", RES="*i32", qk_scale="fp32")
        consts = dict(HEAD_DIM=row["head_dim"], MODE=dec.MODES.index(mode), PAGED=paged, UPCAST=False,
                      DOT_PREC="ieee" if row["dtype"] == "fp32" else "tf32", **tiles)
        if not paged:
            consts["BT"] = None
        if mode != "list":
            consts.update(NUM=None, IDX=None)
        if mode != "s2":
            consts["RES"] = None
        divisible = _DECODE_DIVISIBLE
    out = dict(row)
    out.update(compile_kernel(fn, types, consts, row["cc"], warps, stages, divisible))
    return out


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)


def _compile_safe(row: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return compile_row(row)
    except Exception as exc:  # a configuration that does not compile is a finding, reported as such
        out = dict(row)
        out.update(instr="error", regs=None, spill_bytes=None, smem_bytes=None, error=f"{type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
        return out


# ----------------------------------------------------------------------------------------------
# The model column
# ----------------------------------------------------------------------------------------------
def _model_layouts(blocks: Sequence[int]):
    """The model case's layout per block size (built once, on the CPU)."""
    from ..patterns import strided

    s = MODEL_CASE["seq"]
    return {b: strided(1, s, block_size=b, local_blocks=max(1, MODEL_CASE["window_tokens"] // b),
                       vert_stride=MODEL_CASE["vert_stride"]) for b in blocks}


def model_column(rows: List[Dict[str, Any]]) -> None:
    """Fill ``model_ms`` of every row: the configuration's own tile plan over the model case."""
    from ..tiling import kept_pairs
    from ..triton_kernels.configs import model_ms, plan_for

    s, b, hq, hkv = MODEL_CASE["seq"], MODEL_CASE["batch"], MODEL_CASE["heads"], MODEL_CASE["kv_heads"]
    layouts = _model_layouts(sorted({r["block_q"] for r in rows if r["block_q"]}))
    pairs_cache: Dict[Tuple, float] = {}
    for r in rows:
        t = r["tiles"]
        if r["kernel"] in DECODE_KERNELS:  # memory-bound: the training kernels' model does not apply
            r["model_ms"] = None
            continue
        if r["block_q"] == 0:  # dense causal: every tile up to each query tile's diagonal
            key = ("dense", r["kernel"], t["BLOCK_M"], t["BLOCK_N"])
            if key not in pairs_cache:
                own, walk = (t["BLOCK_N"], t["BLOCK_M"]) if r["kernel"] == "dkdv" else (t["BLOCK_M"], t["BLOCK_N"])
                n_own = -(-s // own)
                # forward/dQ: query tile i walks keys < (i+1)*BM; dK/dV: key tile j walks queries >= j*BN
                steps = sum(-(-min(s, (i + 1) * own) // walk) if r["kernel"] != "dkdv"
                            else -(-(s - i * own) // walk) for i in range(n_own))
                pairs_cache[key] = float(steps * own * walk)
            pairs = pairs_cache[key]
        else:
            lay = layouts[r["block_q"]]
            key = (r["kernel"], t["BLOCK_M"], t["BLOCK_N"], r["block_q"])
            if key not in pairs_cache:
                num, idx = (lay.q_num, lay.q_idx) if r["kernel"] == "dkdv" else (lay.kv_num, lay.kv_idx)
                plan = plan_for(r["kernel"], t, num, idx, s, s)
                pairs_cache[key] = float(plan.num.sum()) * plan.unit_rows * plan.unit_cols
                if ("kept", r["block_q"]) not in pairs_cache:
                    pairs_cache[("kept", r["block_q"])] = float(kept_pairs(lay.kv_num, lay.kv_idx, r["block_q"],
                                                                           r["block_q"], s, s).sum())
            pairs = pairs_cache[key]
        elem = ELEM[r["dtype"]]
        d = r["head_dim"]
        q_side, kv_side = b * hq * s * d * elem, b * hkv * s * d * elem
        compulsory = {"fwd": 2 * q_side + 2 * kv_side, "dq": 3 * q_side + 2 * kv_side,
                      "dkdv": 2 * q_side + 4 * kv_side}[r["kernel"]]
        r["model_ms"] = round(model_ms(r["kernel"], r["cc"], r["dtype"], d, t, pairs * b * hq, compulsory), 4)
        if r["block_q"]:
            r["work_ratio"] = round(pairs / pairs_cache[("kept", r["block_q"])], 3)


# ----------------------------------------------------------------------------------------------
# Checks and output
# ----------------------------------------------------------------------------------------------
def must_be_clean(row: Dict[str, Any]) -> bool:
    """Rows the CI check holds to no spills: fp16/bf16, head dims 64 and 128, both chips."""
    return row["dtype"] in ("fp16", "bf16") and row["head_dim"] in (64, 128)


def check_rows(rows: List[Dict[str, Any]]) -> List[str]:
    """The problems ``--check`` fails on (empty list: clean)."""
    from ..triton_kernels.configs import expected_instr

    bad = []
    for r in rows:
        name = (f"{r['kernel']} sm_{r['cc']} D{r['head_dim']} {r['dtype']} block {r['block_q']}x{r['block_k']} "
                f"tile {r['tile_m']}x{r['tile_n']} ({r.get('shape')})")
        if r["instr"] == "error":
            bad.append(f"{name}: does not compile: {r.get('error')}")
            continue
        if r["smem_bytes"] > SMEM_LIMIT[r["cc"]]:
            bad.append(f"{name}: {r['smem_bytes']} B shared memory > {SMEM_LIMIT[r['cc']]}")
        # decode is memory-bound: any instruction will do (the row reports which)
        want = r["instr"] if r["kernel"] in DECODE_KERNELS else expected_instr(r["kernel"], r["cc"], r["dtype"],
                                                                               r["tiles"])
        if r["instr"] != want:
            bad.append(f"{name}: {r['instr']} where {want} is expected")
        if must_be_clean(r) and r["spill_bytes"]:
            bad.append(f"{name}: {r['spill_bytes']} B of register spills")
    return bad


def _finish_row(r: Dict[str, Any]) -> Dict[str, Any]:
    r["tile_m"], r["tile_n"] = r["tiles"]["BLOCK_M"], r["tiles"]["BLOCK_N"]
    r["num_warps"], r["num_stages"] = r["tiles"]["num_warps"], r["tiles"]["num_stages"]
    return r


def markdown(rows: List[Dict[str, Any]]) -> str:
    """The report as a markdown table (one line per configuration)."""
    lines = [
        "| kernel | cc | D | dtype | block | shape | tile | warps/stages | instr | regs | spills (B) | smem (B) | "
        "model ms* | work ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        block = ("any" if r["kernel"] in DECODE_KERNELS else "dense" if r["block_q"] == 0
                 else f"{r['block_q']}x{r['block_k']}")
        lines.append(f"| {r['kernel']} | {r['cc']} | {r['head_dim']} | {r['dtype']} | {block} | {r.get('shape')} | "
                     f"{r['tile_m']}x{r['tile_n']} | {r['num_warps']}/{r['num_stages']} | {r['instr']} | "
                     f"{r['regs']} | {r['spill_bytes']} | {r['smem_bytes']} | {_blank(r.get('model_ms'))} | "
                     f"{r.get('work_ratio', '')} |")
    c = MODEL_CASE
    lines += ["", f"\\* model_ms is a MODEL (roofline of the tile walk, `triton_kernels/configs.py: model_ms`), "
                  f"not a measurement: {c['seq']} tokens causal, B={c['batch']}, Hq={c['heads']}, Hkv={c['kv_heads']}, "
                  f"S2 layout (window {c['window_tokens']} tokens, vertical stride {c['vert_stride']}; about 0.1 of "
                  f"the causal triangle). work ratio = computed / kept pairs of that layout. Decode rows: tile = "
                  f"query rows (GQA group x new tokens) x keys a step, block any (a runtime argument); not modelled."]
    return "\n".join(lines)


def _blank(value: Any) -> Any:
    return "" if value is None else value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparse-attn bench --static",
                                description="Compile every kernel configuration for sm_80/sm_90 (no GPU needed) and "
                                            "report the tensor-core instruction, registers, spills, shared memory "
                                            "and a modelled time.")
    p.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the rows (a JSON list) here")
    p.add_argument("--md", help="write the markdown table here")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on spills, a missing wgmma or too much shared memory where the rows must be clean")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    p.add_argument("--ccs", type=int, nargs="+", default=list(CCS), choices=list(CCS))
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--blocks", type=int, nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    p.add_argument("--kernels", nargs="+", default=None, help="fwd dq dkdv decode decode_merge (default: all)")
    p.add_argument("--cuda", choices=("auto", "on", "off"), default="auto",
                   help="also compile the CUDA C++ decode kernels (csrc/) with nvcc: auto = when nvcc is found, "
                        "on = a missing nvcc is a check failure")
    return p.parse_args(argv)


def _cuda_part(args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], List[str], str]:
    """The CUDA C++ rows (``static_cuda``): ``(rows, problems, markdown)``."""
    from . import static_cuda

    if args.cuda == "off":
        return [], [], ""
    if static_cuda.find_nvcc() is None:
        why = "nvcc not found: the CUDA C++ kernels were not compiled"
        print(f"# {why}", flush=True)
        return [], ([why] if args.cuda == "on" else []), ""
    head_dims = [d for d in args.head_dims if d in static_cuda.HEAD_DIMS]
    dtypes = [t for t in args.dtypes if t in static_cuda.DTYPES]
    archs = [a for a in static_cuda.ARCHS if int(a[3:5]) in args.ccs]
    if not (head_dims and dtypes and archs):
        return [], [], ""
    t0 = time.perf_counter()
    rows = static_cuda.cuda_rows(archs, head_dims, dtypes, jobs=min(2, max(1, args.jobs)))
    print(f"# compiled {len(rows)} CUDA C++ kernels in {time.perf_counter() - t0:.0f}s", flush=True)
    return [{k: r.get(k) for k in static_cuda.KEYS} for r in rows], static_cuda.check_cuda_rows(rows), \
        static_cuda.markdown(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build, compile and report; returns the exit status (1: ``--check`` found a problem)."""
    args = parse_args(argv)
    rows = configurations(args.ccs, args.head_dims, args.dtypes, args.blocks, args.kernels)
    t0 = time.perf_counter()
    print(f"# static report: compiling {len(rows)} configurations with {args.jobs} job(s)", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_worker_init) as pool:
        rows = [_finish_row(r) for r in pool.map(_compile_safe, rows, chunksize=4)]
    model_column(rows)
    table = markdown(rows)
    print(table)
    print(f"# compiled in {time.perf_counter() - t0:.0f}s", flush=True)
    cuda_rows, cuda_bad, cuda_table = _cuda_part(args)
    if cuda_table:
        print(cuda_table)
        table += "\n\nCUDA C++ kernels (csrc/, nvcc + ptxas -v):\n\n" + cuda_table
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: r.get(k) for k in KEYS} for r in rows] + cuda_rows, f, indent=1)
        print(f"wrote {args.json}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
        print(f"wrote {args.md}")
    bad = check_rows(rows) + cuda_bad
    rows = rows + cuda_rows
    for line in bad:
        print(f"CHECK: {line}", file=sys.stderr)
    print(f"# check: {len(bad)} problem(s) in {len(rows)} rows", flush=True)
    return 1 if (args.check and bad) else 0
