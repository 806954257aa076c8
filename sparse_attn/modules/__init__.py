"""nn.Modules: per-layer pattern modules and ``SparseAttention``.

>>> from sparse_attn.modules import SparseAttention, KVCache, S2Pattern, PATTERNS
"""

from .attention import KVCache, SparseAttention, apply_rope, rope_cos_sin
from .functional import masked_attention, pattern_attention
from .patterns import AttentionPattern, AttentionSpec, BlockMaskPattern, DensePattern, S2Pattern, register_layout_fn
from .registry import PATTERNS, build_pattern
from .seer import SeerPattern

__all__ = [
    "SparseAttention",
    "KVCache",
    "rope_cos_sin",
    "apply_rope",
    "pattern_attention",
    "masked_attention",
    "AttentionPattern",
    "AttentionSpec",
    "DensePattern",
    "S2Pattern",
    "BlockMaskPattern",
    "register_layout_fn",
    "SeerPattern",
    "PATTERNS",
    "build_pattern",
]
