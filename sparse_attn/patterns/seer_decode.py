"""The decode gate: SeerAttention's block gate for one query token, with a cache of compressed K.

SeerAttention scores query *blocks*, so on its own it only serves prefill. :class:`SeerDecodeGate`
scores key blocks for each query *token*, once per GQA group (every query head of a group reads
the same key blocks, so the decode kernel loads each selected K/V block once), and keeps the
pooled + projected + rotated K of every completed block in a :class:`SeerDecodeCache` that grows
one entry per ``block_size`` generated tokens: a decode step costs ``O(Mk * hidden)``, not
``O(Sk * D)``. The same model can then run sparse prefill (:class:`~sparse_attn.patterns.SeerGate`)
and sparse decode.

Its training target is ``attention_block_map(q, k, pool_queries=False, reduce_gqa="max")``
(``[B, Hkv, Sq, Mk]``: per token, the largest probability of each key block over the group's heads,
each row normalised), with :func:`~sparse_attn.patterns.seer.distillation_loss`. For a gate with
``own_block="excluded"`` (SeerAttention-R's form) the target is the authors':
``exclude_own_block=True`` keeps, for the token at key index ``p``, only the key blocks
``c < p // block_size`` and renormalises the row over them. The target follows the gate's form (a
target with mass on a block the gate never scores would make the KL infinite).

Positions, masking and RoPE follow :mod:`sparse_attn.patterns.seer`. Choices specific to the
decode gate (see :class:`SeerDecodeGate` for the options):

* Query feature: by default the token's q of *all* heads of the GQA group, concatenated (``group
  * D`` values; the same number of weights per layer as the prefill gate's per-head projections),
  projected per KV head to ``hidden_size`` -- the authors' ``Qproj``. Concatenation keeps what
  distinguishes the heads; a mean would not.
* Strictly causal per token. Default (``own_block="pooled"``, ours): key block ``c`` is scored for
  the token at key index ``p`` iff ``c * b <= p``, and the token's own (diagonal) block is pooled
  over its keys *up to and including p*, never over later keys. The default is kept so that gates
  trained before stay valid; ``own_block="excluded"`` (the authors') scores only ``c < p // b``,
  which is cheaper per step and spends no capacity on a block the sparse decode always computes.
  Either way a row of :meth:`SeerDecodeGate.forward` on a whole sequence (what training sees)
  equals the scores :meth:`SeerDecodeGate.step` gives when that token is generated: no
  train/inference mismatch, no look-ahead. (The authors' inference code rotates a block that
  completes during decode at the completing token's position instead of the block's start used in
  training; we keep the training positions.)

Sparse decode. :meth:`SeerDecodeGate.select` turns a step's scores into the block lists of
:func:`sparse_attn.sparse_decode` (``kv_num [B, Hkv]``, ``kv_idx [B, Hkv, Mk]``, ascending, on the
device, no host synchronisation), and :meth:`SeerDecodeGate.attend` runs a whole decode step: score,
select, then the decode op over the KV cache, which reads only the selected blocks and the token's
own block, once per GQA group -- the gate's sparsity becomes fewer bytes read.

Example::

    >>> gate = SeerDecodeGate(num_heads=8, num_kv_heads=2, head_dim=64, block_size=64)
    >>> cache = gate.new_cache()
    >>> prompt_q, prompt_k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 200, 64)
    >>> gate.step(prompt_q, prompt_k, cache).shape            # scores for the prompt's last token
    torch.Size([1, 2, 1, 4])
    >>> logits = gate.step(torch.randn(1, 8, 1, 64), torch.randn(1, 2, 1, 64), cache)   # next token
    >>> kv_num, kv_idx = gate.select(logits, topk=2)          # sparse_decode(..., kv_blocks=(kv_num, kv_idx))
    >>> kv_num.shape, kv_idx.shape
    (torch.Size([1, 2]), torch.Size([1, 2, 4]))
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..layout import ceil_div
from .seer import (
    _BlockGate,
    _check_choice,
    _check_common_kwargs,
    _check_qk,
    _pool_blocks,
    _project,
    _query_positions,
    _rms_norm,
)

__all__ = ["SeerDecodeGate", "SeerDecodeCache", "QUERY_FORMS", "OWN_BLOCK"]


def _prefix_pool(k: torch.Tensor, block_size: int, modes: Sequence[str], num_tokens: int) -> torch.Tensor:
    """For each of the last ``num_tokens`` key indices ``p = Sk - num_tokens .. Sk - 1``, pool
    ``k [B, H, Sk, D]`` over ``[floor(p / b) * b, p]`` (the token's block up to itself; a negative
    ``p`` gets key 0's features, for the caller to mask). Returns float32
    ``[B, H, num_tokens, D * len(modes)]``. Only the blocks holding those keys are scanned, and
    everything is decided from Python ints (no host synchronisation)."""
    B, H, Sk, D = k.shape
    first = max(Sk - num_tokens, 0) // block_size * block_size
    ks = k[:, :, first:]
    n_blocks = ceil_div(Sk - first, block_size)
    pad = n_blocks * block_size - (Sk - first)
    if pad:  # trailing padding never reaches a prefix that ends on a real key
        ks = torch.nn.functional.pad(ks, (0, 0, 0, pad))
    kb = ks.reshape(B, H, n_blocks, block_size, D)
    local = (torch.arange(Sk - num_tokens, Sk, device=k.device) - first).clamp(min=0)
    feats = []
    for mode in modes:
        if mode == "avg":
            count = torch.arange(1, block_size + 1, device=k.device, dtype=torch.float32)[:, None]
            f = kb.cumsum(dim=3, dtype=torch.float32) / count
        elif mode == "max":
            f = kb.cummax(dim=3).values
        else:
            f = kb.cummin(dim=3).values
        feats.append(f.reshape(B, H, n_blocks * block_size, D).index_select(2, local).float())
    return torch.cat(feats, dim=-1)


class SeerDecodeCache:
    """Compressed keys of one layer for :meth:`SeerDecodeGate.step` (make it with ``gate.new_cache()``).

    Attributes:
        k_blocks: float32 ``[B, Hkv, Mc, hidden]``, pooled + projected + RoPE'd K of the ``Mc``
            completed blocks (None before the first block completes).
        partial: ``[B, Hkv, n, D]`` raw keys of the current incomplete block, ``0 < n < block_size``
            (None when the last block is complete).
        length: number of keys appended so far.
        offset: absolute position of key 0 (set by the first append; positions then advance by one
            per key).
    """

    def __init__(self) -> None:
        self.k_blocks: Optional[torch.Tensor] = None
        self.partial: Optional[torch.Tensor] = None
        self.length: int = 0
        self.offset: Optional[int] = None

    @property
    def num_blocks(self) -> int:
        """Number of completed (compressed) blocks."""
        return 0 if self.k_blocks is None else self.k_blocks.shape[2]

    def reset(self) -> None:
        """Forget everything (start a new sequence)."""
        self.__init__()

    def __repr__(self) -> str:
        n = 0 if self.partial is None else self.partial.shape[2]
        return f"SeerDecodeCache(length={self.length}, blocks={self.num_blocks}, partial={n}, offset={self.offset})"


#: query forms of :class:`SeerDecodeGate` (the authors' names: Qproj, Qavgproj, Qavg, Qorig)
QUERY_FORMS = ("proj", "avg_proj", "avg", "orig")
OWN_BLOCK = ("pooled", "excluded")


class SeerDecodeGate(_BlockGate):
    """Block gate for decode: one score row per query token, shared by each GQA group.

    ``forward(q, k)`` gives ``logits [B, Hkv, Sq, Mk]`` with
    ``logits[b, g, t, c] = qg_g[t] . k_g[c] / sqrt(hidden_size)``, where ``k_g[c]`` is key block
    ``c`` of KV head ``g`` pooled with each of ``k_pooling``, projected (``k_weight [Hkv,
    D * len(k_pooling), hidden]``), optionally RMS-normalised (``qk_norm``) and rotated at the
    block's start position, and ``qg_g[t]`` the token's query feature for group ``g`` (``query``):

    * ``"proj"`` (default; the authors' ``Qproj``): the queries of all ``G = Hq // Hkv`` heads of the
      group, concatenated (head-major, ``G * D`` values), projected per KV head
      (``q_weight [Hkv, G * D, hidden]``). Keeps what distinguishes the heads; a mean would not.
    * ``"avg_proj"`` (``Qavgproj``): the group's mean query, projected (``q_weight [Hkv, D, hidden]``).
    * ``"avg"`` (``Qavg``): the group's mean query itself (``hidden_size == head_dim``).
    * ``"orig"`` (``Qorig``): every head's query itself (``hidden_size == head_dim``), the scores
      averaged over the group's heads (with ``qk_norm`` each head is normalised first).

    then RMS-normalised (``qk_norm``) and rotated at the token's position.

    Which key blocks a row scores (``own_block``; the token at key index ``p = t + Sk - Sq`` lies in
    block ``p // b``):

    * ``"pooled"`` (ours, the default): ``c <= p // b``; the token's own block is pooled over its
      keys up to and including ``p`` only. Example, ``b = 4``, ``Sq = 3``, ``Sk = 9`` (``p = 6, 7, 8``)::

          t\\c 0 1 2
          0   1 1 0
          1   1 1 0
          2   1 1 1

    * ``"excluded"`` (SeerAttention-R): ``c < p // b``. The own block is never scored (the sparse
      decode always computes it), a token of block 0 scores nothing (a row of ``-inf``), and a
      decode step needs only the cache of completed blocks. The distillation target drops the own
      block too (``attention_block_map(..., exclude_own_block=True)``).

    ``-inf`` elsewhere. Either way no row depends on a later key, so a row of ``forward`` on a whole
    sequence (what training sees) equals what :meth:`step` gives when that token is generated.

    ``step`` does the same one token at a time from a :class:`SeerDecodeCache`.

    Args:
        num_heads, num_kv_heads, head_dim: the attention layer's ``Hq``, ``Hkv``, ``D``.
        block_size, hidden_size, k_pooling, use_rope, rope_theta, bias, rope_positions, rope_scaling: as for
            :class:`~sparse_attn.patterns.SeerGate` (``rope_positions="token"``: the query at its
            token position, key blocks at their first token's, as the authors' decode gate).
        query: ``"proj"``, ``"avg_proj"``, ``"avg"`` or ``"orig"`` (above).
        qk_norm: RMSNorm (eps 1e-6, a learned ``[hidden]`` weight each: ``q_norm_weight``,
            ``k_norm_weight``) on the projected query and key features, before RoPE.
        own_block: ``"pooled"`` or ``"excluded"`` (above).

    Example::

        >>> gate = SeerDecodeGate(4, 2, 16, block_size=4, hidden_size=16)
        >>> gate(torch.randn(1, 4, 3, 16), torch.randn(1, 2, 9, 16)).shape
        torch.Size([1, 2, 3, 3])
    """

    _LEGACY_DEFAULTS = {"query": "proj", "bias": True, "qk_norm": False, "rope_positions": "block",
                        "rope_scaling": None, "own_block": "pooled"}

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 64,
        hidden_size: int = 128,
        k_pooling: Sequence[str] = ("max", "min", "avg"),
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        query: str = "proj",
        bias: bool = True,
        qk_norm: bool = False,
        rope_positions: str = "block",
        rope_scaling: Optional[Dict[str, Any]] = None,
        own_block: str = "pooled",
    ) -> None:
        _check_common_kwargs(num_heads, num_kv_heads, head_dim, block_size, hidden_size, use_rope, rope_theta)
        _check_choice("query", query, QUERY_FORMS)
        _check_choice("own_block", own_block, OWN_BLOCK)
        if query in ("avg", "orig") and hidden_size != head_dim:
            raise ValueError(f"query={query!r} uses the queries without a projection, so hidden_size must equal "
                             f"head_dim={head_dim}, got {hidden_size}")
        group = num_heads // num_kv_heads
        q_shape = {"proj": (num_kv_heads, group * head_dim), "avg_proj": (num_kv_heads, head_dim)}.get(query)
        super().__init__(num_heads, num_kv_heads, head_dim, block_size, hidden_size, k_pooling, use_rope,
                         rope_theta, q_shape=q_shape, k_heads=num_kv_heads, bias=bias,
                         rope_positions=rope_positions, qk_norm=qk_norm, rope_scaling=rope_scaling)
        self.query = query
        self.own_block = own_block

    def _extra_config(self) -> Dict[str, Any]:
        return {"query": self.query, "qk_norm": self.qk_norm, "own_block": self.own_block}

    # -- pieces shared by forward and step ----------------------------------------------------
    def _query_features(self, q: torch.Tensor) -> torch.Tensor:
        """``q [B, Hq, S, D]`` -> float32 ``[B, Hkv, S, hidden]``, before RoPE (``query`` form,
        ``qk_norm``). For ``"orig"`` the group's normalised head features are averaged: RoPE and
        the dot product are linear, so scoring the mean equals averaging the heads' scores."""
        B, _, S, D = q.shape
        Hkv, group = self.num_kv_heads, self.num_heads // self.num_kv_heads
        if self.query == "proj":
            qg = q.reshape(B, Hkv, group, S, D).permute(0, 1, 3, 2, 4).reshape(B, Hkv, S, group * D)
            f = _project(qg, self.q_weight, self.q_bias)
        elif self.query == "orig":
            f = q.float()  # [B, Hq, S, D]: per head, averaged below (after the norm)
        else:
            f = q.float().reshape(B, Hkv, group, S, D).mean(dim=2)
            if self.query == "avg_proj":
                f = _project(f, self.q_weight, self.q_bias)
        if self.qk_norm:
            f = _rms_norm(f, self.q_norm_weight)
        if self.query == "orig":
            f = f.reshape(B, Hkv, group, S, -1).mean(dim=2)
        return f

    def _key_features(self, pooled: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        """Pooled keys ``[B, Hkv, N, D*nk]`` whose blocks start at integer positions ``start_pos
        [Bp, N]`` -> projected, normalised and rotated float32 ``[B, Hkv, N, hidden]``."""
        kf = _project(pooled, self.k_weight, self.k_bias)
        if self.qk_norm:
            kf = _rms_norm(kf, self.k_norm_weight)
        return self._rotate(kf, start_pos)

    # -- full computation -----------------------------------------------------------------------
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Per-token key-block logits, shared across each GQA group.

        Args:
            q: ``[B, Hq, Sq, D]`` pre-RoPE queries (the last ``Sq`` tokens of the sequence).
            k: ``[B, Hkv, Sk, D]`` pre-RoPE keys.
            position_ids: optional ``[Sq]`` or ``[B, Sq]`` integer absolute positions of the query
                tokens (RoPE only); default ``Sk - Sq .. Sk - 1``.

        Returns:
            float32 ``[B, Hkv, Sq, ceil(Sk/b)]``; ``-inf`` on key blocks after the token's own
            (``own_block="pooled"``) or from its own on (``"excluded"``).

        Example::

            >>> gate = SeerDecodeGate(2, 1, 8, block_size=4, hidden_size=8)
            >>> logits = gate(torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8))
            >>> torch.isinf(logits[0, 0]).int().tolist()
            [[0, 1], [0, 1], [0, 1], [0, 1], [0, 0], [0, 0]]
        """
        _check_qk(q, k, self.num_heads, self.num_kv_heads, self.head_dim)
        B, _, Sq, _ = q.shape
        Sk = k.shape[2]
        b = self.block_size
        mk = ceil_div(Sk, b)
        dev = q.device
        tok = torch.arange(Sq, device=dev) + (Sk - Sq)  # key index of each query token
        diag = torch.div(tok, b, rounding_mode="floor")  # its own key block (-1 or less: sees nothing)
        qpos = _query_positions(position_ids, B, Sq, Sk, dev)  # [Bp, Sq]
        key0 = qpos[:, -1:] - (Sk - 1)  # absolute position of key 0, [Bp, 1]
        qf = self._rotate(self._query_features(q), qpos)  # [B, Hkv, Sq, hid]
        kf = self._key_features(_pool_blocks(k, b, self.k_pooling), key0 + torch.arange(mk, device=dev) * b)
        logits = torch.einsum("bhsd,bhnd->bhsn", qf, kf)  # [B, Hkv, Sq, Mk]
        col = torch.arange(mk, device=dev)
        if self.own_block == "pooled":
            kd = self._key_features(_prefix_pool(k, b, self.k_pooling, Sq), key0 + diag.clamp(min=0) * b)
            own = (qf * kd).sum(dim=-1, keepdim=True)  # the token's block, pooled up to the token
            logits = torch.where(col == diag[:, None], own, logits)
            hidden = col > diag[:, None]
        else:
            hidden = col >= diag[:, None]
        return (logits * (1.0 / math.sqrt(self.hidden_size))).masked_fill(hidden, float("-inf"))

    # -- incremental decode ---------------------------------------------------------------------
    def new_cache(self) -> SeerDecodeCache:
        """An empty :class:`SeerDecodeCache` for one layer and one batch of sequences."""
        return SeerDecodeCache()

    def extend_cache(self, k_new: torch.Tensor, cache: SeerDecodeCache, position: Optional[int] = None) -> None:
        """Append keys ``k_new [B, Hkv, n, D]`` to ``cache``, compressing every block they complete.

        ``position`` is the absolute position of the *last* appended key (default: key 0 is at
        position 0); after the first append it must advance with the number of keys.

        Example::

            >>> cache = gate.new_cache(); gate.extend_cache(prompt_k, cache)    # prefill
        """
        if not isinstance(cache, SeerDecodeCache):
            raise TypeError(f"cache must be a SeerDecodeCache (gate.new_cache()), got {type(cache).__name__}")
        if not isinstance(k_new, torch.Tensor) or not k_new.dtype.is_floating_point:
            raise TypeError("k_new must be a floating-point torch.Tensor")
        if k_new.dim() != 4 or k_new.shape[1] != self.num_kv_heads or k_new.shape[3] != self.head_dim:
            raise ValueError(
                f"k_new must be [B, {self.num_kv_heads}, n, {self.head_dim}], got shape {tuple(k_new.shape)}"
            )
        if position is not None and (isinstance(position, bool) or not isinstance(position, int)):
            raise TypeError(f"position must be an int or None, got {type(position).__name__}")
        held = cache.partial if cache.partial is not None else cache.k_blocks
        if held is not None:
            if k_new.shape[0] != held.shape[0]:
                raise ValueError(f"k_new has batch {k_new.shape[0]}, the cache holds batch {held.shape[0]}")
            if k_new.device != held.device:
                raise ValueError(f"k_new is on {k_new.device}, the cache is on {held.device}")
        length = cache.length + k_new.shape[2]
        if cache.offset is None:
            if length == 0:
                return
            cache.offset = 0 if position is None else position - (length - 1)
        elif position is not None and position != cache.offset + length - 1:
            raise ValueError(
                f"position={position}, but the cache's keys are contiguous from position {cache.offset}, so the "
                f"last of its {length} keys is at {cache.offset + length - 1}"
            )
        b = self.block_size
        tokens = k_new if cache.partial is None else torch.cat((cache.partial, k_new.to(cache.partial.dtype)), dim=2)
        done = tokens.shape[2] // b
        if done:
            first = cache.num_blocks
            start = cache.offset + (first + torch.arange(done, device=tokens.device)) * b
            new = self._key_features(_pool_blocks(tokens[:, :, : done * b], b, self.k_pooling), start[None])
            cache.k_blocks = new if cache.k_blocks is None else torch.cat((cache.k_blocks, new), dim=2)
        rest = tokens.shape[2] - done * b
        cache.partial = tokens[:, :, done * b :].clone() if rest else None
        cache.length = length

    def step(
        self,
        q_tok: torch.Tensor,
        k_new: torch.Tensor,
        cache: SeerDecodeCache,
        position: Optional[int] = None,
    ) -> torch.Tensor:
        """Append ``k_new`` to ``cache`` and score the key blocks for the query token ``q_tok``.

        The query token is the last appended key. Completed blocks are scored from the cache; the
        current partial block from its keys so far -- the same numbers :meth:`forward` gives on the
        whole prefix.

        Args:
            q_tok: ``[B, Hq, 1, D]`` pre-RoPE query of the new token.
            k_new: ``[B, Hkv, n, D]`` pre-RoPE keys to append (``n = 1`` per decode step; the whole
                prompt on the first call; ``n = 0`` to re-score with the keys already cached).
            cache: from :meth:`new_cache`, updated in place.
            position: absolute position of the query token (default: key 0 is at position 0).

        Returns:
            float32 ``[B, Hkv, 1, ceil(length / b)]`` (every block is scored for the newest token;
            with ``own_block="excluded"`` the last block, which holds it, is ``-inf``).

        Example::

            >>> cache = gate.new_cache()
            >>> logits = gate.step(q_last_prompt_token, prompt_k, cache)        # prefill
            >>> logits = gate.step(q_new, k_new, cache)                         # each decode step
        """
        if not isinstance(q_tok, torch.Tensor) or not q_tok.dtype.is_floating_point:
            raise TypeError("q_tok must be a floating-point torch.Tensor")
        if q_tok.dim() != 4 or tuple(q_tok.shape[1:]) != (self.num_heads, 1, self.head_dim):
            raise ValueError(f"q_tok must be [B, {self.num_heads}, 1, {self.head_dim}], got {tuple(q_tok.shape)}")
        if isinstance(k_new, torch.Tensor) and k_new.dim() == 4 and k_new.shape[0] != q_tok.shape[0]:
            raise ValueError(
                f"q_tok and k_new must have the same batch size, got {q_tok.shape[0]} and {k_new.shape[0]}"
            )
        self.extend_cache(k_new, cache, position)
        if cache.length == 0:
            raise ValueError("the cache is empty: k_new must hold at least one key on the first step")
        b = self.block_size
        pos = cache.offset + cache.length - 1
        qf = self._rotate(self._query_features(q_tok), torch.full((1, 1), pos, device=q_tok.device))
        parts = []
        if cache.k_blocks is not None:
            parts.append(torch.einsum("bhsd,bhnd->bhsn", qf, cache.k_blocks))
        if cache.partial is not None:
            if self.own_block == "pooled":
                start = torch.full((1, 1), cache.offset + cache.num_blocks * b, device=q_tok.device)
                kp = self._key_features(_pool_blocks(cache.partial, b, self.k_pooling), start)
                parts.append((qf * kp).sum(dim=-1, keepdim=True))
            else:  # never scored: the column is masked below
                parts.append(qf.new_zeros(qf.shape[:-1] + (1,)))
        logits = torch.cat(parts, dim=-1) * (1.0 / math.sqrt(self.hidden_size))
        if self.own_block == "excluded":  # the last block (complete or not) holds the token
            last = torch.arange(logits.shape[-1], device=q_tok.device) == logits.shape[-1] - 1
            logits = logits.masked_fill(last, float("-inf"))
        return logits

    # -- sparse decode --------------------------------------------------------------------------
    def select(self, logits: torch.Tensor, *, seq_k: Optional[int] = None,
               **selection: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """The key blocks a decode step reads, as :func:`~sparse_attn.sparse_decode`'s
        ``kv_blocks``.

        Args:
            logits: a step's scores ``[B, Hkv, 1, Mk]`` (:meth:`step`; ``-inf`` = never chosen).
            seq_k: the keys in the cache (default ``Mk * block_size``; only the causal limit,
                which no block of a decode row crosses, depends on it).
            selection: one rule and its modifiers, as for
                :func:`~sparse_attn.patterns.select_blocks` (``threshold`` / ``topk`` / ``density`` /
                ``nz_ratio``, ``keep_first``, ``keep_last``, ``strict``, ``dense_last_rows``,
                ``share_gqa``): what :class:`~sparse_attn.modules.SeerPattern` passes.

        Returns:
            ``(kv_num [B, Hkv], kv_idx [B, Hkv, Mk])`` int32 on the logits' device: per sequence
            and KV head the count and the ascending ids of the selected blocks (slots past the
            count are padding). The decode op adds the token's own (last) block itself. Fixed
            shapes, no host synchronisation.

        Example::

            >>> kv_num, kv_idx = gate.select(gate.step(q_tok, k_new, cache), density=0.2)
        """
        from .select import select_blocks

        if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[1:3] != (self.num_kv_heads, 1):
            raise ValueError(f"logits must be a step's scores [B, {self.num_kv_heads}, 1, Mk], got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        layout = select_blocks(logits, block_size=self.block_size, seq_q=1, seq_k=seq_k, causal=True,
                               num_kv_heads=self.num_kv_heads, **selection)
        return layout.kv_num[:, :, 0], layout.kv_idx[:, :, 0]

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q_tok: torch.Tensor,
        k_new: torch.Tensor,
        cache: SeerDecodeCache,
        *,
        cache_seqlens: Optional[torch.Tensor] = None,
        position: Optional[int] = None,
        scale: Optional[float] = None,
        backend: str = "auto",
        return_lse: bool = False,
        **selection: Any,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """One sparse decode step: :meth:`step` (append ``k_new``, score the blocks for
        ``q_tok``), :meth:`select`, then :func:`~sparse_attn.sparse_decode` over the KV cache.
        Inference only.

        Args:
            q: ``[B, Hq, 1, D]`` the token's (post-RoPE) query.
            k_cache, v_cache: the KV cache holding the token's key and value, contiguous
                ``[B, Hkv, S_max, D]`` (for a paged cache call :meth:`select` and the op yourself).
            q_tok, k_new, cache, position: as for :meth:`step` (pre-RoPE query and new keys).
            cache_seqlens: ``[B]`` int32 keys per sequence; default ``cache.length`` for all (the
                gate's cache holds one length for the whole batch).
            scale, backend, return_lse: as for :func:`~sparse_attn.sparse_decode`.
            selection: the selection rule, as for :meth:`select`.

        Returns:
            ``out [B, Hq, 1, D]`` (and ``lse [B, Hq, 1]``): attention over the selected key blocks
            and the token's own block.

        Example::

            >>> out = gate.attend(q, k_cache, v_cache, q_pre, k_pre_new, cache, topk=8)
        """
        from ..decode import sparse_decode

        logits = self.step(q_tok, k_new, cache, position)
        lens = cache_seqlens
        if lens is None:
            lens = torch.full((q.shape[0],), cache.length, dtype=torch.int32, device=q.device)
        blocks = self.select(logits, seq_k=cache.length, **selection)
        return sparse_decode(q, k_cache, v_cache, lens, kv_blocks=blocks, block_size=self.block_size, scale=scale,
                             return_lse=return_lse, backend=backend)
