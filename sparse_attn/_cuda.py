"""Loader of the CUDA C++ decode kernel (``csrc/decode/``): the CUDA build, and its CPU emulation.

Two torch ops, one kernel source (``csrc/decode/sparse_decode.cuh``):

* ``sparse_attn::sparse_decode_cuda`` (CUDA tensors): from the prebuilt extension
  ``sparse_attn._C`` (``setup.py`` builds it when a CUDA toolkit and a CUDA build of torch are
  present), else a JIT build with ``torch.utils.cpp_extension.load`` (ninja + nvcc), cached under
  ``$SPARSE_ATTN_CACHE`` if set, else torch's extension directory (``$TORCH_EXTENSIONS_DIR`` or
  ``~/.cache/torch_extensions``). :func:`load_cuda` raises ``RuntimeError`` naming what is missing.
* ``sparse_attn::sparse_decode_emulated`` (CPU tensors): the same kernel compiled as host C++20
  against ``csrc/shim/cuda_shim.h`` (one std::thread per CUDA thread, blocks in turn), JIT-built
  and cached the same way. Test infrastructure: slow, blind to timing and memory-model races, but
  it runs the kernel's own indexing, masks, softmax and split merge, and checks every global
  access against the tensors it was given.

Both take the kernel-facing launcher signature of the decode spec and return ``(out, lse)``.
The JIT builds are keyed by a hash of every file under ``csrc/decode`` and ``csrc/shim``, so
editing a header rebuilds (torch's own versioning only hashes the listed sources).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["cuda_available", "cuda_loaded", "load_cuda", "load_emulated", "decode_fwd_cuda", "decode_fwd_emulated", "csrc_dir",
           "source_hash"]

_CUDA_OP = "sparse_decode_cuda"
_EMULATED_OP = "sparse_decode_emulated"
_KERNEL_DIRS = ("decode", "shim")


def csrc_dir() -> Path:
    """The ``csrc/`` folder of this checkout (``$SPARSE_ATTN_CSRC`` overrides)."""
    env = os.environ.get("SPARSE_ATTN_CSRC")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "csrc"


def source_hash() -> str:
    """A short hash of every kernel, shim and binding source: the JIT builds' cache key."""
    h = hashlib.sha1()
    root = csrc_dir()
    for sub in _KERNEL_DIRS:
        for path in sorted((root / sub).rglob("*")):
            if path.is_file() and path.suffix in (".h", ".cuh", ".cpp", ".cu"):
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _build_dir(name: str) -> Optional[str]:
    base = os.environ.get("SPARSE_ATTN_CACHE")
    if not base:
        return None  # torch's default: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/<py, torch>
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    return path


def _has_op(name: str) -> bool:
    try:
        return hasattr(torch.ops.sparse_attn, name)
    except (AttributeError, RuntimeError):
        return False


def _register_fake(name: str) -> None:
    """Shapes for torch.compile / FakeTensor tracing (out in q's dtype, lse fp32)."""

    def fake(q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx, s2_residues, s2_local, s2_stride,
             block_size, scale, own_block, num_splits=0):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    try:
        torch.library.register_fake(f"sparse_attn::{name}")(fake)
    except RuntimeError:  # already registered (a second loader in this process)
        pass


