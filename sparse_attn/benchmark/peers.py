"""The kernels the benchmark runs: ours and the peers, in one registry.

Each :class:`KernelSpec` has a ``probe`` (``None`` = can run this case on this machine, else the
reason it is skipped: the row says "skipped", the run goes on) and a ``prepare`` that returns the
``attn(q, k, v) -> out`` callable to time plus fields for its rows. Kinds:

* ``"ours"``: ``sparse_attention`` with one backend; uses the case's layout; always runs, even
  after ``--budget-s``;
* ``"masked"``: a peer given the same block mask (FlexAttention);
* ``"dense"``: a dense causal peer (SDPA backends, flash-attn); it ignores the layout, so it runs
  once per input shape and its rows have ``pattern = "dense"``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..layout import compress_block_mask
from ..ops import available_backends, sparse_attention
from .registry import Case
from .timing import Env, time_host

__all__ = ["KernelSpec", "KERNELS", "register_kernel", "CUDA_KERNELS", "CPU_KERNELS", "expand_mask"]

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Prepared = Tuple[Attn, Dict[str, Any]]


@dataclass(frozen=True)
class KernelSpec:
    """A kernel of the benchmark.

    Attributes:
        name: the ``--kernels`` name and the ``kernel`` column.
        kind: ``"ours"``, ``"masked"`` or ``"dense"`` (see the module docstring).
        probe: ``probe(env, case) -> None | reason``; cheap, cached by the implementation.
        prepare: ``prepare(env, case, data) -> (attn, row_fields)``; ``data`` holds ``layout``
            (:class:`~sparse_attn.BlockSparseLayout`), ``mask`` (bool ``[Bl, Hl, Mq, Mk]`` on the
            device), ``counts`` (``[Mq, Mk]`` visible pairs per block) and the layout timings.
        compile_key: ``compile_key(case) -> key`` for kernels whose first call per key is an
            expensive compile (the budget guard will not start one it cannot afford).
        description: one line for the README.
    """

    name: str
    kind: str
    probe: Callable[[Env, Case], Optional[str]]
    prepare: Callable[[Env, Case, Dict[str, Any]], Prepared]
    compile_key: Optional[Callable[[Case], Any]] = None
    description: str = ""


KERNELS: Dict[str, KernelSpec] = {}


def register_kernel(spec: KernelSpec) -> KernelSpec:
    """Add (or replace) a kernel in :data:`KERNELS`; returns it.

    Example::

        >>> register_kernel(KERNELS["flex"]).kind
        'masked'
    """
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"spec must be a KernelSpec, got {type(spec).__name__}")
    if spec.kind not in ("ours", "masked", "dense"):
        raise ValueError(f"spec.kind must be 'ours', 'masked' or 'dense', got {spec.kind!r}")
    KERNELS[spec.name] = spec
    return spec


def _cached_probe(env: Env, key: tuple, fn: Callable[[], Optional[str]]) -> Optional[str]:
    key = ("probe",) + key
    if key not in env.cache:
        env.cache[key] = fn()
    return env.cache[key]


def _reason(exc: BaseException, caught: Optional[List[warnings.WarningMessage]] = None) -> str:
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}"
    hints = [str(w.message).strip().splitlines()[0] for w in (caught or []) if str(w.message).strip()]
    if hints:
        msg += " (" + "; ".join(dict.fromkeys(hints[:3])) + ")"
    return msg[:300]


def expand_mask(mask: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """bool ``[Bl, Hl, Mq, Mk]`` -> ``[batch, heads, Mq, Mk]`` (query head ``h`` takes layout head
    ``h // (heads // Hl)``, as the kernels do).

    Example::

        >>> expand_mask(torch.tensor([[[[True]], [[False]]]]), 2, 4)[1, :, 0, 0].tolist()
        [True, True, False, False]
    """
    bl, hl = mask.shape[:2]
    if heads % hl or bl not in (1, batch):
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to batch={batch}, heads={heads}")
    if hl != heads:
        mask = mask.repeat_interleave(heads // hl, dim=1)
    return mask.expand(batch, heads, *mask.shape[2:])


# ------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------
# The pass a row times -> the kernels whose work ratio it reports (the worst of them).
_PASS_KERNELS = {"fwd": ("fwd",), "bwd": ("dq", "dkdv"), "fwd_bwd": ("fwd", "dq", "dkdv")}


def launch_fields(layout, q: torch.Tensor) -> Dict[str, Any]:
    """What the Triton launchers pick for ``layout``: per pass the work ratio (computed / kept
    pairs, the worst kernel of the pass) and one ``tiles`` string for all three kernels."""
    from ..triton_kernels.configs import launch_report

    rep = launch_report(q, layout)
    return dict(work_ratio={p: max(rep[k]["work_ratio"] for k in ks) for p, ks in _PASS_KERNELS.items()},
                tiles="; ".join(f"{k} {r['tile']} {r['shape']}" for k, r in rep.items()))


def _ours(backend: str, tuned: bool = False) -> KernelSpec:
    name = f"ours_{backend}" + ("_tuned" if tuned else "")

    def probe(env: Env, case: Case) -> Optional[str]:
        def run() -> Optional[str]:
            if backend in available_backends(env.device):
                return None
            # Not listed for this device: a tiny call gives the library's own reason (it raises
            # before any kernel runs), or shows that the backend works after all. The call is
            # prefill-shaped (more query rows than a decode call takes, with a gradient), as the
            # cases are: backend="cuda" runs decode-shaped calls only.
            try:
                q = torch.zeros(1, 1, 32, case.head_dim, device=env.device, dtype=case.torch_dtype,
                                requires_grad=True)
                sparse_attention(q, q, q, None, causal=True, backend=backend)
            except Exception as exc:  # noqa: BLE001
                return _reason(exc)
            return None

        return _cached_probe(env, (backend, case.dtype, case.head_dim), run)

    def prepare(env: Env, case: Case, data: Dict[str, Any]) -> Prepared:
        layout = data["layout"]
        # The tuned variant times the same kernels with SPARSE_ATTN_AUTOTUNE=1. The launchers read
        # it at every launch, and the backward runs outside `attn`, so it is set here for this
        # kernel's timing and cleared by the next untuned `ours` kernel's prepare.
        if tuned:
            os.environ["SPARSE_ATTN_AUTOTUNE"] = "1"
        else:
            os.environ.pop("SPARSE_ATTN_AUTOTUNE", None)

        def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return sparse_attention(q, k, v, layout, causal=True, backend=backend)

        extra = dict(layout_ms=data["layout_ms"], layout_uncached_ms=data.get("layout_uncached_ms"))
        if backend == "triton" and not tuned and layout is not None:
            q = torch.empty(1, 1, 1, case.head_dim, device=env.device, dtype=case.torch_dtype)
            extra.update(launch_fields(layout, q))
        return attn, extra

    how = " with SPARSE_ATTN_AUTOTUNE=1 (first call tunes, then the on-disk cache)" if tuned else ""
    return KernelSpec(name, "ours", probe, prepare,
                      description=f'sparse_attention(..., backend="{backend}") on the case\'s layout{how}')


# ------------------------------------------------------------------------------------------------
# SDPA, one kernel per backend
# ------------------------------------------------------------------------------------------------
_SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}


def _sdpa_call(backend: Any, group: int, gqa_mode: str) -> Attn:
    from torch.nn.attention import sdpa_kernel

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            if group > 1 and gqa_mode == "repeat":
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            # Sq == Sk in every case, so SDPA's top-left causal mask equals our bottom-right one.
            if group > 1 and gqa_mode == "native":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attn


def _sdpa(name: str) -> KernelSpec:
    def backend() -> Any:
        from torch.nn.attention import SDPBackend

        return getattr(SDPBackend, _SDPA_BACKENDS[name])

    def mode(env: Env, case: Case) -> Tuple[Optional[str], str]:
        """(reason or None, "native" | "repeat" | "none"): try a tiny fwd+bwd of this dtype, head
        dim and GQA ratio; without native GQA support K/V are repeated inside the timed call."""
        group = case.heads // case.kv_heads

        def run() -> Tuple[Optional[str], str]:
            try:
                b = backend()
            except Exception as exc:  # noqa: BLE001
                return _reason(exc), "none"
            modes = ["native", "repeat"] if group > 1 else ["none"]
            reason = None
            for m in modes:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        dt = dict(device=env.device, dtype=case.torch_dtype)
                        q = torch.randn(1, group, 128, case.head_dim, **dt, requires_grad=True)
                        kv = torch.randn(1, 1, 128, case.head_dim, **dt, requires_grad=True)
                        _sdpa_call(b, group, m)(q, kv, kv).sum().backward()
                        env.sync()
                        return None, m
                    except Exception as exc:  # noqa: BLE001
                        reason = reason or _reason(exc, caught)
            return reason, "none"

        return _cached_probe(env, (name, case.dtype, case.head_dim, group), run)

    def probe(env: Env, case: Case) -> Optional[str]:
        return mode(env, case)[0]

    def prepare(env: Env, case: Case, data: Dict[str, Any]) -> Prepared:
        group = case.heads // case.kv_heads
        gqa_mode = mode(env, case)[1]
        note = "K/V repeated per call (no native GQA in this backend)" if gqa_mode == "repeat" else None
        return _sdpa_call(backend(), group, gqa_mode), ({"note": note} if note else {})

    return KernelSpec(name, "dense", probe, prepare,
                      description=f"F.scaled_dot_product_attention(is_causal=True) under "
                                  f"sdpa_kernel(SDPBackend.{_SDPA_BACKENDS[name]})")


# ------------------------------------------------------------------------------------------------
# FlexAttention with the same block mask
# ------------------------------------------------------------------------------------------------
def _flex_block_mask(env: Env, case: Case, data: Dict[str, Any]) -> Tuple[Any, float, str]:
    """A FlexAttention ``BlockMask`` for (the case's block mask AND causal), ``BLOCK_SIZE`` = the
    layout block, built on the device from the block lists (``BlockMask.from_kv_blocks``): kept
    blocks entirely visible are "full" (no mask_mod), the others "partial". The mask_mod reads the
    block-mask tensor and applies causal, so the element mask is exact on its own too (eager flex
    evaluates it everywhere). The tensor and mask_mod are made once per shape (refilled per case)
    so the compiled flex_attention is not recompiled per pattern.

    Returns ``(block_mask, build_ms, note)``; build_ms times block mask -> BlockMask.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    s, bs, b, h = case.seq, case.block, case.batch, case.heads
    mask = data["mask"]
    m_shape = (b, h) + tuple(mask.shape[-2:])
    key = ("flexmask",) + m_shape + (s, bs)
    if key not in env.cache:
        for old in [k for k in env.cache if isinstance(k, tuple) and k and k[0] == "flexmask"]:
            del env.cache[old]
        buf = torch.zeros(m_shape, dtype=torch.bool, device=env.device)

        def mask_mod(bi, hi, q_idx, kv_idx):
            return buf[bi, hi, q_idx // bs, kv_idx // bs] & (kv_idx <= q_idx)  # Sq == Sk

        env.cache[key] = (buf, mask_mod)
    buf, mask_mod = env.cache[key]
    counts = data["counts"].to(env.device)
    kwargs: Dict[str, Any] = dict(BLOCK_SIZE=bs, mask_mod=mask_mod)
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (s, s)

    def build() -> Any:
        kept = expand_mask(mask, b, h) & (counts > 0)
        # "full" = every pair of a whole bs x bs block visible; a block the sequence ends inside
        # stays partial (as create_block_mask makes it).
        full = kept & (counts == bs * bs)
        kv_num, kv_idx = compress_block_mask(kept & ~full)
        full_num, full_idx = compress_block_mask(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)

    bm = build()
    build_ms = time_host(build, env.sync)
    buf.copy_(expand_mask(mask, b, h))

    note = "create_block_mask cross-check skipped (too large)"
    if b * h * s * s <= (1 << 27):
        ref = create_block_mask(mask_mod, b, h, s, s, device=env.device, BLOCK_SIZE=bs)
        same = torch.equal(ref.to_dense().bool(), bm.to_dense().bool())
        rf, mf = ref.full_kv_num_blocks, bm.full_kv_num_blocks
        same = same and int(0 if rf is None else rf.sum()) == int(0 if mf is None else mf.sum())
        if not same:
            raise RuntimeError("flex BlockMask built from the block lists != create_block_mask")
        note = "create_block_mask cross-check ok"
    return bm, build_ms, note


def _flex_probe(env: Env, case: Case) -> Optional[str]:
    def run() -> Optional[str]:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return _reason(exc)
        return None

    return _cached_probe(env, ("flex",), run)


def _flex_prepare(env: Env, case: Case, data: Dict[str, Any]) -> Prepared:
    bm, build_ms, note = _flex_block_mask(env, case, data)
    flex = env.flex_fn()
    gqa = case.heads != case.kv_heads

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex(q, k, v, block_mask=bm, enable_gqa=gqa)

    return attn, dict(layout_ms=build_ms, note=note)


# ------------------------------------------------------------------------------------------------
# flash-attn (Dao-AILab), when installed
# ------------------------------------------------------------------------------------------------
def _flash_attn_missing(env: Env, case: Any, symbol: str) -> Optional[str]:
    """Why ``flash_attn.<symbol>`` cannot run ``case`` (a prefill or decode case) here -- it needs
    CUDA, fp16/bf16 and an importable flash-attn -- or None. No kernel runs."""
    if env.device.type != "cuda":
        return "flash_attn needs CUDA"
    if case.torch_dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn needs fp16/bf16, not {case.dtype}"
    try:  # `from flash_attn import <symbol>`
        module = importlib.import_module("flash_attn")
        if not hasattr(module, symbol):
            raise ImportError(f"cannot import name {symbol!r} from 'flash_attn'")
    except Exception as exc:  # noqa: BLE001
        return f"flash_attn not importable ({type(exc).__name__})"
    return None


def _flash_attn_probe(env: Env, case: Case) -> Optional[str]:
    return _cached_probe(env, ("flash_attn", case.dtype), lambda: _flash_attn_missing(env, case, "flash_attn_func"))


def _flash_attn_prepare(env: Env, case: Case, data: Dict[str, Any]) -> Prepared:
    from flash_attn import flash_attn_func

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # flash-attn takes [B, S, H, D] and does GQA itself; causal is bottom-right (Sq == Sk here).
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)

    return attn, {}


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------
for _spec in (_ours("triton"), _ours("triton", tuned=True), _ours("cuda"), _ours("reference")):
    register_kernel(_spec)
for _name in _SDPA_BACKENDS:
    register_kernel(_sdpa(_name))
register_kernel(KernelSpec(
    "flex", "masked", _flex_probe, _flex_prepare,
    compile_key=lambda c: ("flex",) + c.shape_key + (c.block,),
    description="FlexAttention with the same block mask (torch.compile'd on CUDA, eager on CPU)"))
register_kernel(KernelSpec("flash_attn", "dense", _flash_attn_probe, _flash_attn_prepare,
                           description="flash_attn.flash_attn_func(causal=True), when importable"))

# Default kernel lists: the GPU run, and the CPU smoke run (reference backend, SDPA math, eager flex;
# triton/cuda/flash_attn stay in so that an unavailable kernel shows as a skipped row).
CUDA_KERNELS = ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn", "flex", "ours_triton", "ours_triton_tuned",
                "ours_cuda"]
CPU_KERNELS = ["sdpa_math", "flash_attn", "flex", "ours_reference", "ours_triton", "ours_cuda"]
