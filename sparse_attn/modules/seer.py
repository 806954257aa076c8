"""SeerAttention as a pattern module: a learned gate on pooled pre-RoPE q/k picks the blocks."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from ..layout import BlockSparseLayout
from .patterns import AttentionPattern, AttentionSpec

__all__ = ["SeerPattern", "SELECTION_OPTIONS", "SELECTION_RULES", "DEFAULT_DENSITY", "check_selection_options"]

#: the selection rules of :func:`~sparse_attn.patterns.select_blocks` (at most one is given)
SELECTION_RULES = ("threshold", "topk", "density", "nz_ratio")
#: every selection option of :class:`SeerPattern` (the rules, their modifiers, causal_select)
SELECTION_OPTIONS = SELECTION_RULES + ("keep_first", "keep_last", "strict", "dense_last_rows", "share_gqa",
                                       "causal_select")
#: the rule when none is given: a target density of the causal triangle (see SeerPattern)
DEFAULT_DENSITY = 0.2
LOSSES = ("sparse_attn", "seerattention")


def check_selection_options(options: Dict[str, Any], where: str = "selection options") -> Dict[str, Any]:
    """Check :class:`SeerPattern` selection options (a dict with keys from
    :data:`SELECTION_OPTIONS`), as :func:`~sparse_attn.patterns.select_blocks` would; returns a copy.

    Raises:
        TypeError / ValueError naming ``where`` and the option (an unknown key, two rules, a number
        out of range, a non-bool flag).
    """
    if not isinstance(options, dict):
        raise TypeError(f"{where} must be a dict, got {type(options).__name__}")
    unknown = sorted(str(k)[:40] for k in options if k not in SELECTION_OPTIONS)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {list(SELECTION_OPTIONS)}")
    rules = [k for k in SELECTION_RULES if options.get(k) is not None]
    if len(rules) > 1:
        raise ValueError(f"{where}: give at most one of {', '.join(SELECTION_RULES)} (got {rules})")
    for key, value in options.items():
        if value is None and key in SELECTION_RULES:
            continue
        if key in ("threshold", "density", "nz_ratio"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}: {key} must be a number in [0, 1], got {str(value)[:40]!r}")
        elif key in ("topk", "keep_first", "keep_last", "dense_last_rows"):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 40:
                raise ValueError(f"{where}: {key} must be a non-negative int, got {str(value)[:40]!r}")
        elif not isinstance(value, bool):
            raise TypeError(f"{where}: {key} must be a bool, got {type(value).__name__}")
    return dict(options)


class SeerPattern(AttentionPattern):
    """SeerAttention: a learned gate scores pooled (pre-RoPE) q/k blocks; a rule on the scores picks
    the blocks (:func:`~sparse_attn.patterns.select_blocks`).

    * Prefill (``Sq == Sk``): :class:`~sparse_attn.patterns.SeerGate` on this call's pre-RoPE q/k.
      Selection is per query block from that block's pooled queries (the block-level lookahead that
      DESIGN.md describes: fine at inference, a leak in teacher-forced evaluation), or, with
      ``causal_select=True``, strictly causal from the previous block's scores. With
      ``prefill_gate=False`` (gates that only decode, as SeerAttention-R's) prefill runs dense.
    * Decode (``Sq == 1``), with ``decode_gate`` and ``decode="sparse"``:
      :class:`~sparse_attn.patterns.SeerDecodeGate` with its incremental cache of compressed key
      blocks, kept in this module and restarted at every prefill (one sequence batch at a time; no
      beam-search reordering). The token's own (last) key block is always computed, as in the
      authors' decode. Without a decode gate, decode runs dense. Through
      :func:`~sparse_attn.modules.pattern_attention` (and the Hugging Face drop-in) the selection
      goes to :func:`~sparse_attn.sparse_decode` as block lists (:meth:`decode_blocks`), so only the
      selected K/V blocks are read.
    * Chunked prefill (``1 < Sq < Sk``): dense (the gate would need the earlier chunks' pre-RoPE
      keys); the decode cache is still fed.
    * Distillation (``distill = True``): :meth:`distillation_forward`, with the loss ``distill_loss``
      (``"sparse_attn"``: :func:`~sparse_attn.patterns.seer.distillation_loss`; ``"seerattention"``:
      :func:`~sparse_attn.patterns.seer.seerattention_loss`, the authors').

    Selection (passed to :func:`~sparse_attn.patterns.select_blocks`; one rule at most): ``threshold``
    (softmax probability, ``>=``; ``>`` with ``strict``), ``topk``, ``density``, ``nz_ratio``
    (the authors' top-k rule), with ``keep_first`` / ``keep_last`` forced blocks, ``dense_last_rows``
    and ``share_gqa``. **Default: ``density=0.2``** (:data:`DEFAULT_DENSITY`): each query block
    computes 20% of its causal blocks, the sink and diagonal included -- 5x less work than causal
    dense attention, and a budget that means the same for any sequence length and for an untrained
    gate. (The previous default, the authors' ``threshold=2e-3``, was measured to keep 95% of the
    blocks: effectively dense. A softmax threshold is relative to the number of blocks in the row --
    a near-uniform row of ``n`` blocks puts ``1/n`` on each, so 2e-3 keeps all of them up to ~500
    blocks -- and its sparsity moves with the sequence length; a density does not.) The authors'
    rules: ``threshold=t, strict=True, keep_first=0,
    keep_last=0, dense_last_rows=2`` or ``nz_ratio=r, keep_first=0, keep_last=0, dense_last_rows=2``.

    Args:
        num_heads, num_kv_heads, head_dim: the layer's ``Hq``, ``Hkv``, ``D``.
        block_size: gate pooling block and layout block.
        threshold / topk / density / nz_ratio: the selection rule (at most one; default
            ``density=0.2``).
        keep_first, keep_last, strict, dense_last_rows, share_gqa: as in
            :func:`~sparse_attn.patterns.select_blocks`.
        causal_select: prefill selection that no token's mask can depend on later tokens through:
            query block ``r`` takes the scores of block ``r - 1`` (whose pooled queries and keys all
            precede it) plus its own diagonal block; block 0 sees only itself. Use it for
            teacher-forced evaluation and training; the default (False) is the paper's per-block
            selection, which looks ahead within a block.
        rope_theta: RoPE base of the gate (the model's).
        gate: extra :class:`~sparse_attn.patterns.SeerGate` kwargs (``hidden_size``, poolings,
            ``use_rope``, ``bias``, ``q_proj``, ``k_heads``, ``rope_positions``, ``rope_scaling``).
        decode_gate: also hold a :class:`~sparse_attn.patterns.SeerDecodeGate` (``True``, or a dict
            of its extra kwargs, e.g. ``{"own_block": "excluded"}`` for the authors' form and target).
        prefill_gate: hold a prefill gate (default); False: prefill is dense (needs a decode gate).

    Example::

        >>> p = SeerPattern(4, 2, 16, block_size=16, threshold=0.05)
        >>> q, k = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16)
        >>> p(q, k, q_pre=q, k_pre=k).shape           # per batch, per query head
        (1, 4, 7, 7)
    """

    name = "seer"
    needs_pre_rope = True
    per_sequence = False  # the decode gate's cache holds the whole batch

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 64,
        threshold: Optional[float] = None,
        topk: Optional[int] = None,
        density: Optional[float] = None,
        nz_ratio: Optional[float] = None,
        keep_first: int = 1,
        keep_last: int = 1,
        strict: bool = False,
        dense_last_rows: int = 0,
        share_gqa: bool = False,
        causal_select: bool = False,
        rope_theta: float = 10000.0,
        gate: Optional[Dict[str, Any]] = None,
        decode_gate: Union[bool, Dict[str, Any]] = False,
        prefill_gate: bool = True,
        decode: str = "sparse",
        backend: str = "auto",
    ) -> None:
        super().__init__(block_size=block_size, decode=decode, backend=backend)
        from ..patterns import SeerDecodeGate, SeerGate

        select = check_selection_options(dict(
            threshold=threshold, topk=topk, density=density, nz_ratio=nz_ratio, keep_first=keep_first,
            keep_last=keep_last, strict=strict, dense_last_rows=dense_last_rows, share_gqa=share_gqa,
            causal_select=causal_select), "seer selection")
        if all(select[k] is None for k in SELECTION_RULES):
            select["density"] = DEFAULT_DENSITY
        self.causal_select = select.pop("causal_select")
        self.select = select
        if not isinstance(prefill_gate, bool):
            raise TypeError(f"prefill_gate must be a bool, got {type(prefill_gate).__name__}")
        self.num_heads, self.num_kv_heads, self.head_dim = int(num_heads), int(num_kv_heads), int(head_dim)
        self.rope_theta = float(rope_theta)
        # gate options may come from a saved config (untrusted): sizes are checked against this
        # layer's dims before any gate is allocated
        self.gate_options = _gate_options("gate", {} if gate is None else gate, self)
        if not isinstance(decode_gate, (bool, dict)):
            raise TypeError(f"decode_gate must be a bool or a dict of options, got {type(decode_gate).__name__}")
        self.decode_gate_options: Optional[Dict[str, Any]] = (
            _gate_options("decode_gate", decode_gate, self) if isinstance(decode_gate, dict)
            else ({} if decode_gate else None))
        if not prefill_gate and self.decode_gate_options is None:
            raise ValueError("prefill_gate=False needs a decode gate (decode_gate=True or a dict): the pattern would "
                             "have no gate at all")
        self.gate = None
        if prefill_gate:
            self.gate = SeerGate(num_heads, num_kv_heads, head_dim, block_size=block_size, rope_theta=rope_theta,
                                 **self.gate_options)
        self.decode_gate = None
        if self.decode_gate_options is not None:
            self.decode_gate = SeerDecodeGate(num_heads, num_kv_heads, head_dim, block_size=block_size,
                                              rope_theta=rope_theta, **self.decode_gate_options)
        self.distill_loss = "sparse_attn"
        self._decode_cache: Any = None
        self._decode_batch = -1
        self.last_decode_loss: Optional[Tensor] = None

    @classmethod
    def from_spec(cls, spec: AttentionSpec, *, gates: Any = None, **options: Any) -> "SeerPattern":
        """Build for one layer. ``gates``: None (fresh gates), a directory written by
        :func:`~sparse_attn.patterns.seer.save_gates` or by the SeerAttention authors (see
        :func:`~sparse_attn.patterns.seer.load_gates`), or the module it holds -- an
        ``nn.ModuleDict`` keyed by layer index (``str``) whose entries are ``{"prefill": SeerGate,
        "decode": SeerDecodeGate}`` (either one optional; decode only: prefill runs dense) or a bare
        ``SeerGate``. The gates' own settings (block size, hidden size, poolings, RoPE, form) win;
        their weights are copied."""
        options.setdefault("rope_theta", spec.rope_theta)
        if gates is None:
            return cls(spec.num_heads, spec.num_kv_heads, spec.head_dim, **options)
        prefill, decode = _layer_gates(gates, spec)
        main = prefill if prefill is not None else decode
        cfg = main.get_config()
        for key in ("num_heads", "num_kv_heads", "head_dim"):
            if cfg[key] != getattr(spec, key):
                raise ValueError(f"gates for layer {spec.layer_idx} have {key}={cfg[key]}, the model has "
                                 f"{getattr(spec, key)}")
        if options.get("block_size", cfg["block_size"]) != cfg["block_size"]:
            raise ValueError(f"block_size={options['block_size']} but the gates were trained with "
                             f"block_size={cfg['block_size']}")
        shared = ("num_heads", "num_kv_heads", "head_dim", "block_size", "rope_theta")
        options.update(block_size=cfg["block_size"], rope_theta=cfg["rope_theta"])
        if prefill is not None:
            options["gate"] = {k: v for k, v in cfg.items() if k not in shared}
        else:
            options.update(prefill_gate=False, gate=None)
        if decode is not None:
            dcfg = decode.get_config()
            if dcfg["block_size"] != cfg["block_size"] or dcfg["rope_theta"] != cfg["rope_theta"]:
                raise ValueError(f"the prefill and decode gates of layer {spec.layer_idx} differ in block_size or "
                                 "rope_theta")
            options["decode_gate"] = {k: v for k, v in dcfg.items() if k not in shared}
        pattern = cls(spec.num_heads, spec.num_kv_heads, spec.head_dim, **options)
        if prefill is not None:
            pattern.gate.load_state_dict(prefill.state_dict())
        if decode is not None:
            pattern.decode_gate.load_state_dict(decode.state_dict())
        return pattern

    def get_config(self) -> Dict[str, Any]:
        sel = {k: v for k, v in self.select.items() if v is not None}
        cfg = {**super().get_config(), **sel, "causal_select": self.causal_select, "rope_theta": self.rope_theta,
               "gate": dict(self.gate_options),
               "decode_gate": False if self.decode_gate_options is None else dict(self.decode_gate_options)}
        if self.gate is None:
            cfg.update(gate={}, prefill_gate=False)
        return cfg

    # -- layouts ----------------------------------------------------------------------------------
    def _select(self, logits: Tensor, seq_q: int, seq_k: int) -> BlockSparseLayout:
        from ..patterns import select_blocks

        return select_blocks(logits, block_size=self.block_size, seq_q=seq_q, seq_k=seq_k,
                             num_kv_heads=self.num_kv_heads, causal=True, **self.select)

    def _select_decode(self, logits: Tensor, seq_k: int) -> BlockSparseLayout:
        """Decode step: the rule on the gate's row, plus the token's own (last) key block, which the
        decode always computes (the authors' ``mask[..., -1] = True``; a gate with
        ``own_block="excluded"`` never scores it)."""
        layout = self._select(logits, 1, seq_k)
        own = torch.zeros(1, 1, 1, logits.shape[-1], dtype=torch.bool, device=logits.device)
        own[..., -1] = True
        return layout | BlockSparseLayout.from_block_mask(own, self.block_size, 1, seq_k)

    def decode_blocks(self, q, k, *, q_pre=None, k_pre=None, position_ids=None):
        """Decode-shaped calls: the decode gate's selection as :func:`~sparse_attn.sparse_decode`
        block lists (:meth:`~sparse_attn.patterns.SeerDecodeGate.select` with this pattern's rule;
        the op adds the token's own block, as :meth:`layout` does), None (dense: no decode gate,
        no prefill seen, or a chunk of several tokens, whose keys still feed the gate's cache).
        Advances the gate's cache like :meth:`layout`; call one or the other."""
        self._pre(q_pre, k_pre, q, k)
        sq, sk = q.shape[2], k.shape[2]
        if sq == sk:
            return NotImplemented  # prefill: the layout path
        logits = self._decode_logits(q_pre, k_pre, sk, prefill=False)
        return None if logits is None else self.decode_gate.select(logits, seq_k=sk, **self.select)

    def reset(self) -> None:
        self._decode_cache, self._decode_batch = None, -1

    def _decode_logits(self, q_pre: Tensor, k_pre: Tensor, seq_k: int, prefill: bool) -> Optional[Tensor]:
        """Keep the decode gate's cache of compressed keys in step with this call's keys; for a
        decode step (``Sq == 1``) return the gate's logits ``[B, Hkv, 1, Mk]``, else None."""
        if self.decode_gate is None:
            return None
        if prefill:
            self._decode_cache, self._decode_batch = self.decode_gate.new_cache(), k_pre.shape[0]
        elif self._decode_cache is None:
            return None  # no prefill seen for this sequence: nothing to continue from
        elif self._decode_batch != k_pre.shape[0]:
            raise ValueError("the Seer decode cache holds another batch (beam-search reordering is not "
                             "supported); run a new prefill")
        if q_pre.shape[2] == 1 and not prefill:
            return self.decode_gate.step(q_pre, k_pre, self._decode_cache, position=seq_k - 1)
        self.decode_gate.extend_cache(k_pre, self._decode_cache, position=seq_k - 1)
        return None

    def _pre(self, q_pre, k_pre, q, k):
        if q_pre is None or k_pre is None:
            raise ValueError("method 'seer' needs the pre-RoPE q_pre and k_pre (the HF integration captures them "
                             "with hooks on q_proj/k_proj; SparseAttention passes them)")
        if q_pre.shape != q.shape or k_pre.shape[:2] != k.shape[:2] or k_pre.shape[2] > k.shape[2]:
            raise ValueError(f"q_pre {tuple(q_pre.shape)} / k_pre {tuple(k_pre.shape)} do not match q "
                             f"{tuple(q.shape)} / k {tuple(k.shape)}")

    def layout(self, q, k, *, q_pre=None, k_pre=None, position_ids=None):
        self._pre(q_pre, k_pre, q, k)
        sq, sk = q.shape[2], k.shape[2]
        if sq == sk:  # prefill: k_pre holds every key
            self._decode_logits(q_pre, k_pre, sk, prefill=True)
            if self.gate is None:
                return None  # decode-only gates: dense prefill
            logits = self.gate(q_pre, k_pre, position_ids)
            return self._select(previous_block_scores(logits) if self.causal_select else logits, sq, sk)
        logits = self._decode_logits(q_pre, k_pre, sk, prefill=False)
        return None if logits is None else self._select_decode(logits, sk)

    # -- training ---------------------------------------------------------------------------------
    def _loss(self, logits: Tensor, target: Tensor, decode: bool) -> Tensor:
        from ..patterns.seer import distillation_loss, seerattention_loss

        if self.distill_loss not in LOSSES:
            raise ValueError(f"distill_loss must be one of {LOSSES}, got {self.distill_loss!r}")
        if self.distill_loss == "seerattention":  # prefill drops the first quarter of the query blocks
            return seerattention_loss(logits, target, drop_first=0.0 if decode else 0.25)
        return distillation_loss(logits, target)

    def distillation_forward(self, q, k, v, *, q_pre=None, k_pre=None, position_ids=None, scale=None):
        """Dense causal output ``[B, Hq, S, D]`` (q's dtype, not differentiable) and the gates' losses.

        ``last_loss = loss(gate(q_pre, k_pre), attention_block_map(q, k))`` (post-RoPE q/k for the
        target, one fused pass with the output); with a decode gate also ``last_decode_loss``
        against the per-token, GQA-max-reduced map (a second pass; the token's own block dropped
        and the row renormalised when the gate has ``own_block="excluded"``). ``loss`` is
        ``distill_loss``'s. Prefill only (``Sq == Sk``): the target needs the whole attention matrix.
        """
        from ..patterns import attention_block_map

        self._pre(q_pre, k_pre, q, k)
        if q.shape[2] != k.shape[2] or k_pre.shape[2] != k.shape[2]:
            raise ValueError("Seer distillation runs on whole sequences (Sq == Sk, no KV cache)")
        target, out = attention_block_map(q, k, v=v, block_size=self.block_size, causal=True, scale=scale,
                                          return_output=True)
        self.last_loss = None
        if self.gate is not None:
            self.last_loss = self._loss(self.gate(q_pre, k_pre, position_ids), target, decode=False)
        if self.decode_gate is not None:
            target = attention_block_map(q, k, block_size=self.block_size, causal=True, scale=scale,
                                         pool_queries=False, reduce_gqa="max",
                                         exclude_own_block=self.decode_gate.own_block == "excluded")
            self.last_decode_loss = self._loss(self.decode_gate(q_pre, k_pre, position_ids), target, decode=True)
        return out


def previous_block_scores(logits: Tensor) -> Tensor:
    """Prefill logits ``[B, H, M, M]`` -> row ``r`` holds row ``r - 1``'s scores, and its own
    diagonal block gets the row's best score (so it is allowed and ranks first; row 0: only it)."""
    shifted = torch.full_like(logits, float("-inf"))
    shifted[:, :, 1:] = logits[:, :, :-1]
    best = shifted.amax(dim=-1)
    best = torch.where(torch.isinf(best), torch.zeros_like(best), best)
    diag = torch.arange(logits.shape[2], device=logits.device)
    shifted[:, :, diag, diag] = best
    return shifted


def _gate_options(name: str, options: Any, pattern: "SeerPattern") -> Dict[str, Any]:
    """Extra gate kwargs, checked against the pattern's layer before anything is allocated:
    a dict with string keys, none of the pattern's own arguments, sizes bounded by
    :func:`~sparse_attn.patterns.seer.check_gate_options`."""
    from ..patterns.seer import check_gate_options

    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise TypeError(f"{name} options must be a dict with string keys, got {type(options).__name__}")
    for key in ("block_size", "rope_theta", "num_heads", "num_kv_heads", "head_dim"):
        if key in options:
            raise ValueError(f"{name} options must not set {key!r}; it is the pattern's own argument")
    check_gate_options(options, num_heads=pattern.num_heads, num_kv_heads=pattern.num_kv_heads,
                       head_dim=pattern.head_dim, where=f"{name} options")
    return dict(options)


def _layer_gates(gates: Any, spec: AttentionSpec):
    """(prefill gate or None, decode gate or None) for one layer out of ``gates`` (see
    SeerPattern.from_spec); a directory is loaded with the layer's dims checked before anything is
    allocated."""
    from ..patterns import SeerDecodeGate, SeerGate

    layer_idx = spec.layer_idx
    if isinstance(gates, (str, os.PathLike)):
        from ..patterns.seer import load_gates

        gates, _ = load_gates(gates, model_dims=spec)
    entry = gates
    if isinstance(gates, nn.ModuleDict) and "prefill" not in gates and "decode" not in gates:
        if str(layer_idx) not in gates:
            raise ValueError(f"gates has no entry for layer {layer_idx} (keys: {list(gates.keys())[:8]})")
        entry = gates[str(layer_idx)]
    if isinstance(entry, SeerGate):
        return entry, None
    if isinstance(entry, nn.ModuleDict):
        prefill = entry["prefill"] if "prefill" in entry else None
        decode = entry["decode"] if "decode" in entry else None
        ok_prefill = prefill is None or isinstance(prefill, SeerGate)
        ok_decode = decode is None or isinstance(decode, SeerDecodeGate)
        if ok_prefill and ok_decode and (prefill is not None or decode is not None):
            return prefill, decode
    raise TypeError(f"gates for layer {layer_idx} must be a SeerGate or a ModuleDict with a 'prefill' SeerGate "
                    f"and/or a 'decode' SeerDecodeGate, got {type(entry).__name__}")
