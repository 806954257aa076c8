"""A seeded differential fuzzer for :func:`sparse_attn.sparse_attention`.

Every example is drawn from ``(seed, index)`` alone (``random.Random`` seeded with a string, and
a ``torch.Generator`` seeded from it), so a failure is replayed from those two numbers. One
example is a random valid call -- layout (block mask of random density with empty and full rows
and unread key blocks, or no layout; the mask or the counts + indices form; blocks 16..128,
square or not; ``Bl in {1, B}``, ``Hl in {1, Hkv, Hq}``), shape (``Sq``, ``Sk`` from 1 up, equal or
not, every residue), GQA ratio, head dim, dtype, scale (default, small, zero, negative, large,
huge up to far past any real model), causal or not, and the memory layout of every input
(contiguous, ``[B, S, H, D]`` storage seen through ``.transpose(1, 2)``, slices of wider or longer
buffers whose unused storage holds NaN, a non-unit last stride, packed K/V, expanded upstream
gradients). Each available backend runs it, forward and (usually) backward with upstream
gradients on both ``out`` and ``lse``, and is compared with an fp64 oracle: dense masked attention
over the element mask, written here from the semantics in the README, independent of the library.

The error measure (what the tolerances bound). For a row ``r`` of a result (a query row of
``out``/``dq``, a key row of ``dk``/``dv``; ``lse`` is one number per row)::

    err_r = max_d |got - oracle| / max(max_d |oracle|, PHI * N_r)

``N_r`` is the row's *natural magnitude*: the same sums as the result with every term replaced
by its absolute value (``out``: ``P @ |V|``; ``dv``: ``P^T @ |dO|``; ``dq``: ``scale * W @ |K|`` and
``dk``: ``scale * W^T @ |Q|`` with ``W = P * (|dO| @ |V|^T + A)``, ``A = rowsum(P * (|dO| @ |V|^T)) +
|dlse|``; ``lse``: ``1 + max |scale| |q| . |k|`` over the keys the row sees, and ``err = |diff| /
N_r``). A row whose oracle is much smaller than its terms (cancellation: a peaked softmax makes
``dP - delta`` nearly vanish in ``dq``) is held to ``PHI`` times its natural magnitude instead of
its own tiny size; every other row is held relative to its own largest entry, so a dropped or
extra block stands out. A row with ``N_r = 0`` (sees nothing, or a key nobody reads) must be
exactly 0 (``lse``: exactly ``-inf``).

Scales of the ``huge`` kind (``|scale|`` from 1e3 up to the op's limit) make the softmax a hard
arg-max: there ``lse`` is compared everywhere and ``out`` on rows whose arg-max is unambiguous;
the gradients only for NaN and for the rows and keys that must be zero. ``dq``/``dk`` are the
difference of two nearly equal numbers times the scale (garbage in every precision), and ``dv``
rests on probabilities the backward recomputes from fp32 scores: at ``|s| ~ 1e7`` one ulp is a
unit of the exponent, so a recomputation that rounds differently from the forward's (another
tile shape, another summation order) moves ``p`` by a factor of 2 or more (replay ``2:157``).

Used by ``tests/test_fuzz.py``; see README "Fuzz tier".
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sparse_attn import BlockSparseLayout, available_backends, sparse_attention
from sparse_attn.layout import compress_block_mask

__all__ = ["FuzzCase", "ExampleResult", "TOLERANCES", "PHI", "NAMES", "generate_case", "run_example",
           "targets", "oracle"]

NAMES = ("out", "lse", "dq", "dk", "dv")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
BLOCKS = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128, 8, 24, 48, 80, 96, 40, 72, 112, 160, 256, 1, 3, 17)
HEAD_DIM_WEIGHTS = (6, 6, 8, 6, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5)
# Floor of the denominator, in units of the row's natural magnitude (see the module docstring).
PHI = 1 / 16
# Bounds on err (above) per dtype and result: the largest err measured over the fuzz runs recorded
# in README "Fuzz tier", times a margin of about 1.5-2 (5 for fp32). The bf16 and fp16 dq/dk bounds
# are the kernels' measured backward error, ten and four times the reference backend's: their
# backward takes delta = rowsum(dO * O) from the output rounded to the input dtype, a term of size
# ulp(O) |dO| scale |K| in every dq row (and in dk) that the fp64 oracle and the reference (which
# sums P * dP in fp32) do not have. It shows most where a peaked softmax makes dq small.
TOLERANCES: Dict[str, Dict[str, float]] = {
    "float64": dict(out=1e-12, lse=1e-12, dq=1e-12, dk=1e-12, dv=1e-12),
    "float32": dict(out=2e-5, lse=4e-6, dq=2e-5, dk=2e-5, dv=2e-5),
    "float16": dict(out=2.5e-3, lse=4e-6, dq=4e-3, dk=4e-3, dv=1e-3),
    "bfloat16": dict(out=2.5e-2, lse=4e-6, dq=7e-2, dk=7e-2, dv=1.5e-2),
}
_NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FuzzCase:
    """One example. ``strides`` gives, for q, k, v, dO and dlse, ``(kind, a, b)``: ``contig``,
    ``bshd`` (``[B, S, H, D]`` storage, ``.transpose(1, 2)``), ``pad_d`` (columns ``[b, b + D)`` of a
    ``D + a`` wide buffer), ``pad_s`` (rows ``[b, b + S)`` of an ``S + a`` long buffer), ``colmajor``
    (``[B, H, D, S]`` storage, ``.transpose(-1, -2)``: last stride != 1, so the op copies),
    ``packed`` (k and v: one ``[B, Sk, 2, Hkv, D]`` buffer), ``expand`` (dO/dlse: dim ``a`` broadcast
    with stride 0). Unused storage holds NaN."""

    seed: int
    index: int
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    dtype: str
    causal: bool
    scale_kind: str  # default | small | zero | large | huge
    scale: Optional[float]
    layout: str  # dense | mask | idx (counts + indices, garbage in the padding slots)
    bq: int
    bk: int
    Bl: int
    Hl: int
    density: float
    edits: Tuple[str, ...]  # forced empty rows / full rows / unread key blocks
    strides: Tuple[Tuple[str, int, int], ...]
    grad: bool  # backward run (else forward under no_grad: no transposed layout)
    lse_grad: bool  # upstream gradient on lse too
    v_shift: float  # added to V (out = a mean near the shift: cancellation-free but large)
    family: str  # tile table for Triton under the interpreter: interpret | hopper | ampere
    tiles: str  # SPARSE_ATTN_TILES for the Triton backend: auto | wide | rows | exact

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        lay = "dense (no layout)" if self.layout == "dense" else (
            f"{self.layout} blocks ({self.bq},{self.bk}) Bl={self.Bl} Hl={self.Hl} density={self.density:.3g}"
            f"{' ' + '+'.join(self.edits) if self.edits else ''}")
        st = " ".join(f"{n}={k}" + (f"({a},{b})" if k not in ("contig", "bshd", "colmajor", "packed") else "")
                      for n, (k, a, b) in zip(("q", "k", "v", "do", "dlse"), self.strides))
        return (f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Sq={self.Sq} Sk={self.Sk} D={self.D} {self.dtype} "
                f"{'causal' if self.causal else 'non-causal'} scale={self.scale_kind}:{self.scale!r} | {lay} | "
                f"{st} | {'fwd+bwd' + (' (dlse)' if self.lse_grad else ' (no dlse)') if self.grad else 'fwd only'}"
                f" v_shift={self.v_shift:g} | triton tiles={self.tiles} family={self.family}")

    def replay(self) -> str:
        return f"SPARSE_ATTN_FUZZ_REPLAY={self.seed}:{self.index} pytest tests/test_fuzz.py"


def work(B: int, Hq: int, Sq: int, Sk: int, D: int) -> float:
    """A rough cost of one example under the interpreter, in 32x32 score tiles (head dim weighted)."""
    return B * Hq * -(-Sq // 32) * -(-Sk // 32) * (1 + D / 128)


def _length(rng: random.Random) -> int:
    style = rng.random()
    if style < 0.10:
        return 1
    if style < 0.35:
        return rng.randint(2, 40)
    if style < 0.80:
        return rng.randint(41, 160)
    return rng.randint(161, 320)


def _stride(rng: random.Random, which: str) -> Tuple[str, int, int]:
    kinds = ["contig", "bshd", "pad_d", "pad_s", "colmajor"]
    weights = [4, 2, 1, 1, 0.6]
    if which in ("do", "dlse"):
        kinds.append("expand")
        weights.append(1)
    if which == "dlse":  # 3-D: no head-dim tricks
        kinds, weights = ["contig", "pad_s", "expand"], [4, 1, 1]
    kind = rng.choices(kinds, weights)[0]
    if kind == "pad_d":
        a = rng.randint(1, 24)
        return kind, a, rng.randint(0, a)
    if kind == "pad_s":
        a = rng.randint(1, 40)
        return kind, a, rng.randint(0, a)
    if kind == "expand":
        return kind, rng.randrange(3 if which == "dlse" else 4), 0
    return kind, 0, 0


def generate_case(seed: int, index: int, max_work: float = 60.0) -> FuzzCase:
    """The example ``index`` of the run with master seed ``seed`` (deterministic)."""
    rng = random.Random(f"sparse_attn.fuzz:{seed}:{index}")
    dtype = rng.choices(list(DTYPES), [3, 4, 3, 0.4])[0]
    D = rng.choices(HEAD_DIMS, HEAD_DIM_WEIGHTS)[0]
    while True:
        Hkv = rng.choice([1, 1, 2, 2, 3, 4])
        group = rng.choice([1, 1, 2, 2, 3, 4, 8])
        B = rng.choice([1, 1, 2, 3])
        if Hkv * group <= 8 and B * Hkv * group <= 12:
            break
    Hq = Hkv * group
    for _ in range(100):
        Sq = _length(rng)
        Sk = Sq if rng.random() < 0.3 else _length(rng)
        if work(B, Hq, Sq, Sk, D) <= max_work:
            break
    else:  # shrink the longer side until it fits
        while work(B, Hq, Sq, Sk, D) > max_work and max(Sq, Sk) > 1:
            if Sq >= Sk:
                Sq = max(1, Sq // 2)
            else:
                Sk = max(1, Sk // 2)
    causal = rng.random() < 0.6

    kind = rng.choices(["default", "small", "zero", "large", "huge"], [8, 3, 0.5, 7, 1.5])[0]
    if kind == "default":
        scale = None
    elif kind == "small":
        scale = 10 ** rng.uniform(-4, math.log10(0.05))
    elif kind == "zero":
        scale = 0.0
    elif kind == "large":  # scores of standard deviation 1.5..6: a peaked softmax, still smooth
        scale = 10 ** rng.uniform(math.log10(1.5), math.log10(6.0)) / math.sqrt(D)
    else:  # a hard arg-max, up to the op's limit
        scale = 10 ** rng.uniform(3, 30)
    if scale is not None and scale != 0.0 and rng.random() < 0.15:
        scale = -scale

    layout = rng.choices(["dense", "mask", "idx"], [1.2, 6, 2.5])[0]
    bq = rng.choice(BLOCKS)
    bk = bq if rng.random() < 0.5 else rng.choice(BLOCKS)
    Bl = rng.choice(sorted({1, B}))
    Hl = rng.choice(sorted({1, Hkv, Hq}))
    r = rng.random()
    density = 0.0 if r < 0.03 else 1.0 if r < 0.15 else rng.uniform(0.05, 0.35) if r < 0.55 else rng.uniform(0.35, 0.95)
    edits = tuple(e for e, p in (("empty-rows", 0.5), ("full-rows", 0.3), ("unread-cols", 0.25)) if rng.random() < p)
    if layout == "dense":
        bq = bk = 64
        Bl = Hl = 1
        density, edits = 1.0, ()

    strides = [_stride(rng, w) for w in ("q", "k", "v", "do", "dlse")]
    if rng.random() < 0.12:
        strides[1] = strides[2] = ("packed", 0, 0)
    grad = rng.random() < 0.8
    lse_grad = rng.random() < 0.8
    v_shift = rng.choice([0.0, 0.0, 0.0, 0.0, 3.0, -20.0])
    family = rng.choices(["interpret", "hopper", "ampere"], [6, 2.5, 1.5])[0]
    tiles = rng.choices(["auto", "wide", "rows", "exact"], [5, 1.5, 1.5, 1.5])[0]
    return FuzzCase(seed, index, B, Hq, Hkv, Sq, Sk, D, dtype, causal, kind, scale, layout, bq, bk, Bl, Hl,
                    density, edits, tuple(strides), grad, lse_grad, v_shift, family, tiles)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The values (fp32, CPU, contiguous, already rounded to the case's dtype) and the block mask."""

    q: Tensor
    k: Tensor
    v: Tensor
    do: Tensor
    dlse: Tensor
    block_mask: Optional[Tensor]  # [Bl, Hl, Mq, Mk] bool
    idx_padding: Optional[Tensor]  # garbage for the padding slots of the counts + indices form
    idx_width: int


