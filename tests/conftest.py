"""Shared pytest setup for the sparse_attn test-suite.

* On machines without CUDA, Triton kernels run in the interpreter. Triton reads
  ``TRITON_INTERPRET`` when a kernel is *defined*, so this must happen before any
  test module (or sparse_attn) imports triton -- hence at the very top of this file.
* The repo root and this ``tests/`` directory are put on ``sys.path`` so that
  ``import sparse_attn`` and ``from helpers import ...`` work without installation.
* Every test runs with ``torch.empty`` / ``torch.empty_like`` / ``Tensor.new_empty``
  returning NaN-filled floating-point tensors, so any output element a kernel or the
  reference forgets to write shows up as NaN.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)
for _p in (_TESTS_DIR, _REPO_ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA, runs in the GPU tier")
    config.addinivalue_line("markers", "slow: slow test (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped (not failed) on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------
# NaN-filled allocations
# --------------------------------------------------------------------------------------
def _nan_fill(t):
    """Fill a freshly allocated floating-point tensor with NaN (in place); return it."""
    try:
        if torch.compiler.is_compiling():  # never put extra ops into a traced graph
            return t
    except Exception:  # pragma: no cover - very old torch
        pass
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        return t
    if t.is_meta or t.numel() == 0:
        return t
    with torch.no_grad():
        t.fill_(float("nan"))
    return t


def _wrap_alloc(orig):
    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        return _nan_fill(orig(*args, **kwargs))

    return wrapper


# Built once, so that every test patches in the *same* function objects (torch.compile
# guards on them; fresh wrappers per test would force recompilation).
_NAN_ALLOCATORS = (
    (torch, "empty", _wrap_alloc(torch.empty)),
    (torch, "empty_like", _wrap_alloc(torch.empty_like)),
    (torch.Tensor, "new_empty", _wrap_alloc(torch.Tensor.new_empty)),
)


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Make torch.empty / torch.empty_like / Tensor.new_empty return NaN-filled
    floating-point tensors (integer and bool tensors are left untouched), so that any
    output element a kernel or the reference forgets to write shows up as NaN."""
    for owner, name, wrapper in _NAN_ALLOCATORS:
        monkeypatch.setattr(owner, name, wrapper)
    yield
