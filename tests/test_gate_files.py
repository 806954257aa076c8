"""Gate files are untrusted input.

* Every damaged or crafted gates directory -- truncations at many offsets, byte flips, garbage,
  JSON of the wrong types, missing and extra keys, deep nesting, unknown classes, bad kwargs,
  missing / unexpected / mis-shaped tensors, wrong dtypes, malformed safetensors headers -- raises
  ``CorruptFileError`` (a ValueError) naming the damaged file, or loads exactly the saved tensors
  when the damage was harmless (version 2 hashes the weights, so no change to them is harmless).
* Sizes from a config (``gates_config.json``, a saved model's ``sparse_attention`` options) are
  checked against the safetensors header and the model's dimensions before anything is
  allocated: a guard fails the test if any tensor over 16 MiB is requested.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import struct

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sparse_attn._files import CorruptFileError, sha256_bytes
from sparse_attn.modules.seer import SeerPattern
from sparse_attn.patterns import seer_io as seer_mod
from sparse_attn.patterns.seer import GATES_CONFIG, GATES_WEIGHTS, SeerDecodeGate, SeerGate, load_gates, save_gates

GUARD_BYTES = 16 << 20


class NoLargeAllocations(TorchDispatchMode):
    """Fails (AssertionError) on any request for a tensor of more than ``limit`` bytes off the
    meta device -- checked before a factory op runs, so nothing large is ever allocated."""

    def __init__(self, limit: int = GUARD_BYTES) -> None:
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        size = args[0] if args and isinstance(args[0], (list, tuple)) else None
        if size is not None and all(isinstance(d, int) for d in size) and str(kwargs.get("device", "cpu")) != "meta":
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            nbytes = math.prod(size) * dtype.itemsize
            assert nbytes <= self.limit, f"{func} asked for {nbytes} bytes"
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                assert t.untyped_storage().nbytes() <= self.limit, f"{func} made {t.untyped_storage().nbytes()} bytes"
        return out


def test_the_guard_catches_a_large_allocation():
    with pytest.raises(AssertionError, match="asked for"), NoLargeAllocations():
        SeerGate(4, 2, 8, hidden_size=1 << 20)
    with NoLargeAllocations(), seer_mod._MetaFactories():  # what load_gates builds its modules under
        SeerGate(4, 2, 8, hidden_size=1 << 20)


def _gates():
    torch.manual_seed(0)
    return nn.ModuleDict({"0": nn.ModuleDict({
        "prefill": SeerGate(4, 2, 8, block_size=16, hidden_size=8, q_pooling=("avg", "max")),
        "decode": SeerDecodeGate(4, 2, 8, block_size=16, hidden_size=8, k_pooling=("max", "avg"))})})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A version-2 gates directory and its tensors."""
    path = tmp_path_factory.mktemp("gates") / "good"
    gates = _gates()
    save_gates(path, gates, {"base": "tiny", "layers": [0]})
    return path, {k: v.clone() for k, v in gates.state_dict().items()}


def _weights_name(path):
    return json.loads((path / GATES_CONFIG).read_text())["weights"]["file"]


def _outcome(path, damaged_file, want, *, may_load=True, check_values=True):
    """Load ``path``: a CorruptFileError naming ``damaged_file``, or (if ``may_load``) the saved
    tensors (``check_values``: exactly)."""
    try:
        loaded, _ = load_gates(path)
    except CorruptFileError as e:
        assert str(damaged_file) in str(e), str(e)
        return "error"
    assert may_load, f"damage to {damaged_file} went unnoticed"
    state = loaded.state_dict()
    assert state.keys() == want.keys()
    if check_values:
        assert all(torch.equal(state[k], want[k]) for k in want)
    return "loaded"


