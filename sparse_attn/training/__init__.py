"""Trainers for the learned parts of the patterns (SeerAttention gates so far).

>>> from sparse_attn.training import train_gates
"""

from .data import ByteTokenizer, PackedSequences, read_documents, stdlib_corpus
from .trainer import TrainConfig, cosine_schedule, train_gates

__all__ = ["train_gates", "TrainConfig", "cosine_schedule", "ByteTokenizer", "PackedSequences",
           "read_documents", "stdlib_corpus"]
