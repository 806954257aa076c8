"""A transformers ``Cache`` that keeps, for S2 layers, only each KV head's shard.

:class:`S2Cache` is what the drop-in's ``generate()`` uses for ``method="s2"`` (see
:func:`~sparse_attn.integrations.transformers.apply_sparse_attention`): every layer whose pattern
can (:meth:`~sparse_attn.modules.S2Pattern.supports_s2_cache`) stores its keys and values in an
:class:`~sparse_attn.patterns.S2KVCache` -- per KV head the blocks on its stride and its sliding
window, nothing else -- so the S2 memory saving is real during generation; other layers keep
transformers' ``DynamicLayer``.

How a layer answers transformers' per-layer ``update(key_states, value_states)`` contract (it
returns the keys and values the attention function is given):

* prefill (the cache is empty): the prompt's keys and values are stored (shards only) and
  returned as they are, so the attention runs the S2 prefill over the whole prompt (a transient,
  as any prefill's activations);
* decode (one new token): the token is appended (blocks that leave every head's reach are
  dropped) and the layer returns *placeholders* of the logical shape ``[B, Hkv, n, D]`` that hold
  no data (an expanded NaN: any attention function but ``"sparse_attn"`` would produce NaN, never a
  silently wrong number); ``"sparse_attn"``'s attention function recognises them
  (:func:`s2_cache_layer`) and decodes from the shards with :meth:`S2KVCache.attend`, i.e. on
  :func:`~sparse_attn.sparse_decode` with the per-head block lists of the compacted store.

Limits (each raises, naming the fix): several new tokens on a non-empty cache (chunked prefill,
speculative decoding), a padding mask (left-padded batches: ``generate()`` keeps the full
``DynamicCache`` for them by itself), rolling back (``crop``), offloading. Beam search works
(``reorder_cache`` gathers the batch rows: every row shares one slot table).

Example::

    >>> model = apply_sparse_attention(model, method="s2", block_size=64, local_blocks=16, vert_stride=8)
    >>> out = model.generate(ids, max_new_tokens=100, return_dict_in_generate=True)   # uses S2Cache
    >>> out.past_key_values.memory_bytes() / out.past_key_values.full_cache_bytes()   # < 1
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from ..patterns.s2_cache import S2KVCache

__all__ = ["S2Cache", "S2CacheLayer", "s2_cache_layer", "s2_cache_patterns"]

_MARK = "_sparse_attn_s2_cache"  # attribute on the tensors update() returns: (layer, phase)
_MIN_CAPACITY = 256  # tokens; storage grows geometrically from here when no length was given


def s2_cache_layer(key: Tensor) -> Optional[Tuple["S2CacheLayer", str]]:
    """``(layer, phase)`` if ``key`` came from an :class:`S2CacheLayer`'s ``update`` (phase
    ``"prefill"``: the real prompt keys; ``"decode"``: a placeholder, decode from ``layer.s2``),
    else None."""
    return getattr(key, _MARK, None)


def _marked(t: Tensor, layer: "S2CacheLayer", phase: str) -> Tensor:
    out = t.view_as(t)  # a new tensor object: the mark never sticks to the caller's tensor
    setattr(out, _MARK, (layer, phase))
    return out


class S2CacheLayer(CacheLayerMixin):
    """One layer of :class:`S2Cache`: an :class:`~sparse_attn.patterns.S2KVCache` behind
    transformers' cache-layer interface (see the module docstring for what ``update`` returns).

    Args:
        pattern: the layer's :class:`~sparse_attn.modules.S2Pattern` (its ``s2_config`` and
            ``num_query_heads`` set the pattern; ``backend`` the decode backend).
        max_cache_len: capacity in tokens, allocated at the first update; None: start at the
            prompt's length (at least 256) and grow geometrically (one copy of the stored shards
            each time).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, pattern: nn.Module, max_cache_len: Optional[int] = None) -> None:
        super().__init__()
        if not getattr(pattern, "supports_s2_cache", lambda: False)():
            raise ValueError("S2CacheLayer needs an S2Pattern over the KV heads with sparse decode and s2_cache=True "
                             "(see S2Pattern.supports_s2_cache)")
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a positive int or None, got {max_cache_len!r}")
        self.config = pattern.s2_config
        self.num_query_heads = int(pattern.num_query_heads)
        self.backend = pattern.backend
        self.max_cache_len = max_cache_len
        self.s2: Optional[S2KVCache] = None

    def __repr__(self) -> str:
        return f"S2CacheLayer({self.s2!r})"

    # -- the CacheLayerMixin interface ------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, hkv, t, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        capacity = self.max_cache_len or max(_MIN_CAPACITY, t)
        self.s2 = S2KVCache(b, hkv, d, max_seq_len=max(capacity, t, 1), num_query_heads=self.num_query_heads,
                            dtype=key_states.dtype, device=key_states.device, config=self.config)
        self._nan = torch.full((), float("nan"), dtype=key_states.dtype, device=key_states.device)
        self.is_initialized = True

    def _fits(self, key_states: Tensor) -> bool:
        s2 = self.s2
        b, hkv, _, d = key_states.shape
        return ((s2.batch, s2.num_kv_heads, s2.head_dim, s2.dtype, s2.device)
                == (b, hkv, d, key_states.dtype, key_states.device))

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        if not self.is_initialized or (self.s2.seq_len == 0 and not self._fits(key_states)):
            self.lazy_initialization(key_states, value_states)  # first use, or a reset cache reused for other shapes
        s2, t = self.s2, key_states.shape[-2]
        n0 = s2.seq_len
        if n0 and t != 1:
            raise ValueError(f"S2Cache decodes one token at a time (it keeps only what the newest token reads); got "
                             f"{t} new tokens on a cache of {n0}. Chunked prefill and speculative decoding need a "
                             "full cache: pass past_key_values=DynamicCache()")
        if n0 + t > s2.max_seq_len:
            s2.reserve(max(n0 + t, 2 * s2.max_seq_len))
        s2.append(key_states, value_states)
        if not n0:  # prefill: the attention runs over the whole prompt
            return _marked(key_states, self, "prefill"), _marked(value_states, self, "prefill")
        b, hkv, _, d = key_states.shape
        placeholder = self._nan.expand(b, hkv, n0 + t, d)  # the logical shape, no data
        return _marked(placeholder, self, "decode"), _marked(placeholder, self, "decode")

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.s2 is None else self.s2.seq_len

    def get_max_length(self) -> int:
        return -1  # grows on demand

    def reset(self) -> None:
        if self.s2 is not None:
            self.s2.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length():
            self.s2.select_batch(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.get_seq_length():
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self.s2.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            self.s2.repeat_batch(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("S2Cache cannot roll back: the blocks no head reads any more are gone (use a "
                                      "DynamicCache for assisted / speculative decoding)")

    def offload(self) -> None:
        raise NotImplementedError("S2Cache does not offload (it already keeps only each head's shard)")

    def prefetch(self) -> None:
        pass

    # -- memory -----------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of the K/V storage allocated (0 before the first update)."""
        return 0 if self.s2 is None else self.s2.memory_bytes()

    def full_cache_bytes(self) -> int:
        """Bytes a full K and V cache of the tokens stored so far would take."""
        s2 = self.s2
        if s2 is None:
            return 0
        return 2 * s2.batch * s2.num_kv_heads * s2.seq_len * s2.head_dim * s2._k_d.element_size()


def s2_cache_patterns(model: nn.Module) -> Dict[int, nn.Module]:
    """``{layer_idx: pattern}`` for the attention layers whose pattern supports an S2 cache."""
    found = {}
    for m in model.modules():
        pattern = getattr(m, "sparse_pattern", None)
        if pattern is not None and hasattr(m, "layer_idx") and getattr(pattern, "supports_s2_cache", None):
            if pattern.supports_s2_cache():
                found[int(m.layer_idx)] = pattern
    return found


def _dynamic_layer_bytes(layer: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, Tensor))


class S2Cache(Cache):
    """A transformers ``Cache`` for a model patched with ``method="s2"``: S2 layers keep only each
    KV head's shard (:class:`S2CacheLayer`), the others transformers' ``DynamicLayer``.
    ``generate()`` builds one by itself (unless the batch is padded, a cache is passed, or
    ``cache_implementation`` / chunked prefill / assisted decoding is asked for); pass one as
    ``past_key_values`` to keep it.

    Args:
        model: the patched model (its attention layers carry ``sparse_pattern``).
        max_cache_len: capacity in tokens of each S2 layer (prompt + generated); None: grow on demand.

    Example::

        >>> cache = S2Cache(model, max_cache_len=4096)
        >>> out = model.generate(ids, max_new_tokens=200, past_key_values=cache)
        >>> cache.memory_bytes() < cache.full_cache_bytes()
        True
    """

    def __init__(self, model: nn.Module, max_cache_len: Optional[int] = None) -> None:
        patterns = s2_cache_patterns(model)
        if not patterns:
            raise ValueError("S2Cache needs a model patched with method='s2' over the KV heads (layout_heads='kv'), "
                             "decode='sparse' and s2_cache=True in at least one layer")
        config = model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        layers: List[Any] = list(DynamicCache(config=config).layers)
        if not layers:  # a config without per-layer types: one dynamic layer per attention layer
            count = max(int(getattr(config, "num_hidden_layers", 0)), max(patterns) + 1)
            layers = [DynamicLayer() for _ in range(count)]
        if max(patterns) >= len(layers):
            raise ValueError(f"attention layer {max(patterns)} has no cache layer (the config lists {len(layers)})")
        for idx, pattern in patterns.items():
            layers[idx] = S2CacheLayer(pattern, max_cache_len)
        super().__init__(layers=layers)

    def memory_bytes(self) -> int:
        """Bytes of K/V storage held by every layer (S2 layers: their shards' allocation)."""
        return sum(layer.memory_bytes() if isinstance(layer, S2CacheLayer) else _dynamic_layer_bytes(layer)
                   for layer in self.layers)

    def full_cache_bytes(self) -> int:
        """Bytes a full cache of the same tokens would hold (every layer at its stored length)."""
        return sum(layer.full_cache_bytes() if isinstance(layer, S2CacheLayer) else _dynamic_layer_bytes(layer)
                   for layer in self.layers)
