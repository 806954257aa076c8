"""Drop-in sparse attention for Llama-style Hugging Face ``transformers`` models.

::

    from sparse_attn.integrations.transformers import apply_sparse_attention
    model = apply_sparse_attention(model, method="dense")                   # exact: same outputs as sdpa
    model = apply_sparse_attention(model, method="s2", block_size=16, local_blocks=4, vert_stride=4)
    model = apply_sparse_attention(model, method="seer", gates="path/or/None", density=0.2)
    model = apply_sparse_attention(model, method="block_mask", layout_fn=my_fn)   # user-defined
    register_layout_fn("my_fn", my_fn)   # ... and by name, so a saved config can refer to it

Supported versions: ``transformers >= 4.53`` (the first release with ``AttentionMaskInterface``);
tested, and pinned in CI, with 5.23. Older versions raise ImportError on import of this module.
Models: those whose attention layers call ``ALL_ATTENTION_FUNCTIONS`` and have ``q_proj``/
``k_proj``/``v_proj``, ``head_dim`` and ``layer_idx`` (tested: Llama, Qwen3; Mistral and Qwen2
have the same layer).

What :func:`apply_sparse_attention` does:

* registers (:func:`register`) an attention function and a mask function under ``"sparse_attn"``
  (``AttentionInterface`` / ``AttentionMaskInterface``) and switches the model to it;
* attaches one pattern module per attention layer as ``<attention layer>.sparse_pattern`` (so
  learned gates follow ``.to()`` and are in ``state_dict()``), hooking ``q_proj``/``k_proj`` (or
  ``q_norm``/``k_norm``) to capture pre-RoPE q/k for methods that need them (Seer);
* stores the options in ``model.config.sparse_attention`` (a JSON dict), so ``save_pretrained``
  keeps them. After :func:`register`, ``from_pretrained(dir, attn_implementation="sparse_attn")``
  rebuilds the patterns while the model is constructed (``register`` wraps
  ``PreTrainedModel.post_init`` for this) and the checkpoint's pattern weights load into them.
  (Loaded with another implementation, the patterns are built and loaded too, but unused until
  ``apply_sparse_attention(model)`` switches to them.) A saved config is data: it names no code
  (a ``block_mask`` layout function is stored by its :func:`register_layout_fn` name and looked
  up, never imported) and no file (Seer gate weights travel in the checkpoint's state dict).

Which path runs (K/V arrive un-repeated ``[B, Hkv, Sk, D]``; GQA goes straight to the op):

* **No padding** (the mask function returns None when the mask is plain bottom-right causal):
  :func:`sparse_attn.sparse_attention` with the pattern's layout. Prefill (``Sq == Sk``) is sparse;
  decode (``Sq == 1``) and chunked prefill (``Sq < Sk``) use the method's rule bottom-right where
  it has one (S2: yes; Seer: its decode gate, if any) and dense otherwise; ``decode="dense"``
  forces dense there.
* **Left padding** (a padded ``generate()`` batch) with dense, s2 or block_mask: the sparse op runs
  per padding group on the unpadded tokens, with layouts anchored at each sequence's first real
  token, so a padded prompt gets exactly what it gets alone (and dense equals sdpa).
* **Any other element mask** (packed sequences, sliding windows, static caches, a user 4-D mask,
  Seer with padding -- its decode cache holds the whole batch --, and any mask inside a
  ``torch.compile`` region, where it cannot be inspected): a block layout cannot express
  per-token masks, so attention is computed exactly over ``layout AND mask`` by
  :func:`sparse_attn.modules.masked_attention` (PyTorch SDPA, chunked over query rows), at dense
  cost. The layout is in the coordinates of the padded tensors; where the mask shows the queries
  are not the last keys (a static cache's empty slots) the layout is not applied and the step is
  dense.
* **Decode** (a few new tokens over the KV cache, no padding): :func:`sparse_attn.sparse_decode`
  over the cache's contiguous K/V (``cache_seqlens`` = its length), with the method's block rule
  in the op's form: Seer's decode gate's block lists, S2's config in closed form, dense for dense.
  The op reads only the kept blocks, once per GQA group: the decode sparsity is real speed.
* **S2 generation**: for ``method="s2"``, ``generate()`` uses :class:`~sparse_attn.integrations.
  s2_hf_cache.S2Cache` (a transformers ``Cache``) whose S2 layers store only each KV head's shard,
  so the S2 memory saving is real in generation; decode steps run on ``sparse_decode`` over the
  compacted shards. It is not used for a padded batch (the full ``DynamicCache`` and the
  per-sequence path run), when a cache or ``cache_implementation`` is given, with chunked prefill
  or assisted decoding, or with ``s2_cache=False``.
* Not supported (ValueError): attention dropout > 0, non-causal attention, ``softcap``,
  attention sinks, paged (continuous-batching) caches. Seer's decode gate keeps per-sequence
  state: no beam-search reordering.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

try:
    from transformers.cache_utils import DynamicCache
    from transformers.generation.utils import GenerationMixin
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
    from transformers.modeling_utils import AttentionInterface, PreTrainedModel
except ImportError as _e:  # pragma: no cover - depends on the installed version
    raise ImportError(
        "sparse_attn.integrations.transformers needs transformers >= 4.53 (AttentionMaskInterface); "
        f"import failed: {_e}"
    ) from None

from ..modules.functional import pattern_attention
from ..modules.patterns import AttentionPattern, AttentionSpec, register_layout_fn
from ..modules.registry import PATTERNS, build_pattern
try:
    from .s2_hf_cache import S2Cache, s2_cache_layer, s2_cache_patterns
except ImportError:  # pragma: no cover - transformers without per-layer cache classes: no S2 cache
    S2Cache = None

    def s2_cache_layer(key):
        return None

    def s2_cache_patterns(model):
        return {}

__all__ = [
    "ATTN_NAME",
    "METHODS",
    "apply_sparse_attention",
    "register",
    "sparse_attention_forward",
    "sparse_attention_mask",
    "sparse_patterns",
    "collect_gates",
    "saved_selection",
    "register_layout_fn",
    "S2Cache",
]

ATTN_NAME = "sparse_attn"
# One table: a new method is one entry (its pattern class in sparse_attn.modules.patterns).
METHODS: Dict[str, type] = PATTERNS
_CONFIG_VERSION = 1
_ORIGINAL_POST_INIT = None
_ORIGINAL_INITIALIZE_WEIGHTS = None
_ORIGINAL_PREPARE_CACHE = None


# --------------------------------------------------------------------------------------------------
# Mask and attention functions
# --------------------------------------------------------------------------------------------------
def _plain_causal(q_length, kv_length, q_offset, kv_offset, attention_mask) -> bool:
    """True when the mask is exactly bottom-right causal over the given keys (no padding)."""
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return False  # static caches pass tensor offsets: reading them would sync / break graphs
    if q_offset + q_length != kv_offset + kv_length:
        return False
    if attention_mask is None:
        return True
    if torch.compiler.is_compiling() or attention_mask.dim() != 2:
        return False
    if attention_mask.shape[-1] < kv_offset + kv_length:
        return False
    return bool(attention_mask[:, kv_offset : kv_offset + kv_length].all())


def sparse_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[Tensor] = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> Optional[Tensor]:
    """The ``AttentionMaskInterface`` entry for ``"sparse_attn"``.

    Returns None when the mask would be plain bottom-right causal (our op applies that itself:
    the sparse fast path), else sdpa's 4-D boolean mask ``[B, 1, q_length, kv_length]`` (True =
    may attend), which routes the layer to the exact masked path.

    Example::

        >>> sparse_attention_mask(1, 4, 6, q_offset=2) is None                  # chunked prefill
        True
        >>> pad = torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
        >>> sparse_attention_mask(1, 4, 4, attention_mask=pad).shape
        torch.Size([1, 1, 4, 4])
    """
    if (allow_is_causal_skip and mask_function is causal_mask_function
            and _plain_causal(q_length, kv_length, q_offset, kv_offset, attention_mask)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


def _take_pre_rope(pattern: Optional[AttentionPattern]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    captured = getattr(pattern, "_sparse_attn_captured", None)
    if not captured:
        return None, None
    return captured.pop("q", None), captured.pop("k", None)


def sparse_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> Tuple[Tensor, None]:
    """The ``AttentionInterface`` entry for ``"sparse_attn"``.

    Args:
        module: the attention layer (its ``sparse_pattern`` decides the layout; none = dense).
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` (post-RoPE, cache included).
        attention_mask: None (plain causal) or the 4-D mask from :func:`sparse_attention_mask`.
        dropout: must be 0 (the op has no dropout).
        scaling: softmax scale.
        is_causal: must not be False (decoder attention only).
        kwargs: ``position_ids`` is passed to the pattern; ``softcap``, sinks and paged caches
            are rejected.

    Returns:
        ``(out [B, Sq, Hq, D], None)`` like the other interfaces.
    """
    if dropout:
        raise ValueError(f"attn_implementation='sparse_attn' has no attention dropout; got dropout={dropout} "
                         "(set config.attention_dropout=0 or call model.eval())")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("attn_implementation='sparse_attn' supports causal (decoder) attention only")
    for name in ("softcap", "s_aux", "sinks", "cache"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='sparse_attn' does not support {name!r}")
    pattern = getattr(module, "sparse_pattern", None)
    if pattern is None and getattr(getattr(module, "config", None), "sparse_attention", None):
        raise RuntimeError("this model's config asks for sparse attention but its layers have no pattern "
                           "modules; call apply_sparse_attention(model) to attach them")
    q_pre, k_pre = _take_pre_rope(pattern)
    marked = s2_cache_layer(key)
    if marked is not None:  # an S2Cache layer: prefill over the prompt, or decode from its shards
        layer, phase = marked
        if attention_mask is not None:
            raise ValueError("S2Cache needs an unpadded batch (plain causal attention); for a padded batch use "
                             "past_key_values=DynamicCache() (generate() does so by itself)")
        if pattern is not None and pattern.distill:
            raise ValueError("distillation runs on whole sequences, without an S2Cache")
        if phase == "decode":
            out = layer.s2.attend(query, scale=scaling, backend=layer.backend)
            return out.transpose(1, 2).contiguous(), None
    out = pattern_attention(pattern, query, key, value, attn_mask=attention_mask, q_pre=q_pre, k_pre=k_pre,
                            position_ids=kwargs.get("position_ids"), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------------
# Registration (and rebuilding patterns when a saved model is loaded)
# --------------------------------------------------------------------------------------------------
def _saved_options(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The options of a saved ``config.sparse_attention``, checked as untrusted data: a config may
    name no file to read (gate weights travel in the checkpoint's state dict) and no code (a
    ``layout_fn`` is a registered name, resolved by ``BlockMaskPattern``)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("method"), str):
        raise ValueError("config.sparse_attention must be a dict with a 'method' string")
    options = saved.get("options", {})
    if not isinstance(options, dict):
        raise ValueError("config.sparse_attention['options'] must be a dict")
    if options.get("gates") is not None:
        raise ValueError("a saved config.sparse_attention may not name gates to load (got "
                         f"{str(options['gates'])[:200]!r}); the gate weights are in the checkpoint, or pass "
                         "gates=... to apply_sparse_attention yourself")
    return dict(options)


def _post_init_with_patterns(self: PreTrainedModel) -> None:
    _ORIGINAL_POST_INIT(self)
    saved = getattr(self.config, "sparse_attention", None)
    if saved:  # whatever the attention implementation, so the checkpoint's pattern weights load
        layers = _attention_layers(self)
        if layers and any(getattr(m, "sparse_pattern", None) is None for _, m in layers):
            _attach_patterns(self, layers, saved["method"], _saved_options(saved), saved.get("layers"))


def _initialize_weights_with_patterns(self: PreTrainedModel, module: nn.Module, *args: Any, **kw: Any) -> None:
    # Pattern weights missing from a checkpoint: the model's own _init_weights does not know our
    # modules (it would leave them as uninitialised memory), so they use their reset_parameters().
    if not getattr(module, "_sparse_attn_pattern_part", False):
        return _ORIGINAL_INITIALIZE_WEIGHTS(self, module, *args, **kw)
    if getattr(module, "_is_hf_initialized", False):
        return None
    own = list(module.parameters(recurse=False))
    loaded = all(getattr(p, "_is_hf_initialized", False) for p in own)
    if own and not loaded and hasattr(module, "reset_parameters"):
        module.reset_parameters()
    module._is_hf_initialized = True
    return None


_S2_CACHE_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")


def _wants_s2_cache(model: nn.Module, generation_config: Any, model_kwargs: Dict[str, Any], mode: Any) -> bool:
    """generate() on a model whose S2 layers can keep shards only, in a setting the S2 cache serves:
    our attention, no cache asked for, one token per step after the prompt, no padding."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        return False
    if generation_config.cache_implementation is not None or getattr(generation_config, "is_assistant", False):
        return False
    mode = str(getattr(mode, "value", mode))
    if getattr(generation_config, "prefill_chunk_size", None) or mode not in _S2_CACHE_MODES:
        return False
    if model_kwargs.get("inputs_embeds") is not None or not s2_cache_patterns(model):
        return False
    mask = model_kwargs.get("attention_mask")
    return mask is None or bool(mask.all())  # one read at the start of generate()


def _prepare_cache_with_s2(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
    # generate()'s cache preparation: as transformers does it, then, for a model patched with
    # method="s2", its default DynamicCache replaced by an S2Cache (shards only)
    user_cache = model_kwargs.get("past_key_values") is not None
    result = _ORIGINAL_PREPARE_CACHE(self, generation_config, model_kwargs, generation_mode, batch_size,
                                     max_cache_length)
    cache = model_kwargs.get("past_key_values")
    if (not user_cache and type(cache) is DynamicCache
            and _wants_s2_cache(self, generation_config, model_kwargs, generation_mode)):
        model_kwargs["past_key_values"] = S2Cache(self, max_cache_len=max(1, int(max_cache_length)))
    return result


def register() -> None:
    """Register ``"sparse_attn"`` with transformers (attention and mask functions). Idempotent.

    After this, ``from_pretrained(dir, attn_implementation="sparse_attn")`` works, and a model
    saved after :func:`apply_sparse_attention` is rebuilt with its patterns (and their weights):
    ``register`` wraps ``PreTrainedModel.post_init`` so that models whose config holds
    ``sparse_attention`` get their pattern modules while they are constructed, before the
    checkpoint loads, wraps ``PreTrainedModel._initialize_weights`` so that pattern weights
    missing from a checkpoint get their own initialisation, and wraps
    ``GenerationMixin._prepare_cache_for_generation`` so that ``generate()`` on a model patched
    with ``method="s2"`` uses an :class:`S2Cache` instead of the default ``DynamicCache``. Models
    without that config are untouched.

    Example::

        >>> register()
        >>> model = AutoModelForCausalLM.from_pretrained("saved_dir", attn_implementation="sparse_attn")
    """
    global _ORIGINAL_POST_INIT, _ORIGINAL_INITIALIZE_WEIGHTS, _ORIGINAL_PREPARE_CACHE
    AttentionInterface.register(ATTN_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sparse_attention_mask)
    if _ORIGINAL_POST_INIT is None:
        _ORIGINAL_POST_INIT = PreTrainedModel.post_init
        PreTrainedModel.post_init = _post_init_with_patterns
    if _ORIGINAL_INITIALIZE_WEIGHTS is None and hasattr(PreTrainedModel, "_initialize_weights"):
        _ORIGINAL_INITIALIZE_WEIGHTS = PreTrainedModel._initialize_weights
        PreTrainedModel._initialize_weights = _initialize_weights_with_patterns
    if (_ORIGINAL_PREPARE_CACHE is None and S2Cache is not None
            and hasattr(GenerationMixin, "_prepare_cache_for_generation")):
        _ORIGINAL_PREPARE_CACHE = GenerationMixin._prepare_cache_for_generation
        GenerationMixin._prepare_cache_for_generation = _prepare_cache_with_s2


# --------------------------------------------------------------------------------------------------
# Patching a model
# --------------------------------------------------------------------------------------------------
def _attention_layers(model: nn.Module) -> List[Tuple[int, nn.Module]]:
    """``(layer_idx, attention module)`` for every Llama-style attention layer, by layer index."""
    found = []
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "head_dim", "layer_idx")):
            found.append((int(m.layer_idx), m))
    return sorted(found, key=lambda t: t[0])


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", None) or 10000.0)


def _spec(model: nn.Module, layer_idx: int, module: nn.Module) -> AttentionSpec:
    config = getattr(module, "config", None) or model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    return AttentionSpec(num_heads, num_kv, int(module.head_dim), _rope_theta(config), layer_idx)


class _CapturePreRope:
    """Forward hook on ``q_proj``/``k_proj`` (or ``q_norm``/``k_norm``): keeps the output as
    ``[B, H, S, D]`` on the pattern until the attention function takes it. A callable object (not
    a closure) so that ``copy.deepcopy(model)`` points the copy's hooks at the copy's pattern."""

    def __init__(self, pattern: AttentionPattern, slot: str, head_dim: int, config: Any) -> None:
        self.pattern, self.slot, self.head_dim, self.config = pattern, slot, head_dim, config

    def __call__(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if getattr(self.config, "_attn_implementation", ATTN_NAME) != ATTN_NAME:
            return  # another implementation runs (it would never take the tensors)
        if output.dim() == 3:
            output = output.view(output.shape[0], output.shape[1], -1, self.head_dim)
        self.pattern._sparse_attn_captured[self.slot] = output.transpose(1, 2)


def _attach(module: nn.Module, pattern: AttentionPattern) -> None:
    for handle in getattr(module, "_sparse_attn_hooks", ()):
        handle.remove()
    module._sparse_attn_hooks = []
    module.sparse_pattern = pattern
    for part in pattern.modules():
        part._sparse_attn_pattern_part = True
    if pattern.needs_pre_rope:
        pattern._sparse_attn_captured = {}
        for slot in ("q", "k"):
            target = getattr(module, f"{slot}_norm", None) or getattr(module, f"{slot}_proj")
            hook = _CapturePreRope(pattern, slot, int(module.head_dim), getattr(module, "config", None))
            module._sparse_attn_hooks.append(target.register_forward_hook(hook))


def _attach_patterns(model, layers, method, options, only_layers) -> Dict[str, Any]:
    """Build and attach a pattern per layer; returns the method's resolved (JSON) options."""
    resolved: Optional[Dict[str, Any]] = None
    common = {k: options[k] for k in ("decode", "backend") if k in options}
    for idx, module in layers:
        spec = _spec(model, idx, module)
        if only_layers is None or idx in only_layers:
            pattern = build_pattern(method, spec, **options)
            resolved = resolved or pattern.get_config()
        else:
            pattern = build_pattern("dense", spec, **common)
        ref = next(module.parameters(), None)
        if ref is not None and ref.device.type != "meta":
            pattern.to(device=ref.device)
        _attach(module, pattern)
    return resolved if resolved is not None else dict(options)


def apply_sparse_attention(
    model: nn.Module,
    method: Optional[str] = None,
    *,
    layers: Optional[Sequence[int]] = None,
    **options: Any,
) -> nn.Module:
    """Switch a Llama-style transformers model to sparse attention, in place; returns the model.

    Args:
        model: a ``PreTrainedModel`` (e.g. ``LlamaForCausalLM``) whose attention layers use
            ``ALL_ATTENTION_FUNCTIONS``.
        method: a key of :data:`METHODS` (``"dense"``, ``"s2"``, ``"seer"``, ``"block_mask"``), or
            None for what ``model.config.sparse_attention`` holds (``"dense"`` if nothing): pattern
            modules already attached are kept as they are (with their weights) when no options are
            given, else rebuilt from the saved options.
        layers: indices of the layers that get the method (others stay dense); default all.
        options: the method's options (see its pattern class in :mod:`sparse_attn.modules`), plus
            for every method ``block_size`` (16/32/64/128), ``decode`` (``"sparse"``: the method's
            rule for decode / chunked prefill where it has one; ``"dense"``) and ``backend``.
            ``method="seer"`` takes ``gates``: a directory from
            :func:`sparse_attn.patterns.seer.save_gates` (an ``nn.ModuleDict`` keyed by layer index
            holding ``{"prefill": SeerGate, "decode": SeerDecodeGate}``) or a SeerAttention
            authors' checkpoint directory (``config.json`` + ``attn_gate_weights.pth``; the format
            is detected), such a module, or None (fresh untrained gates -- what the trainer
            trains); ``threshold`` / ``topk`` / ``density`` / ``nz_ratio`` (with ``strict``,
            ``keep_first``, ``keep_last``, ``dense_last_rows``, ``share_gqa``) pick the blocks,
            default ``density=0.2``. Gates loaded from a directory bring the selection options
            saved with them (:func:`saved_selection`); the caller's options override them one by
            one, and a rule the caller gives replaces the saved rule. ``method="s2"`` takes the
            pattern options (``local_blocks``, ``vert_stride``, ...) and ``s2_cache`` (default True:
            ``generate()`` keeps only each KV head's shard, :class:`S2Cache`). ``method="block_mask"`` takes
            ``layout_fn``: a callable ``(q, k) -> layout or block mask``, or a name given to
            :func:`register_layout_fn`.

    Returns:
        ``model``, now with ``config._attn_implementation == "sparse_attn"``, a pattern module per
        attention layer (``.sparse_pattern``) and ``config.sparse_attention`` set.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
        >>> model = apply_sparse_attention(model, method="s2", block_size=16, local_blocks=4, vert_stride=4)
        >>> model.config.sparse_attention["method"], model.config._attn_implementation
        ('s2', 'sparse_attn')
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    attn_layers = _attention_layers(model)
    if not attn_layers:
        raise ValueError("model has no Llama-style attention layers (modules with q_proj/k_proj/v_proj, "
                         "head_dim and layer_idx)")
    saved = getattr(model.config, "sparse_attention", None)
    if method is None and saved and not options and layers is None and all(
            getattr(m, "sparse_pattern", None) is not None for _, m in attn_layers):
        _switch(model)  # patterns already attached (e.g. loaded with sdpa): keep them and their weights
        return model
    if method is None:
        saved = saved or {"method": "dense", "options": {}}
        method, saved_opts = saved["method"], _saved_options(saved)
        options = {**saved_opts, **options}
        if layers is None:
            layers = saved.get("layers")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if layers is not None:
        known = {idx for idx, _ in attn_layers}
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i not in known]
        if bad:
            raise ValueError(f"layers must be attention layer indices in {sorted(known)}, got {bad}")
        layers = sorted(set(layers))
    if method == "block_mask" and options.get("layout_fn") is None:
        raise ValueError("method='block_mask' needs layout_fn=callable(q, k) -> BlockSparseLayout or block mask")
    gates = options.get("gates")
    if isinstance(gates, (str, os.PathLike)):
        from ..patterns.seer import load_gates

        # the model's dims bound the sizes in the gates' JSON before anything is allocated (with
        # layers of different shapes, each layer's pattern checks its gates when it is built)
        specs = {(s.num_heads, s.num_kv_heads, s.head_dim) for s in
                 (_spec(model, idx, m) for idx, m in attn_layers if layers is None or idx in layers)}
        dims = dict(zip(("num_heads", "num_kv_heads", "head_dim"), specs.pop())) if len(specs) == 1 else None
        options["gates"], gate_config = load_gates(gates, model_dims=dims)  # ours or the authors' (detected)
        if method == "seer":
            options = _with_saved_selection(options, saved_selection(gate_config, gates))
    _own_config(model)  # before the patterns: their hooks keep the model's config
    resolved = _attach_patterns(model, attn_layers, method, options, layers)
    model.config.sparse_attention = {"method": method, "options": resolved, "layers": layers,
                                     "version": _CONFIG_VERSION}
    _switch(model)
    return model


def saved_selection(config: Any, path: Any = "gates") -> Dict[str, Any]:
    """The selection options stored with gates: from our ``gates_config.json`` the trainer's
    ``config["options"]["options"]`` (``model.config.sparse_attention`` at training time) restricted
    to :data:`~sparse_attn.modules.seer.SELECTION_OPTIONS`; from an authors' checkpoint its
    ``config["selection"]`` (their rule, when their config sets one). ``{}`` when there are none.
    The values are checked (:func:`~sparse_attn.modules.seer.check_selection_options`); bad ones are a
    :class:`~sparse_attn._files.CorruptFileError` naming the gates' config file.

    Example::

        >>> saved_selection({"options": {"method": "seer", "options": {"density": 0.1, "block_size": 16}}})
        {'density': 0.1}
    """
    from .._files import CorruptFileError
    from ..modules.seer import SELECTION_OPTIONS, check_selection_options

    if not isinstance(config, dict):
        return {}
    if config.get("format") == "seerattention":
        found, where = config.get("selection") or {}, os.path.join(os.fspath(path), "config.json")
    else:
        saved = config.get("options")
        found = saved.get("options") if isinstance(saved, dict) else None
        found = {k: v for k, v in found.items() if k in SELECTION_OPTIONS} if isinstance(found, dict) else {}
        where = os.path.join(os.fspath(path), "gates_config.json")
    try:
        return check_selection_options(found, "saved selection options")
    except (TypeError, ValueError) as e:
        raise CorruptFileError(where, str(e)) from None


def _with_saved_selection(options: Dict[str, Any], saved: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with the gates' saved selection under them: the caller's selection options win
    one by one, and a rule given by the caller (threshold / topk / density / nz_ratio) replaces the
    saved rule."""
    from ..modules.seer import SELECTION_RULES

    if any(options.get(k) is not None for k in SELECTION_RULES):
        saved = {k: v for k, v in saved.items() if k not in SELECTION_RULES}
    return {**saved, **options}


def _own_config(model: nn.Module) -> None:
    """Give ``model`` (and each submodule sharing it) a private copy of its config before it is
    changed: a transformers model keeps the config object it was built from, so writing into it
    would switch every other model built from that object (now or later) to sparse attention."""
    if getattr(model, "_sparse_attn_own_config", None) is model.config:
        return
    old = model.config
    new = copy.deepcopy(old)
    swap = {id(old): new}
    for name, value in vars(old).items():  # sub-configs (e.g. text_config) shared by submodules
        if type(value).__name__.endswith("Config") and hasattr(value, "to_dict"):
            swap[id(value)] = getattr(new, name)
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if cfg is not None and id(cfg) in swap:
            module.config = swap[id(cfg)]
    model._sparse_attn_own_config = model.config


def _switch(model: nn.Module) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
    else:  # pragma: no cover - transformers 4.x
        model.config._attn_implementation = ATTN_NAME


def sparse_patterns(model: nn.Module) -> Dict[int, AttentionPattern]:
    """The attached pattern modules by layer index (e.g. to set ``distill`` and read ``last_loss``).

    Example::

        >>> for p in sparse_patterns(model).values(): p.distill = True
    """
    return {idx: m.sparse_pattern for idx, m in _attention_layers(model) if getattr(m, "sparse_pattern", None)}


def collect_gates(model: nn.Module) -> nn.ModuleDict:
    """The Seer gates of a patched model in the layout :func:`sparse_attn.patterns.seer.save_gates`
    stores and ``apply_sparse_attention(..., gates=...)`` reads: ``{"<layer>": {"prefill": SeerGate,
    "decode": SeerDecodeGate}}`` (the modules themselves, not copies).

    Example::

        >>> save_gates("out/gates", collect_gates(model), {"base_model": "tiny"})
    """
    out = nn.ModuleDict()
    for idx, p in sparse_patterns(model).items():
        entry = nn.ModuleDict()
        if getattr(p, "gate", None) is not None:
            entry["prefill"] = p.gate
        if getattr(p, "decode_gate", None) is not None:
            entry["decode"] = p.decode_gate
        if len(entry):
            out[str(idx)] = entry
    return out
