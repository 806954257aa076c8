"""Triton kernels and their launchers (installed as ``sparse_attn.triton_kernels``).

Only ``@triton.jit`` kernels and the functions that launch them live here: no
autograd, no validation, no modules. Import the submodules directly; this file
imports nothing so that ``sparse_attn`` loads without Triton.
"""