def _copy(saved, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(saved[0], dst)
    return dst


# --------------------------------------------------------------------------------------------------
# Byte-level damage: truncation, flips, garbage
# --------------------------------------------------------------------------------------------------
def test_truncated_flipped_and_garbage_files(saved, tmp_path):
    good, want = saved
    rng = random.Random(0)
    cfg_bytes = (good / GATES_CONFIG).read_bytes()
    w_name = _weights_name(good)
    w_bytes = (good / w_name).read_bytes()
    cases = []  # (file name, new content, may it load?)
    for n in sorted({0, 1, 7, 8, 9, 100, len(w_bytes) - 1} | {rng.randrange(len(w_bytes)) for _ in range(40)}):
        cases.append((w_name, w_bytes[:n], False))
    for n in sorted({0, 1, 2, len(cfg_bytes) - 2} | {rng.randrange(len(cfg_bytes)) for _ in range(40)}):
        cases.append((GATES_CONFIG, cfg_bytes[:n], n >= len(cfg_bytes) - 1))  # only the final newline may go
    for _ in range(60):
        i = rng.randrange(len(w_bytes))
        cases.append((w_name, w_bytes[:i] + bytes([w_bytes[i] ^ rng.randrange(1, 256)]) + w_bytes[i + 1:], False))
    for _ in range(60):
        i = rng.randrange(len(cfg_bytes))
        cases.append((GATES_CONFIG, cfg_bytes[:i] + bytes([cfg_bytes[i] ^ rng.randrange(1, 256)]) + cfg_bytes[i + 1:],
                      True))
    garbage = [b"", b"\x00" * 8, b"\xff" * 64, b"\xff\xfe{", b"null", b"[]", b"{}", b'"x"', b"1", b"[" * 100_000,
               b'{"a":' * 50_000, b'{"format": NaN}', b"1" * 5000, bytes(rng.randrange(256) for _ in range(300))]
    cases += [(GATES_CONFIG, g, False) for g in garbage]
    cases += [(w_name, g, False) for g in garbage]
    cases.append((w_name, struct.pack("<Q", 2**63) + w_bytes[8:], False))  # header length beyond the file
    outcomes = []
    for i, (name, content, may_load) in enumerate(cases):
        path = _copy(saved, tmp_path, f"case{i}")
        (path / name).write_bytes(content)
        outcomes.append(_outcome(path, path / name, want, may_load=may_load))
    assert outcomes.count("error") > 0.8 * len(cases)


def test_version_1_directories_still_load_and_are_checked(saved, tmp_path):
    """Version 1 (fixed ``gates.safetensors``, no hash): a flip in a float payload is harmless (it
    loads, with that value changed); a damaged header is an error naming the file."""
    good, want = saved
    path = _copy(saved, tmp_path, "v1")
    meta = json.loads((path / GATES_CONFIG).read_text())
    (path / meta.pop("weights")["file"]).rename(path / GATES_WEIGHTS)
    meta["version"] = 1
    (path / GATES_CONFIG).write_text(json.dumps(meta))
    assert _outcome(path, path / GATES_WEIGHTS, want, may_load=True) == "loaded"
    data = (path / GATES_WEIGHTS).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    rng = random.Random(1)
    results = set()
    for i in range(40):
        at = rng.randrange(len(data))
        case = _copy(saved, tmp_path, f"v1case{i}")
        shutil.copy(path / GATES_CONFIG, case / GATES_CONFIG)
        (case / _weights_name(good)).unlink()
        (case / GATES_WEIGHTS).write_bytes(data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1:])
        results.add(_outcome(case, case / GATES_WEIGHTS, want, check_values=at < 8 + header_len))
    assert results == {"error", "loaded"}


# --------------------------------------------------------------------------------------------------
# JSON-level damage: type swaps, missing and extra keys, classes, kwargs, nesting
# --------------------------------------------------------------------------------------------------
def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _get(meta, path):
    for k in path:
        meta = meta[k]
    return meta


def _set(meta, path, value):
    if not path:
        return value
    meta = copy.deepcopy(meta)
    _get(meta, path[:-1])[path[-1]] = value
    return meta


SWAPS = [None, True, 0, -7, 2.5, 10**9, 10**30, "x", "", [], {}, ["avg", "avg"], {"class": "SeerGate"}]


