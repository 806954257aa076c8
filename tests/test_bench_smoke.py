"""The benchmark harness (``sparse_attn.benchmark``) on CPU: the ``--cpu`` smoke run end to end,
and the pieces whose numbers a reader relies on (pair counts, FLOPs, roofline, partial checks).

The end-to-end run is a subprocess of ``bench/run.py --cpu`` (its own process: no NaN-filled
allocations from conftest, no interpreter); its outputs are checked against quantities computed
here independently (element-level causal masks, S(S+1)/2, the S2 pattern's own block mask).
"""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO_ROOT, "bench", "run.py")
PEAK = 0.5  # --peak-tflops for the roofline column

# The --cpu preset (sparse_attn/benchmark/runner.py CPU_OVERRIDES): these tests restate it on purpose.
SEQS, HQ, HKV, D, BLOCK, DENSITIES = (256, 200), 4, 2, 32, 32, (0.5, 0.2)
S2_ARGS = "local_blocks=2,vert_stride=4"
PASSES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
COLUMNS = {
    "suite", "pattern", "pattern_args", "seq", "density", "blocks_frac", "kernel", "pass", "status", "ms",
    "ms_p20", "ms_p80", "tflops", "tflops_effective", "roofline", "speedup_vs_sdpa", "speedup_vs_flex",
    "layout_ms", "layout_uncached_ms", "check", "check_ref", "max_err", "first_call_s", "bwd_method", "batch",
    "heads", "kv_heads", "head_dim", "block", "dtype", "pairs", "dense_pairs", "flops", "error", "note",
}


