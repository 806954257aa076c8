"""Per-layer pattern modules: what decides an attention layer's block layout.

Every method is an :class:`AttentionPattern` (an ``nn.Module``, so learned parts such as
SeerAttention's gates follow ``.to()`` and state dicts) with one job::

    layout = pattern(q, k, q_pre=None, k_pre=None, position_ids=None)   # BlockSparseLayout | None

``q [B, Hq, Sq, D]`` and ``k [B, Hkv, Sk, D]`` are the post-RoPE tensors the attention op sees
(queries are the last ``Sq`` of the ``Sk`` positions: bottom-right causal); ``q_pre`` / ``k_pre``
are the same projections before RoPE, ``k_pre`` for *this call's tokens only* (its last
``k_pre.shape[2]`` keys), for methods that score pooled blocks. ``None`` means dense (causal).

Prefill is ``Sq == Sk``; decode (``Sq == 1``) and chunked prefill (``1 < Sq < Sk``) follow the
pattern's ``decode`` option: ``"sparse"`` uses the method's rule for them where it has one and dense
otherwise, ``"dense"`` always runs them dense.

Decode-shaped calls (``1 <= Sq <= 16``, ``Sq < Sk``: a few new tokens over a KV cache) run on
:func:`sparse_attn.sparse_decode`, which reads only the kept key blocks, once per GQA group. For them
:func:`~sparse_attn.modules.pattern_attention` asks ``pattern.kv_blocks(q, k, ...)`` (the ``decode``
policy, then the method's :meth:`AttentionPattern.decode_blocks`) for the op's ``kv_blocks``: None
(dense), per (sequence, KV head) block lists ``(kv_num [B, Hkv], kv_idx [B, Hkv, N])`` (Seer's
decode gate), an :class:`~sparse_attn.patterns.s2.S2Config` (S2, closed form), or ``NotImplemented``
when the method has no such form (``block_mask``; S2 over query heads): then the layout path runs.
The op always adds each row's own key block, and applies the block rule row by row.

=============  ===================================================================================
name           layout
=============  ===================================================================================
``dense``      ``None`` (exact causal attention)
``s2``         :func:`sparse_attn.patterns.strided` (S2-Attention): static, cached per shape
``block_mask`` a user ``layout_fn(q, k)`` returning a layout or a bool block mask ``[Bl, Hl, Mq, Mk]``
``seer``       SeerAttention's learned gate + threshold (:class:`~sparse_attn.modules.SeerPattern`)
=============  ===================================================================================

:data:`~sparse_attn.modules.PATTERNS` maps these names to classes;
:func:`~sparse_attn.modules.build_pattern` builds one from an :class:`AttentionSpec` and options,
and ``pattern.get_config()`` gives the JSON-serialisable options that rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Optional, Union

from torch import Tensor, nn

from ..layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout
from ..ops import BACKENDS

__all__ = [
    "AttentionSpec",
    "AttentionPattern",
    "DensePattern",
    "S2Pattern",
    "BlockMaskPattern",
]

DECODE_MODES = ("sparse", "dense")


@dataclass(frozen=True)
class AttentionSpec:
    """Shape facts of one attention layer that patterns are built from.

    Example::

        >>> AttentionSpec(num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, layer_idx=3)
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    layer_idx: int = 0

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    return block_size