def test_type_swaps_missing_and_extra_keys(saved, tmp_path):
    """Every value of the JSON swapped for values of other types, every key deleted, an extra key
    in every object: only changes to the free-form ``config`` and a positive ``rope_theta`` load;
    everything else is an error naming gates_config.json."""
    good, want = saved
    meta = json.loads((good / GATES_CONFIG).read_text())
    variants = []  # (json, should it load?, what changed)
    for p in _paths(meta):
        current, free = _get(meta, p), p[:1] == ("config",) and len(p) > 1  # inside the free-form config
        for v in SWAPS:
            if type(v) is not type(current) or v != current:
                theta = p[-1:] == ("rope_theta",) and type(v) in (int, float) and v > 0
                other_config = p == ("config",) and isinstance(v, dict)
                variants.append((_set(meta, p, v), free or theta or other_config, f"{p} = {v!r}"))
        if p and isinstance(_get(meta, p[:-1]), dict):
            cut = copy.deepcopy(meta)
            del _get(cut, p[:-1])[p[-1]]
            variants.append((cut, free, f"del {p}"))
        if isinstance(current, dict):
            variants.append((_set(meta, p, {**current, "extra": 1}), p[:1] == ("config",), f"extra key in {p}"))
    for i, (variant, loads, what) in enumerate(variants):
        path = _copy(saved, tmp_path, f"v{i}")
        (path / GATES_CONFIG).write_text(json.dumps(variant))
        got = _outcome(path, path / GATES_CONFIG, want)
        assert got == ("loaded" if loads else "error"), what
    assert len(variants) > 400


@pytest.mark.parametrize("where,value,match", [
    (("modules", "class"), "os.system", "unknown class"),
    (("modules", "children", "0", "children", "prefill", "class"), "torch.nn.Linear", "unknown class"),
    (("modules", "children", "0", "children", "prefill", "kwargs", "use_rope"), 1, "use_rope must be a bool"),
    (("modules", "children", "0", "children", "prefill", "kwargs", "rope_theta"), -1.0, "rope_theta"),
    (("modules", "children", "0", "children", "prefill", "kwargs", "hidden_size"), 8.0, "hidden_size must be an int"),
    (("modules", "children", "0", "children", "prefill", "kwargs", "hidden_size"), 16, r"declares \[4, 16, 16\]"),
    (("modules", "children", "0", "children", "prefill", "kwargs", "q_pooling"), ["avg", "avg"], "repeat"),
    (("modules", "children", "0", "children", "decode", "kwargs", "k_pooling"), ["median"], "k_pooling"),
    (("modules", "children", "0", "children", "a.b"), {"class": "torch.nn.ModuleList", "children": []}, "child name"),
    (("modules", "children", "0", "children", "decode", "kwargs", "num_kv_heads"), 3, "multiple"),
    (("version",), 3, "format version"),
    (("version",), "2", "format version"),
    (("format",), "pickle", "not a sparse_attn gates config"),
    (("weights", "file"), "../../etc/passwd", "weights.file"),
    (("weights", "sha256"), "0" * 64, "weights.file"),
    (("weights", "size"), 10**12, "bytes"),
    (("config",), [], "'config' must be a JSON object"),
    (("modules", "children"), [], "children"),
])
def test_specific_config_errors(saved, tmp_path, where, value, match):
    good, want = saved
    meta = json.loads((good / GATES_CONFIG).read_text())
    path = _copy(saved, tmp_path, "c")
    (path / GATES_CONFIG).write_text(json.dumps(_set(meta, where, value)))
    with pytest.raises(CorruptFileError, match=match) as err:
        load_gates(path)
    assert str(path) in str(err.value)


def test_deep_nesting_and_too_many_gates(saved, tmp_path, monkeypatch):
    good, _ = saved
    meta = json.loads((good / GATES_CONFIG).read_text())
    tree = meta["modules"]
    for _ in range(20):  # parseable JSON (depth ~40), but containers 20 deep
        tree = {"class": "torch.nn.ModuleDict", "children": {"x": tree}}
    path = _copy(saved, tmp_path, "deep")
    (path / GATES_CONFIG).write_text(json.dumps({**meta, "modules": tree}))
    with pytest.raises(CorruptFileError, match="nest deeper"):
        load_gates(path)
    deep: list = []
    for _ in range(100):  # parseable by json (under its ~1000 limit), deeper than the 64 levels allowed
        deep = [deep]
    (path / GATES_CONFIG).write_text(json.dumps({**meta, "config": {"a": deep}}))
    with pytest.raises(CorruptFileError, match="nested deeper"):
        load_gates(path)
    with pytest.raises(ValueError, match="nests deeper"):  # what load_gates would refuse is not written
        save_gates(tmp_path / "x", _gates(), {"a": deep})
    monkeypatch.setattr(seer_mod, "_MAX_GATES", 1)
    with pytest.raises(CorruptFileError, match="more than 1 gates"):
        load_gates(good)