def _element_pairs(block_mask: torch.Tensor, seq: int, block: int, heads: int) -> int:
    """Visible pairs of a block mask [1, Hl, Mq, Mk], by expanding it to elements (independent of
    the benchmark's closed form)."""
    el = block_mask[0].repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq, :seq]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return int((el & causal).sum()) * (heads // block_mask.shape[1])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_out")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # ours_triton must show as skipped, not run in the interpreter
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, RUN, "--cpu", "--peak-tflops", str(PEAK), "--out", str(out_dir)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    files = sorted(os.listdir(out_dir))
    json_files = [f for f in files if f.endswith(".json")]
    assert len(json_files) == 1, files
    with open(out_dir / json_files[0]) as f:
        doc = json.load(f)
    return dict(proc=proc, log=log, out=out_dir, files=files, stem=json_files[0][:-5], doc=doc)


def _find(rows, kernel, pattern, seq, pass_, density=None):
    hits = [r for r in rows if r["kernel"] == kernel and r["pattern"] == pattern and r["seq"] == seq
            and r["pass"] == pass_ and r["density"] == density]
    assert len(hits) == 1, (kernel, pattern, seq, pass_, density, len(hits))
    return hits[0]


def test_files_and_metadata(smoke):
    stem, files = smoke["stem"], smoke["files"]
    assert stem.startswith("bench_cpu_"), stem
    for suffix in (".json", ".csv", ".md", "_speedup.png", "_tflops.png"):
        assert stem + suffix in files, (suffix, files)
        with open(smoke["out"] / (stem + suffix), "rb") as f:
            head = f.read(8)
        if suffix.endswith(".png"):
            assert head == b"\x89PNG\r\n\x1a\n", suffix
    assert not [f for f in files if f.endswith(".tmp")], files
    meta = smoke["doc"]["meta"]
    for key in ("gpu", "driver", "torch", "triton", "git_commit", "date", "timer", "baseline", "peak_tflops"):
        assert key in meta, key
    assert meta["mode"] == "cpu-smoke" and meta["speed_claims"] is False and meta["gpu"] == "cpu"
    assert meta["baseline"] == "sdpa_math" and meta["peak_tflops"] == {"fp32": PEAK}
    assert COLUMNS <= set(smoke["doc"]["columns"])
    assert "NOT speed claims" in smoke["proc"].stdout and "| pattern | seq |" in smoke["proc"].stdout


def test_rows_cover_the_grid(smoke):
    rows = smoke["doc"]["rows"]
    labels = [("dense", "", None), ("s2", S2_ARGS, None)] + [
        (p, "", d) for p in ("random", "seer_topk") for d in DENSITIES]
    for seq in SEQS:
        for pass_ in PASSES:
            base = _find(rows, "sdpa_math", "dense", seq, pass_)
            assert base["status"] == "ok" and base["ms"] > 0 and base["speedup_vs_sdpa"] == pytest.approx(1.0)
            assert base["pairs"] == base["dense_pairs"] == seq * (seq + 1) // 2 * HQ
            for pattern, args, d in labels:
                r = _find(rows, "ours_reference", pattern, seq, pass_, d)
                assert r["pattern_args"] == args and r["heads"] == HQ and r["kv_heads"] == HKV, r
                assert r["status"] == "ok" and r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"], r
                assert r["check"] == "ok" and r["max_err"] < 1e-3, r
                assert r["layout_ms"] is not None and r["layout_ms"] >= 0, r
                assert r["speedup_vs_sdpa"] == pytest.approx(base["ms"] / r["ms"]), r
                # unavailable kernels are rows too, marked skipped with the library's reason
                for kernel, why in (("ours_cuda", "backend='cuda'"), ("ours_triton", "TRITON_INTERPRET"),
                                    ("flash_attn", "CUDA")):
                    s = _find(rows, kernel, pattern, seq, pass_, d) if kernel != "flash_attn" else \
                        _find(rows, kernel, "dense", seq, pass_)
                    assert s["status"] == "skipped" and why in s["error"] and s["ms"] is None, s
                f = _find(rows, "flex", pattern, seq, pass_, d)
                if pass_ == "fwd":  # eager flex on CPU: forward only; checked against an oracle
                    assert f["status"] == "ok" and f["check"] == "ok", f
                    assert r["speedup_vs_flex"] == pytest.approx(f["ms"] / r["ms"]), (r, f)
                else:  # no FlexAttention backward on CPU: a "not available" row, not an error row
                    assert f["status"] == "skipped" and "not available on cpu" in f["error"], f
            s2 = _find(rows, "ours_reference", "s2", seq, pass_)
            assert s2["layout_uncached_ms"] is not None and s2["layout_uncached_ms"] >= 0, s2
    # densities order the computed fractions; dense keeps every causal block
    for seq in SEQS:
        assert _find(rows, "ours_reference", "dense", seq, "fwd")["blocks_frac"] == 1.0
        fr = [_find(rows, "ours_reference", "random", seq, "fwd", d)["blocks_frac"] for d in DENSITIES]
        assert 1.0 > fr[0] > fr[1] > 0, fr


def test_pairs_flops_and_rates_are_consistent(smoke):
    from sparse_attn.patterns import strided_block_mask

    rows = [r for r in smoke["doc"]["rows"] if r["status"] == "ok"]
    assert rows
    for r in rows:
        assert r["dense_pairs"] == r["seq"] * (r["seq"] + 1) // 2 * r["heads"] * r["batch"], r
        assert 0 < r["pairs"] <= r["dense_pairs"], r
        assert r["flops"] == pytest.approx(4 * r["head_dim"] * r["pairs"] * FLOP_FACTOR[r["pass"]]), r
        tflops = r["flops"] / (r["ms"] * 1e-3) / 1e12
        assert r["tflops"] == pytest.approx(tflops, rel=1e-9), r
        assert r["tflops_effective"] == pytest.approx(r["tflops"] * r["dense_pairs"] / r["pairs"], rel=1e-9), r
        assert r["roofline"] == pytest.approx(r["tflops"] / PEAK, rel=1e-9), r
    for seq in SEQS:  # the S2 case's pair count, from the pattern's own mask expanded to elements
        mask = strided_block_mask(HQ, seq, block_size=BLOCK, local_blocks=2, vert_stride=4)
        r = _find(rows, "ours_reference", "s2", seq, "fwd")
        assert r["pairs"] == _element_pairs(mask, seq, BLOCK, HQ), r
        assert r["pairs"] < r["dense_pairs"]


def test_csv_and_markdown(smoke):
    rows = smoke["doc"]["rows"]
    with open(smoke["out"] / (smoke["stem"] + ".csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert COLUMNS <= set(reader.fieldnames)
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    for a, b in zip(csv_rows, rows):
        assert (a["kernel"], a["pass"], a["status"]) == (b["kernel"], b["pass"], b["status"])
        if b["ms"] is not None:
            assert math.isclose(float(a["ms"]), b["ms"], rel_tol=1e-9)
    md = (smoke["out"] / (smoke["stem"] + ".md")).read_text()
    assert "NOT speed claims" in md and "git_commit" in md and "## Targets" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| pattern")]
    assert len(table) == sum(r["status"] != "skipped" for r in rows)
    skipped = md.split("## Skipped", 1)[1]
    assert "ours_cuda" in skipped and "ours_triton" in skipped and "flash_attn" in skipped


def test_failing_kernel_is_an_error_row(tmp_path):
    """A kernel that raises becomes error rows (exit status 1 for one of ours), the run goes on."""
    from sparse_attn.benchmark import main
    from sparse_attn.benchmark.peers import KERNELS, KernelSpec, register_kernel

    def prepare(env, case, data):
        def attn(q, k, v):
            raise RuntimeError("boom: broken on purpose")

        return attn, {}

    register_kernel(KernelSpec("ours_broken", "ours", lambda env, case: None, prepare))
    try:
        rc = main(["--cpu", "--seqs", "96", "--patterns", "dense", "random", "--densities", "0.5", "--kernels",
                   "sdpa_math", "ours_reference", "ours_broken", "--passes", "fwd", "bwd", "--out", str(tmp_path)])
    finally:
        KERNELS.pop("ours_broken")
    assert rc == 1
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    rows = json.loads((tmp_path / name).read_text())["rows"]
    broken = [r for r in rows if r["kernel"] == "ours_broken"]
    assert len(broken) == 4 and all(r["status"] == "error" and "boom" in r["error"] for r in broken)
    good = [r for r in rows if r["kernel"] == "ours_reference"]
    assert len(good) == 4 and all(r["status"] == "ok" and r["check"] == "ok" for r in good)


def test_pair_counts_against_element_masks():
    from sparse_attn.benchmark.metrics import pair_counts

    for sq, sk, bq, bk in [(70, 130, 32, 16), (130, 70, 16, 32), (200, 200, 64, 64), (1, 100, 16, 16), (5, 3, 4, 4)]:
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        visible = j <= i + (sk - sq)  # bottom-right aligned causal
        mq, mk = -(-sq // bq), -(-sk // bk)
        pad = torch.zeros(mq * bq, mk * bk, dtype=torch.int64)
        pad[:sq, :sk] = visible
        want = pad.reshape(mq, bq, mk, bk).sum((1, 3))
        counts, area = pair_counts(sq, sk, bq, bk)
        assert torch.equal(counts, want), (sq, sk, bq, bk)
        pad[:sq, :sk] = 1
        assert torch.equal(area, pad.reshape(mq, bq, mk, bk).sum((1, 3)))
    with pytest.raises(ValueError, match="bq"):
        pair_counts(8, 8, 0, 4)


def test_peak_table():
    from sparse_attn.benchmark.metrics import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "float16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert peak_tflops("NVIDIA L40S", "bfloat16") == 362.0
    for name in ("NVIDIA GH200 480GB", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA B200", "cpu", None):
        assert peak_tflops(name, "bfloat16") is None, name
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float32") is None


def test_partial_reference_matches_full_rows():
    """The long-sequence check (last rows only) equals the full reference on those rows: the
    sub-layout is aligned to the right query blocks (odd length, GQA, a partial last block)."""
    from sparse_attn.benchmark.checks import TOLS, check_rows, reference_outputs
    from sparse_attn.benchmark.registry import Case

    case = Case("random", 200, 0.5, 1, 4, 2, 16, 32, "fp32")
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(1, 2, 7, 7, generator=gen) < 0.5
    mask[..., torch.arange(7), torch.arange(7)] = True
    q, dout = (torch.randn(1, 4, 200, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 2, 200, 16, generator=gen) for _ in range(2))
    full = reference_outputs(case, mask, q, k, v, dout)
    part = reference_outputs(case, mask, q, k, v, dout, rows=50)
    n = part["rows"]
    assert n == 72 and part["out"].shape == (1, 4, 72, 16)  # 200 - 4 * 32: starts on a block boundary
    torch.testing.assert_close(part["out"], full["out"][:, :, -n:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part["grads"][0], full["grads"][0][:, :, -n:], rtol=1e-5, atol=1e-6)
    # and check_rows can fail: a perturbed output on the checked rows is a FAIL
    bad = full["out"].clone()
    bad[0, 1, -3, 5] += 0.1
    rows = [{"kernel": "k", "pass": "fwd", "status": "ok"}, {"kernel": "k", "pass": "bwd", "status": "ok"}]
    check_rows(rows, {"k": {"out": bad, "grads": full["grads"]}}, "reference", part, TOLS[torch.float32])
    assert [r["check"] for r in rows] == ["FAIL", "ok"], rows
    assert rows[0]["max_err"] == pytest.approx(0.1, rel=1e-3) and "last 72 rows" in rows[0]["check_ref"]


def test_plots_need_matplotlib_only(smoke, tmp_path, monkeypatch):
    from sparse_attn.benchmark import report

    doc = smoke["doc"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths, msg = report.write_plots(str(tmp_path), "x", doc["rows"], doc["meta"])
    assert paths == [] and "matplotlib is not available" in msg
    written = report.write_outputs(str(tmp_path), "x", doc["meta"], doc["rows"])
    assert sorted(os.path.basename(p) for p in written.values()) == ["x.csv", "x.json", "x.md"]


def test_skip_reasons_are_printed_once(capsys):
    """A kernel's passes skipped for one reason share a line, and a reason given once (e.g. the
    interpreter notice, on every case) is not repeated in full."""
    from sparse_attn.benchmark import report

    report._SKIPS_SAID.clear()
    why = "skipped: needs TRITON_INTERPRET=1"
    rows = [dict(kernel="ours_triton", status="skipped", error=why, **{"pass": p}) for p in ("fwd", "bwd")]
    report.print_rows(rows, "case A")
    report.print_rows(rows, "case B")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[case A]    ours_triton fwd/bwd: skipped: needs TRITON_INTERPRET=1",
                     "[case B]    ours_triton fwd/bwd: skipped (reason above)"]


def test_default_output_folder_is_under_the_current_directory():
    from sparse_attn.benchmark.runner import parse_args

    assert parse_args([]).out == "bench_results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_check_without_a_gpu_stops_before_running_anything(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(root, "bench", "gpu_check.sh")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable, OUT=str(out)), timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stderr and not out.exists()
