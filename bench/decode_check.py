#!/usr/bin/env python
"""Decode correctness on the GPU (``bench/gpu_check.sh`` step ``decode``): the CUDA C++ backend
built (JIT, ``sparse_attn._cuda``) and both kernel backends of ``sparse_decode`` compared with the
reference at real sizes.

Usage, from the repository root::

    python bench/decode_check.py --out bench/results            # real sizes, triton + cuda (CUDA GPU)
    python bench/decode_check.py --set small                    # the few small calls of the sanitizer runs
    TRITON_INTERPRET=1 python bench/decode_check.py --set tiny  # CPU smoke of this script (no GPU)

The CUDA extension is built in a background thread while the Triton cases start; once it is
ready, the CUDA runs of the cases already done come first, then every case runs both backends on
one input set. Every case: ragged ``cache_seqlens`` (a full 128k sequence, odd lengths, one shorter
than ``Sq``, one empty), cache rows past each length and unused pages set to NaN, lists padded
with junk past ``kv_num`` and one empty list; output and lse compared with
``sparse_decode(..., backend="reference")`` (``torch.isclose`` per dtype tolerance; equal
infinities, i.e. the ``-inf`` lse of rows that see nothing, count as equal), and no NaN anywhere.

``--time-limit S``: no new case starts after S seconds (the run says how many were left out and
the JSON has ``"incomplete": true``). Exit status: 0 every case that ran passed (and the CUDA
build worked, on a GPU, within the time limit); 1 a failure; 3 no CUDA GPU without ``--set tiny``.
Results: ``decode_check_<gpu>_<set>_<date>.json`` in ``--out`` (with ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import torch  # noqa: E402

TOLS = {  # out: (atol, rtol) against the reference computed from the same inputs; lse: fp32
    torch.bfloat16: dict(out=(2e-2, 2e-2), lse=(5e-3, 1e-3)),
    torch.float16: dict(out=(4e-3, 4e-3), lse=(5e-3, 1e-3)),
    torch.float32: dict(out=(1e-4, 1e-4), lse=(1e-4, 1e-4)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def case_set(name: str) -> List[Dict[str, Any]]:
    """The cases of a set: ``real`` (Llama-3-8B GQA at 128k, every layout x kv_blocks mode x Sq 1/4,
    plus other head dims, GQA ratios, dtypes, block and page sizes), ``small`` (the sanitizer's few
    calls) or ``tiny`` (CPU smoke)."""
    out: List[Dict[str, Any]] = []
    if name == "real":
        lens = [131072, 65536 + 37, 4099, 3, 0]
        base = dict(hq=32, hkv=8, d=128, dtype="bf16", block=64, lens=lens)
        for layout, ps in (("contiguous", None), ("paged", 64), ("paged", 16)):
            for kv in ("dense", "list", "s2"):
                for sq in (1, 4):
                    out.append(dict(base, layout=layout, page_size=ps, kv=kv, sq=sq))
        out += [
            dict(hq=16, hkv=2, d=64, dtype="fp16", block=32, lens=[32768, 1000, 5, 0], layout="paged", page_size=32,
                 kv="list", sq=16),
            dict(hq=8, hkv=8, d=256, dtype="bf16", block=128, lens=[16384, 2049, 1], layout="contiguous",
                 page_size=None, kv="s2", sq=2),
            dict(hq=32, hkv=8, d=128, dtype="bf16", block=16, lens=[40000, 300, 7], layout="paged", page_size=256,
                 kv="list", sq=7),
            dict(hq=32, hkv=8, d=128, dtype="fp16", block=64, lens=[131072, 77], layout="contiguous", page_size=None,
                 kv="s2dense", sq=1),
        ]
    elif name == "small":
        base = dict(hq=8, hkv=2, d=128, dtype="bf16", block=64, lens=[700, 129, 3, 0])
        out = [dict(base, layout="contiguous", page_size=None, kv="list", sq=1),
               dict(base, layout="paged", page_size=16, kv="list", sq=4),
               dict(base, layout="paged", page_size=64, kv="s2", sq=1),
               dict(base, layout="contiguous", page_size=None, kv="dense", sq=5)]
    elif name == "tiny":
        base = dict(hq=4, hkv=2, d=32, dtype="fp32", block=16, lens=[70, 33, 3, 0])
        out = [dict(base, layout="contiguous", page_size=None, kv="list", sq=1),
               dict(base, layout="paged", page_size=16, kv="s2", sq=4),
               dict(base, layout="paged", page_size=32, kv="dense", sq=2)]
    else:
        raise ValueError(f"unknown case set {name!r}")
    return out


def case_label(c: Dict[str, Any]) -> str:
    layout = c["layout"] + (f"/{c['page_size']}" if c["page_size"] else "")
    return (f"{c['dtype']} H={c['hq']}/{c['hkv']} D={c['d']} bs={c['block']} {layout} kv={c['kv']} Sq={c['sq']} "
            f"lens={c['lens']}")


def make_inputs(c: Dict[str, Any], device: torch.device, seed: int = 0) -> Dict[str, Any]:
    """q, the cache (rows past each length and unused pages NaN), lengths, block table, kv_blocks."""
    from sparse_attn.patterns.s2 import S2Config

    gen = torch.Generator(device="cpu").manual_seed(seed)  # the small host-side choices
    gen_dev = torch.Generator(device=device).manual_seed(seed + 1)  # the tensors, made on the device
    dt = DTYPES[c["dtype"]]
    b, hq, hkv, d, bs, sq = len(c["lens"]), c["hq"], c["hkv"], c["d"], c["block"], c["sq"]
    s_max = max(max(c["lens"]), 1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen_dev, device=device, dtype=dt)

    q = rnd(b, hq, sq, d)
    lens = torch.tensor(c["lens"], dtype=torch.int32, device=device)
    table = None
    if c["layout"] == "contiguous":
        k, v = rnd(b, hkv, s_max, d), rnd(b, hkv, s_max, d)
        for i, n in enumerate(c["lens"]):
            k[i, :, n:] = float("nan")
            v[i, :, n:] = float("nan")
    else:
        ps = c["page_size"]
        max_pages = -(-s_max // ps)
        need = [-(-n // ps) for n in c["lens"]]
        total = sum(need) + 1  # + one spare page, NaN, that every unused table slot points at
        k, v = rnd(total, ps, hkv, d), rnd(total, ps, hkv, d)
        perm = torch.randperm(total - 1, generator=gen).tolist()
        spare = total - 1
        k[spare] = float("nan")
        v[spare] = float("nan")
        rows = []
        at = 0
        for n, m in zip(c["lens"], need):
            pages = perm[at: at + m]
            at += m
            if n % ps and pages:
                k[pages[-1], n % ps:] = float("nan")
                v[pages[-1], n % ps:] = float("nan")
            rows.append(pages + [spare] * (max_pages - m))
        table = torch.tensor(rows, dtype=torch.int32, device=device)
    kv_blocks: Any = None
    block_size: Optional[int] = bs
    if c["kv"] in ("s2", "s2dense"):
        kv_blocks = S2Config(block_size=bs, local_blocks=4 if bs >= 64 else 16, vert_stride=8,
                             num_dense_heads=1 if c["kv"] == "s2dense" else 0)
        block_size = None
    elif c["kv"] == "list":
        nb = -(-s_max // bs)
        width = max(2, nb // 10 + 3)
        kv_num = torch.zeros(b, hkv, dtype=torch.int32)
        kv_idx = torch.full((b, hkv, width), 10**6, dtype=torch.int32)  # junk past kv_num
        for i, n in enumerate(c["lens"]):
            blocks = -(-n // bs)
            for h in range(hkv):
                if i == 0 and h == hkv - 1:
                    continue  # an empty list: the own blocks only
                m = min(blocks, max(1, blocks // 10))
                ids = torch.randperm(max(blocks, 1), generator=gen)[:m].sort().values if blocks else torch.zeros(0)
                kv_num[i, h] = len(ids)
                kv_idx[i, h, : len(ids)] = ids.to(torch.int32)
        kv_blocks = (kv_num.to(device), kv_idx.to(device))
    return dict(q=q, k=k, v=v, lens=lens, table=table, kv_blocks=kv_blocks, block_size=block_size)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> Tuple[bool, float]:
    a, b = a.float(), b.float()
    ok = bool(torch.isclose(a, b, rtol=rtol, atol=atol).all())
    fin = torch.isfinite(a) & torch.isfinite(b)
    err = float((a - b).abs()[fin].max()) if bool(fin.any()) else 0.0
    return ok, err


def run_case(c: Dict[str, Any], backend: str, inp: Dict[str, Any], ref: Tuple[torch.Tensor, torch.Tensor]
             ) -> Dict[str, Any]:
    from sparse_attn.decode import sparse_decode

    tol = TOLS[DTYPES[c["dtype"]]]
    t = time.perf_counter()
    out, lse = sparse_decode(inp["q"], inp["k"], inp["v"], inp["lens"], block_table=inp["table"],
                             kv_blocks=inp["kv_blocks"], block_size=inp["block_size"], return_lse=True, backend=backend)
    if out.is_cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    ok_o, err_o = _close(out, ref[0], *tol["out"])
    ok_l, err_l = _close(lse, ref[1].to(lse.dtype), *tol["lse"])
    nan = bool(torch.isnan(out).any() or torch.isnan(lse).any())
    return dict(ok=ok_o and ok_l and not nan, max_err_out=err_o, max_err_lse=err_l, nan=nan, first_call_s=sec)


class CudaBuild(threading.Thread):
    """Builds / loads the CUDA C++ extension (``sparse_attn._cuda``) in the background."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ok: Optional[bool] = None
        self.why = ""
        self.seconds = 0.0

    def run(self) -> None:
        t = time.perf_counter()
        try:
            mod = importlib.import_module("sparse_attn._cuda")
            loader = getattr(mod, "load_cuda", None)
            if loader is not None:
                loader()
            ok, why = mod.cuda_available() if hasattr(mod, "cuda_available") else (True, "")
            self.ok, self.why = bool(ok), str(why or "")
        except Exception as exc:  # noqa: BLE001
            self.ok, self.why = False, f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        self.seconds = time.perf_counter() - t


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=["real", "small", "tiny"], default="real", help="which cases (default real)")
    p.add_argument("--backends", nargs="+", choices=["triton", "cuda"], default=["triton", "cuda"])
    p.add_argument("--no-reference", action="store_true", help="run the calls only (the sanitizer runs)")
    p.add_argument("--time-limit", type=float, default=None, help="no new case after this many seconds")
    p.add_argument("--out", default=None, help="write decode_check_<gpu>_<date>.json here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        gpu = torch.cuda.get_device_name(device)
    elif args.set == "tiny":
        device, gpu = torch.device("cpu"), "cpu"
    else:
        print("decode_check: no CUDA GPU (use --set tiny for the CPU smoke run)", file=sys.stderr)
        return 3
    if args.set == "tiny" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("decode_check: the tiny set on CPU needs TRITON_INTERPRET=1 for the Triton backend", file=sys.stderr)
    cases = case_set(args.set)
    print(f"# decode_check: {gpu} | torch {torch.__version__} | set {args.set} ({len(cases)} cases) | backends "
          f"{' '.join(args.backends)}", flush=True)
    build: Optional[CudaBuild] = None
    if "cuda" in args.backends and device.type == "cuda":
        build = CudaBuild()
        if args.set == "real":  # a long check: build in the background while the Triton cases run
            build.start()
            print("# CUDA extension: building/loading in the background (sparse_attn._cuda)", flush=True)
        else:  # the sanitizer's few calls: load first, so the first case runs both backends
            build.run()
    results: List[Dict[str, Any]] = []
    state = dict(left_out=0, failed=False, build_said=False)

    def over() -> bool:
        return args.time_limit is not None and time.perf_counter() - t0 > args.time_limit

    def build_ready(wait: bool) -> Optional[bool]:
        """None: still building (and not waiting); else whether the CUDA backend can be run (said once)."""
        if build is None:
            return True  # no build here (CPU): the backend's own error says why
        if wait and build.is_alive():
            left = None if args.time_limit is None else max(1.0, args.time_limit - (time.perf_counter() - t0))
            build.join(left)
            if build.is_alive():
                build.ok, build.why = False, f"not finished within --time-limit {args.time_limit:g}s"
                build.seconds = time.perf_counter() - t0
        elif build.is_alive():
            return None
        if not state["build_said"]:
            state["build_said"] = True
            status = "ok" if build.ok else f"FAILED: {build.why}"
            print(f"# CUDA extension build/load: {status} in {build.seconds:.1f}s", flush=True)
            results.append(dict(kind="cuda_build", ok=build.ok, why=build.why, seconds=round(build.seconds, 1)))
            if not build.ok:
                state["failed"] = True
        return bool(build.ok)

    def run(c: Dict[str, Any], backends: List[str]) -> None:
        """One input set (and reference) for ``backends`` on case ``c``."""
        from sparse_attn.decode import sparse_decode

        if over():
            state["left_out"] += len(backends)
            return
        label = case_label(c)
        inp: Optional[Dict[str, Any]] = None
        ref = None
        for backend in backends:
            rec: Dict[str, Any] = dict(kind="case", backend=backend, case=label)
            try:
                if inp is None:
                    inp = make_inputs(c, device)
                call = dict(block_table=inp["table"], kv_blocks=inp["kv_blocks"], block_size=inp["block_size"])
                if args.no_reference:
                    out = sparse_decode(inp["q"], inp["k"], inp["v"], inp["lens"], backend=backend, **call)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    rec.update(ok=not bool(torch.isnan(out).any()))
                else:
                    if ref is None:
                        ref = sparse_decode(inp["q"], inp["k"], inp["v"], inp["lens"], return_lse=True,
                                            backend="reference", **call)
                    rec.update(run_case(c, backend, inp, ref))
            except Exception as exc:  # noqa: BLE001
                text = str(exc).strip().splitlines()
                rec.update(ok=False, error=f"{type(exc).__name__}: {text[0] if text else ''}"[:400])
                if device.type == "cpu" and "needs CUDA tensors" in rec["error"]:
                    rec.update(ok=None, skipped=True)  # the tiny set on CPU: no CUDA backend here
                else:
                    traceback.print_exc()
            if rec.get("ok") is False:
                state["failed"] = True
            verdict = "skipped" if rec.get("skipped") else ("ok" if rec.get("ok") else "FAIL")
            errs = "" if "max_err_out" not in rec else \
                f" (max err out {rec['max_err_out']:.3g}, lse {rec['max_err_lse']:.3g})"
            print(f"[{backend:>6}] {verdict:>7}: {label}{errs}{'  ' + rec['error'] if rec.get('error') else ''}",
                  flush=True)
            results.append(rec)
        del inp, ref

    # Case by case, every backend on one input set; while the CUDA extension is still building, its
    # cases wait in `pending` and run as soon as it is ready (or after the others).
    pending: List[Dict[str, Any]] = []
    for c in cases:
        now = []
        for backend in args.backends:
            if backend != "cuda":
                now.append(backend)
                continue
            ready = build_ready(wait=False)
            if ready is None:
                pending.append(c)
            elif ready:
                if pending:
                    for p_case in pending:
                        run(p_case, ["cuda"])
                    pending = []
                now.append(backend)
        run(c, now)
    no_build = 0  # cuda cases not run because the extension could not be built / loaded
    if pending and build_ready(wait=True):
        for p_case in pending:
            run(p_case, ["cuda"])
    elif pending:
        no_build = len(pending)
    if build is not None and build.ok is False:
        no_build = sum(1 for c in cases if "cuda" in args.backends) - sum(
            1 for r in results if r.get("kind") == "case" and r["backend"] == "cuda")
    left_out, failed = state["left_out"], state["failed"]
    ran = [r for r in results if r.get("kind") == "case" and r.get("ok") is not None]
    bad = [r for r in ran if not r["ok"]]
    if left_out:
        print(f"# INCOMPLETE: {left_out} (case, backend) pairs not run: --time-limit {args.time_limit:g}s reached",
              flush=True)
    if no_build:
        print(f"# {no_build} cuda cases not run: the CUDA extension is not available (see above)", flush=True)
    print(f"# decode_check: {len(ran)} ran, {len(bad)} failed, {left_out} left out, "
          f"{time.perf_counter() - t0:.1f}s -> {'FAILED' if failed else 'ok'}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = re.sub(r"[^A-Za-z0-9._-]+", "_", gpu).strip("_") or "unknown"
        date = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(args.out, f"decode_check_{tag}_{args.set}_{date}.json")
        with open(path, "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, set=args.set, backends=args.backends,
                           incomplete=bool(left_out or no_build), left_out=left_out, cuda_not_run=no_build,
                           failed=failed,
                           seconds=round(time.perf_counter() - t0, 1), results=results), f, indent=1)
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