# --------------------------------------------------------------------------------------------------
# Tensor-level damage: a well-formed file with the wrong tensors (rehashed, so only the checks see it)
# --------------------------------------------------------------------------------------------------
def _rewrite_weights(path, tensors):
    from safetensors.torch import save

    payload = save(tensors)
    digest = sha256_bytes(payload)
    meta = json.loads((path / GATES_CONFIG).read_text())
    (path / meta["weights"]["file"]).unlink()
    meta["weights"] = {"file": f"gates-{digest[:16]}.safetensors", "size": len(payload), "sha256": digest}
    (path / meta["weights"]["file"]).write_bytes(payload)
    (path / GATES_CONFIG).write_text(json.dumps(meta))
    return path / meta["weights"]["file"]


TENSOR_DAMAGE = {
    "missing": (lambda t: {k: v for k, v in t.items() if k != "0.decode.q_bias"}, "missing"),
    "unexpected": (lambda t: {**t, "0.decode.extra": torch.zeros(2)}, "unexpected"),
    "mis-shaped": (lambda t: {**t, "0.prefill.q_weight": t["0.prefill.q_weight"].transpose(1, 2).contiguous()},
                   "shape"),
    "integer dtype": (lambda t: {**t, "0.prefill.k_bias": t["0.prefill.k_bias"].to(torch.int32)}, "dtype"),
    "mixed dtypes": (lambda t: {**t, "0.decode.k_bias": t["0.decode.k_bias"].half()}, "mixes dtypes"),
    "bool": (lambda t: {**t, "0.decode.k_bias": t["0.decode.k_bias"] > 0}, "dtype"),
}


@pytest.mark.parametrize("damage", sorted(TENSOR_DAMAGE))
def test_wrong_tensors(saved, tmp_path, damage):
    good, want = saved
    change, match = TENSOR_DAMAGE[damage]
    path = _copy(saved, tmp_path, "t")
    weights = _rewrite_weights(path, change(dict(want)))
    with pytest.raises(CorruptFileError, match=match) as err:
        load_gates(path)
    assert str(weights) in str(err.value)


def _raw_safetensors(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


HEADERS = {
    "not an object": ([1, 2], b""),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "string shape": ({"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets past the end": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4000]}}, b"\0" * 4),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "overlap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
    "bad metadata": ({"__metadata__": {"a": 1}}, b""),
    "missing field": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "huge shape": ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_safetensors_headers(saved, tmp_path, case):
    """Crafted headers in a version-1 directory (no hash to hide behind): the header checks alone
    turn each into a CorruptFileError naming the file, never a safetensors library error."""
    header, data = HEADERS[case]
    path = _copy(saved, tmp_path, "h")
    meta = json.loads((path / GATES_CONFIG).read_text())
    (path / meta.pop("weights")["file"]).unlink()
    meta["version"] = 1
    (path / GATES_CONFIG).write_text(json.dumps(meta))
    (path / GATES_WEIGHTS).write_bytes(_raw_safetensors(header, data))
    with pytest.raises(CorruptFileError) as err:
        load_gates(path)
    assert str(path / GATES_WEIGHTS) in str(err.value)


# --------------------------------------------------------------------------------------------------
# Sizes from configs are bounded before anything is allocated
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [10**9, 1 << 20])
def test_huge_hidden_size_in_gates_config_fails_before_allocating(saved, tmp_path, hidden):
    """10**9 fails the constructor's own bound; 2**20 passes it, and is stopped by the check of the
    (meta-device) modules against the safetensors header, or by the model's bound."""
    good, _ = saved
    meta = json.loads((good / GATES_CONFIG).read_text())
    path = _copy(saved, tmp_path, "big")
    meta["modules"]["children"]["0"]["children"]["prefill"]["kwargs"]["hidden_size"] = hidden
    (path / GATES_CONFIG).write_text(json.dumps(meta))
    with NoLargeAllocations():
        with pytest.raises(CorruptFileError, match="hidden_size|shape") as err:
            load_gates(path)
        assert str(path / GATES_CONFIG) in str(err.value)
        with pytest.raises(CorruptFileError, match="hidden_size"):
            load_gates(path, model_dims={"num_heads": 4, "num_kv_heads": 2, "head_dim": 8})
        with pytest.raises(CorruptFileError, match="num_heads=4 but the model has num_heads=8"):
            load_gates(good, model_dims={"num_heads": 8, "num_kv_heads": 2, "head_dim": 8})
    pool = copy.deepcopy(json.loads((good / GATES_CONFIG).read_text()))
    pool["modules"]["children"]["0"]["children"]["decode"]["kwargs"]["k_pooling"] = ["avg"] * 100_000
    (path / GATES_CONFIG).write_text(json.dumps(pool))
    with NoLargeAllocations(), pytest.raises(CorruptFileError, match="repeat"):
        load_gates(path)


