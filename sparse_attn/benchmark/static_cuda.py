"""The CUDA C++ rows of the static report: every kernel instantiation of ``csrc/decode`` compiled
ahead of time with nvcc (no GPU needed) and read back with ``ptxas -v``.

``cuda_rows()`` compiles one translation unit per arch (every (dtype, head dim) instantiation) to
PTX with nvcc, then assembles it with ``ptxas -v`` and returns one row per kernel (the split kernel and the merge
kernel): ``regs``, ``spill_bytes`` (spill stores + loads), ``stack_bytes``, ``smem_static``,
``smem_dynamic`` (the split kernel's dynamic shared memory, read from the PTX of a marker constant,
so it is the kernel's own number) and ``compile_s``.

ptxas: ``$SPARSE_ATTN_PTXAS`` if set, else the CUDA toolkit's (beside nvcc), else the one Triton
ships; each row names the one that read it. The PTX's ISA version follows nvcc, so a ptxas older
than nvcc refuses it (Triton 3.9's ptxas is CUDA 12.9's; nvcc 13 writes PTX ISA 9.0): the next
candidate is tried.

CLI: ``python -m sparse_attn.benchmark.static_cuda [--json FILE] [--md FILE] [--check] [--jobs N]``
(``--check``: exit 1 on a compile error or on spills in fp16/bf16 at head dims 64/128).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["cuda_rows", "check_cuda_rows", "markdown", "find_nvcc", "ptxas_candidates", "main", "ARCHS", "KEYS"]

ARCHS = ("sm_80", "sm_90a")
HEAD_DIMS = (64, 128, 256)
DTYPES = ("fp16", "bf16")
_CTYPE = {"fp16": "__half", "bf16": "__nv_bfloat16"}
KERNELS = ("decode_split_kernel", "decode_merge_kernel")
KEYS = ("kernel", "arch", "head_dim", "dtype", "regs", "spill_bytes", "stack_bytes", "smem_static", "smem_dynamic",
        "compile_s", "ptxas", "error")

_FUNC = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def _csrc() -> Path:
    from .._cuda import csrc_dir

    return csrc_dir()


def find_nvcc() -> Optional[str]:
    """nvcc from ``$CUDA_HOME``/``$CUDA_PATH`` or the PATH; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.path.join(os.environ[var], "bin", "nvcc")
    return shutil.which("nvcc")


def ptxas_candidates() -> List[Tuple[str, str]]:
    """``(label, path)`` of the ptxas binaries to try, in order."""
    out = []
    if os.environ.get("SPARSE_ATTN_PTXAS"):
        out.append(("env", os.environ["SPARSE_ATTN_PTXAS"]))
    nvcc = find_nvcc()
    if nvcc:
        p = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "ptxas")
        if os.path.exists(p):
            out.append(("cuda-toolkit", p))
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if os.path.exists(p):
            out.append(("triton", p))
    except ImportError:
        pass
    return out


def _mangled(kernel: str, dtype: str, head_dim: int) -> str:
    t = _CTYPE[dtype]
    return f"{kernel}I{len(t)}{t}Li{head_dim}EE"


def _marker(dtype: str, head_dim: int) -> str:
    return f"sparse_attn_split_smem_bytes_{dtype}_{head_dim}"


def _translation_unit(combos: Sequence[Tuple[str, int]]) -> str:
    lines = ['#include "decode/sparse_decode.cuh"', "namespace sd = sparse_attn::decode;"]
    for dtype, d in combos:
        t = _CTYPE[dtype]
        lines += [f"template __global__ void sd::{k}<{t}, {d}>(const sd::DecodeParams);" for k in KERNELS]
        # a constant the PTX keeps: the split kernel's dynamic shared memory, as the launcher computes it
        lines.append(f'extern "C" __device__ const int {_marker(dtype, d)} = int(sd::SplitSmem<{t}, {d}>::bytes);')
    return "\n".join(lines) + "\n"


def _parse_ptxas(log: str) -> Dict[str, Dict[str, int]]:
    """ptxas -v output -> {mangled name: {regs, spill_bytes, stack_bytes, smem_static}}."""
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        m = _STACK.search(line)
        if m:
            out[current].update(stack_bytes=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)))
        m = _USED.search(line)
        if m:
            out[current].update(regs=int(m.group(1)), smem_static=int(m.group(2) or 0))
    return out


