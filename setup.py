"""Packaging for sparse_attn.

``pip install -e .`` needs no GPU and no nvcc: the package is Python + Triton.
``triton_kernels/`` (a top-level folder) is installed as ``sparse_attn.triton_kernels``,
because the top-level import name ``triton_kernels`` belongs to the Triton project.

Optional CUDA C++ extension ``sparse_attn._C`` (the decode kernel of ``csrc/decode``): built only
when the build environment has a CUDA build of torch and a CUDA toolkit (nvcc), so install with
``pip install -e . --no-build-isolation`` into an environment that has torch for it to be built.
Without it, ``sparse_attn._cuda`` JIT-builds the same sources on first use (or Triton runs).

* ``SPARSE_ATTN_SKIP_CUDA_BUILD=1``: never build it.
* ``SPARSE_ATTN_CUDA_ARCHS``: ``;``-separated compute capabilities, default ``80;90a``.
* ``MAX_JOBS``: parallel compile jobs (torch's BuildExtension reads it).
"""

import os

from setuptools import find_packages, setup


def _cuda_extension():
    """``(ext_modules, cmdclass)`` for ``sparse_attn._C``, or empty ones (with the reason printed)."""
    if os.environ.get("SPARSE_ATTN_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001  (no torch in the build environment: a pure-Python install)
        print(f"sparse_attn: not building the CUDA extension ({type(exc).__name__}: {exc})")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (CUDA_HOME/nvcc)"
        print(f"sparse_attn: not building the CUDA extension ({why})")
        return [], {}
    archs = [a.strip() for a in os.environ.get("SPARSE_ATTN_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext = CUDAExtension(
        "sparse_attn._C",
        sources=["csrc/decode/binding_cuda.cu", "csrc/decode/py_module.cpp"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "-lineinfo", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


_EXT_MODULES, _CMDCLASS = _cuda_extension()

setup(
    name="sparse_attn",
    version="0.1.0",
    description="Block-sparse attention with autograd: Triton kernels, an exact PyTorch reference, "
    "and the sparsity patterns of SeerAttention and S2-Attention (SEA and the Routing Transformer are planned)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["sparse_attn", "sparse_attn.*"]) + ["sparse_attn.triton_kernels"],
    package_dir={"sparse_attn": "sparse_attn", "sparse_attn.triton_kernels": "triton_kernels"},
    # numpy: Triton's interpreter (TRITON_INTERPRET=1, the CPU path of the kernels) runs on it
    install_requires=["torch>=2.5", "triton>=3.0", "numpy"],
    extras_require={
        "test": ["pytest>=7", "numpy"],
        "bench": ["matplotlib", "numpy"],
        "hf": ["transformers>=4.56", "safetensors"],
        "train": ["transformers>=4.56", "safetensors", "tqdm"],
    },
    entry_points={"console_scripts": ["sparse-attn=sparse_attn.cli:main"]},
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
    license="Apache-2.0",
    license_files=["LICENSE"],
)
