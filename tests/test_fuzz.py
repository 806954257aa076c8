"""Fuzz tier: every available backend against an fp64 oracle on seeded random valid calls.

The fuzzer is :mod:`sparse_attn.testing.fuzz` (what an example randomises, the oracle, and the
error measure the tolerances bound are described there and in README "Fuzz tier").

Profiles (environment):

* default (CI): ``CI_EXAMPLES`` (100) examples from seed 0, about 2 minutes of one CPU core under
  the interpreter;
* ``SPARSE_ATTN_FUZZ_EXAMPLES=10000`` (by hand), with ``SPARSE_ATTN_FUZZ_SEED`` (master seed,
  default 0) and ``SPARSE_ATTN_FUZZ_START`` (first index, default 0, to split a run);
* ``SPARSE_ATTN_FUZZ_REPLAY=SEED:INDEX[,SEED:INDEX...]``: only those examples (a failure prints
  the line to use);
* ``SPARSE_ATTN_FUZZ_REPORT=FILE``: write the largest error per (backend, dtype, result) as JSON.

All examples run even after a failure; the test then fails listing every failing example with
its replay line and full description.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import pytest
import torch

from sparse_attn.testing import fuzz

CI_EXAMPLES = 100
MAX_WORK = 60.0  # size cap per example (fuzz.work: 32x32 score tiles, head-dim weighted)
MIN_NONVACUOUS = 0.75  # examples with at least one row that sees a key
MIN_SEEN_ROWS = 0.35  # query rows, over all examples, that see at least one key
MAX_LISTED = 20

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def _examples():
    replay = os.environ.get("SPARSE_ATTN_FUZZ_REPLAY", "").strip()
    if replay:
        return [tuple(int(x) for x in item.split(":")) for item in replay.split(",") if item.strip()]
    seed = int(os.environ.get("SPARSE_ATTN_FUZZ_SEED", "0"))
    start = int(os.environ.get("SPARSE_ATTN_FUZZ_START", "0"))
    count = int(os.environ.get("SPARSE_ATTN_FUZZ_EXAMPLES", str(CI_EXAMPLES)))
    return [(seed, i) for i in range(start, start + count)]


def _report(results, path, seconds):
    worst = {}
    for r in results:
        for (device, backend), errs in r.errors.items():
            for name, e in errs.items():
                key = f"{device}/{backend}/{r.case.dtype}/{name}"
                if key not in worst or e > worst[key]["err"]:
                    worst[key] = dict(err=e, seed=r.case.seed, index=r.case.index, case=r.case.describe())
    summary = dict(examples=len(results), seconds=round(seconds, 1),
                   failing_examples=sum(bool(r.failures) for r in results),
                   tolerances=fuzz.TOLERANCES, phi=fuzz.PHI, worst=dict(sorted(worst.items())))
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)


def test_fuzz_against_fp64_oracle():
    examples = _examples()
    replaying = bool(os.environ.get("SPARSE_ATTN_FUZZ_REPLAY", "").strip())
    t0 = time.time()
    results = [fuzz.run_example(seed, index, MAX_WORK) for seed, index in examples]
    seconds = time.time() - t0
    if os.environ.get("SPARSE_ATTN_FUZZ_REPORT"):
        _report(results, os.environ["SPARSE_ATTN_FUZZ_REPORT"], seconds)

    by_target = defaultdict(int)
    for r in results:
        for t in r.errors:
            by_target[t] += 1
    print(f"\nfuzz: {len(results)} examples in {seconds:.0f} s; compared per backend: {dict(by_target)}")

    failing = [r for r in results if r.failures]
    if failing:
        lines = [f"{len(failing)} of {len(results)} fuzz examples failed"]
        for r in failing[:MAX_LISTED]:
            lines.append(f"\n* replay: {r.case.replay()}\n  case: {r.case.describe()}")
            lines.extend(f"  - {f}" for f in r.failures[:8])
        if len(failing) > MAX_LISTED:
            lines.append(f"\n... and {len(failing) - MAX_LISTED} more: "
                         + ", ".join(f"{r.case.seed}:{r.case.index}" for r in failing[MAX_LISTED:]))
        pytest.fail("\n".join(lines), pytrace=False)

    # Not vacuous: every example compared something on every backend that takes its dtype, and most
    # examples (and a good share of all rows) see keys, so they are not zeros against zeros.
    for r in results:
        assert r.compared > 0, f"example {r.case.seed}:{r.case.index} compared nothing"
    if not replaying:
        expected = set(fuzz.targets())
        assert set(by_target) == expected, f"backends compared {set(by_target)}, available {expected}"
        nonvacuous = sum(r.seen_rows > 0 for r in results) / len(results)
        seen = sum(r.seen_rows for r in results) / max(1, sum(r.rows for r in results))
        assert nonvacuous >= MIN_NONVACUOUS, f"only {nonvacuous:.0%} of the examples have a row that sees a key"
        assert seen >= MIN_SEEN_ROWS, f"only {seen:.0%} of all query rows see a key"


def test_fuzz_cases_are_reproducible():
    """A replay draws the very same example (case and values)."""
    for index in range(5):
        a, b = fuzz.generate_case(123, index, MAX_WORK), fuzz.generate_case(123, index, MAX_WORK)
        assert a == b
        ia, ib = fuzz.make_inputs(a), fuzz.make_inputs(b)
        for name in ("q", "k", "v", "do", "dlse"):
            assert torch.equal(getattr(ia, name), getattr(ib, name))
    assert fuzz.generate_case(123, 0, MAX_WORK) != fuzz.generate_case(124, 0, MAX_WORK)
