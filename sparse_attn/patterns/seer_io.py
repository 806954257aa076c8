"""Save / load of Seer gates: safetensors + JSON (never pickle), and the authors' checkpoints.

:func:`save_gates` / :func:`load_gates` (re-exported by :mod:`sparse_attn.patterns.seer` and
:mod:`sparse_attn.patterns`). ``load_gates(dir, format="seerattention")`` (or ``format="auto"``)
also reads a checkpoint directory published by the SeerAttention authors (``config.json`` +
``attn_gate_weights.pth``); that reader lives in :mod:`sparse_attn.patterns.seer_compat`.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _files
from .seer import SeerGate, _check_positive_int, check_gate_options

__all__ = ["save_gates", "load_gates", "GATES_CONFIG", "GATES_WEIGHTS", "GATE_FORMATS"]

GATES_CONFIG = "gates_config.json"
GATES_WEIGHTS = "gates.safetensors"  # the weights file of format version 1 (still read; version 2 names its own)
_FORMAT = "sparse_attn.gates"
_FORMAT_VERSION = 2  # 2: a content-addressed weights file, named with its size and SHA-256 by the JSON
#: what ``load_gates(format=...)`` reads: ours, the authors' checkpoint directories, or whichever a directory holds
GATE_FORMATS = ("auto", "sparse_attn", "seerattention")

_CONTAINERS = {"torch.nn.ModuleDict": nn.ModuleDict, "torch.nn.ModuleList": nn.ModuleList}
_WEIGHTS_NAME = re.compile(r"gates-[0-9a-f]{16}\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_CONFIG_BYTES = 16 << 20  # a gates_config.json is a few hundred bytes per layer
_MAX_GATES = 4096  # gates in one file (a model has one or two per layer)
_MAX_TREE_DEPTH = 8  # containers nested in containers
_GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _gate_classes() -> Dict[str, type]:
    from .seer_decode import SeerDecodeGate

    return {"SeerGate": SeerGate, "SeerDecodeGate": SeerDecodeGate}


def _describe(module: nn.Module, where: str) -> Dict[str, Any]:
    """JSON tree that rebuilds ``module``: containers with children, gates with kwargs."""
    classes = _gate_classes()
    name = type(module).__name__
    if name in classes and type(module) is classes[name]:
        return {"class": name, "kwargs": module.get_config()}
    if type(module) is nn.ModuleDict:
        children = {k: _describe(m, f"{where}.{k}") for k, m in module.items()}
        return {"class": "torch.nn.ModuleDict", "children": children}
    if type(module) is nn.ModuleList:
        items = [_describe(m, f"{where}.{i}") for i, m in enumerate(module)]
        return {"class": "torch.nn.ModuleList", "children": items}
    raise TypeError(
        f"gates{where} is a {type(module).__name__}; save_gates stores SeerGate / SeerDecodeGate modules, "
        "optionally nested in nn.ModuleDict / nn.ModuleList"
    )


def save_gates(path: Union[str, os.PathLike], gates: nn.Module, config: Optional[Dict[str, Any]] = None) -> None:
    """Save gates to a directory, atomically: ``gates_config.json`` + ``gates-<hash>.safetensors``.

    Layout (format version 2)::

        path/gates_config.json           {"format": "sparse_attn.gates", "version": 2,
                                          "weights": {"file": ..., "size": ..., "sha256": ...},
                                          "modules": <tree>, "config": <config>}
        path/gates-<16 hex>.safetensors  the state dict, named by the first 16 hex digits of its SHA-256

    The JSON holds everything needed to rebuild the modules (class name and constructor kwargs of
    every gate, nested in ``nn.ModuleDict`` / ``nn.ModuleList`` containers, e.g. a dict keyed by
    layer index holding ``{"prefill": SeerGate, "decode": SeerDecodeGate}``), the weights file's
    name, size and hash, and the caller's ``config`` (JSON-serialisable: base model name, training
    settings, ...). Nothing is pickled.

    Crash safety: the weights go to a new file (temporary name, fsync, rename), then the JSON that
    names them replaces the old JSON in one ``os.replace`` (temporary file, fsync, replace,
    directory fsync); only then are weight files the JSON no longer names deleted (also a version-1
    ``gates.safetensors``). A crash at any point leaves the old gates or the new ones readable by
    :func:`load_gates`, never a mix, plus at most unreferenced files that the next save removes.
    One writer per directory at a time.

    Args:
        path: directory (created if missing).
        gates: a gate, or containers of gates.
        config: free-form JSON-serialisable dict (no NaN/Infinity, nested at most 63 levels),
            returned by :func:`load_gates`.

    Raises:
        TypeError / ValueError for what :func:`load_gates` would refuse (other module types,
        more than 4096 gates or containers nested more than 8 deep, such a ``config``); nothing is
        written then.

    Example::

        >>> gates = nn.ModuleDict({"0": nn.ModuleDict({"prefill": SeerGate(4, 2, 32)})})
        >>> save_gates("out/gates", gates, {"base_model": "tiny-llama"})
        >>> loaded, config = load_gates("out/gates")
    """
    from safetensors.torch import save

    if not isinstance(gates, nn.Module):
        raise TypeError(f"gates must be an nn.Module, got {type(gates).__name__}")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    tree = _describe(gates, "")
    names = [n for n, m in gates.named_modules(remove_duplicate=False) if type(m) in _gate_classes().values()]
    if len(names) > _MAX_GATES or max((n.count(".") + 1 for n in names if n), default=0) > _MAX_TREE_DEPTH:
        raise ValueError(f"save_gates stores at most {_MAX_GATES} gates in containers nested at most "
                         f"{_MAX_TREE_DEPTH} deep (load_gates refuses more)")
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"config must be JSON-serialisable (no NaN/Infinity): {e}") from None
    if _files.json_depth(config) > _files.MAX_JSON_DEPTH - 1:
        raise ValueError(f"config nests deeper than {_files.MAX_JSON_DEPTH - 1} levels; load_gates would refuse it")
    # clone: safetensors refuses tensors that share storage (a gate reused under two names)
    state = gates.state_dict()
    tensors = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format) for name, t in state.items()}
    payload = save(tensors, metadata={"format": _FORMAT})
    digest = _files.sha256_bytes(payload)
    weights = f"gates-{digest[:16]}.safetensors"
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION,
            "weights": {"file": weights, "size": len(payload), "sha256": digest}, "modules": tree, "config": config}
    text = (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode("utf-8")
    if len(text) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{GATES_CONFIG} would be {len(text)} bytes, more than load_gates reads ({_MAX_CONFIG_BYTES})")
    path = os.fspath(path)
    _files.make_dirs(path)
    _files.atomic_write(os.path.join(path, weights), payload)  # a new name: the old JSON still names the old file
    _files.atomic_write(os.path.join(path, GATES_CONFIG), text)  # the commit point
    for name in sorted(os.listdir(path)):  # what no JSON names any more, and leftovers of crashed saves
        stale = name != weights and (_WEIGHTS_NAME.fullmatch(name) or name == GATES_WEIGHTS)
        if stale or _files.is_temp_name(name, "gates"):
            _files.remove(os.path.join(path, name))


class _MetaFactories(TorchDispatchMode):
    """Inside, every op that takes a ``device`` (the factories: empty, zeros, rand, ...) makes a
    ``meta`` tensor: modules get their shapes but no memory. Unlike ``with torch.device("meta")``
    this acts at the dispatcher, so a wrapped ``torch.empty`` cannot bypass it (torch's device
    context recognises factory functions by identity, cached at first use)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def _is_seerattention_dir(path: str) -> bool:
    from .seer_compat import SEERATTN_CONFIG, SEERATTN_WEIGHTS

    return all(os.path.isfile(os.path.join(path, f)) for f in (SEERATTN_CONFIG, SEERATTN_WEIGHTS))