class AttentionPattern(nn.Module):
    """Base class: one attention layer's source of block layouts.

    Subclasses set :attr:`name`, implement :meth:`layout` and :meth:`get_config`, and build from an
    :class:`AttentionSpec` with :meth:`from_spec`. Calling the module applies the ``decode`` policy
    and then :meth:`layout`.

    Args:
        block_size: the layout's block size (16, 32, 64, 128).
        decode: ``"sparse"`` (the method's rule for ``Sq < Sk`` where it has one) or ``"dense"``.
        backend: :func:`sparse_attn.sparse_attention` backend for this layer.

    Attributes:
        distill: when True, :func:`~sparse_attn.modules.pattern_attention` runs
            :meth:`distillation_forward` (dense output + ``last_loss``) instead of sparse attention.
        last_loss: the last distillation loss (a scalar tensor), or None.
        per_sequence: the layout depends only on the sequence it is given (no state kept across
            calls), so a left-padded batch can run one unpadded sequence at a time with layouts
            anchored at each sequence's first real token (see :func:`~sparse_attn.modules.pattern_attention`).
    """

    name: ClassVar[str] = ""
    needs_pre_rope: ClassVar[bool] = False
    per_sequence: ClassVar[bool] = True

    def __init__(self, *, block_size: int = 64, decode: str = "sparse", backend: str = "auto") -> None:
        super().__init__()
        self.block_size = _check_block_size(block_size)
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.decode = decode
        self.backend = backend
        self.distill = False
        self.last_loss: Optional[Tensor] = None

    # -- the interface ----------------------------------------------------------------------------
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        *,
        q_pre: Optional[Tensor] = None,
        k_pre: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
    ) -> Optional[BlockSparseLayout]:
        """The layout for ``q [B, Hq, Sq, D]`` against ``k [B, Hkv, Sk, D]`` (None = dense)."""
        if q.shape[2] < k.shape[2] and self.decode == "dense":
            return None
        return self.layout(q, k, q_pre=q_pre, k_pre=k_pre, position_ids=position_ids)

    def layout(
        self,
        q: Tensor,
        k: Tensor,
        *,
        q_pre: Optional[Tensor] = None,
        k_pre: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
    ) -> Optional[BlockSparseLayout]:
        """The method's layout (see the module docstring for the arguments)."""
        raise NotImplementedError

    def kv_blocks(
        self,
        q: Tensor,
        k: Tensor,
        *,
        q_pre: Optional[Tensor] = None,
        k_pre: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
    ) -> Any:
        """For a decode-shaped call (``Sq < Sk``), the ``kv_blocks`` of
        :func:`~sparse_attn.sparse_decode`: the ``decode`` policy (``"dense"``: None), then
        :meth:`decode_blocks`. Called *instead of* the module (a pattern with per-sequence state,
        Seer's decode gate, advances it once either way).

        Returns:
            None (dense), ``(kv_num [B, Hkv], kv_idx [B, Hkv, N])`` int32 ascending, an
            :class:`~sparse_attn.patterns.s2.S2Config`, or ``NotImplemented`` (no such form: call
            the module for a layout instead; nothing was consumed).
        """
        if self.decode == "dense":
            return None
        return self.decode_blocks(q, k, q_pre=q_pre, k_pre=k_pre, position_ids=position_ids)

    def decode_blocks(
        self,
        q: Tensor,
        k: Tensor,
        *,
        q_pre: Optional[Tensor] = None,
        k_pre: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
    ) -> Any:
        """The method's decode rule as :func:`~sparse_attn.sparse_decode` ``kv_blocks`` (see
        :meth:`kv_blocks`; the op adds each row's own block). Default: ``NotImplemented``."""
        return NotImplemented

    def reset(self) -> None:
        """Forget per-sequence state (decode caches). Default: nothing."""

    def distillation_forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        q_pre: Optional[Tensor] = None,
        k_pre: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        scale: Optional[float] = None,
    ) -> Tensor:
        """Dense attention output ``[B, Hq, Sq, D]``, storing a training loss in ``last_loss``."""
        raise NotImplementedError(f"pattern {self.name!r} has nothing to distil")

    # -- (de)serialisation ------------------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        """JSON-serialisable options; ``type(p).from_spec(spec, **p.get_config())`` rebuilds it."""
        return {"block_size": self.block_size, "decode": self.decode, "backend": self.backend}

    @classmethod
    def from_spec(cls, spec: AttentionSpec, **options: Any) -> "AttentionPattern":
        """Build the pattern for a layer described by ``spec``."""
        return cls(**options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if not isinstance(v, dict))


class DensePattern(AttentionPattern):
    """No sparsity: every step runs exact causal attention (the reference point for tests).

    Example::

        >>> DensePattern()(torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)) is None
        True
    """

    name = "dense"

    def layout(self, q, k, *, q_pre=None, k_pre=None, position_ids=None):
        return None

    def decode_blocks(self, q, k, *, q_pre=None, k_pre=None, position_ids=None):
        return None


