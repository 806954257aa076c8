"""Adapters that put sparse attention into other frameworks.

* :mod:`sparse_attn.integrations.transformers` -- Hugging Face transformers (Llama-style models):
  ``apply_sparse_attention(model, method=...)`` and ``register()``.

Each adapter imports its framework only when imported itself, so ``import sparse_attn`` never
needs transformers.
"""
