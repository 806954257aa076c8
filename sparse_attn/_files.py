"""Crash-safe writes, and bounded reads of files that may be damaged or hostile.

Writes. Every change the package makes to the file system for gates and training checkpoints goes
through the few functions in :data:`MUTATIONS` (and only through them), so that

* each is durable when it returns: file data is fsynced before a rename publishes it, and the
  directory is fsynced after a rename, so a power cut cannot publish a name before its content;
* tests can inject a crash before any one of them (they replace these module attributes; the
  callers look them up at call time, ``_files.replace(...)``).

:func:`atomic_write` is the one-file primitive: write a temporary file next to the target, fsync
it, ``os.replace`` it onto the target, fsync the directory. A crash leaves the old file or the new
one, plus at most a temporary file (``.<name>.<random>.tmp``) that the next save of the same
kind removes.

Reads. :func:`read_json`, :func:`safetensors_header` and :func:`load_safetensors` parse files
that may be truncated, garbled, deeply nested or crafted; every problem is a
:class:`CorruptFileError` (a ``ValueError``) whose message starts with the file's path. Sizes are
bounded before anything is read or allocated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import struct
from typing import Any, Dict, Tuple, Union

import torch

__all__ = [
    "CorruptFileError",
    "MUTATIONS",
    "MAX_JSON_DEPTH",
    "atomic_write",
    "write_durable",
    "replace",
    "rename",
    "fsync_dir",
    "remove",
    "rmtree",
    "make_dirs",
    "make_temp_dir",
    "is_temp_name",
    "sha256_bytes",
    "read_bytes",
    "read_json",
    "parse_json",
    "json_depth",
    "safetensors_header",
    "load_safetensors",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The functions that change the file system (a test injecting crashes wraps exactly these).
MUTATIONS = ("make_dirs", "make_temp_dir", "write_durable", "replace", "rename", "fsync_dir", "remove", "rmtree")
#: Deepest JSON nesting accepted anywhere (our files nest a few levels; ``json`` itself would
#: recurse ~1000 levels and then raise RecursionError).
MAX_JSON_DEPTH = 64
#: Largest safetensors header read (the safetensors library's own limit).
MAX_SAFETENSORS_HEADER = 100 << 20
_TEMP_SUFFIX = ".tmp"


class CorruptFileError(ValueError):
    """A file that is missing pieces, malformed, or inconsistent with what refers to it.

    ``str(err)`` is ``"<path>: <what is wrong>"``; ``err.path`` is the path.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------------------------------
# Writes (each one durable; see MUTATIONS)
# --------------------------------------------------------------------------------------------------
def make_dirs(path: PathLike) -> None:
    """``mkdir -p path`` (the new entries are not fsynced: callers fsync what they publish)."""
    os.makedirs(path, exist_ok=True)


def make_temp_dir(parent: PathLike, prefix: str) -> str:
    """A new, empty directory ``parent/<prefix><random>`` (permissions from the umask, unlike
    ``tempfile.mkdtemp``'s 0700, since it is renamed into place); returns its path."""
    path = os.path.join(parent, prefix + secrets.token_hex(6))
    os.mkdir(path)
    return path


def write_durable(path: PathLike, data: bytes) -> None:
    """Create (or truncate) ``path``, write ``data``, fsync. Not atomic by itself: write to a
    name nobody reads yet (a temporary file, a directory not yet renamed into place)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace(src: PathLike, dst: PathLike) -> None:
    """``os.replace``: atomically make ``dst`` name what ``src`` names (files)."""
    os.replace(src, dst)


def rename(src: PathLike, dst: PathLike) -> None:
    """``os.rename`` (used for directories; ``dst`` must not exist)."""
    os.rename(src, dst)


def fsync_dir(path: PathLike) -> None:
    """Make the directory's entries (creations, renames) durable. A no-op where directories
    cannot be opened (Windows)."""
    if os.name == "nt":  # pragma: no cover - no directory fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: PathLike) -> None:
    """Delete a file (missing is fine)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def rmtree(path: PathLike) -> None:
    """Delete a directory tree (missing is fine)."""
    if os.path.lexists(path):
        shutil.rmtree(path)