class S2Pattern(AttentionPattern):
    """S2-Attention: local window + per-head strided blocks (:func:`sparse_attn.patterns.strided`).

    The layout is static, so it is built once per ``(Sq, Sk, device)`` and cached. It is defined
    over the KV heads (``layout_heads="kv"``, each GQA group shares one shard, what an S2 KV cache
    keeps) or over the query heads (``"q"``). Decode and chunked prefill use the same rule
    bottom-right (queries are the last ``Sq`` positions); ``decode="dense"`` turns that off.

    With ``layout_heads="kv"``, :meth:`from_spec` sets ``num_query_heads`` to the layer's query
    heads, so the head step is DKernel's ``max(1, vert_stride // Hq)`` (its per-KV-head GQA rule);
    until this was added the drop-in stepped by ``vert_stride // Hkv``, which differs when
    ``vert_stride > Hkv`` (a checkpoint trained with that older pattern is served with DKernel's).
    ``layout_heads="q"`` builds one pattern per query head (``strided(Hq, ...)``), the layout of
    Phi-3-small's vLLM port when combined with ``head_sliding_offset=1``.

    Decode-shaped calls (a few new tokens over a KV cache) give :func:`~sparse_attn.sparse_decode`
    the pattern itself (:attr:`s2_config`, applied in closed form, row by row -- the rule a full
    forward applies to those rows, also for chunks that straddle a block boundary) when it is over
    the KV heads with ``local_blocks >= 1``; otherwise (``layout_heads="q"`` with GQA) the layout
    path runs. With ``s2_cache`` (default), the Hugging Face drop-in's ``generate()`` keeps a KV
    cache holding only each KV head's shard (:class:`~sparse_attn.integrations.s2_hf_cache.S2Cache`,
    :meth:`supports_s2_cache`); ``s2_cache=False`` keeps transformers' full ``DynamicCache``.

    Args:
        num_heads: heads the pattern is defined over (set by :meth:`from_spec` from ``layout_heads``).
        num_query_heads: as in :func:`~sparse_attn.patterns.strided` (set by :meth:`from_spec`;
            when set, the queries must have that many heads).
        config / pattern options: an :class:`~sparse_attn.patterns.s2.S2Config` or its fields as
            keywords (``block_size``, ``local_blocks``, ``vert_stride``, ``homo_head``,
            ``num_dense_heads``, ``head_sliding_offset``), validated there once; kept as ``.s2_config``.
        layout_heads: ``"kv"`` or ``"q"`` (recorded for :meth:`get_config`).
        s2_cache: let ``generate()`` use the shard-only S2 cache where it can (see above).

    Example::

        >>> p = S2Pattern.from_spec(AttentionSpec(4, 2, 16), block_size=16, local_blocks=2, vert_stride=4)
        >>> p.options["num_query_heads"]
        4
        >>> p(torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16)).shape
        (1, 2, 7, 7)
    """

    name = "s2"

    def __init__(
        self,
        num_heads: int,
        *,
        num_query_heads: Optional[int] = None,
        layout_heads: str = "kv",
        decode: str = "sparse",
        backend: str = "auto",
        s2_cache: bool = True,
        config: Optional[Any] = None,
        **pattern_options: Any,
    ) -> None:
        from ..patterns.s2 import S2Config

        cfg = S2Config.from_options(config, pattern_options)
        if not isinstance(cfg.local_blocks, int) or cfg.position_type(True) != "absolute" or cfg.kv_start_position:
            raise ValueError("the S2 drop-in is causal: local_blocks must be an int, vert_position_type 'absolute' "
                             "(or None) and kv_start_position 0")
        super().__init__(block_size=cfg.block_size, decode=decode, backend=backend)
        if layout_heads not in ("kv", "q"):
            raise ValueError(f"layout_heads must be 'kv' or 'q', got {layout_heads!r}")
        self.num_heads = int(num_heads)
        cfg.check_heads(self.num_heads, num_query_heads)
        if not isinstance(s2_cache, bool):
            raise TypeError(f"s2_cache must be a bool, got {type(s2_cache).__name__}")
        self.s2_config = cfg
        self.num_query_heads = num_query_heads
        self.layout_heads = layout_heads
        self.s2_cache = s2_cache

    @property
    def options(self) -> Dict[str, Any]:
        """The pattern options as :func:`~sparse_attn.patterns.strided` keywords."""
        opts = {k: v for k, v in self.s2_config.to_dict().items()
                if k not in ("block_size", "vert_position_type", "kv_start_position")}
        return {**opts, "num_query_heads": self.num_query_heads}

    @classmethod
    def from_spec(cls, spec: AttentionSpec, **options: Any) -> "S2Pattern":
        """One layer's pattern: over ``spec.num_kv_heads`` (``layout_heads="kv"``, the default) or
        ``spec.num_heads`` (``"q"``), with ``num_query_heads = spec.num_heads`` (DKernel's step)."""
        heads = spec.num_kv_heads if options.get("layout_heads", "kv") == "kv" else spec.num_heads
        hq = options.get("num_query_heads")
        if hq is not None and hq != spec.num_heads:
            raise ValueError(f"num_query_heads={hq!r} does not match the layer's {spec.num_heads} query heads "
                             "(it is set from the model; leave it out)")
        return cls(heads, **{**options, "num_query_heads": spec.num_heads})

    def layout(self, q, k, *, q_pre=None, k_pre=None, position_ids=None):
        from ..patterns import strided

        hq = self.num_query_heads
        if hq is not None and q.shape[1] != hq:
            raise ValueError(f"q has {q.shape[1]} heads but this S2 pattern was built for num_query_heads={hq}")
        return strided(self.num_heads, q.shape[2], k.shape[2], num_query_heads=hq, device=q.device,
                       config=self.s2_config)

    def _over_kv_heads(self, num_query_heads: int, num_kv_heads: int) -> bool:
        """The pattern is one per KV head with DKernel's step from ``num_query_heads`` (what the
        decode op's closed form and the S2 cache apply), with a window holding the own block."""
        cfg = self.s2_config
        return (self.num_heads == num_kv_heads and (self.num_query_heads or self.num_heads) == num_query_heads
                and isinstance(cfg.local_blocks, int) and cfg.local_blocks >= 1
                and cfg.position_type(True) == "absolute")

    def decode_blocks(self, q, k, *, q_pre=None, k_pre=None, position_ids=None):
        hq = self.num_query_heads
        if hq is not None and q.shape[1] != hq:
            raise ValueError(f"q has {q.shape[1]} heads but this S2 pattern was built for num_query_heads={hq}")
        return self.s2_config if self._over_kv_heads(q.shape[1], k.shape[1]) else NotImplemented

    def supports_s2_cache(self) -> bool:
        """Whether ``generate()`` may keep this layer's KV cache as an
        :class:`~sparse_attn.patterns.S2KVCache` (shards only): ``s2_cache`` on, sparse decode,
        a pattern over the KV heads built with the layer's query heads (:meth:`from_spec`)."""
        return (self.s2_cache and self.decode == "sparse" and self.layout_heads == "kv"
                and self.num_query_heads is not None and self._over_kv_heads(self.num_query_heads, self.num_heads)
                and not self.s2_config.kv_start_position)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), **self.options, "layout_heads": self.layout_heads, "s2_cache": self.s2_cache}


