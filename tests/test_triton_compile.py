"""Ahead-of-time compile of the kernels for real GPUs, on a machine without one.

The interpreter runs the kernels' Python but not Triton's compiler: a kernel that interprets
fine can still fail to compile (a global that is not a constexpr, a type that differs between
the branches of an ``if``), need more shared memory than the chip has, spill registers or miss
Hopper's wgmma. This compiles a representative subset of the configurations the launchers can
pick (``sparse_attn.benchmark.static``, the same code as ``sparse-attn bench --static``) for
sm_80 and sm_90 and applies the report's check to it. CI runs the whole report with ``--check``
as a separate step (``.ci/run``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from sparse_attn.benchmark import static  # noqa: E402


def _subset():
    rows = []
    # the clean set (16-bit, D 64/128), every tile shape, on the block sizes with the most shapes
    rows += static.configurations(ccs=(90, 80), head_dims=(128,), dtypes=("bf16",), blocks=(16, 64))
    rows += static.configurations(ccs=(90,), head_dims=(64,), dtypes=("fp16",), blocks=(32,))
    # compile-only corners: fp32 (FMA dots), head dim 256, 128-blocks split by the tiles
    rows += [r for r in static.configurations(ccs=(90,), head_dims=(256,), dtypes=("fp32",), blocks=(128,))
             if r["block_q"]]
    return rows


def test_configurations_cover_every_choice():
    """The report lists every tile shape the launchers can pick, for every layout block."""
    from sparse_attn.triton_kernels.configs import KERNELS, candidates

    rows = static.configurations()
    seen = {(r["kernel"], r["cc"], r["head_dim"], r["dtype"], r["block_q"], r["tiles"]["BLOCK_M"],
             r["tiles"]["BLOCK_N"]) for r in rows}
    for cc, family in ((80, "ampere"), (90, "hopper")):
        for kernel in KERNELS:
            for d in (64, 128, 256):
                for b in (16, 32, 64, 128):
                    for c in candidates(family, kernel, d, 2, b, b):
                        assert (kernel, cc, d, "bf16", b, c["BLOCK_M"], c["BLOCK_N"]) in seen
    assert {r["block_q"] for r in rows} == {0, 16, 32, 64, 128}


def test_compile_subset_outside_interpreter(tmp_path):
    """Compile the subset in a child process without TRITON_INTERPRET (kernels defined under the
    interpreter cannot be compiled) and hold it to the report's check."""
    out = tmp_path / "rows.json"
    code = (
        "import json, sys\n"
        "sys.path.insert(0, %r)\n"
        "from test_triton_compile import _subset\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from sparse_attn.benchmark import static\n"
        "with ProcessPoolExecutor(2, initializer=static._worker_init) as pool:\n"
        "    rows = [static._finish_row(r) for r in pool.map(static._compile_safe, _subset())]\n"
        "json.dump(rows, open(%r, 'w'))\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), str(out))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == len(_subset())
    problems = static.check_rows(rows)
    assert not problems, "\n".join(problems)
    by_kernel = {r["kernel"] for r in rows if r["instr"] == "wgmma"}
    assert by_kernel == {"fwd", "dq", "dkdv"}  # every kernel reaches wgmma somewhere on sm_90
    for r in rows:
        assert r["regs"] > 0 and r["smem_bytes"] > 0


def test_check_flags_each_problem():
    """The CI check fails on what it promises to fail on, and only where it applies."""
    base = dict(kernel="fwd", cc=90, head_dim=128, dtype="bf16", block_q=16, block_k=16, tile_m=128, tile_n=16,
                shape="rows", instr="wgmma", regs=200, spill_bytes=0, smem_bytes=40960,
                tiles=dict(BLOCK_M=128, BLOCK_N=16, BLOCK_D=128))
    assert static.check_rows([base]) == []
    assert "spills" in static.check_rows([dict(base, spill_bytes=8)])[0]
    assert "mma.sync where wgmma" in static.check_rows([dict(base, instr="mma.sync")])[0]
    assert "shared memory" in static.check_rows([dict(base, smem_bytes=static.SMEM_LIMIT[90] + 1)])[0]
    assert "does not compile" in static.check_rows([dict(base, instr="error", error="boom")])[0]
    assert static.check_rows([dict(base, head_dim=256, tiles=dict(base["tiles"], BLOCK_D=256), spill_bytes=64)]) == []
    sm80 = dict(base, cc=80, instr="mma.sync")
    assert static.check_rows([sm80]) == [] and static.check_rows([dict(sm80, spill_bytes=4)])


def test_static_command_writes_the_json_rows(tmp_path):
    """`sparse-attn bench --static --json F` end to end on a slice: one row per configuration with
    exactly the documented keys."""
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sparse_attn.cli", "bench", "--static", "--ccs", "90", "--head-dims",
                           "64", "--dtypes", "bf16", "--blocks", "128", "--kernels", "fwd", "--jobs", "1", "--check",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == len([r for r in static.configurations((90,), (64,), ("bf16",), (128,)) if r["kernel"] == "fwd"])
    assert all(list(r) == list(static.KEYS) for r in rows)
    assert all(r["instr"] == "wgmma" and r["spill_bytes"] == 0 and r["model_ms"] > 0 for r in rows)
    assert "| fwd | 90 | 64 | bf16 |" in proc.stdout


def test_contained_variant_compiles():
    """The variant that runs when an input holds a NaN/inf (``CONTAIN=True``) compiles for sm_90 for
    each kernel, on a split layout block (bit masks) and dense. It may spill (it is the rare path);
    the report's checks hold the plain variant."""
    rows = [r for r in static.configurations(ccs=(90,), head_dims=(64,), dtypes=("fp16",), blocks=(16,))
            if r["shape"] == "dense" or r["shape"].startswith("wide")]
    assert {r["kernel"] for r in rows} == {"fwd", "dq", "dkdv"}
    code = (
        "import json, sys\n"
        "from sparse_attn.benchmark import static\n"
        "static._worker_init()\n"
        "rows = json.loads(sys.stdin.read())\n"
        "print(json.dumps([static.compile_row(r, contain=True) for r in rows]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(rows), env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == len(rows) and all(r["regs"] > 0 and r["instr"] != "none" for r in got)