def _model_dims(model_dims: Any) -> Optional[Dict[str, int]]:
    if model_dims is None:
        return None
    keys = ("num_heads", "num_kv_heads", "head_dim")
    if isinstance(model_dims, dict):
        dims = {k: model_dims.get(k) for k in keys}
    else:
        dims = {k: getattr(model_dims, k, None) for k in keys}
    for k, v in dims.items():
        _check_positive_int(f"model_dims[{k!r}]", v)
    return dims


def _weights_entry(meta: Any, path: str, cfg_file: str) -> Tuple[str, Optional[Tuple[int, str]]]:
    """Check the JSON's top level; ``(weights file, (size, sha256) or None for version 1)``."""
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise _files.CorruptFileError(cfg_file, "is not a sparse_attn gates config (no format 'sparse_attn.gates')")
    version = meta.get("version")
    if type(version) is not int or version not in (1, _FORMAT_VERSION):
        raise _files.CorruptFileError(cfg_file, f"has format version {str(version)[:20]!r}; this code reads 1 and "
                                                f"{_FORMAT_VERSION}")
    keys = {"format", "version", "modules", "config"} | ({"weights"} if version >= 2 else set())
    if set(meta) != keys:
        raise _files.CorruptFileError(cfg_file, f"top-level keys must be {sorted(keys)}, got {sorted(meta)[:10]}")
    if not isinstance(meta["config"], dict):
        raise _files.CorruptFileError(cfg_file, "'config' must be a JSON object")
    if version == 1:
        return os.path.join(path, GATES_WEIGHTS), None
    w = meta["weights"]
    if not isinstance(w, dict) or set(w) != {"file", "size", "sha256"}:
        raise _files.CorruptFileError(cfg_file, "'weights' must be an object with exactly file, size, sha256")
    name, size, digest = w["file"], w["size"], w["sha256"]
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise _files.CorruptFileError(cfg_file, "'weights.sha256' must be 64 lowercase hex digits")
    if not isinstance(name, str) or name != f"gates-{digest[:16]}.safetensors":
        raise _files.CorruptFileError(cfg_file, f"'weights.file' must be gates-<first 16 hex digits of sha256>"
                                                f".safetensors, got {str(name)[:80]!r}")
    if type(size) is not int or size < 8:
        raise _files.CorruptFileError(cfg_file, f"'weights.size' must be an int >= 8, got {str(size)[:20]!r}")
    return os.path.join(path, name), (size, digest)