# Layout functions by name. A saved config is data: it refers to a layout function by the name it
# was registered under, and loading one never imports or runs code the config names.
_LAYOUT_FNS: Dict[str, Callable] = {}


def register_layout_fn(name: str, fn: Callable) -> Callable:
    """Register ``fn(q, k)`` (a ``block_mask`` layout function) under ``name``, so a model config can
    refer to it: ``BlockMaskPattern("name")``, ``apply_sparse_attention(model, method="block_mask",
    layout_fn="name")``, and a saved model whose config names it reloads with it once the same
    registration has run. Returns ``fn`` (usable as a decorator via ``functools.partial``).

    Re-registering a name with another function is an error (a config must not silently change
    meaning); registering the same function again is a no-op.

    Example::

        >>> def sink_and_diagonal(q, k): ...
        >>> register_layout_fn("sink_and_diagonal", sink_and_diagonal)  # doctest: +ELLIPSIS
        <function sink_and_diagonal at ...>
    """
    if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
        raise ValueError(f"layout function names must be non-empty printable strings of at most 200 characters, "
                         f"got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable (q, k) -> layout, got {type(fn).__name__}")
    if _LAYOUT_FNS.get(name, fn) is not fn:
        raise ValueError(f"layout function name {name!r} is already registered to another function")
    _LAYOUT_FNS[name] = fn
    return fn


