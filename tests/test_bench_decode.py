"""The decode family of the benchmark (``bench/run.py --decode``) and the decode GPU-check scripts,
on CPU.

The end-to-end run is a subprocess of ``bench/run.py --decode --cpu`` with ``TRITON_INTERPRET=1``
(the reference and the Triton backends run; the CUDA backend and flash-attn are skipped rows).
Its rows are checked against quantities computed here independently: the kept bytes from the
documented list rule (counted token by token), the achieved and MODELLED bandwidths from the
bytes and times, the speed-ups from the baseline rows. The targets (checked on a GPU only) are
checked on synthetic rows.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO_ROOT, "bench", "run.py")
CHECK = os.path.join(REPO_ROOT, "bench", "decode_check.py")

# The --decode --cpu preset (sparse_attn/benchmark/decode.py DECODE_CPU_OVERRIDES), restated on purpose.
B, CTX, HQ, HKV, D, BS, RECENT, PAGE = 2, 200, 4, 2, 32, 16, 2, 16
KEEPS, SQS, LAYOUTS = (1.0, 0.25), (1, 4), ("contiguous", "paged")
ELEM = 4  # fp32
HBM_TBS = 0.001  # --hbm-tbs: a 1 GB/s "peak", so bw_frac == gbps
COLUMNS = {"kernel", "status", "batch", "context", "keep", "layout", "page_size", "sq", "heads", "kv_heads",
           "head_dim", "block", "dtype", "kept_bytes", "dense_bytes", "bytes", "ms", "gbps", "gbps_effective",
           "hbm_peak_gbps", "bw_frac", "speedup_vs_sdpa", "speedup_vs_triton", "model_ms_h100", "model_gbps_h100",
           "model_ms_h200", "model_gbps_h200", "check", "check_ref", "max_err", "error", "note"}


def _env(interpret: bool = True):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("SPARSE_ATTN_CUDA_EMULATE", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_decode")
    cmd = [sys.executable, RUN, "--decode", "--cpu", "--warmup", "0", "--rep", "1", "--hbm-tbs", str(HBM_TBS),
           "--out", str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    files = sorted(os.listdir(out_dir))
    (name,) = [f for f in files if f.endswith(".json")]
    with open(out_dir / name) as f:
        doc = json.load(f)
    return dict(proc=proc, log=log, out=out_dir, files=files, stem=name[:-5], doc=doc)


def _find(rows, kernel, layout, sq, keep):
    hits = [r for r in rows if r["kernel"] == kernel and r["layout"] == layout and r["sq"] == sq and r["keep"] == keep]
    assert len(hits) == 1, (kernel, layout, sq, keep, len(hits))
    return hits[0]


def _kept_tokens_rule(keep: float, ctx: int = CTX, bs: int = BS, recent: int = RECENT) -> int:
    """Tokens of one (sequence, KV head) the documented rule keeps: round(keep * nblocks) blocks,
    the last `recent` (the rows' own blocks are among them here) and older, full ones."""
    nb = -(-ctx // bs)
    if keep >= 1.0:
        return ctx
    n = max(1, math.floor(keep * nb + 0.5))
    w = min(recent, n)
    last = [min(bs, ctx - c * bs) for c in range(nb - w, nb)]
    return (n - w) * bs + sum(last)


def _kept_bytes(keep: float, sq: int) -> int:
    return B * HKV * _kept_tokens_rule(keep) * 2 * D * ELEM + 2 * B * HQ * sq * D * ELEM


def test_files_and_metadata(smoke):
    stem, files = smoke["stem"], smoke["files"]
    assert stem.startswith("bench_cpu_decode_"), stem
    for suffix in (".json", ".csv", ".md", "_decode_bw.png"):
        assert stem + suffix in files, (suffix, files)
    meta = smoke["doc"]["meta"]
    assert meta["mode"] == "cpu-smoke" and meta["speed_claims"] is False and meta["family"] == "decode"
    assert meta["hbm_peak_gbps"] == pytest.approx(HBM_TBS * 1e3) and "MODEL" in meta["model"]
    assert [t["met"] for t in meta["targets"]] == [None, None, None]
    assert COLUMNS <= set(smoke["doc"]["columns"])
    out = smoke["proc"].stdout
    assert "NOT speed claims" in out and "MODELLED" in out and "| B | context |" in out
    md = (smoke["out"] / (stem + ".md")).read_text()
    assert "Targets (decode" in md and "no data (CPU run" in md and "Modelled (NOT measured)" in md
    skipped = md.split("## Skipped", 1)[1]
    assert "ours_cuda" in skipped and "flash_attn" in skipped


def test_rows_cover_the_grid_and_pass_their_checks(smoke):
    rows = smoke["doc"]["rows"]
    for sq in SQS:
        base = _find(rows, "sdpa_math", "contiguous", sq, None)
        assert base["status"] == "ok" and base["check"] == "ok", base
        assert _find(rows, "sdpa_math", "paged", sq, None)["status"] == "skipped"
        for layout in LAYOUTS:
            fa = _find(rows, "flash_attn", layout, sq, None)
            assert fa["status"] == "skipped" and "CUDA" in fa["error"], fa
            for keep in KEEPS:
                for kernel in ("ours_reference", "ours_triton"):
                    r = _find(rows, kernel, layout, sq, keep)
                    assert r["status"] == "ok" and r["check"] == "ok" and r["max_err"] < 1e-4, r
                    assert r["page_size"] == (PAGE if layout == "paged" else None), r
                    assert (r["batch"], r["context"], r["heads"], r["kv_heads"], r["head_dim"], r["block"]) == \
                        (B, CTX, HQ, HKV, D, BS), r
                cu = _find(rows, "ours_cuda", layout, sq, keep)
                assert cu["status"] == "skipped" and "backend='cuda'" in cu["error"] and cu["ms"] is None, cu
                fl = _find(rows, "flex", layout, sq, keep)
                if layout == "contiguous":  # eager flex on CPU, same kept blocks, checked
                    assert fl["status"] == "ok" and fl["check"] == "ok", fl
                else:
                    assert fl["status"] == "skipped" and "contiguous" in fl["error"], fl


def test_kept_bytes_bandwidth_and_model(smoke):
    rows = smoke["doc"]["rows"]
    for r in rows:
        dense = B * HKV * CTX * 2 * D * ELEM + 2 * B * HQ * r["sq"] * D * ELEM
        assert r["dense_bytes"] == dense, r
        want = dense if r["keep"] is None else _kept_bytes(r["keep"], r["sq"])
        assert r["kept_bytes"] == r["bytes"] == want, r
        for key, tbs in (("h100", 3.35), ("h200", 4.8)):  # the MODEL: 5 us + bytes / data-sheet bandwidth
            m = 5e-3 + want / (tbs * 1e12) * 1e3
            assert r[f"model_ms_{key}"] == pytest.approx(m, rel=1e-9), r
            assert r[f"model_gbps_{key}"] == pytest.approx(want / (m * 1e-3) / 1e9, rel=1e-9), r
        if r["status"] != "ok":
            assert r["gbps"] is None and r["bw_frac"] is None, r
            continue
        gbps = want / (r["ms"] * 1e-3) / 1e9
        assert math.isfinite(r["gbps"]) and r["gbps"] > 0 and r["gbps"] == pytest.approx(gbps, rel=1e-9), r
        assert r["bw_frac"] == pytest.approx(gbps / (HBM_TBS * 1e3), rel=1e-9), r
        assert r["gbps_effective"] == pytest.approx(dense / (r["ms"] * 1e-3) / 1e9, rel=1e-9), r
    # the sparse case moves less than the dense one: 40 of 200 tokens per (sequence, KV head)
    assert _kept_tokens_rule(0.25) == 40
    r = _find(rows, "ours_reference", "paged", 1, 0.25)
    assert r["kept_bytes"] == 2 * 2 * 40 * 2 * 32 * 4 + 2 * 2 * 4 * 1 * 32 * 4 == 43008
    assert r["note"].startswith("3/13 blocks"), r


def test_speedups(smoke):
    rows = smoke["doc"]["rows"]
    for sq in SQS:
        base = _find(rows, "sdpa_math", "contiguous", sq, None)["ms"]
        for layout in LAYOUTS:  # paged rows are compared with SDPA on the contiguous cache
            for keep in KEEPS:
                r = _find(rows, "ours_triton", layout, sq, keep)
                assert r["speedup_vs_sdpa"] == pytest.approx(base / r["ms"], rel=1e-9), r
                assert r["speedup_vs_triton"] is None


def test_kept_bytes_counted_token_by_token():
    """decode_bytes against a token-level count of sparse_decode's rule (listed blocks or a new
    row's own block), for spread and random lists, Sq 1 and 4, a window smaller than the rows'
    blocks (ctx 194, Sq 4: rows 190..193 straddle blocks 11 and 12; one recent block)."""
    from sparse_attn.benchmark.decode import DecodeCase, decode_bytes, decode_lists

    for ctx, sq, recent, sel, keep in [(200, 1, 2, "spread", 0.25), (194, 4, 1, "spread", 0.3),
                                       (194, 4, 1, "random", 0.5), (1000, 1, 3, "random", 0.1),
                                       (37, 2, 1, "spread", 1.0)]:
        case = DecodeCase(3, ctx, keep, "contiguous", None, sq, 4, 2, 8, 16, "fp16", sel, recent, seed=1)
        lists = decode_lists(case, torch.device("cpu"))
        tokens = 0
        for b in range(3):
            for h in range(2):
                listed = set(range(-(-ctx // 16))) if lists is None else \
                    set(lists[1][b, h, : int(lists[0][b, h])].tolist())
                if lists is not None:
                    ids = lists[1][b, h].tolist()
                    assert ids == sorted(set(ids)) and len(ids) == max(1, math.floor(keep * -(-ctx // 16) + 0.5))
                own = {(ctx - sq + i) // 16 for i in range(sq)}
                tokens += sum(1 for j in range(ctx) if j // 16 in listed or j // 16 in own)
        s = decode_bytes(case, lists)
        assert s["kept_bytes"] == tokens * 2 * 8 * 2 + 2 * 3 * 4 * sq * 8 * 2, (ctx, sq, recent, sel, keep)
        assert s["dense_bytes"] == 3 * 2 * ctx * 2 * 8 * 2 + 2 * 3 * 4 * sq * 8 * 2
    # the straddling rows add block 11, which a one-block window does not list
    case = DecodeCase(1, 194, 1 / 13, "contiguous", None, 4, 2, 1, 8, 16, "fp32", "spread", 1)
    lists = decode_lists(case, torch.device("cpu"))
    assert lists[1].tolist() == [[[12]]] and decode_bytes(case, lists)["kept_blocks"] == 2


def test_targets_on_synthetic_rows():
    from sparse_attn.benchmark.decode import decode_speedups, decode_targets

    def row(kernel, keep, layout, ms, bw):
        return dict(kernel=kernel, status="ok", batch=16, context=131072, sq=1, keep=keep, layout=layout,
                    page_size=64 if layout == "paged" else None, heads=32, kv_heads=8, head_dim=128, block=64,
                    dtype="bf16", selection="spread", ms=ms, bw_frac=bw)

    rows = [row("ours_triton", 0.1, "contiguous", 1.0, 0.85), row("ours_triton", 0.1, "paged", 1.1, 0.79),
            row("ours_cuda", 0.1, "contiguous", 0.8, 0.9), row("ours_cuda", 0.1, "paged", 0.9, 0.88),
            row("ours_cuda", 0.25, "paged", 0.9, 0.95)]  # no triton row for this case: no ratio
    decode_speedups(rows, "sdpa_flash")
    assert rows[3]["speedup_vs_triton"] == pytest.approx(1.1 / 0.9) and rows[4]["speedup_vs_triton"] is None
    lines, recs = decode_targets(rows)
    assert [r["met"] for r in recs] == [False, True, True], lines
    assert recs[0]["worst"] == 0.79 and "paged/64" in recs[0]["where"] and "NOT met" in lines[0]
    assert recs[2]["worst"] == pytest.approx(1.1 / 0.9)  # paged: 1.1 / 0.9 < contiguous: 1.0 / 0.8
    rows[2]["ms"] = 0.95  # 1.0 / 0.95 < 1.1
    decode_speedups(rows, "sdpa_flash")
    assert decode_targets(rows)[1][2]["met"] is False
    other = [dict(r, batch=1) for r in rows]  # not the target shape: no data
    assert all(r["met"] is None for r in decode_targets(other)[1])


def test_cli():
    from sparse_attn.benchmark.runner import parse_args

    a = parse_args(["--decode"])
    assert a.suite == "decode" and a.batches == [1, 16, 64] and a.contexts == [8192, 32768, 131072]
    assert a.keeps == [1.0, 0.25, 0.1] and a.heads == 32 and a.gqa == [4] and a.head_dims == [128]
    assert a.layouts == ["contiguous", "paged"] and a.sqs == [1, 4] and a.passes == ["fwd"]
    q = parse_args(["--decode", "--quick", "--batches", "16"])
    assert q.suite == "decode_quick" and q.batches == [16] and "ours_cuda" in q.kernels
    c = parse_args(["--decode", "--cpu"])
    assert c.dtypes == ["fp32"] and c.kernels[0] == "sdpa_math" and c.contexts == [200]
    assert parse_args(["--suite", "decode_quick"]).decode
    assert not parse_args(["--quick"]).decode
    for bad in (["--decode", "--seqs", "128"], ["--keeps", "0.5"], ["--suite", "quick", "--decode"],
                ["--decode", "--kernels", "ours_triton_tuned"], ["--decode", "--hbm-tbs", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_bad_grid_exits_2(tmp_path, capsys):
    from sparse_attn.benchmark import main

    assert main(["--decode", "--cpu", "--keeps", "1.5", "--out", str(tmp_path)]) == 2
    assert "keeps" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_hbm_table_and_model():
    from sparse_attn.benchmark.metrics import MODEL_CHIPS, decode_model_ms, peak_hbm_gbps
    from sparse_attn.triton_kernels.configs import CHIPS

    assert peak_hbm_gbps("NVIDIA H200") == peak_hbm_gbps("NVIDIA H200 NVL") == 4800.0
    assert peak_hbm_gbps("NVIDIA H100 80GB HBM3") == 3350.0 == CHIPS[90]["hbm"] * 1e3
    assert peak_hbm_gbps("NVIDIA H100 PCIe") == 2000.0 and peak_hbm_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert peak_hbm_gbps("NVIDIA A100-SXM4-40GB") == 1555.0 and peak_hbm_gbps("NVIDIA L40S") == 864.0
    for name in ("NVIDIA GH200 480GB", "NVIDIA B200", "cpu", None):
        assert peak_hbm_gbps(name) is None, name
    assert MODEL_CHIPS["h100"][1] == CHIPS[90]["hbm"]
    assert decode_model_ms(3.35e9, 3350.0) == pytest.approx(1.005)
    with pytest.raises(ValueError):
        decode_model_ms(1.0, 0.0)


def test_decode_check_script_tiny(tmp_path):
    """bench/decode_check.py (the gpu_check decode step) on its smoke set: on CPU the Triton backend
    under the interpreter against the reference, the CUDA backend a skip; JSON written."""
    gpu = torch.cuda.is_available()  # there: the tiny set on the GPU, Triton compiled (fp32: no CUDA backend)
    proc = subprocess.run([sys.executable, CHECK, "--set", "tiny", "--out", str(tmp_path)]
                          + (["--backends", "triton"] if gpu else []), cwd=REPO_ROOT, env=_env(interpret=not gpu),
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (name,) = os.listdir(tmp_path)
    doc = json.loads((tmp_path / name).read_text())
    assert name.startswith("decode_check_cpu_tiny_") and doc["failed"] is False and not doc["incomplete"]
    triton = [r for r in doc["results"] if r.get("backend") == "triton"]
    assert len(triton) == 3 and all(r["ok"] and not r["nan"] for r in triton), triton
    if not gpu:
        assert all(r.get("skipped") for r in doc["results"] if r.get("backend") == "cuda")


def test_sanitize_calls_tiny(capsys, monkeypatch):
    """What compute-sanitizer runs (bench/decode_sanitize.py: decode_check's calls without the
    reference), in this process (NaN-filled allocations from conftest) on the tiny set."""
    import importlib

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest before triton is imported)")
    monkeypatch.syspath_prepend(os.path.join(REPO_ROOT, "bench"))
    decode_check = importlib.import_module("decode_check")
    args = ["--set", "tiny"] if not torch.cuda.is_available() else ["--set", "small"]
    assert decode_check.main(args + ["--no-reference", "--backends", "triton", "--time-limit", "120"]) == 0
    out = capsys.readouterr().out
    n = len(decode_check.case_set(args[1]))
    assert out.count("[triton]      ok:") == n and f"{n} ran, 0 failed" in out, out


def test_wrong_or_failing_kernel_fails_the_run(tmp_path):
    """A kernel of ours whose output is off fails its check, one that raises gives error rows; the
    run goes on and exits 1."""
    from sparse_attn.benchmark import main
    from sparse_attn.benchmark.decode import DECODE_KERNELS, DecodeKernel
    from sparse_attn.decode import sparse_decode

    def off(env, case, data):
        def fn():
            out = sparse_decode(data["q"], data["k"], data["v"], data["lens"], block_table=data["block_table"],
                                kv_blocks=data["lists"], block_size=case.block, backend="reference")
            out[0, 1, 0, 3] += 0.05
            return out

        return fn, {}

    def boom(env, case, data):
        def fn():
            raise RuntimeError("boom: broken on purpose")

        return fn, {}

    DECODE_KERNELS["ours_off"] = DecodeKernel("ours_off", "ours", lambda env, case: None, off)
    DECODE_KERNELS["ours_boom"] = DecodeKernel("ours_boom", "ours", lambda env, case: None, boom)
    try:
        rc = main(["--decode", "--cpu", "--kernels", "sdpa_math", "ours_reference", "ours_off", "ours_boom",
                   "--layouts", "paged", "--sqs", "1", "--rep", "1", "--warmup", "0", "--out", str(tmp_path)])
    finally:
        DECODE_KERNELS.pop("ours_off")
        DECODE_KERNELS.pop("ours_boom")
    assert rc == 1
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    rows = json.loads((tmp_path / name).read_text())["rows"]
    by = {k: [r for r in rows if r["kernel"] == k] for k in ("ours_reference", "ours_off", "ours_boom")}
    assert len(by["ours_off"]) == 2 and all(r["check"] == "FAIL" and r["max_err"] == pytest.approx(0.05, rel=1e-3)
                                            for r in by["ours_off"])
    assert all(r["status"] == "error" and "boom" in r["error"] for r in by["ours_boom"])
    assert all(r["status"] == "ok" and r["check"] == "ok" for r in by["ours_reference"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_decode_check_without_a_gpu_exits_3():
    proc = subprocess.run([sys.executable, CHECK], cwd=REPO_ROOT, env=_env(False), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3 and "no CUDA GPU" in proc.stderr, proc.stdout + proc.stderr
