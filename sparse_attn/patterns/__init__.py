"""Producers of sparsity: each method's pattern, ending in a :class:`~sparse_attn.BlockSparseLayout`.

=========================  ==================================================================
name                       what
=========================  ==================================================================
``strided``                S2 / DKernel: local window + per-head strided blocks (``s2.py``)
``S2Config``               the S2 options, checked once (also ``sparse_decode``'s closed-form kv_blocks)
``S2KVCache``              decode KV cache keeping, per KV head, only the S2 shard it reads
``S2DecodePart``           one op call's share of an ``S2KVCache`` decode (dense heads apart)
``S2DecodeArgs``           one ``sparse_decode`` call's inputs over an ``S2KVCache`` store
``select_blocks``          scores/logits -> layout (threshold, top-k or target density)
``attention_block_map``    block max-pooled softmax map (SeerAttention's training target)
``SeerGate``               SeerAttention's learned block gate (prefill)
``SeerDecodeGate``         the gate for one query token with a cache of compressed K blocks
``SeerDecodeCache``        that cache (pooled, projected K of completed blocks)
``distillation_loss``      KL(target || softmax(gate logits)), the gates' training loss
``seerattention_loss``     the SeerAttention authors' loss (per-element mean, first rows dropped)
``save_gates``             gates -> safetensors + JSON (``load_gates`` reads them back, and the
                           SeerAttention authors' checkpoint directories)
``gate_from_seerattention``         a SeerGate holding an authors' prefill AttnGate
``decode_gate_from_seerattention``  a SeerDecodeGate holding an authors' decode AttnGate
=========================  ==================================================================

Names are resolved lazily, so importing one pattern never imports the others (or Triton).
"""

from importlib import import_module as _import_module

_EXPORTS = {
    "strided": ".s2",
    "strided_block_mask": ".s2",
    "S2Config": ".s2",
    "S2DecodeArgs": ".s2_cache",
    "S2KVCache": ".s2_cache",
    "S2DecodePart": ".s2_cache",
    "select_blocks": ".select",
    "attention_block_map": ".block_map",
    "SeerGate": ".seer",
    "SeerDecodeGate": ".seer",
    "SeerDecodeCache": ".seer_decode",
    "distillation_loss": ".seer",
    "seerattention_loss": ".seer",
    "save_gates": ".seer_io",
    "load_gates": ".seer_io",
    "gate_from_seerattention": ".seer_compat",
    "decode_gate_from_seerattention": ".seer_compat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