def _jit(name: str, sources, **kwargs) -> None:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (torch's JIT build needs it: pip install ninja)")
    root = csrc_dir()
    missing = [s for s in sources if not (root / s).is_file()]
    if missing:
        raise RuntimeError(f"the C++ sources are not in {root} (missing {missing}); set SPARSE_ATTN_CSRC")
    tag = f"-DSPARSE_ATTN_SRC_HASH={source_hash()}"  # part of torch's build key: header edits rebuild
    kwargs["extra_cflags"] = list(kwargs.get("extra_cflags", [])) + [tag]
    cpp_extension.load(name=name, sources=[str(root / s) for s in sources], extra_include_paths=[str(root)],
                       build_directory=_build_dir(name), is_python_module=False,
                       verbose=os.environ.get("SPARSE_ATTN_VERBOSE_BUILD", "0") not in ("", "0"), **kwargs)


@functools.lru_cache(maxsize=None)
def _load_cuda_once() -> Optional[str]:
    """None when loaded, else the reason it cannot be."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    if _has_op(_CUDA_OP):
        return None
    try:
        import sparse_attn._C  # noqa: F401  (the setup.py build registers the op on import)
    except ImportError:
        pass
    if not _has_op(_CUDA_OP):
        from torch.utils import cpp_extension

        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
        if not (nvcc and os.path.exists(nvcc)) and shutil.which("nvcc") is None:
            return "no prebuilt sparse_attn._C and no nvcc to build it (install the CUDA toolkit or set CUDA_HOME)"
        try:
            _jit("sparse_attn_decode_cuda", ["decode/binding_cuda.cu"], extra_cflags=["-O3"],
                 extra_cuda_cflags=["-O3", "-lineinfo"])
        except Exception as exc:  # noqa: BLE001  (a failed build is a reason, not a crash)
            return f"the JIT build of the CUDA extension failed: {type(exc).__name__}: {str(exc)[-2000:]}"
        if not _has_op(_CUDA_OP):
            return "the CUDA extension built but did not register sparse_attn::sparse_decode_cuda"
    _register_fake(_CUDA_OP)
    return None


def load_cuda() -> None:
    """Make ``torch.ops.sparse_attn.sparse_decode_cuda`` available: the prebuilt ``sparse_attn._C``,
    else a cached JIT build. Raises ``RuntimeError`` naming why it cannot (no CUDA torch, no nvcc,
    no ninja, a failed build)."""
    why = _load_cuda_once()
    if why:
        raise RuntimeError(f"sparse_attn CUDA kernels unavailable: {why}")


def cuda_available() -> Tuple[bool, str]:
    """``(True, "")`` when the CUDA decode kernel can run here (a CUDA device, and the extension
    loaded or built: the first call may compile it, a few minutes, cached afterwards), else
    ``(False, reason)``."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a build without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    why = _load_cuda_once()
    return (why is None), (why or "")


@functools.lru_cache(maxsize=None)
def _prebuilt() -> bool:
    try:
        import sparse_attn._C  # noqa: F401
    except ImportError:
        return False
    return _has_op(_CUDA_OP)


def cuda_loaded() -> bool:
    """Whether the CUDA decode kernel can run here *without building anything*: a CUDA device and
    the op already registered (the prebuilt ``sparse_attn._C``, or a JIT build that
    :func:`load_cuda` / ``backend="cuda"`` made in this process). ``backend="auto"`` uses this, so
    it never starts a compile."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    if not (_has_op(_CUDA_OP) or _prebuilt()):
        return False
    return _load_cuda_once() is None


@functools.lru_cache(maxsize=None)
def load_emulated() -> None:
    """Build (once, cached on disk) and load the CPU emulation of the CUDA kernel:
    ``torch.ops.sparse_attn.sparse_decode_emulated``. Needs a C++20 compiler and ninja."""
    if _has_op(_EMULATED_OP):
        return
    try:
        _jit("sparse_attn_decode_emulated", ["decode/binding_emulated.cpp"],
             extra_cflags=["-O2", "-std=c++20", "-pthread", "-Wno-unknown-pragmas"], extra_ldflags=["-pthread"])
    except RuntimeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"building the emulated CUDA decode kernel failed: {type(exc).__name__}: {exc}") from exc
    if not _has_op(_EMULATED_OP):
        raise RuntimeError("the emulation extension built but did not register sparse_attn::sparse_decode_emulated")
    _register_fake(_EMULATED_OP)


def _args(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table, kv_num, kv_idx,
          s2_residues, s2_local, s2_stride, block_size, scale, own_block, num_splits):
    return (q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx, s2_residues,
            int(s2_local) if s2_local is not None else 1, int(s2_stride) if s2_stride is not None else 1,
            int(block_size), float(scale) if scale is not None else q.shape[-1] ** -0.5, bool(own_block),
            int(num_splits or 0))


def decode_fwd_cuda(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table: Optional[Tensor],
                    kv_num: Optional[Tensor], kv_idx: Optional[Tensor], s2_residues: Optional[Tensor],
                    s2_local: int, s2_stride: int, block_size: int, scale: float, own_block: bool,
                    num_splits: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The decode launcher on CUDA tensors (the spec's signature): ``(out [B, Hq, Sq, D] in q's
    dtype, lse [B, Hq, Sq] fp32)``. fp16/bf16, D in 64/128/256, int32 metadata. ``num_splits``
    (default: from the shapes and the SM count) is the flash-decoding split count, for tests."""
    load_cuda()
    return torch.ops.sparse_attn.sparse_decode_cuda(*_args(q, k_cache, v_cache, cache_seqlens, block_table, kv_num,
                                                           kv_idx, s2_residues, s2_local, s2_stride, block_size,
                                                           scale, own_block, num_splits))


def decode_fwd_emulated(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                        block_table: Optional[Tensor], kv_num: Optional[Tensor], kv_idx: Optional[Tensor],
                        s2_residues: Optional[Tensor], s2_local: int, s2_stride: int, block_size: int, scale: float,
                        own_block: bool, num_splits: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """:func:`decode_fwd_cuda` on CPU tensors, through the CPU emulation of the same kernel source
    (the split heuristic assumes an 8-SM chip unless ``num_splits`` is given)."""
    load_emulated()
    return torch.ops.sparse_attn.sparse_decode_emulated(*_args(q, k_cache, v_cache, cache_seqlens, block_table,
                                                               kv_num, kv_idx, s2_residues, s2_local, s2_stride,
                                                               block_size, scale, own_block, num_splits))
