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


TRAINING = ("fwd", "dq", "dkdv")


def _subset():
    rows = []
    # the clean set (16-bit, D 64/128), every tile shape, on the block sizes with the most shapes
    rows += static.configurations(ccs=(90, 80), head_dims=(128,), dtypes=("bf16",), blocks=(16, 64), kernels=TRAINING)
    rows += static.configurations(ccs=(90,), head_dims=(64,), dtypes=("fp16",), blocks=(32,), kernels=TRAINING)
    # compile-only corners: fp32 (FMA dots), head dim 256, 128-blocks split by the tiles
    rows += [r for r in static.configurations(ccs=(90,), head_dims=(256,), dtypes=("fp32",), blocks=(128,),
                                              kernels=TRAINING) if r["block_q"]]
    # decode: the heaviest variant (paged cache, kept-block list) at the smallest and largest row
    # tile, the S2 closed form, and the merge
    rows += [r for r in static.decode_configurations(ccs=(90, 80), head_dims=(128,), dtypes=("bf16",))
             if (r["shape"] == "list-paged" and r["tiles"]["BLOCK_M"] in (16, 64))
             or (r["shape"] == "s2" and r["tiles"]["BLOCK_M"] == 32) or r["kernel"] == "decode_merge"]
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


def test_decode_configurations_cover_every_choice():
    """Every launch the decode launcher picks (row tile, key step, warps, stages) for any GQA group
    x new tokens, head dim and dtype is a report row, in every mode and cache layout."""
    import torch

    from sparse_attn.triton_kernels import configs
    from sparse_attn.triton_kernels import decode as dec

    rows = static.decode_configurations()
    seen = {(r["cc"], r["head_dim"], r["dtype"], r["shape"], r["tiles"]["BLOCK_M"], r["tiles"]["BLOCK_N"],
             r["tiles"]["num_warps"], r["tiles"]["num_stages"]) for r in rows if r["kernel"] == "decode"}
    shapes = {m + p for m in dec.MODES for p in ("", "-paged")}
    for cc, family in ((80, "ampere"), (90, "hopper")):
        with configs.family_override(family):
            for d in (64, 128, 256):
                for dt, torch_dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
                    for group_rows in (1, 2, 5, 16, 24, 33, 64, 128):  # G * Sq
                        launch = dec.decode_launch(torch.zeros(1, group_rows, 1, d, dtype=torch_dt), 1, 1000, 16)
                        for shape in shapes:
                            assert (cc, d, dt, shape, launch.block_m, launch.block_n, launch.num_warps,
                                    launch.num_stages) in seen
    assert {r["shape"] for r in rows if r["kernel"] == "decode_merge"} == {"merge"}


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
    by_kernel = {r["kernel"] for r in rows if r["instr"] == "wgmma" and r["kernel"] in TRAINING}
    assert by_kernel == set(TRAINING)  # every training kernel reaches wgmma somewhere on sm_90
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
    # decode rows: any instruction (memory-bound), but no spills and the shared memory limit
    dec = dict(base, kernel="decode", block_q=0, block_k=0, tile_m=16, tile_n=64, shape="list-paged", instr="mma.sync",
               tiles=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=128))
    assert static.check_rows([dec]) == [] and static.check_rows([dict(dec, cc=90, instr="none")]) == []
    assert "spills" in static.check_rows([dict(dec, spill_bytes=4)])[0]
    assert "shared memory" in static.check_rows([dict(dec, smem_bytes=static.SMEM_LIMIT[90] + 1)])[0]
    sm80 = dict(base, cc=80, instr="mma.sync")
    assert static.check_rows([sm80]) == [] and static.check_rows([dict(sm80, spill_bytes=4)])


def test_static_command_writes_the_json_rows(tmp_path):
    """`sparse-attn bench --static --json F` end to end on a slice: one row per configuration with
    exactly the documented keys."""
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sparse_attn.cli", "bench", "--static", "--ccs", "90", "--head-dims",
                           "64", "--dtypes", "bf16", "--blocks", "128", "--kernels", "fwd", "--jobs", "1", "--check",
                           "--cuda", "off", "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == len([r for r in static.configurations((90,), (64,), ("bf16",), (128,)) if r["kernel"] == "fwd"])
    assert all(list(r) == list(static.KEYS) for r in rows)
    assert all(r["instr"] == "wgmma" and r["spill_bytes"] == 0 and r["model_ms"] > 0 for r in rows)
    assert "| fwd | 90 | 64 | bf16 |" in proc.stdout


def test_cuda_part_of_the_static_report(monkeypatch):
    """``--cuda on`` without nvcc is a check problem, ``auto`` skips quietly, ``off`` compiles nothing;
    with nvcc the rows come from ``static_cuda`` restricted to the requested chips/dims/dtypes."""
    from sparse_attn.benchmark import static_cuda

    args = static.parse_args(["--ccs", "90", "--head-dims", "64", "256", "--dtypes", "bf16", "fp32"])
    monkeypatch.setattr(static_cuda, "find_nvcc", lambda: None)
    assert static._cuda_part(args)[:2] == ([], [])
    args.cuda = "on"
    rows, bad, _ = static._cuda_part(args)
    assert rows == [] and len(bad) == 1 and "nvcc" in bad[0]
    seen = {}
    monkeypatch.setattr(static_cuda, "find_nvcc", lambda: "nvcc")
    monkeypatch.setattr(static_cuda, "cuda_rows", lambda archs, dims, dtypes, jobs: seen.update(
        archs=archs, dims=dims, dtypes=dtypes) or [{"kernel": "decode", "arch": "sm_90a", "head_dim": 64,
                                                    "dtype": "bf16", "regs": 100, "spill_bytes": 8,
                                                    "stack_bytes": 0, "smem_static": 0, "smem_dynamic": 0,
                                                    "ptxas": "ptxas"}])
    rows, bad, table = static._cuda_part(args)
    assert seen == {"archs": ["sm_90a"], "dims": [64, 256], "dtypes": ["bf16"]}
    assert len(rows) == 1 and bad and "spills" in bad[0] and "| decode | sm_90a |" in table
    args.cuda = "off"
    assert static._cuda_part(args) == ([], [], "")


def test_contained_variant_compiles():
    """The variant that runs when an input holds a NaN/inf (``CONTAIN=True``) compiles for sm_90 for
    each kernel, on a split layout block (bit masks) and dense. It may spill (it is the rare path);
    the report's checks hold the plain variant."""
    rows = [r for r in static.configurations(ccs=(90,), head_dims=(64,), dtypes=("fp16",), blocks=(16,),
                                             kernels=TRAINING)
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