def is_temp_name(name: str, stem: str = "") -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_write` makes for a target starting
    with ``stem`` (``.<stem>...<random>.tmp``)."""
    return name.startswith("." + stem) and name.endswith(_TEMP_SUFFIX)


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` so that a crash at any point leaves the old content
    or the new, never a mix: temporary file in the same directory, fsync, ``os.replace``, fsync of
    the directory. A crash leaves at most the temporary file behind (see :func:`is_temp_name`)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}")
    write_durable(tmp, data)
    replace(tmp, path)
    fsync_dir(folder or ".")


# --------------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: PathLike, max_bytes: int) -> bytes:
    """The file's content; a :class:`CorruptFileError` if it is larger than ``max_bytes``."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise CorruptFileError(path, f"is {size} bytes, more than the {max_bytes} this file may have")
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read
        raise CorruptFileError(path, f"is more than the {max_bytes} bytes this file may have")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            d += 1
            deepest = max(deepest, d)
            stack.extend((c, d) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(data: bytes, path: PathLike, *, max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False) -> Any:
    """Parse UTF-8 JSON ``data`` read from ``path``; any problem is a :class:`CorruptFileError`.

    ``NaN`` / ``Infinity`` are refused unless ``allow_nan``; nesting deeper than ``max_depth`` is
    refused (also what ``json`` could not parse at all: it raises RecursionError near 1000).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(path, f"is not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise CorruptFileError(path, f"is not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise CorruptFileError(path, f"JSON is nested deeper than {max_depth} levels") from None
    except ValueError as e:  # NaN/Infinity, integers longer than Python's digit limit
        raise CorruptFileError(path, f"is not valid JSON ({e})") from None
    if json_depth(value) > max_depth:
        raise CorruptFileError(path, f"JSON is nested deeper than {max_depth} levels")
    return value


def read_json(path: PathLike, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False) -> Any:
    """:func:`read_bytes` + :func:`parse_json`."""
    return parse_json(read_bytes(path, max_bytes), path, max_depth=max_depth, allow_nan=allow_nan)


_ST_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_header(path: PathLike, *, max_entries: int = 1 << 16) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors file's header, read without the data.

    Checks the whole layout against the file's size: an 8-byte little-endian header length that
    fits the file, a JSON header (a dict; ``__metadata__`` a dict of strings), every tensor with a
    known dtype, a shape of non-negative ints and ``data_offsets`` whose span is exactly
    ``numel * itemsize``, the spans tiling the data area with no gap, overlap or tail. Any problem
    is a :class:`CorruptFileError`.
    """
    size = os.path.getsize(path)
    if size < 8:
        raise CorruptFileError(path, f"is {size} bytes, too short for a safetensors file (8-byte header length)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CorruptFileError(path, f"declares a {n}-byte safetensors header, but the file is {size} bytes")
        raw = fh.read(n)
    header = parse_json(raw, path, max_depth=4)
    if not isinstance(header, dict):
        raise CorruptFileError(path, "safetensors header is not a JSON object")
    if len(header) > max_entries + 1:
        raise CorruptFileError(path, f"safetensors header lists {len(header)} entries (at most {max_entries})")
    data_len = size - 8 - n
    out: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CorruptFileError(path, "safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CorruptFileError(path, f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise CorruptFileError(path, f"tensor {name!r}: unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CorruptFileError(path, f"tensor {name!r}: shape must be a list of at most 8 non-negative ints, "
                                         f"got {shape!r}"[:300])
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CorruptFileError(path, f"tensor {name!r}: data_offsets {offsets!r} do not fit the "
                                         f"{data_len}-byte data area"[:300])
        nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CorruptFileError(path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes of data for shape "
                                         f"{shape} {dtype} ({nbytes} bytes)")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (_ST_DTYPES[dtype], tuple(shape))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CorruptFileError(path, f"tensor {name!r}: data starts at byte {begin}, expected {end} "
                                         "(tensors' data must tile the data area)")
        end = stop
    if end != data_len:
        raise CorruptFileError(path, f"tensors' data end at byte {end} of a {data_len}-byte data area")
    return out


def load_safetensors(data: bytes, path: PathLike) -> Dict[str, torch.Tensor]:
    """``safetensors.torch.load(data)`` (CPU tensors) with its errors as :class:`CorruptFileError`
    naming ``path``. Check the header first (:func:`safetensors_header`) for clear messages."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # the library's own SafetensorError and friends, which name no file
        raise CorruptFileError(path, f"unreadable safetensors data ({type(e).__name__}: {e})"[:500]) from None
