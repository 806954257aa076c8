"""Timers: the device clock for kernels, the host clock for layout builds, and the pass runner.

On CUDA a kernel is timed with ``triton.testing.do_bench`` (median and 20/80 % quantiles; the L2
cache is flushed before every call). On CPU (the ``--cpu`` smoke run) ``time.perf_counter`` is
used and the numbers are not speed claims. Layout builds are timed on the host with a device
synchronisation, because their cost is mostly launch and host overhead.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Env", "time_host", "time_passes", "split_passes", "BWD_RETAIN", "BWD_SUBTRACT", "FLEX_COMPILE_EST_S"]

BWD_RETAIN = "autograd.grad(retain_graph=True) on one saved graph"
BWD_SUBTRACT = "time(fwd_bwd) - time(fwd)"

# Rough cost of compiling FlexAttention forward + backward for one new shape on an H100 (torch
# 2.x, no autotuning); the budget guard will not start a compile that would cross --budget-s.
FLEX_COMPILE_EST_S = 45.0

Attn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Env:
    """What differs between the CUDA benchmark and the CPU smoke run, plus per-run caches.

    Args:
        cpu: the smoke run on CPU (perf_counter timer, eager FlexAttention).
        warmup, rep: ``do_bench`` warm-up / repetition time in ms on CUDA; on CPU the number of
            untimed and timed calls.
        budget_s: after this many seconds only "always run" kernels run (see ``runner``).

    Example::

        >>> env = Env(cpu=True, warmup=1, rep=3)
        >>> ms, p20, p80 = env.bench(lambda: torch.ones(8).sum())
    """

    def __init__(self, *, cpu: bool, warmup: int, rep: int, budget_s: Optional[float] = None) -> None:
        self.cpu = bool(cpu)
        self.device = torch.device("cpu") if self.cpu else torch.device("cuda", torch.cuda.current_device())
        self.warmup, self.rep = int(warmup), int(rep)
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.cache: Dict[Any, Any] = {}
        self.compiled: set = set()  # compile keys (e.g. flex shapes) already paid for
        self._flex_fn: Optional[Callable] = None

    # -- clocks ---------------------------------------------------------------------------------
    def sync(self) -> None:
        """Wait for the device (no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.t0

    def over_budget(self, extra_s: float = 0.0, factor: float = 1.0) -> bool:
        """True when ``elapsed + extra_s`` exceeds ``factor * budget_s`` (never without a budget)."""
        return self.budget_s is not None and self.elapsed() + extra_s > factor * self.budget_s

    def bench(self, fn: Callable[[], Any]) -> Tuple[float, float, float]:
        """``(median, p20, p80)`` milliseconds of ``fn()``."""
        if self.device.type == "cuda":
            import triton.testing

            res = triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep, quantiles=[0.5, 0.2, 0.8])
            return float(res[0]), float(res[1]), float(res[2])
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(max(1, self.rep)):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        return float(q[0]), float(q[1]), float(q[2])

    # -- peers' one-time set-up -------------------------------------------------------------------
    def flex_fn(self) -> Callable:
        """``torch.compile(flex_attention, dynamic=False)`` once per process on CUDA (one compile
        per shape); eager ``flex_attention`` on CPU (compiling on a small CPU is too slow for a
        smoke run, and eager flex is exact)."""
        if self._flex_fn is None:
            import warnings

            from torch.nn.attention.flex_attention import flex_attention

            if self.cpu:
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                self._flex_fn = flex_attention
            else:
                import torch._dynamo

                cfg = torch._dynamo.config
                for name in ("cache_size_limit", "recompile_limit"):
                    if hasattr(cfg, name):
                        setattr(cfg, name, max(int(getattr(cfg, name)), 64))
                self._flex_fn = torch.compile(flex_attention, dynamic=False)
        return self._flex_fn


def time_host(fn: Callable[[], Any], sync: Callable[[], None], reps: int = 5, warmup: int = 1,
              before: Optional[Callable[[], None]] = None) -> float:
    """Median wall-clock milliseconds of ``fn()`` including a device sync (host + device cost).

    Args:
        fn: what to time (e.g. a layout build).
        sync: waits for the device after each call.
        reps, warmup: timed and untimed calls.
        before: run (untimed) before every call, e.g. to clear a cache for an uncached time.

    Example::

        >>> time_host(lambda: sum(range(100)), sync=lambda: None) >= 0
        True
    """
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    sync()
    times = []
    for _ in range(max(1, reps)):
        if before is not None:
            before()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _error(exc: BaseException) -> Dict[str, Any]:
    text = str(exc).strip()
    msg = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return dict(error=msg[:300], traceback=traceback.format_exc()[-4000:])


