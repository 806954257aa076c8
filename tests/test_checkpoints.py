"""Crash safety of gate files and training checkpoints.

* Injected crashes: every file-system change the package makes goes through
  ``sparse_attn._files`` (its ``MUTATIONS``); the tests make the N-th of them (and every later one)
  raise, for every N, with the N-th write torn (half its bytes land), and check that what is left
  loads as the complete old state or the complete new one.
* Damage on disk: a damaged newest checkpoint falls back to the previous one with a warning naming
  the file; nothing complete is a clear error naming the directory.
* Real crashes: a training run in a forked process is SIGKILLed at seeded random moments and
  resumed each time; the final gates equal those of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import time
import warnings

import pytest
import torch
from torch import nn

from sparse_attn import _files
from sparse_attn._files import CorruptFileError
from sparse_attn.patterns.seer import GATES_CONFIG, GATES_WEIGHTS, SeerDecodeGate, SeerGate, load_gates, save_gates
from sparse_attn.training.trainer import CheckpointWarning, TrainConfig, _resume, _save_checkpoint

transformers = pytest.importorskip("transformers")


class SimulatedCrash(BaseException):
    """Raised in place of a file-system change (a BaseException: no ``except Exception`` hides it)."""


@contextlib.contextmanager
def crash_at(n, monkeypatch):
    """Let the first ``n`` file-system changes happen; the next one tears (a write lands half its
    bytes) and raises SimulatedCrash, and so does every later one. Yields the list of done ops."""
    done = []

    def wrap(name, fn):
        def op(*args, **kwargs):
            if len(done) >= n:
                if name == "write_durable":
                    with open(args[0], "wb") as fh:
                        fh.write(args[1][: len(args[1]) // 2])
                raise SimulatedCrash(name)
            done.append((name, args))
            return fn(*args, **kwargs)

        return op

    with monkeypatch.context() as m:
        for name in _files.MUTATIONS:
            m.setattr(_files, name, wrap(name, getattr(_files, name)))
        yield done


def crashed_copies(base, tmp_path, monkeypatch, save):
    """Yield ``(n, path, total)`` for each ``n`` in ``0 .. total``: ``path`` a fresh copy of ``base``
    on which ``save(path)`` was cut at its ``n``-th file-system change (``total``, the changes one
    whole save makes, counted first; ``n == total``: the save completed)."""
    shutil.copytree(base, tmp_path / "count")
    with crash_at(10**9, monkeypatch) as ops:
        save(tmp_path / "count")
    for n in range(len(ops) + 1):
        path = tmp_path / f"crash{n}"
        shutil.copytree(base, path)
        with crash_at(n, monkeypatch):
            if n < len(ops):
                with pytest.raises(SimulatedCrash):
                    save(path)
            else:
                save(path)
        yield n, path, len(ops)


def _gates(seed):
    torch.manual_seed(seed)
    return nn.ModuleDict({"0": nn.ModuleDict({"prefill": SeerGate(4, 2, 8, block_size=16, hidden_size=8),
                                              "decode": SeerDecodeGate(4, 2, 8, block_size=16, hidden_size=8)})})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# save_gates: old or new, never a mix
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old_format", ["v2", "v1"])
def test_save_gates_survives_a_crash_at_every_write(tmp_path, monkeypatch, old_format):
    old, new = _gates(1), _gates(2)
    base = tmp_path / "base"
    save_gates(base, old, {"which": "old"})
    if old_format == "v1":  # a directory written by the previous release: fixed weights name, no hash
        meta = json.loads((base / GATES_CONFIG).read_text())
        (base / meta.pop("weights")["file"]).rename(base / GATES_WEIGHTS)
        meta["version"] = 1
        (base / GATES_CONFIG).write_text(json.dumps(meta))
    seen = []
    for n, path, _ in crashed_copies(base, tmp_path, monkeypatch, lambda p: save_gates(p, new, {"which": "new"})):
        loaded, config = load_gates(path)  # complete old gates, or complete new ones
        seen.append(config["which"])
        assert _equal(_state(loaded), _state(new if seen[-1] == "new" else old)), n
        save_gates(path, new, {"which": "new"})  # the next save cleans up whatever the crash left
        meta = json.loads((path / GATES_CONFIG).read_text())
        assert sorted(os.listdir(path)) == [meta["weights"]["file"], GATES_CONFIG], n
    assert seen == sorted(seen, reverse=True) and seen[0] == "old" and seen[-1] == "new", seen  # one switch


# --------------------------------------------------------------------------------------------------
# Checkpoints: crashes while saving
# --------------------------------------------------------------------------------------------------
def _optimizer(gates):
    return torch.optim.AdamW(gates.parameters(), lr=1e-2)


def _train_step(gates, opt):
    opt.zero_grad()
    sum((p.float() ** 2).sum() for p in gates.parameters()).backward()
    opt.step()


def _snapshot(gates, opt):
    return _state(gates), {f"{pid}.{k}": v.clone() for pid, st in opt.state_dict()["state"].items()
                           for k, v in st.items()}


def _save(root, gates, opt, step, keep=2):
    return _save_checkpoint(str(root), gates, opt, step, TrainConfig(), [{"step": step}], {"trained_steps": step}, keep)


def _resumed(root):
    """Resume into fresh gates and optimiser: (step, snapshot of what was loaded)."""
    gates = _gates(99)
    opt = _optimizer(gates)
    step, history = _resume(str(root), gates, opt, TrainConfig())
    assert history == [{"step": step}]
    return step, _snapshot(gates, opt)


def _same(a, b):
    return _equal(a[0], b[0]) and _equal(a[1], b[1])


@pytest.fixture
def two_checkpoints(tmp_path):
    """root with complete checkpoints of steps 1 and 2; returns (root, gates, opt, snapshots)."""
    gates = _gates(3)
    opt = _optimizer(gates)
    snaps = {}
    for step in (1, 2, 3):
        _train_step(gates, opt)
        snaps[step] = _snapshot(gates, opt)
        if step < 3:
            _save(tmp_path / "base", gates, opt, step)
    return tmp_path / "base", gates, opt, snaps


def test_checkpoint_survives_a_crash_at_every_write(tmp_path, monkeypatch, two_checkpoints):
    base, gates, opt, snaps = two_checkpoints
    warnings.simplefilter("error", CheckpointWarning)  # an interrupted save is not damage
    seen = []
    for n, root, total in crashed_copies(base, tmp_path, monkeypatch, lambda p: _save(p, gates, opt, 3)):
        assert total > 10
        step, got = _resumed(root)  # the complete step 2 or the complete step 3
        seen.append(step)
        assert step in (2, 3) and _same(got, snaps[step]), n
        _save(root, gates, opt, 3)  # the next save removes the leftovers and keeps the newest two
        assert sorted(os.listdir(root)) == ["step-000002", "step-000003"], n
        assert _resumed(root)[0] == 3
    assert seen == sorted(seen) and seen[0] == 2 and seen[-1] == 3, seen
    assert seen.count(3) > 2  # the clean-up after the commit was interrupted too


# --------------------------------------------------------------------------------------------------
# Checkpoints: damage found on resume
# --------------------------------------------------------------------------------------------------
def _flip(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _rehash(ckpt):
    """Recompute the manifest for the files now in ``ckpt`` (a consistent-looking forgery)."""
    man = json.loads((ckpt / "manifest.json").read_text())
    for name in man["files"]:
        data = (ckpt / name).read_bytes()
        man["files"][name] = {"size": len(data), "sha256": _files.sha256_bytes(data)}
    (ckpt / "manifest.json").write_text(json.dumps(man))


def _mixed_step(ckpt):
    """The failure of the old format: one file of another step (here trainer_state.json of step 1)."""
    shutil.copy(ckpt.parent / "step-000001" / "trainer_state.json", ckpt / "trainer_state.json")
    _rehash(ckpt)


def _weights(ckpt):
    return ckpt / json.loads((ckpt / GATES_CONFIG).read_text())["weights"]["file"]


DAMAGE = {
    "truncated optimizer": (lambda c: (c / "optimizer.safetensors").write_bytes(
        (c / "optimizer.safetensors").read_bytes()[:100]), "optimizer.safetensors"),
    "empty trainer state": (lambda c: (c / "trainer_state.json").write_bytes(b""), "trainer_state.json"),
    "flipped trainer state": (lambda c: _flip(c / "trainer_state.json"), "trainer_state.json"),
    "edited trainer state, valid JSON": (lambda c: _edit(c / "trainer_state.json", '"lr": 0.01', '"lr": 0.02'),
                                         "trainer_state.json"),
    "flipped optimizer payload": (lambda c: _flip(c / "optimizer.safetensors", -5), "optimizer.safetensors"),
    "flipped gate weights": (lambda c: _flip(_weights(c), -5), ".safetensors"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json"),
    "garbage manifest": (lambda c: (c / "manifest.json").write_text("[" * 5000), "manifest.json"),
    "missing gates config": (lambda c: (c / GATES_CONFIG).unlink(), GATES_CONFIG),
    "mixed steps, rehashed": (_mixed_step, "trainer_state.json"),
    "gates of another step, rehashed": (lambda c: (
        [shutil.copy(p, c / p.name) for p in (c.parent / "step-000001").iterdir() if "gates" in p.name],
        _rehash(c)), GATES_CONFIG),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_past_a_damaged_checkpoint(two_checkpoints, damage):
    root, _, _, snaps = two_checkpoints
    corrupt, names = DAMAGE[damage]
    corrupt(root / "step-000002")
    with pytest.warns(CheckpointWarning, match=r"step-000002.*" + names.replace(".", r"\.")):
        step, got = _resumed(root)
    assert step == 1 and _same(got, snaps[1])


def test_resume_without_a_complete_checkpoint_names_the_directory(two_checkpoints, tmp_path):
    root, gates, opt, snaps = two_checkpoints
    for ckpt in ("step-000001", "step-000002"):
        (root / ckpt / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="no complete checkpoint") as err:
        _resumed(root)
    assert str(err.value).startswith(str(root)) and "step-000001" in str(err.value)
    (tmp_path / "empty" / ".tmp-step-000001-xyz").mkdir(parents=True)  # an interrupted first save only
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        _resumed(tmp_path / "empty")
    # a complete checkpoint of another run's settings is an error, not a fallback
    _save(tmp_path / "other", gates, opt, 5)
    with pytest.raises(ValueError, match="seq_len"):
        _resume(str(tmp_path / "other"), _gates(0), _optimizer(_gates(0)), TrainConfig(seq_len=7))
    wider = nn.ModuleDict({"0": nn.ModuleDict({"prefill": SeerGate(4, 2, 8, block_size=16, hidden_size=16)})})
    with pytest.raises(ValueError, match="does not fit"):
        _resume(str(tmp_path / "other"), wider, _optimizer(wider), TrainConfig())
    (tmp_path / "legacy" / "checkpoint").mkdir(parents=True)  # the single, unverifiable directory of before
    with pytest.raises(FileNotFoundError, match="older sparse_attn"):
        _resumed(tmp_path / "legacy" / "checkpoints")


def test_keep_and_stale_checkpoints(tmp_path):
    gates = _gates(4)
    opt = _optimizer(gates)
    root = tmp_path / "ckpts"
    for step in (1, 2, 3, 4):
        _train_step(gates, opt)
        _save(root, gates, opt, step, keep=3)
    assert sorted(os.listdir(root)) == ["step-000002", "step-000003", "step-000004"]
    # resumed from step 2 (say 3 and 4 were damaged): saving step 3 drops the abandoned step 4
    _save(root, gates, opt, 3, keep=3)
    assert sorted(os.listdir(root)) == ["step-000002", "step-000003"]


# --------------------------------------------------------------------------------------------------
# Real crashes: SIGKILL during training, then resume
# --------------------------------------------------------------------------------------------------
STEPS = 20


def _tiny_model():
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def _train(out, resume, steps=STEPS):
    from sparse_attn.integrations.transformers import apply_sparse_attention
    from sparse_attn.training import train_gates

    model = _tiny_model()
    apply_sparse_attention(model, method="seer", gates=None, block_size=16, topk=2)
    tokens = torch.randint(0, 257, (20_000,), generator=torch.Generator().manual_seed(0))
    train_gates(model, tokens, steps=steps, lr=3e-3, seq_len=64, batch_size=2, progress=False, output_dir=out,
                save_every=1, seed=3, resume=resume)


def _child(out):
    """A training run that resumes when there is something to resume from."""
    torch.set_num_threads(1)
    warnings.simplefilter("error", CheckpointWarning)  # a kill must never leave a damaged checkpoint
    try:
        _train(out, resume=True)
    except FileNotFoundError:
        _train(out, resume=False)


def test_sigkilled_training_resumes_to_the_uninterrupted_result(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # lazy imports and first-call set-up happen once, here, rather than in every forked child
        _train(None, resume=False, steps=1)
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")  # the children inherit all that: no seconds of start-up per run
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(str(tmp_path / "straight"),))
    proc.start()
    proc.join(timeout=120)
    run_time = time.perf_counter() - t0  # kills are spread over one run's length, whatever the machine
    assert proc.exitcode == 0
    want = _state(load_gates(tmp_path / "straight")[0])
    out = str(tmp_path / "killed")
    root = os.path.join(out, "checkpoints")
    rng = random.Random(20240611)
    step_time = run_time / STEPS
    killed, resumed_from = 0, []
    for target in sorted(rng.sample(range(1, STEPS - 1), 6)):
        proc = ctx.Process(target=_child, args=(out,))
        proc.start()
        # a kill aimed by progress, not by wall time (a loaded machine runs at any speed): once the
        # run has reached step `target`, a random fraction of a step later, wherever it then is
        deadline = time.perf_counter() + 120
        while proc.is_alive() and time.perf_counter() < deadline and not any(
                n.endswith(f"step-{target:06d}") or f"step-{target:06d}-" in n
                for n in (os.listdir(root) if os.path.isdir(root) else ())):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 1.0) * step_time)
        proc.kill()
        proc.join(timeout=60)
        assert proc.exitcode in (-9, 0), f"training died by itself (exit code {proc.exitcode})"
        killed += proc.exitcode == -9
        resumed_from.append(sorted(os.listdir(root)) if os.path.isdir(root) else [])
    proc = ctx.Process(target=_child, args=(out,))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    assert killed >= 2, resumed_from  # the kills landed mid-run
    assert any(any(n.startswith("step-") for n in names) for names in resumed_from), resumed_from  # and resumed
    got = _state(load_gates(out)[0])
    assert _equal(got, want)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [f"step-{STEPS - 1:06d}", f"step-{STEPS:06d}"]
    with pytest.raises(FileExistsError, match="resume=True"):  # a fresh run refuses to mix with these
        _train(out, resume=False)