def _block_mask(case: FuzzCase, gen: torch.Generator) -> Optional[Tensor]:
    if case.layout == "dense":
        return None
    mq, mk = -(-case.Sq // case.bq), -(-case.Sk // case.bk)
    mask = torch.rand(case.Bl, case.Hl, mq, mk, generator=gen) < case.density
    for b in range(case.Bl):
        for h in range(case.Hl):
            if case.density > 0 and not mask[b, h].any():  # keep something (density 0 is the all-empty case)
                r, c = (int(torch.randint(n, (1,), generator=gen)) for n in (mq, mk))
                mask[b, h, r, c] = True
            if "full-rows" in case.edits:
                mask[b, h, int(torch.randint(mq, (1,), generator=gen))] = True
            if "empty-rows" in case.edits and mq >= 2:
                mask[b, h, int(torch.randint(mq, (1,), generator=gen))] = False
            if "unread-cols" in case.edits and mk >= 2:
                mask[b, h, :, int(torch.randint(mk, (1,), generator=gen))] = False
    return mask


def make_inputs(case: FuzzCase) -> Inputs:
    gen = torch.Generator().manual_seed(random.Random(f"sparse_attn.fuzz.data:{case.seed}:{case.index}")
                                        .getrandbits(62))
    dt = case.torch_dtype
    q = torch.randn(case.B, case.Hq, case.Sq, case.D, generator=gen)
    k = torch.randn(case.B, case.Hkv, case.Sk, case.D, generator=gen)
    v = torch.randn(case.B, case.Hkv, case.Sk, case.D, generator=gen) + case.v_shift
    do = torch.randn(case.B, case.Hq, case.Sq, case.D, generator=gen)
    dlse = torch.randn(case.B, case.Hq, case.Sq, generator=gen)
    q, k, v, do = (t.to(dt).float() for t in (q, k, v, do))
    # an expanded upstream gradient repeats its first entry along the broadcast dim
    if case.strides[3][0] == "expand":
        do = do.narrow(case.strides[3][1], 0, 1).expand(do.shape).contiguous()
    if case.strides[4][0] == "expand":
        dlse = dlse.narrow(case.strides[4][1], 0, 1).expand(dlse.shape).contiguous()
    mask = _block_mask(case, gen)
    pad, width = None, 0
    if case.layout == "idx":
        mk = mask.shape[-1]
        most = int(mask.sum(-1).max()) if mask.numel() else 0
        width = mk if torch.rand((), generator=gen) < 0.5 else max(1, most)
        pad = torch.randint(-3, mk + 4, (*mask.shape[:3], width), generator=gen, dtype=torch.int32)
    return Inputs(q, k, v, do, dlse, mask, pad, width)


def _place(t: Tensor, spec: Tuple[str, int, int], dtype: torch.dtype, device) -> Tensor:
    """``t``'s values in ``dtype`` on ``device``, laid out as ``spec`` says (unused storage NaN)."""
    kind, a, b = spec
    t = t.to(device=device, dtype=dtype)
    if kind == "contig":
        return t.clone()
    if kind == "expand":  # dim a broadcast (stride 0) from index 0
        return t.narrow(a, 0, 1).expand(t.shape)
    if kind == "pad_s":  # rows [b, b + S) of a longer buffer
        shape = list(t.shape)
        s_dim = 2
        shape[s_dim] += a
        buf = torch.full(shape, _NAN, dtype=dtype, device=device)
        view = buf.narrow(s_dim, b, t.shape[s_dim])
        view.copy_(t)
        return view
    if kind == "pad_d":
        buf = torch.full((*t.shape[:-1], t.shape[-1] + a), _NAN, dtype=dtype, device=device)
        view = buf[..., b:b + t.shape[-1]]
        view.copy_(t)
        return view
    if kind == "bshd":
        buf = torch.full((t.shape[0], t.shape[2], t.shape[1], t.shape[3]), _NAN, dtype=dtype, device=device)
        buf.copy_(t.transpose(1, 2))
        return buf.transpose(1, 2)
    if kind == "colmajor":
        buf = torch.full((t.shape[0], t.shape[1], t.shape[3], t.shape[2]), _NAN, dtype=dtype, device=device)
        buf.copy_(t.transpose(-1, -2))
        return buf.transpose(-1, -2)
    raise ValueError(f"unknown stride kind {kind!r}")


def _device_inputs(case: FuzzCase, inp: Inputs, device) -> Tuple[Tensor, ...]:
    dt = case.torch_dtype
    sq, sk, sv, sdo, sdl = case.strides
    if sk[0] == "packed":
        buf = torch.full((case.B, case.Sk, 2, case.Hkv, case.D), _NAN, dtype=dt, device=device)
        buf[:, :, 0].copy_(inp.k.transpose(1, 2))
        buf[:, :, 1].copy_(inp.v.transpose(1, 2))
        k, v = buf[:, :, 0].transpose(1, 2), buf[:, :, 1].transpose(1, 2)
    else:
        k, v = _place(inp.k, sk, dt, device), _place(inp.v, sv, dt, device)
    q = _place(inp.q, sq, dt, device)
    do = _place(inp.do, sdo, dt, device)
    dlse = _place(inp.dlse, sdl, torch.float64 if dt == torch.float64 else torch.float32, device)
    return q, k, v, do, dlse


def _layout(case: FuzzCase, inp: Inputs, device) -> Optional[BlockSparseLayout]:
    if inp.block_mask is None:
        return None
    mask = inp.block_mask.to(device)
    if case.layout == "mask":
        return BlockSparseLayout.from_block_mask(mask, (case.bq, case.bk), case.Sq, case.Sk)
    num, idx = compress_block_mask(inp.block_mask)
    idx = idx[..., :inp.idx_width].clone()
    slots = torch.arange(inp.idx_width)
    idx = torch.where(slots < num.unsqueeze(-1), idx, inp.idx_padding)  # garbage past the counts
    return BlockSparseLayout(num.to(device), idx.to(device), (case.bq, case.bk), case.Sq, case.Sk)


def element_mask(case: FuzzCase, block_mask: Optional[Tensor]) -> Tensor:
    """``[B, Hq, Sq, Sk]`` bool: query ``i`` sees key ``j`` (README "Semantics"), written from scratch."""
    i = torch.arange(case.Sq)[:, None]
    j = torch.arange(case.Sk)[None, :]
    m = torch.ones(1, 1, case.Sq, case.Sk, dtype=torch.bool)
    if block_mask is not None:
        bm = block_mask
        hl = bm.shape[1]
        heads = torch.arange(case.Hq)
        # layout head of each query head: Hl == Hq -> itself; Hl == Hkv -> h // (Hq // Hkv); Hl == 1 -> 0
        lh = heads if hl == case.Hq else heads // (case.Hq // hl) if hl > 1 else torch.zeros_like(heads)
        m = bm[:, lh][:, :, (i // case.bq).squeeze(1)][:, :, :, (j // case.bk).squeeze(0)]
    if case.causal:
        m = m & (j <= i + (case.Sk - case.Sq))
    return m.expand(case.B, case.Hq, case.Sq, case.Sk)


# ----------------------------------------------------------------------------------------------
# The fp64 oracle
# ----------------------------------------------------------------------------------------------
def oracle(case: FuzzCase, inp: Inputs) -> Dict[str, Tensor]:
    """fp64 dense masked attention, its gradients, and the natural magnitude ``N`` of every row
    (``N_out`` ..., see the module docstring). Also ``seen [B, Hq, Sq]`` and ``read [B, Hkv, Sk]``
    (keys some query of the group sees), and ``clear`` (rows with an unambiguous arg-max)."""
    f64 = torch.float64
    scale = case.D ** -0.5 if case.scale is None else case.scale
    g = case.Hq // case.Hkv
    q, k, v, do = (t.to(f64) for t in (inp.q, inp.k, inp.v, inp.do))
    dl = inp.dlse.to(f64) if (case.lse_grad and case.grad) else torch.zeros(q.shape[:3], dtype=f64)
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    allowed = element_mask(case, inp.block_mask)
    seen = allowed.any(-1)
    s = torch.where(allowed, (q @ kx.transpose(-1, -2)) * scale, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(allowed, torch.exp(s - torch.where(seen, lse, 0.0).unsqueeze(-1)), 0.0)
    out = p @ vx
    dp = do @ vx.transpose(-1, -2)
    delta = (p * dp).sum(-1) - dl
    ds = p * (dp - delta.unsqueeze(-1))

    def group_sum(t: Tensor) -> Tensor:
        return t.view(case.B, case.Hkv, g, *t.shape[2:]).sum(2)

    res = dict(out=out, lse=lse, dq=scale * (ds @ kx), dk=group_sum(scale * (ds.transpose(-1, -2) @ q)),
               dv=group_sum(p.transpose(-1, -2) @ do))
    # natural magnitudes
    absdp = do.abs() @ vx.abs().transpose(-1, -2)
    a = (p * absdp).sum(-1) + dl.abs()
    w = p * (absdp + a.unsqueeze(-1))
    s_abs = torch.where(allowed, (q.abs() @ kx.abs().transpose(-1, -2)) * abs(scale), 0.0)
    res.update(
        N_out=(p @ vx.abs()).amax(-1),
        N_lse=1.0 + s_abs.amax(-1),
        N_dq=abs(scale) * (w @ kx.abs()).amax(-1),
        N_dk=group_sum(abs(scale) * (w.transpose(-1, -2) @ q.abs())).amax(-1),
        N_dv=group_sum(p.transpose(-1, -2) @ do.abs()).amax(-1),
        seen=seen,
        read=group_sum(allowed.any(2).to(f64)) > 0,
    )
    # rows with an unambiguous arg-max (huge scales): the top score beats the next by 40 nats and by
    # far more than the fp32 rounding of the scores; or the row sees a single key
    top2 = s.topk(min(2, case.Sk), -1).values
    gap = (top2[..., 0] - top2[..., -1]) if case.Sk > 1 else torch.full_like(lse, float("inf"))
    single = allowed.sum(-1) == 1
    clear = seen & (single | ((gap.abs() >= 40) & (gap >= 1e-4 * s_abs.amax(-1))))
    res["clear"] = clear
    return res


# ----------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------
def targets() -> List[Tuple[str, str]]:
    """``(device, backend)`` pairs available here: CPU reference, CPU Triton under the interpreter
    (``TRITON_INTERPRET=1``), and on a CUDA machine the compiled Triton kernels and the reference."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, b) for d in devices for b in available_backends(d) if b in ("triton", "reference")]


@contextlib.contextmanager
def _tile_choice(case: FuzzCase, device: str, backend: str):
    if backend != "triton":
        yield
        return
    from sparse_attn.triton_kernels import configs

    old = os.environ.get("SPARSE_ATTN_TILES")
    os.environ["SPARSE_ATTN_TILES"] = case.tiles
    family = case.family if device == "cpu" else None
    try:
        with configs.family_override(family):
            yield
    finally:
        if old is None:
            os.environ.pop("SPARSE_ATTN_TILES", None)
        else:
            os.environ["SPARSE_ATTN_TILES"] = old


def run_backend(case: FuzzCase, inp: Inputs, device: str, backend: str) -> Dict[str, Optional[Tensor]]:
    q, k, v, do, dlse = _device_inputs(case, inp, device)
    originals = [t.clone() for t in (q, k, v, do, dlse)]
    layout = _layout(case, inp, device)
    q, k, v = (t.detach().requires_grad_(case.grad) for t in (q, k, v))
    with _tile_choice(case, device, backend):
        with torch.set_grad_enabled(case.grad):
            out, lse = sparse_attention(q, k, v, layout, causal=case.causal, scale=case.scale, return_lse=True,
                                        backend=backend)
        if case.grad:
            if case.lse_grad:
                torch.autograd.backward([out, lse], [do, dlse])
            else:
                torch.autograd.backward([out], [do])
    for name, t, t0 in zip(("q", "k", "v", "do", "dlse"), (q, k, v, do, dlse), originals):
        if not torch.equal(t.detach(), t0):
            raise AssertionError(f"the backend modified its input {name}")
    res = dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    want_dtype = dict(out=q.dtype, lse=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      dq=q.dtype, dk=k.dtype, dv=v.dtype)
    want_shape = dict(out=q.shape, lse=q.shape[:3], dq=q.shape, dk=k.shape, dv=v.shape)
    for name, t in res.items():
        if t is None:
            if case.grad:
                raise AssertionError(f"{name}: no gradient")
            continue
        if t.dtype != want_dtype[name] or t.shape != want_shape[name]:
            raise AssertionError(f"{name}: dtype/shape {t.dtype}/{tuple(t.shape)}, expected "
                                 f"{want_dtype[name]}/{tuple(want_shape[name])}")
    return {n: (None if t is None else t.detach().to("cpu", torch.float64)) for n, t in res.items()}


def row_errors(name: str, got: Tensor, want: Tensor, natural: Tensor, tiny: float = 0.0) -> Tensor:
    """Per-row ``err`` (module docstring); ``inf`` for NaN, for a wrong non-finite pattern and for
    any nonzero value where the natural magnitude is 0. ``tiny`` (the result dtype's smallest normal
    number) also floors the denominator of rows with a nonzero natural magnitude: fp16 cannot hold
    a gradient of 1e-9 (a key read with probability 1e-9), and returning 0 there is no error."""
    if name == "lse":
        empty = natural.isnan() | (want == float("-inf"))
        diff = (got - want).abs()
        err = diff / natural
        err = torch.where(empty, torch.where(got == float("-inf"), 0.0, float("inf")), err)
        return torch.where(err.isnan(), float("inf"), err)
    diff = (got - want).abs().amax(-1)
    den = torch.maximum(want.abs().amax(-1), PHI * natural)
    den = torch.where(natural > 0, den.clamp_min(tiny), den)
    err = torch.where(diff == 0, 0.0, diff / den)
    return torch.where(err.isnan(), float("inf"), err)


@dataclass
class ExampleResult:
    case: FuzzCase
    # (device, backend) -> result name -> largest err
    errors: Dict[Tuple[str, str], Dict[str, float]] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    rows: int = 0
    seen_rows: int = 0
    compared: int = 0  # (target, tensor) comparisons made


def _where(err: Tensor) -> str:
    i = tuple(int(x) for x in torch.nonzero(err == err.max())[0])
    return f"row {i}"


def compare(case: FuzzCase, got: Dict[str, Optional[Tensor]], ref: Dict[str, Tensor],
            tol: Dict[str, float]) -> Tuple[Dict[str, float], List[str]]:
    huge = case.scale_kind == "huge"
    errs: Dict[str, float] = {}
    fails: List[str] = []
    for name in NAMES:
        g = got[name]
        if g is None:
            continue
        want = ref[name]
        if name == "lse":
            natural = torch.where(ref["seen"], ref["N_lse"], _NAN)
        else:
            natural = ref["N_" + name]
        if huge and name in ("dq", "dk", "dv"):
            # garbage in every precision: no NaN, and zero where nothing is seen / read
            zero = ~ref["seen"] if name == "dq" else ~ref["read"]
            nan = g.isnan().any(-1)
            if bool(nan.any()):
                fails.append(f"{name}: NaN ({int(nan.sum())} rows), first at {_where(nan.double())}")
            nonzero = zero & (g != 0).any(-1)
            if bool(nonzero.any()):
                fails.append(f"{name}: nonzero where nothing is {'seen' if name == 'dq' else 'read'}, "
                             f"first at {_where(nonzero.double())}")
            continue
        err = row_errors(name, g, want, natural, 0.0 if name == "lse" else torch.finfo(case.torch_dtype).tiny)
        if huge and name == "out":
            err = torch.where(ref["clear"] | ~ref["seen"], err, 0.0)
        m = float(err.max()) if err.numel() else 0.0
        errs[name] = m
        if not m <= tol[name]:
            loc = _where(err)
            idx = tuple(int(x) for x in torch.nonzero(err == err.max())[0])
            detail = ""
            if name != "lse":
                gr, wr = g[idx], want[idx]
                d = int((gr - wr).abs().nan_to_num(float("inf")).argmax())
                detail = (f" (element {d}: got {float(gr[d]):.6g}, oracle {float(wr[d]):.6g}, row max |oracle| "
                          f"{float(wr.abs().max()):.3g}, natural {float(natural[idx]):.3g})")
            else:
                detail = f" (got {float(g[idx]):.8g}, oracle {float(want[idx]):.8g})"
            fails.append(f"{name}: err {m:.3g} > tol {tol[name]:.3g} at {loc}{detail}")
    return errs, fails


def run_example(seed: int, index: int, max_work: float = 60.0,
                which: Optional[Sequence[Tuple[str, str]]] = None,
                tolerances: Optional[Dict[str, Dict[str, float]]] = None) -> ExampleResult:
    """Generate example ``(seed, index)``, run it on every target, compare with the oracle."""
    case = generate_case(seed, index, max_work)
    res = ExampleResult(case)
    inp = make_inputs(case)
    ref = oracle(case, inp)
    res.rows = ref["seen"].numel()
    res.seen_rows = int(ref["seen"].sum())
    tol = (tolerances or TOLERANCES)[case.dtype]
    for device, backend in (which or targets()):
        if backend == "triton" and case.dtype == "float64":
            continue  # the kernels take fp16/bf16/fp32
        try:
            got = run_backend(case, inp, device, backend)
        except Exception as exc:  # a valid call must not raise
            res.failures.append(f"[{device}/{backend}] raised {type(exc).__name__}: {exc}\n"
                                + "".join(traceback.format_exception(exc)[-4:]))
            continue
        errs, fails = compare(case, got, ref, tol)
        res.errors[(device, backend)] = errs
        res.compared += len(errs)
        res.failures.extend(f"[{device}/{backend}] {f}" for f in fails)
    return res
