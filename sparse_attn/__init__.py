"""sparse_attn: block-sparse attention with autograd, fast on GPUs, exact everywhere.

>>> from sparse_attn import sparse_attention, BlockSparseLayout
"""

import importlib.util as _ilu
import os as _os
import sys as _sys


def _mount_triton_kernels() -> None:
    """Make ``sparse_attn.triton_kernels`` importable from a source checkout too.

    The kernels live in the top-level ``triton_kernels/`` folder and are installed as
    ``sparse_attn.triton_kernels`` (a top-level ``triton_kernels`` name belongs to the
    Triton project). An install (regular or editable) already provides the subpackage;
    running from a checkout with ``PYTHONPATH=.`` does not, so register it here. Nothing
    is imported from Triton by this.
    """
    name = __name__ + ".triton_kernels"
    if name in _sys.modules or _ilu.find_spec(name) is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "triton_kernels")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = _ilu.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_mount_triton_kernels()

from .layout import BlockSparseLayout  # noqa: E402
from .decode import sparse_decode  # noqa: E402
from .merge import merge_attention  # noqa: E402
from .ops import BACKENDS, available_backends, sparse_attention  # noqa: E402
from .reference import reference_attention  # noqa: E402

__all__ = ["sparse_attention", "sparse_decode", "BlockSparseLayout", "merge_attention", "reference_attention",
           "available_backends", "BACKENDS"]
__version__ = "0.1.0"
