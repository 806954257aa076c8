"""Smoke test of the benchmark harness: ``bench/run.py --cpu`` end to end on tiny CPU shapes.

Runs the script as a subprocess (its own process: no NaN-filled allocations, no shared
Triton state), then checks the JSON / CSV / markdown it writes. Needs no GPU, no conftest.
"""

import csv
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO_ROOT, "bench", "run.py")

EXPECTED_COLUMNS = {
    "seq", "density", "blocks_frac", "kernel", "pass", "ms", "ms_p20", "ms_p80", "tflops",
    "speedup_vs_sdpa", "layout_ms", "check_ref", "max_err", "check", "bwd_method", "error",
}


def test_bench_cpu_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # --cpu uses backend="reference"; no interpreter needed
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "2")
    out_dir = tmp_path / "bench_out"
    proc = subprocess.run(
        [sys.executable, RUN, "--cpu", "--out", str(out_dir)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    log = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    assert "NOT speed claims" in proc.stdout, log
    assert "| seq | density |" in proc.stdout, log  # the markdown table on stdout

    files = sorted(os.listdir(out_dir))
    by_ext = {ext: [f for f in files if f.endswith("." + ext)] for ext in ("json", "csv", "md")}
    for ext, names in by_ext.items():
        assert len(names) == 1, (ext, files)
        assert names[0].startswith("bench_cpu_"), names
    assert not [f for f in files if f.endswith(".tmp")], files

    # JSON: metadata + rows
    with open(out_dir / by_ext["json"][0]) as f:
        doc = json.load(f)
    meta, rows = doc["meta"], doc["rows"]
    for key in ("gpu", "torch", "triton", "git_commit", "date", "mode", "timer", "bwd_timing"):
        assert key in meta, key
    assert meta["mode"] == "cpu-smoke" and meta["speed_claims"] is False and meta["gpu"] == "cpu"
    assert EXPECTED_COLUMNS <= set(doc["columns"])
    densities = {1.0, 0.5, 0.1}

    def find(kernel, pass_, density):
        hits = [r for r in rows if r["kernel"] == kernel and r["pass"] == pass_ and r["density"] == density]
        assert len(hits) == 1, (kernel, pass_, density, rows)
        return hits[0]

    for d in densities:
        for pass_ in ("fwd", "bwd"):
            r = find("ours", pass_, d)
            assert r["seq"] == 256 and not r["error"], r
            assert r["ms"] > 0 and r["ms_p20"] <= r["ms_p80"], r
            assert r["tflops"] > 0 and r["speedup_vs_sdpa"] > 0, r
            assert r["layout_ms"] is not None and r["layout_ms"] >= 0, r
            assert r["check"] == "ok", r
            assert r["max_err"] is not None and r["max_err"] < 1e-3, r
            assert 0 < r["blocks_frac"] <= 1, r
            # a flex row for every case: timed, or an error row (never a crash)
            f = find("flex", pass_, d)
            assert f["error"] or f["ms"] > 0, f
        assert find("ours", "bwd", d)["bwd_method"], d
    for pass_ in ("fwd", "bwd"):
        s = find("sdpa_flash", pass_, None)  # the dense baseline, once per seq
        assert not s["error"] and s["ms"] > 0 and abs(s["speedup_vs_sdpa"] - 1.0) < 1e-9, s
    assert find("ours", "fwd", 1.0)["blocks_frac"] == 1.0
    assert find("ours", "fwd", 0.1)["blocks_frac"] < find("ours", "fwd", 0.5)["blocks_frac"] < 1.0

    # CSV: same rows, expected columns
    with open(out_dir / by_ext["csv"][0], newline="") as f:
        reader = csv.DictReader(f)
        assert EXPECTED_COLUMNS <= set(reader.fieldnames)
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert {(r["kernel"], r["pass"]) for r in csv_rows} >= {("ours", "fwd"), ("ours", "bwd"),
                                                           ("sdpa_flash", "fwd"), ("sdpa_flash", "bwd")}

    # Markdown: metadata, the label, a table row per result row
    md = (out_dir / by_ext["md"][0]).read_text()
    assert "NOT speed claims" in md and "git_commit" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| seq")]
    assert len(table) == len(rows)
    assert sum("| ours | fwd |" in line for line in table) == len(densities)