def _build(node: Any, where: str, cfg_file: str, dims: Optional[Dict[str, int]], count: list, depth: int = 0
           ) -> nn.Module:
    """Rebuild the module tree of a gates JSON (call under :class:`_MetaFactories`: nothing is
    allocated); every problem is a CorruptFileError naming ``cfg_file`` and the entry."""

    def bad(msg: str) -> Exception:
        return _files.CorruptFileError(cfg_file, f"gates{where}: {msg}")

    if depth > _MAX_TREE_DEPTH:
        raise bad(f"modules nest deeper than {_MAX_TREE_DEPTH} levels")
    if not isinstance(node, dict) or not isinstance(node.get("class"), str):
        raise bad("is not a module description (an object with a 'class' string)")
    cls_name = node["class"]
    if cls_name in _CONTAINERS:
        if set(node) != {"class", "children"}:
            raise bad(f"a {cls_name} entry must have exactly 'class' and 'children', got {sorted(node)[:10]}")
        children = node["children"]
        try:
            if cls_name == "torch.nn.ModuleDict":
                if not isinstance(children, dict):
                    raise bad("'children' of a ModuleDict must be a JSON object")
                return nn.ModuleDict({k: _build(v, f"{where}.{k}", cfg_file, dims, count, depth + 1)
                                      for k, v in children.items()})
            if not isinstance(children, list):
                raise bad("'children' of a ModuleList must be a JSON list")
            return nn.ModuleList([_build(v, f"{where}.{i}", cfg_file, dims, count, depth + 1)
                                  for i, v in enumerate(children)])
        except (KeyError, TypeError) as e:  # a child name nn.Module refuses ("a.b", "", "training")
            raise bad(f"bad child name ({e})"[:300]) from None
    classes = _gate_classes()
    if cls_name not in classes:
        raise _files.CorruptFileError(cfg_file, f"unknown class {cls_name[:100]!r} at gates{where}")
    count[0] += 1
    if count[0] > _MAX_GATES:
        raise bad(f"more than {_MAX_GATES} gates")
    if set(node) != {"class", "kwargs"}:
        raise bad(f"a {cls_name} entry must have exactly 'class' and 'kwargs', got {sorted(node)[:10]}")
    kwargs = node["kwargs"]
    if not isinstance(kwargs, dict):
        raise bad("'kwargs' must be a JSON object")
    names = set(inspect.signature(classes[cls_name].__init__).parameters) - {"self"}
    legacy = classes[cls_name]._LEGACY_DEFAULTS  # kwargs newer than the file: all absent, or all present
    if legacy and set(kwargs) == names - set(legacy):
        kwargs = {**kwargs, **legacy}
    if set(kwargs) != names:
        raise bad(f"{cls_name} kwargs must be exactly {sorted(names)}; missing {sorted(names - set(kwargs))}, "
                  f"unexpected {sorted(set(kwargs) - names)[:5]}"[:400])
    try:
        if dims is not None:
            check_gate_options(kwargs, **dims, where=f"gates{where}")
        return classes[cls_name](**kwargs)
    except (TypeError, ValueError, AttributeError) as e:  # AttributeError: SeerGate(q_pooling=None)
        raise bad(str(e)[:300]) from None


def _check_tensors(gates: nn.Module, header: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], weights_file: str,
                   cfg_file: str) -> None:
    """The safetensors header must hold exactly the modules' tensors, with their shapes, in a
    floating dtype, one dtype per gate."""
    want = {name: tuple(t.shape) for name, t in gates.state_dict(keep_vars=True).items()}
    missing, unexpected = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing or unexpected:
        raise _files.CorruptFileError(weights_file, f"tensors do not match {cfg_file}: missing {missing[:4]}, "
                                                    f"unexpected {[n[:60] for n in unexpected[:4]]}")
    for name, shape in want.items():
        dtype, got = header[name]
        if got != shape:
            raise _files.CorruptFileError(weights_file, f"tensor {name!r} has shape {list(got)}, but {cfg_file} "
                                                        f"declares {list(shape)}")
        if dtype not in _GATE_DTYPES:
            raise _files.CorruptFileError(weights_file, f"tensor {name!r} has dtype {dtype}; gate weights are "
                                                        "floating point")
    classes = tuple(_gate_classes().values())
    for prefix, module in gates.named_modules():
        if isinstance(module, classes):
            dtypes = {header[f"{prefix}.{n}" if prefix else n][0] for n, _ in module.named_parameters()}
            if len(dtypes) > 1:
                raise _files.CorruptFileError(weights_file, f"gate {prefix or '(root)'!r} mixes dtypes "
                                                            f"{sorted(map(str, dtypes))}")


