"""What a timing means: visible pairs, FLOPs, TFLOP/s, roofline fraction and speed-ups.

Counting convention (the one FlashAttention's benchmarks use, made exact for block layouts):

* a *pair* is one (query, key) product that the causal mask lets through; a causal
  ``S x S`` problem has ``S (S + 1) / 2`` pairs per (batch, head);
* forward FLOPs = ``4 * D * pairs`` (``Q K^T`` and ``P V``, two FLOPs per multiply-add);
  backward = ``2.5 x`` forward (five matmuls instead of two), forward+backward = ``3.5 x``;
* *computed* TFLOP/s count the pairs inside the blocks the layout keeps (summed over batch and
  query heads); *effective* TFLOP/s count the dense causal pairs, i.e. what a dense kernel would
  have to do in the same time. So ``effective = computed * dense_pairs / pairs``;
* *roofline* = computed TFLOP/s / the GPU's dense peak for the dtype (blank when unknown).

Decode (``--decode``) is memory-bound, so its rows count bytes instead: the K and V bytes of the
kept key blocks (every visible token of a kept block, once per KV head) plus the bytes of q and
out; achieved GB/s = those bytes / time, and ``bw_frac`` = achieved / the GPU's HBM peak
(:data:`PEAK_HBM_TBS`). :func:`decode_model_ms` is a MODEL of the same bytes on a chip (a
roofline over the data-sheet HBM bandwidth plus a fixed launch cost), not a measurement.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

__all__ = [
    "PASSES",
    "PASS_FLOP_FACTOR",
    "PEAK_TFLOPS",
    "pair_counts",
    "causal_blocks",
    "layout_stats",
    "flops",
    "peak_tflops",
    "fill_rates",
    "fill_per_second",
    "speedups",
    "PEAK_HBM_TBS",
    "MODEL_CHIPS",
    "DECODE_LAUNCH_US",
    "peak_hbm_gbps",
    "decode_model_ms",
]

PASSES = ("fwd", "bwd", "fwd_bwd")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s from the vendor data sheets.
# fp16 and bf16 have the same peak on these parts; fp32 (or TF32) is left blank on purpose.
# (regex on torch.cuda.get_device_name(), peak). First match wins; no match -> unknown.
PEAK_TFLOPS: List[Tuple[str, float]] = [
    (r"\bH200\b(?!.*\bNVL\b)", 989.4),  # H200 SXM; "H200 NVL" has a lower clock -> unknown
    (r"\bH100\b.*\b(SXM|HBM3)\b", 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bA100\b", 312.0),  # SXM and PCIe have the same tensor-core peak
    (r"\bL40S\b", 362.0),
]
_PEAK_DTYPES = ("bfloat16", "float16")

# HBM (DRAM) bandwidth in TB/s (1e12 bytes/s) from the vendor data sheets, by GPU name as above.
# H100 SXM's 3.35 is the value triton_kernels/configs.py CHIPS[90] models with.
PEAK_HBM_TBS: List[Tuple[str, float]] = [
    (r"\bH200\b", 4.8),  # H200 SXM and H200 NVL: 141 GB HBM3e, 4.8 TB/s
    (r"\bH100\b.*\bNVL\b", 3.9),
    (r"\bH100\b.*\b(SXM|HBM3)\b", 3.35),
    (r"\bH100\b.*\bPCIe\b", 2.0),
    (r"\bA100\b.*\bSXM\w*-80GB\b", 2.039),
    (r"\bA100\b.*\b80GB\b.*\bPCIe\b", 1.935),
    (r"\bA100\b.*\b40GB\b", 1.555),
    (r"\bL40S\b", 0.864),
]
# The chips every decode row is modelled on, whatever machine runs (the columns model_*_<key>).
MODEL_CHIPS: Dict[str, Tuple[str, float]] = {"h100": ("H100 SXM", 3.35), "h200": ("H200", 4.8)}
# Model parameter: the fixed cost of one decode call, two launches (split pass + merge) of ~2.5 us.
DECODE_LAUNCH_US = 5.0


def pair_counts(seq_q: int, seq_k: int, bq: int, bk: int, causal: bool = True,
                device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Visible (query, key) pairs per block, and each block's full area.

    Causal masking is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``.

    Args:
        seq_q, seq_k: sequence lengths (need not be multiples of the block sizes).
        bq, bk: query / key block sizes.
        causal: count only the pairs the causal mask lets through.
        device: where to build the result (default CPU).

    Returns:
        ``(counts, area)``, both int64 ``[Mq, Mk]`` with ``Mq = ceil(Sq / bq)``, ``Mk = ceil(Sk / bk)``.

    Example::

        >>> counts, area = pair_counts(3, 3, 2, 2)     # 1 0 0 / 1 1 0 / 1 1 1
        >>> counts.tolist(), area.tolist()
        ([[3, 0], [2, 1]], [[4, 2], [2, 1]])
    """
    for name, val in (("seq_q", seq_q), ("seq_k", seq_k), ("bq", bq), ("bk", bk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name.startswith("seq") else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name.startswith('seq') else 'positive'} int, "
                             f"got {val!r}")
    mq, mk = -(-seq_q // bq), -(-seq_k // bk)
    i64 = dict(dtype=torch.int64, device=device)
    qstart = torch.arange(mq, **i64) * bq
    qend = (qstart + bq).clamp(max=seq_q)
    kstart = torch.arange(mk, **i64) * bk
    kend = (kstart + bk).clamp(max=seq_k)
    area = (qend - qstart)[:, None] * (kend - kstart)[None, :]
    if not causal:
        return area.clone(), area
    # Row i sees keys [0, i + off]: in key block c that is clamp(x, 0, L) keys with
    # x = i + off + 1 - kstart[c] and L = its length. Over the rows of query block r, x runs
    # through consecutive integers [a, b], so the sum is F(b) - F(a - 1) with
    # F(n) = sum_{x=1..n} min(x, L) (0 for n <= 0). O(Mq * Mk), never O(Sq * Mk).
    klen = (kend - kstart)[None, :]
    off = seq_k - seq_q

    def prefix(n: torch.Tensor) -> torch.Tensor:
        n = n.clamp(min=0)
        tri = torch.minimum(n, klen)
        return tri * (tri + 1) // 2 + (n - tri) * klen

    a = qstart[:, None] + off + 1 - kstart[None, :]
    b = (qend - 1)[:, None] + off + 1 - kstart[None, :]
    counts = prefix(b) - prefix(a - 1)
    return counts, area


def causal_blocks(seq_q: int, seq_k: int, bq: int, bk: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """bool ``[Mq, Mk]``: the blocks that hold at least one causally visible pair.

    Example::

        >>> causal_blocks(4, 4, 2, 2).tolist()
        [[True, False], [True, True]]
    """
    return pair_counts(seq_q, seq_k, bq, bk, True, device)[0] > 0


def layout_stats(mask: torch.Tensor, counts: torch.Tensor, batch: int, heads: int) -> Dict[str, Any]:
    """Pairs and block fractions a block mask computes, over the whole batch and all query heads.

    Args:
        mask: bool ``[Bl, Hl, Mq, Mk]`` (``Bl`` in {1, batch}; ``Hl`` divides ``heads``: query
            head ``h`` uses layout head ``h // (heads // Hl)``, so each layout head stands for
            ``heads // Hl`` query heads).
        counts: int ``[Mq, Mk]`` visible pairs per block (:func:`pair_counts`).
        batch, heads: ``B`` and ``Hq``.

    Returns:
        dict with ``pairs`` (visible pairs in kept blocks), ``dense_pairs`` (all visible pairs),
        ``blocks_frac`` (kept causal blocks / causal blocks) and ``blocks`` (kept causal blocks),
        all summed over ``B x Hq``.

    Example::

        >>> counts, _ = pair_counts(4, 4, 2, 2)
        >>> mask = torch.tensor([[[[True, False], [False, True]]]])
        >>> layout_stats(mask, counts, batch=1, heads=2)["pairs"]  # (1 + 2) + (1 + 2) per head
        12
    """
    if mask.dim() != 4 or mask.shape[-2:] != counts.shape:
        raise ValueError(f"mask must be [Bl, Hl, Mq, Mk] matching counts {tuple(counts.shape)}, "
                         f"got {tuple(mask.shape)}")
    bl, hl = mask.shape[0], mask.shape[1]
    if bl not in (1, batch) or heads % hl:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to batch={batch}, heads={heads}")
    rep = (batch // bl) * (heads // hl)
    counts = counts.to(mask.device)
    causal = counts > 0
    kept = mask & causal
    pairs = int((kept.to(torch.int64) * counts).sum()) * rep
    blocks = int(kept.sum()) * rep
    total_blocks = int(causal.sum()) * batch * heads
    return dict(pairs=pairs, dense_pairs=int(counts.sum()) * batch * heads,
                blocks_frac=blocks / max(1, total_blocks), blocks=blocks)


def flops(pairs: int, head_dim: int, pass_: str) -> float:
    """FLOPs of one pass over ``pairs`` visible pairs: ``4 * D * pairs * {fwd 1, bwd 2.5, fwd_bwd 3.5}``.

    Example::

        >>> flops(10, 64, "bwd")
        6400.0
    """
    if pass_ not in PASS_FLOP_FACTOR:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    return 4.0 * head_dim * pairs * PASS_FLOP_FACTOR[pass_]


def peak_tflops(gpu_name: Optional[str], dtype: str) -> Optional[float]:
    """The dense tensor-core peak (TFLOP/s) of a GPU for ``dtype``, or ``None`` when not known.

    Args:
        gpu_name: ``torch.cuda.get_device_name()``, e.g. ``"NVIDIA H100 80GB HBM3"``.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` (fp32 is always ``None``).

    Example::

        >>> peak_tflops("NVIDIA H100 PCIe", "bfloat16"), peak_tflops("NVIDIA GH200 480GB", "bfloat16")
        (756.0, None)
    """
    if not gpu_name or dtype not in _PEAK_DTYPES:
        return None
    for pattern, peak in PEAK_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return peak
    return None


def peak_hbm_gbps(gpu_name: Optional[str]) -> Optional[float]:
    """The data-sheet HBM bandwidth of a GPU in GB/s (1e9 bytes/s), or ``None`` when not known.

    Example::

        >>> peak_hbm_gbps("NVIDIA H200"), peak_hbm_gbps("NVIDIA H100 80GB HBM3"), peak_hbm_gbps("cpu")
        (4800.0, 3350.0, None)
    """
    if not gpu_name:
        return None
    for pattern, tbs in PEAK_HBM_TBS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return round(tbs * 1e3, 6)
    return None


def decode_model_ms(nbytes: float, hbm_gbps: float, launch_us: float = DECODE_LAUNCH_US) -> float:
    """MODELLED time (ms) of a decode call that must move ``nbytes`` through HBM: a fixed launch
    cost plus the bytes at the full data-sheet bandwidth. A lower bound of a roofline, not a
    measurement.

    Example::

        >>> round(decode_model_ms(4.8e9, 4800.0, launch_us=0.0), 6)   # 4.8 GB at 4.8 TB/s
        1.0
    """
    if not hbm_gbps > 0:
        raise ValueError(f"hbm_gbps must be positive, got {hbm_gbps!r}")
    return launch_us * 1e-3 + float(nbytes) / (hbm_gbps * 1e9) * 1e3


def fill_rates(row: Dict[str, Any], peak: Optional[float]) -> None:
    """Set ``flops``, ``tflops``, ``tflops_effective`` and ``roofline`` of a result row in place.

    Needs ``pairs``, ``dense_pairs``, ``head_dim`` and ``pass``; rates need ``ms > 0``.

    Example::

        >>> row = {"pairs": 5, "dense_pairs": 10, "head_dim": 64, "pass": "fwd", "ms": 1e-9}
        >>> fill_rates(row, peak=None); row["tflops_effective"] / row["tflops"]
        2.0
    """
    row["flops"] = flops(row["pairs"], row["head_dim"], row["pass"])
    row["dense_flops"] = flops(row["dense_pairs"], row["head_dim"], row["pass"])
    timed = fill_per_second(row, {"tflops": row["flops"], "tflops_effective": row["dense_flops"]}, 1e12)
    row["roofline"] = row["tflops"] / peak if timed and peak else None


def fill_per_second(row: Dict[str, Any], amounts: Dict[str, float], unit: float) -> bool:
    """Set ``row[name] = amount / (row["ms"] ms) / unit`` for each of ``amounts`` in place; all
    None, and False returned, unless the row has a positive ``ms``. The rates of :func:`fill_rates`
    (FLOP/s) and of the decode rows (bytes/s).

    Example::

        >>> row = {"ms": 2.0}
        >>> fill_per_second(row, {"gbps": 4e9}, 1e9), row["gbps"]
        (True, 2000.0)
    """
    ms = row.get("ms")
    timed = ms is not None and ms > 0
    for name, amount in amounts.items():
        row[name] = amount / (ms * 1e-3) / unit if timed else None
    return timed


def _shape_key(r: Dict[str, Any]) -> tuple:
    return (r["seq"], r["batch"], r["heads"], r["kv_heads"], r["head_dim"], r["dtype"], r["pass"])


def _mask_key(r: Dict[str, Any]) -> tuple:
    return _shape_key(r) + (r["pattern"], r["pattern_args"], r["density"], r["block"])


def speedups(rows: Iterable[Dict[str, Any]], baseline: str, flex: str = "flex") -> None:
    """Fill ``speedup_vs_sdpa`` (baseline ms / ms, same shape and pass) and ``speedup_vs_flex``
    (flex ms / ms, same shape, pass and block mask) on every timed row, in place.

    Example::

        >>> rows = [dict(seq=8, batch=1, heads=1, kv_heads=1, head_dim=8, dtype="bf16", pattern="dense",
        ...              pattern_args="", density=None, block=None, kernel=k, ms=ms, **{"pass": "fwd"})
        ...         for k, ms in (("sdpa_flash", 2.0), ("ours_triton", 1.0))]
        >>> speedups(rows, "sdpa_flash"); rows[1]["speedup_vs_sdpa"]
        2.0
    """
    rows = list(rows)
    base = {_shape_key(r): r["ms"] for r in rows if r["kernel"] == baseline and r.get("ms")}
    flex_ms = {_mask_key(r): r["ms"] for r in rows if r["kernel"] == flex and r.get("ms")}
    for r in rows:
        ms = r.get("ms")
        ok = ms is not None and ms > 0
        b = base.get(_shape_key(r))
        f = flex_ms.get(_mask_key(r))
        r["speedup_vs_sdpa"] = b / ms if (ok and b) else None
        r["speedup_vs_flex"] = f / ms if (ok and f and r["kernel"] not in (baseline, flex)) else None
