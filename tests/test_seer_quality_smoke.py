"""bench/seer_quality.py end to end on a tiny budget: the harness behind the README's Seer numbers runs."""

import importlib.util
import json
import os

import pytest

pytest.importorskip("transformers")

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "seer_quality.py")


def test_seer_quality_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("seer_quality", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--out", str(tmp_path), "--lm-steps", "3", "--gate-steps", "3", "--layers", "1",
                   "--seq-len", "128", "--chars", "120000"])
    assert rc == 0
    res = json.loads((tmp_path / "seer_quality_cpu.json").read_text())
    for name in ("gate", "gate_causal", "oracle", "local", "random"):
        for d in ("0.1", "0.25"):
            assert 0.0 < res["mass"][name][d] <= 1.0 + 1e-6
            assert 0.0 < res["density"][name][d] <= 1.0
    # same per-row budget for every selector, so they compute the same blocks count and the
    # oracle (true block mass) is an upper bound
    for d in ("0.1", "0.25"):
        assert len({round(res["density"][n][d], 9) for n in res["density"]}) == 1
        assert res["mass"]["oracle"][d] >= max(res["mass"][n][d] for n in res["mass"]) - 1e-6
    # each selector ranks blocks once, so its density-0.25 set contains its density-0.1 set
    for name in ("gate", "gate_causal", "oracle", "local", "random"):
        assert res["mass"][name]["0.25"] >= res["mass"][name]["0.1"] - 1e-6
        # (at this tiny size the forced sink + diagonal fill both budgets: equal is allowed)
        assert res["density"][name]["0.25"] >= res["density"][name]["0.1"]