def test_seer_pattern_bounds_gate_options_by_the_model():
    with pytest.raises(ValueError, match="hidden_size=512 is more than 256"):
        SeerPattern(4, 2, 16, gate={"hidden_size": 512})
    with pytest.raises(ValueError, match="hidden_size=4096 is more than 1024"):
        SeerPattern(8, 2, 128, decode_gate={"hidden_size": 4096})
    with pytest.raises(ValueError, match="repeat"):
        SeerPattern(4, 2, 16, gate={"k_pooling": ["max", "max"]})
    with pytest.raises(TypeError, match="gate options must be a dict"):
        SeerPattern(4, 2, 16, gate=[("hidden_size", 8)])
    with pytest.raises(TypeError, match="decode_gate must be a bool or a dict"):
        SeerPattern(4, 2, 16, decode_gate=[1])
    assert SeerPattern(4, 2, 16, gate={"hidden_size": 256}).gate.hidden_size == 256


@pytest.mark.parametrize("key,value,match", [
    ("gate", {"hidden_size": 10**9}, "hidden_size"),
    ("gate", {"hidden_size": 1 << 20}, "hidden_size"),
    ("decode_gate", {"hidden_size": 1 << 20}, "hidden_size"),
    ("gate", {"q_pooling": ["avg"] * 100_000}, "repeat"),
])
def test_saved_model_config_gate_sizes_fail_before_allocating(tmp_path, key, value, match):
    transformers = pytest.importorskip("transformers")
    from sparse_attn.integrations.transformers import apply_sparse_attention, register

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=128))
    apply_sparse_attention(model, "seer", block_size=16, gate={"hidden_size": 32})
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sparse_attention"]["options"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    register()
    with NoLargeAllocations(), pytest.raises(ValueError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_attn")


def test_apply_sparse_attention_checks_gate_files_against_the_model(saved, tmp_path):
    transformers = pytest.importorskip("transformers")
    from sparse_attn.integrations.transformers import apply_sparse_attention

    good, _ = saved  # gates for 4 heads, 2 KV heads, head_dim 8
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=128))  # head_dim 16
    with NoLargeAllocations(), pytest.raises(CorruptFileError, match="head_dim=8 but the model has head_dim=16"):
        apply_sparse_attention(model, "seer", gates=str(good))


def test_files_written_before_the_new_gate_options_still_load(saved, tmp_path):
    """Gate kwargs added later (bias, q_proj, k_heads, rope_positions, rope_scaling; query, qk_norm,
    own_block) are absent from files written before them: such a file loads with the values that
    reproduce its gates. A file with only some of them is corrupt (see the key deletions above)."""
    good, want = saved
    meta = json.loads((good / GATES_CONFIG).read_text())
    old = copy.deepcopy(meta)
    for kind, cls in (("prefill", SeerGate), ("decode", SeerDecodeGate)):
        kwargs = old["modules"]["children"]["0"]["children"][kind]["kwargs"]
        for key in cls._LEGACY_DEFAULTS:
            del kwargs[key]
    path = _copy(saved, tmp_path, "old")
    (path / GATES_CONFIG).write_text(json.dumps(old))
    loaded, _ = load_gates(path)
    current, _ = load_gates(good)
    assert loaded["0"]["prefill"].get_config() == current["0"]["prefill"].get_config()
    assert loaded["0"]["decode"].get_config() == current["0"]["decode"].get_config()
    assert _outcome(path, path / GATES_CONFIG, want) == "loaded"
