"""Packaging for sparse_attn.

``pip install -e .`` needs no GPU and no nvcc: the package is Python + Triton.
``triton_kernels/`` (a top-level folder) is installed as ``sparse_attn.triton_kernels``,
because the top-level import name ``triton_kernels`` belongs to the Triton project.
"""

from setuptools import find_packages, setup

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
    license="Apache-2.0",
    license_files=["LICENSE"],
)
