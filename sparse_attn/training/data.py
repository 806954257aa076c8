"""Training data for the gate trainer: text files -> tokens -> packed fixed-length sequences.

Sequence packing: documents are tokenised, joined with a separator token and cut into
``seq_len`` windows, so no compute is spent on padding (the gate learns attention
structure, which a document boundary inside a window does not spoil: it is what the frozen
model sees too).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import torch

__all__ = ["ByteTokenizer", "read_documents", "tokenize_documents", "PackedSequences", "stdlib_corpus"]

TextSource = Union[str, os.PathLike, Sequence[str]]


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255), separator 256: needs no vocabulary file.

    Used when a model directory ships no tokenizer, and by the tiny test models.

    >>> ByteTokenizer().encode("hi")
    [104, 105]
    """

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _files(path: str) -> List[str]:
    if os.path.isdir(path):
        out = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            out += [os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".jsonl", ".json", ".py", ".md"))]
        return out
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data path {path!r} is neither a file nor a directory")
    return [path]


def read_documents(source: TextSource, *, text_field: str = "text", max_chars: Optional[int] = None) -> Iterator[str]:
    """Yield documents from a file, a folder (recursively, sorted) or a list of strings.

    ``.jsonl`` / ``.json`` lines are JSON objects whose ``text_field`` is the document; any
    other file is one document. Stops after ``max_chars`` characters in total.
    """
    if isinstance(source, (list, tuple)):
        docs: Iterable[str] = source
    else:
        docs = _iter_files(_files(os.fspath(source)), text_field)
    total = 0
    for doc in docs:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be str, got {type(doc).__name__}")
        if max_chars is not None and total + len(doc) > max_chars:
            doc = doc[: max_chars - total]
        if doc:
            yield doc
        total += len(doc)
        if max_chars is not None and total >= max_chars:
            return


def _iter_files(files: List[str], text_field: str) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            if path.endswith((".jsonl", ".json")):
                for n, line in enumerate(fh, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{os.path.basename(path)} line {n} is not JSON: {e}") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        raise ValueError(f"{os.path.basename(path)} line {n} has no {text_field!r} field")
                    yield str(obj[text_field])
            else:
                yield fh.read()


def tokenize_documents(docs: Iterable[str], encode: Callable[[str], List[int]], eos_id: Optional[int]) -> torch.Tensor:
    """All documents as one int64 token stream, each followed by ``eos_id`` (if given)."""
    ids: List[int] = []
    for doc in docs:
        ids.extend(encode(doc))
        if eos_id is not None:
            ids.append(int(eos_id))
    return torch.tensor(ids, dtype=torch.long)


class PackedSequences:
    """A token stream cut into ``[batch_size, seq_len]`` batches, reshuffled each epoch.

    Args:
        tokens: ``[N]`` int64.
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        seed: shuffling seed (the order is a pure function of seed and epoch, so resuming
            from a checkpoint continues with the same batches).

    ``len(self)`` sequences; ``batch(step)`` gives batch number ``step`` (wrapping around).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, *, seed: int = 0) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        n = tokens.numel() // seq_len
        if n < batch_size:
            raise ValueError(f"{tokens.numel()} tokens make {n} sequences of {seq_len}, fewer than one batch "
                             f"of {batch_size}: give more data or a shorter seq_len")
        self.seqs = tokens[: n * seq_len].view(n, seq_len)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.batches_per_epoch = n // batch_size

    def __len__(self) -> int:
        return self.seqs.shape[0]

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return self.seqs[order[i * self.batch_size: (i + 1) * self.batch_size]]


def stdlib_corpus(max_chars: int = 2_000_000) -> List[str]:
    """Python standard library sources: a real text corpus every machine has (no download)."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib"))
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    text = fh.read()
            except (UnicodeDecodeError, OSError):
                continue
            docs.append(text)
            total += len(text)
            if total >= max_chars:
                return docs
    return docs