def time_passes(env: Env, attn: Attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                passes: Sequence[str]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """Time the forward, backward and forward+backward of ``attn(q, k, v)``.

    The first call (compilation, autotuning) is reported as ``first_call_s`` and not timed.
    The forward is timed with ``requires_grad`` inputs, as in training. The backward is timed
    as ``autograd.grad(retain_graph=True)`` on one saved graph; if a kernel's graph cannot be
    replayed, it is ``time(fwd_bwd) - time(fwd)`` (``bwd_method`` says which).
    In the CPU smoke run a forward that refuses grad inputs (eager FlexAttention) is timed on
    detached inputs and its backward passes become error entries.

    Args:
        env: the :class:`Env`.
        attn: ``attn(q, k, v) -> out [B, Hq, S, D]``.
        q ``[B, Hq, S, D]``, k, v ``[B, Hkv, S, D]`` (requires_grad), dout ``[B, Hq, S, D]``.
        passes: a subset of ``("fwd", "bwd", "fwd_bwd")``.

    Returns:
        ``(results, outputs)``: ``results[pass]`` is a dict with ``ms, ms_p20, ms_p80,
        first_call_s`` (+ ``bwd_method``, ``note``) or ``error`` (+ ``traceback``);
        ``outputs = {"out": Tensor, "grads": (dq, dk, dv) or None}`` for the correctness checks.
        An exception in the first forward call propagates (the caller makes error rows).

    Example::

        >>> env = Env(cpu=True, warmup=0, rep=1)
        >>> q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
        >>> res, outs = time_passes(env, lambda q, k, v: (q @ k.mT).softmax(-1) @ v, q, k, v,
        ...                         torch.randn(1, 1, 8, 4), ("fwd", "bwd"))
        >>> sorted(res), outs["grads"][0].shape
        (['bwd', 'fwd'], torch.Size([1, 1, 8, 4]))
    """
    res: Dict[str, Dict[str, Any]] = {}
    note: Optional[str] = None
    bwd_err: Optional[Dict[str, Any]] = None  # why the backward passes cannot be timed
    t = time.perf_counter()
    try:
        out = attn(q, k, v)
    except Exception as exc:  # noqa: BLE001
        if not env.cpu:
            raise  # on CUDA a second (no-grad) compile would only burn time
        bwd_err = _error(exc)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        try:
            out = attn(qd, kd, vd)
        except Exception:  # noqa: BLE001
            raise exc from None  # the original failure is the interesting one
        note = "fwd timed without grad (grad inputs unsupported)"
        fwd: Callable[[], torch.Tensor] = lambda: attn(qd, kd, vd)  # noqa: E731
    else:
        fwd = lambda: attn(q, k, v)  # noqa: E731
    grads = None
    if bwd_err is None:
        try:
            grads = torch.autograd.grad(out, (q, k, v), dout)
        except Exception as exc:  # noqa: BLE001
            bwd_err = _error(exc)
    env.sync()
    first_call_s = time.perf_counter() - t
    outputs = dict(out=out.detach(), grads=None if grads is None else tuple(g.detach() for g in grads))
    del out, grads

    def timed(fn: Callable[[], Any], **extra: Any) -> Dict[str, Any]:
        ms, p20, p80 = env.bench(fn)
        return dict(ms=ms, ms_p20=p20, ms_p80=p80, first_call_s=first_call_s, **extra)

    fwd_res: Optional[Dict[str, Any]] = None
    if "fwd" in passes or "bwd" in passes:
        try:
            fwd_res = timed(fwd, **({"note": note} if note else {}))
        except Exception as exc:  # noqa: BLE001
            fwd_res = _error(exc)
            bwd_err = bwd_err or fwd_res
        if "fwd" in passes:
            res["fwd"] = fwd_res
    if bwd_err is not None:
        for p in ("bwd", "fwd_bwd"):
            if p in passes:
                res[p] = dict(bwd_err)
        return res, outputs

    both = lambda: torch.autograd.grad(fwd(), (q, k, v), dout)  # noqa: E731
    both_res: Optional[Dict[str, Any]] = None
    if "fwd_bwd" in passes:
        try:
            both_res = res["fwd_bwd"] = timed(both)
        except Exception as exc:  # noqa: BLE001
            res["fwd_bwd"] = _error(exc)
    if "bwd" in passes:
        try:
            res["bwd"] = _time_bwd(env, fwd, q, k, v, dout, timed)
        except Exception:  # noqa: BLE001 - e.g. a compiled graph that frees its saved tensors
            try:
                if both_res is None:
                    both_res = timed(both)
                f_ms = fwd_res["ms"] if fwd_res and "ms" in fwd_res else timed(fwd)["ms"]
                res["bwd"] = dict(ms=both_res["ms"] - f_ms, ms_p20=both_res["ms_p20"] - f_ms,
                                  ms_p80=both_res["ms_p80"] - f_ms, first_call_s=first_call_s,
                                  bwd_method=BWD_SUBTRACT)
            except Exception as exc:  # noqa: BLE001
                res["bwd"] = _error(exc)
    return res, outputs


def _time_bwd(env: Env, fwd: Callable[[], torch.Tensor], q, k, v, dout, timed) -> Dict[str, Any]:
    out = fwd()
    bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
    bwd()
    bwd()  # a second backward on the same graph must work too
    env.sync()
    result = timed(bwd, bwd_method=BWD_RETAIN)
    del out
    return result


def split_passes(value: Sequence[str]) -> List[str]:
    """Validate a list of pass names (``fwd``, ``bwd``, ``fwd_bwd``), keeping the canonical order.

    Example::

        >>> split_passes(["fwd_bwd", "fwd"])
        ['fwd', 'fwd_bwd']
    """
    allowed = ("fwd", "bwd", "fwd_bwd")
    bad = [p for p in value if p not in allowed]
    if bad:
        raise ValueError(f"passes must be among {allowed}, got {bad}")
    return [p for p in allowed if p in value]
