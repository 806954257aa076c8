"""Demo: build a block-sparse layout for a sample problem, run ``sparse_attention`` on the
best backend here, check it against dense masked attention, print density, error, time.

Run: ``python -m sparse_attn.demo`` (``--seq``, ``--heads``, ``--stride`` to vary it).
On a GPU it also times dense causal SDPA (flash) and prints the speed-up.

Then, with transformers installed, the Hugging Face drop-in on a tiny random Llama (CPU):
dense == sdpa, greedy ``generate()`` identical, S2 sparse, save/load. With ``--model DIR`` on a
GPU it loads that model and prints the prefill speed-up of ``--method`` (default S2) over sdpa
at ``--hf-seq`` tokens (default 32k); ``--option key=value`` passes method options.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from . import BlockSparseLayout, sparse_attention
from .ops import resolve_backend


def sample_block_mask(num_blocks: int, stride: int, local: int, device) -> torch.Tensor:
    """``[1, 1, M, M]`` mask: the first block (attention sink), ``local`` blocks up to the
    diagonal, and every ``stride``-th block before that; causal at block level."""
    r = torch.arange(num_blocks, device=device)[:, None]
    c = torch.arange(num_blocks, device=device)[None, :]
    keep = (c == 0) | ((r - c >= 0) & (r - c < local)) | ((c % stride) == (stride - 1))
    return (keep & (c <= r))[None, None]


def _time(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="sparse-attn demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--seq", type=int, default=8192 if cuda else 1000)
    p.add_argument("--heads", type=int, default=16 if cuda else 4)
    p.add_argument("--kv-heads", type=int, default=4 if cuda else 2)
    p.add_argument("--head-dim", type=int, default=128 if cuda else 64)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--local", type=int, default=4)
    p.add_argument("--model", metavar="DIR", help="local Hugging Face model directory: prefill speed-up (GPU)")
    p.add_argument("--method", default="s2", help="sparse method for --model (default s2)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option for --model, value as JSON (e.g. vert_stride=16); repeatable")
    p.add_argument("--hf-seq", type=int, default=32768, help="prompt length for --model (default 32768)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face part")
    args = p.parse_args(argv)
    if args.model and args.no_hf:
        p.error("--model runs in the Hugging Face part, which --no-hf skips: drop one of them")

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    s, d = args.seq, args.head_dim
    q = torch.randn(1, args.heads, s, d, device=device, dtype=dtype)
    k = torch.randn(1, args.kv_heads, s, d, device=device, dtype=dtype)
    v = torch.randn(1, args.kv_heads, s, d, device=device, dtype=dtype)

    m = -(-s // args.block)
    t0 = time.perf_counter()
    layout = BlockSparseLayout.from_block_mask(sample_block_mask(m, args.stride, args.local, device),
                                               args.block, s, s)
    if cuda:
        torch.cuda.synchronize()
    build_ms = (time.perf_counter() - t0) * 1e3
    backend = resolve_backend("auto", device)

    out = sparse_attention(q, k, v, layout, causal=True)

    # Dense check: the same visibility as an element mask, through PyTorch SDPA.
    block_mask = layout.to_block_mask()[0, 0]
    idx = torch.arange(s, device=device) // args.block
    elem = block_mask[idx][:, idx] & torch.ones(s, s, dtype=torch.bool, device=device).tril()
    group = args.heads // args.kv_heads
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                         v.float().repeat_interleave(group, 1), attn_mask=elem)
    err = (out.float() - ref).abs().max().item()
    causal_blocks = m * (m + 1) // 2
    kept = int(block_mask.sum().item())

    reps = 20 if cuda else 3
    ms = _time(lambda: sparse_attention(q, k, v, layout, causal=True), device, reps)
    print(f"sparse_attn demo on {torch.cuda.get_device_name() if cuda else 'CPU'} (backend={backend})")
    print(f"  problem     : B=1 Hq={args.heads} Hkv={args.kv_heads} S={s} D={d} {str(dtype)[6:]} causal, "
          f"block {args.block}")
    print(f"  layout      : sink + {args.local} local blocks + every {args.stride}th block; built in {build_ms:.2f} ms")
    print(f"  density     : {kept / causal_blocks:.3f} of the causal blocks ({kept}/{causal_blocks}), "
          f"{layout.density:.3f} of all blocks")
    print(f"  max |error| : {err:.2e} vs dense masked attention (SDPA, fp32)")
    print(f"  time        : {ms:.3f} ms forward (median of {reps})")
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dense_ms = _time(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), device, reps)
        print(f"  SDPA flash  : {dense_ms:.3f} ms dense causal forward -> speed-up {dense_ms / ms:.2f}x")
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    ok = err <= tol
    print(f"  check       : {'OK' if ok else 'FAILED'} (tolerance {tol:g})")
    rc = 0 if ok else 1
    if not args.no_hf:
        rc = max(rc, _hf_demo(args))
    return rc


def _parse_options(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option must be KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a plain string (e.g. a gates directory)
    return out


def _hf_demo(args) -> int:
    """The Hugging Face part (see the module docstring); returns an exit code."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("\nHugging Face drop-in: skipped (transformers is not installed)")
        return 2 if args.model else 0
    from .integrations.hf_demo import prefill_speed_demo, tiny_model_demo

    print()
    rc = 0 if tiny_model_demo() else 1
    if args.model:
        print()
        rc = max(rc, prefill_speed_demo(args.model, method=args.method, seq=args.hf_seq,
                                        options=_parse_options(args.option)))
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
