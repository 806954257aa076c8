"""Opt-in autotuning of the kernel tiles (``SPARSE_ATTN_AUTOTUNE=1``), with a persistent cache.

Off by default: a search costs seconds on the first call of each key and cannot run inside a
CUDA graph capture. When on, the first launch of a key times a small set of configurations
around the table's choice (:func:`sparse_attn.triton_kernels.configs.tune_space`) on the real
inputs and keeps the fastest; the result is written to a JSON file so a later process pays
nothing. The key is what the best tile depends on: kernel, GPU name, head dim, dtype, layout
block sizes, causal, and the tile shape the launcher chose for the layout (see ``configs``).

Cache file: ``$SPARSE_ATTN_CACHE_DIR/autotune.json``, default ``~/.cache/sparse_attn/``. It is
written atomically (temporary file + rename), so concurrent processes never read half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["enabled", "cache_path", "pick", "clear_memory"]

_LOCK = threading.Lock()
_MEMORY: Dict[str, Dict[str, dict]] = {}  # cache path -> {key: tiles}


def enabled() -> bool:
    """Whether ``SPARSE_ATTN_AUTOTUNE`` asks for tuning (read at every launch)."""
    return os.environ.get("SPARSE_ATTN_AUTOTUNE", "0") not in ("", "0")


def cache_path() -> str:
    root = os.environ.get("SPARSE_ATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparse_attn")
    return os.path.join(root, "autotune.json")


def clear_memory() -> None:
    """Forget what this process read or tuned (the file stays): the next pick reads the file."""
    with _LOCK:
        _MEMORY.clear()


def _load(path: str) -> Dict[str, dict]:
    if path not in _MEMORY:
        try:
            with open(path) as f:
                data = json.load(f)
            _MEMORY[path] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _MEMORY[path] = {}
    return _MEMORY[path]


def _store(path: str, key: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:  # merge with what other processes wrote since we read
        with open(path) as f:
            on_disk = json.load(f)
        if not isinstance(on_disk, dict):
            on_disk = {}
    except (OSError, ValueError):
        on_disk = {}
    on_disk[key] = value
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(on_disk, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _default_timer(run: Callable[[], None]) -> float:
    from triton.testing import do_bench

    return float(do_bench(run, warmup=5, rep=20))


def pick(key: Sequence, options: List[dict], run: Callable[[dict], None],
         timer: Optional[Callable[[Callable[[], None]], float]] = None) -> Tuple[dict, bool]:
    """The fastest of ``options`` (launch-parameter dicts) for ``key``, and whether it came from
    the cache. ``run(tiles)`` launches the kernel with one option; ``timer(fn) -> ms`` times it
    (default ``triton.testing.do_bench``). An option that fails to launch is skipped."""
    path = cache_path()
    skey = json.dumps([str(k) for k in key])
    with _LOCK:
        hit = _load(path).get(skey)
    if hit is not None:
        for opt in options:
            if all(opt.get(k) == v for k, v in hit.items()):
                return opt, True
    timer = timer or _default_timer
    best, best_ms = None, float("inf")
    for opt in options:
        try:
            ms = timer(lambda: run(opt))
        except Exception:  # noqa: BLE001 - e.g. out of shared memory on this part: not a candidate
            continue
        if ms < best_ms:
            best, best_ms = opt, ms
    if best is None:
        raise RuntimeError(f"autotune: no configuration launched for {key}")
    with _LOCK:
        _load(path)[skey] = dict(best)
        _store(path, skey, dict(best))
    return best, False