def load_gates(
    path: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    model_dims: Any = None,
    format: str = "auto",
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load gates saved by :func:`save_gates` (format version 2, or version 1), or a checkpoint
    directory of the SeerAttention authors: ``(gates, config)``.

    ``format``: ``"sparse_attn"`` (``gates_config.json`` + safetensors, below), ``"seerattention"``
    (``config.json`` + ``attn_gate_weights.pth``, read by
    :func:`~sparse_attn.patterns.seer_compat.load_seerattention_gates`: an ``nn.ModuleDict`` keyed
    by layer index holding ``{"prefill": SeerGate}`` or ``{"decode": SeerDecodeGate}``), or
    ``"auto"`` (default): whichever of the two the directory holds (ours if both).

    Everything in the directory is treated as untrusted: the JSON is size- and depth-bounded and
    type-checked; the modules are built on the ``meta`` device (nothing allocated) and every
    parameter's name and shape is checked against the safetensors header (read without the data);
    the weights file's size and SHA-256 are checked against the JSON (version 2); only then are the
    tensors read, keeping the saved dtype, onto ``device`` (default CPU). A damaged or inconsistent
    file is a :class:`~sparse_attn._files.CorruptFileError` (a ``ValueError``) whose message starts
    with that file's path; a missing directory or JSON is a ``FileNotFoundError``.

    Args:
        path: a directory written by :func:`save_gates` (or by the authors' training scripts).
        device: where the tensors go.
        model_dims: the model the gates are for (an object or dict with ``num_heads``,
            ``num_kv_heads``, ``head_dim``, e.g. an ``AttentionSpec``): every gate must have these,
            and sizes are bounded by them (:func:`check_gate_options`) before anything is built.
        format: ``"auto"``, ``"sparse_attn"`` or ``"seerattention"``.

    Example::

        >>> gates, config = load_gates("out/gates", device="cuda")
        >>> gates["0"]["prefill"](q, k)      # logits [B, Hq, Mq, Mk]
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(format, str) or format not in GATE_FORMATS:
        raise ValueError(f"format must be one of {GATE_FORMATS}, got {format!r}")
    path = os.fspath(path)
    cfg_file = os.path.join(path, GATES_CONFIG)
    if format == "auto":
        format = "seerattention" if not os.path.isfile(cfg_file) and _is_seerattention_dir(path) else "sparse_attn"
    if format == "seerattention":
        from .seer_compat import load_seerattention_gates

        return load_seerattention_gates(path, device=device, model_dims=model_dims)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"path must be a directory written by save_gates (or a SeerAttention checkpoint "
                                f"directory with config.json and attn_gate_weights.pth); missing {cfg_file}")
    device = torch.device("cpu" if device is None else device)
    dims = _model_dims(model_dims)
    meta = _files.read_json(cfg_file, max_bytes=_MAX_CONFIG_BYTES)
    weights_file, expected = _weights_entry(meta, path, cfg_file)
    if not os.path.isfile(weights_file):
        if expected is None:
            raise FileNotFoundError(f"path must be a directory written by save_gates; missing {weights_file}")
        raise _files.CorruptFileError(weights_file, f"is missing (named by {cfg_file})")
    size = os.path.getsize(weights_file)
    if expected is not None and size != expected[0]:
        raise _files.CorruptFileError(weights_file, f"is {size} bytes, {cfg_file} says {expected[0]}")
    header = _files.safetensors_header(weights_file)
    with _MetaFactories():
        gates = _build(meta["modules"], "", cfg_file, dims, [0])
    _check_tensors(gates, header, weights_file, cfg_file)
    data = _files.read_bytes(weights_file, max_bytes=size)
    if expected is not None and _files.sha256_bytes(data) != expected[1]:
        raise _files.CorruptFileError(weights_file, f"content does not match the SHA-256 in {cfg_file}")
    state = _files.load_safetensors(data, weights_file)
    got = {name: (t.dtype, tuple(t.shape)) for name, t in state.items()}
    if got != header:  # the file changed under us
        raise _files.CorruptFileError(weights_file, "changed while it was read")
    gates.load_state_dict(state, strict=True, assign=True)
    return gates.to(device), meta["config"]

