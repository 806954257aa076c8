"""Tile configurations for the block-sparse attention kernels, in one table.

Keyed by GPU family and head-dim bucket. A kernel tile never exceeds the layout
block (tiles split a layout block; ``BLOCK_M`` divides ``bq`` and ``BLOCK_N``
divides ``bk``), so the table gives upper bounds that the launcher clips.

Provenance: starting points from the shapes FlashAttention-2-style Triton kernels
use on A100 (sm_80) and H100 (sm_90); not yet re-tuned for this project on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (family, pass, head-dim bucket) -> config. Buckets: padded head dim <= 64, <= 128, <= 256.
_TABLE: Dict[Tuple[str, str, int], TileConfig] = {
    # Hopper (H100 / H200)
    ("hopper", "fwd", 64): TileConfig(128, 128, 4, 3),
    ("hopper", "fwd", 128): TileConfig(128, 128, 8, 3),
    ("hopper", "fwd", 256): TileConfig(128, 64, 8, 2),
    ("hopper", "bwd", 64): TileConfig(64, 128, 4, 2),
    ("hopper", "bwd", 128): TileConfig(64, 128, 8, 2),
    ("hopper", "bwd", 256): TileConfig(32, 64, 8, 1),
    # Ampere (A100 / A10 / RTX 30xx) and anything older or unknown
    ("ampere", "fwd", 64): TileConfig(128, 64, 4, 3),
    ("ampere", "fwd", 128): TileConfig(128, 64, 8, 2),
    ("ampere", "fwd", 256): TileConfig(64, 32, 8, 1),
    ("ampere", "bwd", 64): TileConfig(64, 64, 4, 2),
    ("ampere", "bwd", 128): TileConfig(64, 64, 8, 1),
    ("ampere", "bwd", 256): TileConfig(32, 32, 8, 1),
    # TRITON_INTERPRET=1 on CPU tensors: small tiles keep numpy fast.
    ("interpret", "fwd", 64): TileConfig(32, 32, 4, 1),
    ("interpret", "fwd", 128): TileConfig(32, 32, 4, 1),
    ("interpret", "fwd", 256): TileConfig(32, 32, 4, 1),
    ("interpret", "bwd", 64): TileConfig(32, 32, 4, 1),
    ("interpret", "bwd", 128): TileConfig(32, 32, 4, 1),
    ("interpret", "bwd", 256): TileConfig(32, 32, 4, 1),
}


def gpu_family(device: torch.device) -> str:
    """The row of the table a device uses: "hopper" (sm_90+), "ampere" (older GPUs) or
    "interpret" (CPU tensors under TRITON_INTERPRET=1)."""
    if device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"


def tile_config(family: str, which: str, block_d: int, bq: int, bk: int, elem_bytes: int = 2) -> TileConfig:
    """The tile for pass ``which`` ("fwd" or "bwd"), clipped to the layout block ``(bq, bk)``.

    fp32 operands (``elem_bytes == 4``) take twice the shared memory per tile, so they get
    half the key tile and one pipeline stage less.
    """
    bucket = 64 if block_d <= 64 else 128 if block_d <= 128 else 256
    cfg = _TABLE[(family, which, bucket)]
    block_n, stages = cfg.block_n, cfg.num_stages
    if elem_bytes == 4 and family != "interpret":
        block_n, stages = max(16, block_n // 2), max(1, stages - 1)
    return TileConfig(min(cfg.block_m, bq), min(block_n, bk), cfg.num_warps, stages)


def kernel_tiles(family: str, kernel: str, head_dim: int, elem_bytes: int, block_q: int, block_k: int,
                 dense: bool) -> dict:
    """Launch parameters (tile constexprs + warps/stages) of ``kernel`` in {"fwd", "dkdv", "dq"}.

    A dense launch has no layout block, so its tiles are the table's and ``BQ``/``BK`` (the
    layout block the kernel steps over) equal them. dQ uses the transpose of the dK/dV tile:
    many query rows, few keys per step.
    """
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    bq, bk = (128, 128) if dense else (block_q, block_k)
    cfg = tile_config(family, "fwd" if kernel == "fwd" else "bwd", block_d, bq, bk, elem_bytes)
    bm, bn = (min(cfg.block_n, bq), min(cfg.block_m, bk)) if kernel == "dq" else (cfg.block_m, cfg.block_n)
    return dict(BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, BQ=bm if dense else bq, BK=bn if dense else bk,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
