"""Testing utilities that ship with the package (the differential fuzzer: :mod:`sparse_attn.testing.fuzz`).

Nothing here is imported by :mod:`sparse_attn` itself.
"""