def _layout_fn_name(fn: Callable) -> Optional[str]:
    """The name ``fn`` is registered under, or None."""
    return next((name for name, f in _LAYOUT_FNS.items() if f is fn), None)


class BlockMaskPattern(AttentionPattern):
    """A user-defined layout: ``layout_fn(q, k)`` returns a :class:`BlockSparseLayout`, a boolean
    block mask ``[Bl, Hl, Mq, Mk]`` (blocks of ``block_size``; built into a layout here) or None.

    ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]`` are post-RoPE; the op adds the causal mask
    (bottom-right) on top of whatever the function keeps. ``layout_fn`` is a callable or the name it
    was registered under with :func:`register_layout_fn`. Configs store that name (a function that
    is not registered is stored as None, and a reloaded model needs ``layout_fn`` again); a name is
    only ever looked up in the registry, never imported.

    Example::

        >>> def sink_and_diagonal(q, k):
        ...     mq, mk = -(-q.shape[2] // 16), -(-k.shape[2] // 16)
        ...     r = torch.arange(mq)[:, None] + (mk - mq); c = torch.arange(mk)[None, :]
        ...     return ((c == 0) | (c == r))[None, None]
        >>> p = BlockMaskPattern(sink_and_diagonal, block_size=16)
        >>> p(torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)).density
        0.4375
    """

    name = "block_mask"

    def __init__(
        self,
        layout_fn: Optional[Union[Callable, str]] = None,
        *,
        block_size: int = 64,
        decode: str = "sparse",
        backend: str = "auto",
    ) -> None:
        super().__init__(block_size=block_size, decode=decode, backend=backend)
        if isinstance(layout_fn, str):
            if layout_fn not in _LAYOUT_FNS:
                raise ValueError(f"layout_fn {layout_fn[:200]!r} is not a registered layout function name "
                                 f"(registered: {sorted(_LAYOUT_FNS)[:20]}); register it in code with "
                                 "sparse_attn.modules.register_layout_fn(name, fn) before loading. Names are "
                                 "never imported")
            layout_fn = _LAYOUT_FNS[layout_fn]
        if layout_fn is not None and not callable(layout_fn):
            raise TypeError(f"layout_fn must be callable (q, k) -> layout, got {type(layout_fn).__name__}")
        self.layout_fn = layout_fn

    def layout(self, q, k, *, q_pre=None, k_pre=None, position_ids=None):
        if self.layout_fn is None:
            raise ValueError(
                "method 'block_mask' has no layout_fn (it was not registered when the model was saved); "
                "pass it again: apply_sparse_attention(model, method='block_mask', layout_fn=...)"
            )
        out = self.layout_fn(q, k)
        if out is None or isinstance(out, BlockSparseLayout):
            return out
        if isinstance(out, Tensor):
            return BlockSparseLayout.from_block_mask(out.to(q.device), self.block_size, q.shape[2], k.shape[2])
        raise TypeError("layout_fn must return a BlockSparseLayout, a bool block mask or None, "
                        f"got {type(out).__name__}")

    def get_config(self) -> Dict[str, Any]:
        fn = None if self.layout_fn is None else _layout_fn_name(self.layout_fn)
        return {**super().get_config(), "layout_fn": fn}