def compile_arch(arch: str, head_dims: Sequence[int] = HEAD_DIMS, dtypes: Sequence[str] = DTYPES,
                 nvcc: Optional[str] = None, extra_flags: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Compile the split and merge kernels of every (dtype, head dim) for ``arch`` in one
    translation unit (nvcc -ptx, then ptxas -v); one row per kernel instantiation."""
    nvcc = nvcc or find_nvcc()
    combos = [(t, d) for t in dtypes for d in head_dims]
    rows = [dict(kernel=k, arch=arch, head_dim=d, dtype=t) for t, d in combos for k in KERNELS]

    def fail(msg: str) -> List[Dict[str, Any]]:
        for r in rows:
            r.update(regs=None, spill_bytes=None, stack_bytes=None, smem_static=None, smem_dynamic=None,
                     error=msg[-600:])
        return rows

    if nvcc is None:
        return fail("nvcc not found")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sparse_attn_cuda_static_") as tmp:
        src, ptx = os.path.join(tmp, "tu.cu"), os.path.join(tmp, "tu.ptx")
        Path(src).write_text(_translation_unit(combos))
        cmd = [nvcc, "-std=c++20", "-O3", f"-arch={arch}", "-ptx", "-I", str(_csrc()), src, "-o", ptx, *extra_flags]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            return fail(f"nvcc: {res.stderr.strip()}")
        ptx_text = Path(ptx).read_text()
        errors = []
        for label, ptxas in ptxas_candidates():
            res = subprocess.run([ptxas, "-v", f"-arch={arch}", ptx, "-o", os.path.join(tmp, "tu.cubin")],
                                 capture_output=True, text=True)
            if res.returncode == 0:
                break
            errors.append(f"{label} ptxas: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}")
        else:
            return fail("; ".join(errors) or "no ptxas found")
    stats = _parse_ptxas(res.stdout + res.stderr)
    elapsed = round(time.perf_counter() - t0, 2)
    for r in rows:
        want = _mangled(r["kernel"], r["dtype"], r["head_dim"])
        name = next((n for n in stats if n.endswith(want) or want + "N" in n or want in n), None)
        if name is None:
            r.update(regs=None, spill_bytes=None, error="kernel missing from the ptxas output")
            continue
        m = re.search(_marker(r["dtype"], r["head_dim"]) + r"\s*=\s*(\d+)", ptx_text)
        r.update(stats[name])
        r.update(smem_dynamic=(int(m.group(1)) if m else None) if r["kernel"] == "decode_split_kernel" else 0,
                 compile_s=elapsed, ptxas=label, error=None)
    return rows


def cuda_rows(archs: Sequence[str] = ARCHS, head_dims: Sequence[int] = HEAD_DIMS,
              dtypes: Sequence[str] = DTYPES, jobs: int = 2) -> List[Dict[str, Any]]:
    """Compile every instantiation, one nvcc process per arch (``jobs`` at a time): a list of
    rows, one per (kernel, arch, dtype, head dim). ``compile_s`` is the arch's whole compile."""
    nvcc = find_nvcc()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        parts = list(pool.map(lambda a: compile_arch(a, head_dims, dtypes, nvcc=nvcc), archs))
    return [r for part in parts for r in part]


def must_be_clean(row: Dict[str, Any]) -> bool:
    """Rows held to no spills (as the Triton rows): fp16/bf16 at head dims 64 and 128."""
    return row["head_dim"] in (64, 128)


def check_cuda_rows(rows: Sequence[Dict[str, Any]]) -> List[str]:
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['arch']} D{r['head_dim']} {r['dtype']}"
        if r.get("error"):
            bad.append(f"{name}: does not compile: {r['error']}")
        elif must_be_clean(r) and r["spill_bytes"]:
            bad.append(f"{name}: {r['spill_bytes']} B of register spills")
    return bad


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| kernel | arch | D | dtype | regs | spills (B) | stack (B) | smem static (B) | smem dynamic (B) "
             "| ptxas |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['head_dim']} | {r['dtype']} | error: "
                         f"{r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['head_dim']} | {r['dtype']} | {r['regs']} | "
                     f"{r['spill_bytes']} | {r['stack_bytes']} | {r['smem_static']} | {r['smem_dynamic']} | "
                     f"{r['ptxas']} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparse_attn.benchmark.static_cuda",
                                description="Compile every CUDA C++ decode kernel instantiation with nvcc and report "
                                            "registers, spills and shared memory from ptxas -v (no GPU needed).")
    p.add_argument("--json", help="write the rows (a JSON list) here")
    p.add_argument("--md", help="write the markdown table here")
    p.add_argument("--check", action="store_true", help="exit 1 on a compile error or spills in the clean rows")
    p.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = p.parse_args(argv)
    if find_nvcc() is None:
        print("# static_cuda: nvcc not found; nothing compiled", file=sys.stderr)
        return 1 if args.check else 0
    t0 = time.perf_counter()
    rows = cuda_rows(args.archs, args.head_dims, args.dtypes, args.jobs)
    table = markdown(rows)
    print(table)
    print(f"# compiled {len(rows)} kernels in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: r.get(k) for k in KEYS} for r in rows], f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    bad = check_cuda_rows(rows)
    for line in bad:
        print(f"CHECK: {line}", file=sys.stderr)
    print(f"# check: {len(bad)} problem(s) in {len(rows)} rows", flush=True)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
