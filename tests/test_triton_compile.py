"""Ahead-of-time compile of every kernel for real GPUs, on a machine without one.

The interpreter runs the kernels' Python but not Triton's compiler: a kernel that
interprets fine can still fail to compile (a type that differs between the branches of an
``if``, a ``None`` pointer reaching code) or need more shared memory than the GPU has.
This compiles each kernel for sm_80 and sm_90 with the launch parameters the launchers
would use (``configs.kernel_tiles``) and checks its shared memory fits the chip.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - very old Triton
    pytest.skip("this Triton has no ahead-of-time compile API", allow_module_level=True)

# Shared memory a block may use (opt-in maximum): A100 164 KiB, H100 227 KiB.
SMEM = {80: 166912, 90: 232448}
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _compile(fn, arg_types: dict, constexprs: dict, cc: int, num_warps: int, num_stages: int):
    names = fn.arg_names
    signature = {n: ("constexpr" if n in constexprs else arg_types.get(n, "i32")) for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


# (compute capability, dtype, head dim, layout block, dense, causal): the largest tiles of each
# table row, fp32's smaller ones, and the odd shapes (padded head dim, 16-blocks, rectangles).
CASES = [
    (90, "bf16", 64, (128, 128), False, True),
    (90, "bf16", 128, (128, 128), False, True),
    (90, "bf16", 256, (128, 128), False, True),
    (90, "bf16", 128, (64, 64), True, True),
    (90, "fp32", 128, (128, 128), False, True),
    (90, "fp32", 256, (64, 64), True, True),
    (90, "fp16", 96, (16, 16), False, False),
    (90, "bf16", 128, (32, 128), False, True),
    (80, "bf16", 128, (128, 128), False, True),
    (80, "bf16", 256, (64, 64), True, False),
    (80, "fp32", 256, (128, 128), False, True),
]


def test_compile_runs_outside_interpreter():
    """The CPU tier defines the kernels under TRITON_INTERPRET=1, where they cannot be
    compiled; run this file again in a process without it, so CI does run the compiles."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("kernels are compiled directly by the tests below in this process")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert f"{len(CASES)} passed" in proc.stdout, tail


@pytest.mark.parametrize("cc,dt,d,blocks,dense,causal", CASES,
                         ids=[f"sm{c[0]}-{c[1]}-D{c[2]}-{'dense' if c[4] else 'blk%dx%d' % c[3]}"
                              f"-{'causal' if c[5] else 'full'}" for c in CASES])
def test_kernels_compile_for_gpu(cc, dt, d, blocks, dense, causal, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from sparse_attn.triton_kernels import block_sparse_bwd as bwd, block_sparse_fwd as fwd
    from sparse_attn.triton_kernels.configs import kernel_tiles

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernels are interpreted here; test_compile_runs_outside_interpreter compiles them")
    family = "hopper" if cc >= 90 else "ampere"
    ptr = "*" + dt
    flags = dict(HEAD_DIM=d, CAUSAL=causal, DENSE=dense, UPCAST=False, DOT_PREC="ieee" if dt == "fp32" else "tf32")
    no_layout = lambda a, b: {a: None, b: None} if dense else {}  # noqa: E731
    kernels = {
        "fwd": (fwd._fwd_kernel, dict(Q=ptr, K=ptr, V=ptr, O=ptr, LSE="*fp32", KV_NUM="*i32", KV_IDX="*i32",
                                      qk_scale="fp32"), no_layout("KV_NUM", "KV_IDX")),
        "dkdv": (bwd._bwd_dkdv_kernel, dict(Q=ptr, K=ptr, V=ptr, DO=ptr, LSE="*fp32", DELTA="*fp32", DK=ptr, DV=ptr,
                                            Q_NUM="*i32", Q_IDX="*i32", qk_scale="fp32", scale="fp32"),
                 no_layout("Q_NUM", "Q_IDX")),
        "dq": (bwd._bwd_dq_kernel, dict(Q=ptr, K=ptr, V=ptr, DO=ptr, LSE="*fp32", DELTA="*fp32", DQ=ptr,
                                        KV_NUM="*i32", KV_IDX="*i32", qk_scale="fp32", scale="fp32"),
               no_layout("KV_NUM", "KV_IDX")),
    }
    for name, (fn, types, nones) in kernels.items():
        tiles = kernel_tiles(family, name, d, DTYPES[dt], blocks[0], blocks[1], dense)
        warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        compiled = _compile(fn, types, {**flags, **tiles, **nones}, cc, warps, stages)
        assert compiled.asm.get("cubin") or compiled.asm.get("ptx"), f"{name}: no machine code"
        assert compiled.metadata.shared <= SMEM[cc], (
            f"{name} needs {compiled.metadata.shared} B of shared memory on sm_{cc} (max {SMEM[cc]}), tiles {tiles}"
        )
    pre = _compile(bwd._bwd_preprocess, dict(O=ptr, DO=ptr, DLSE="*fp32", DELTA="*fp32"),
                   dict(HEAD_DIM=d, BLOCK_D=tiles["BLOCK_D"], BLOCK_M=64, HAS_DLSE=True), cc, 4, 1)
    assert pre.metadata.shared <= SMEM[cc]
