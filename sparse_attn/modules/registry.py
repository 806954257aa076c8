"""The table of pattern methods: a new method is one entry here (and its class)."""

from __future__ import annotations

from typing import Any, Dict

from .patterns import AttentionPattern, AttentionSpec, BlockMaskPattern, DensePattern, S2Pattern
from .seer import SeerPattern

__all__ = ["PATTERNS", "build_pattern"]


PATTERNS: Dict[str, type] = {
    "dense": DensePattern,
    "s2": S2Pattern,
    "block_mask": BlockMaskPattern,
    "seer": SeerPattern,
}


def build_pattern(method: str, spec: AttentionSpec, **options: Any) -> AttentionPattern:
    """Build the pattern module named ``method`` (a key of :data:`PATTERNS`) for one layer.

    Example::

        >>> build_pattern("s2", AttentionSpec(32, 8, 128), local_blocks=8, vert_stride=16)
        S2Pattern(block_size=64, decode='sparse', backend='auto', local_blocks=8, ...)
    """
    if method not in PATTERNS:
        raise ValueError(f"method must be one of {sorted(PATTERNS)}, got {method!r}")
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    try:
        return PATTERNS[method].from_spec(spec, **options)
    except TypeError as e:
        raise TypeError(f"bad option for method {method!r}: {e}") from None
