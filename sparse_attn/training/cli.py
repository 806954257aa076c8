"""``sparse-attn train-gates``: distil SeerAttention gates for a local Hugging Face model.

Example::

    sparse-attn train-gates --model ./Llama-3.2-1B --data corpus.jsonl --steps 500 \\
        --seq-len 4096 --batch-size 2 --grad-accum 4 --out ./gates

Needs the ``train`` extra (``pip install 'sparse_attn[train]'``: transformers, safetensors, tqdm);
without transformers the command says so and exits with status 2.

The gates land in ``--out`` (``gates_config.json`` + the ``gates-<hash>.safetensors`` it names,
written atomically); load them with ``apply_sparse_attention(model, method="seer", gates="./gates")``.
With ``--save-every N`` checkpoints go to ``--out/checkpoints/step-NNNNNN/`` (complete or absent
whenever the process dies; the newest ``--keep-checkpoints`` are kept) and ``--resume`` continues
from the newest complete one. Nothing is downloaded:
``--model`` is a local directory (weights, config and, if present, a tokenizer; without one
the text is fed as UTF-8 bytes, which only suits byte-level models).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparse-attn train-gates", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="a .txt / .jsonl file or a folder of them")
    p.add_argument("--out", required=True, help="output directory for gates and checkpoints")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--block-size", type=int, default=64)
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--density", type=float, default=None,
                      help="selection stored with the gates: this share of each row's causal blocks (default 0.2)")
    rule.add_argument("--threshold", type=float, default=None, help="selection: softmax probability threshold")
    rule.add_argument("--topk", type=int, default=None, help="selection: this many blocks per row")
    rule.add_argument("--nz-ratio", type=float, default=None, help="selection: the SeerAttention nz_ratio rule")
    p.add_argument("--loss", choices=("sparse_attn", "seerattention"), default="sparse_attn",
                   help="distillation loss: ours (mean row KL) or the SeerAttention authors' (mean element KL, "
                        "first quarter of the query blocks dropped)")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps and at the end (0: no checkpoints; the gates are saved anyway)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many checkpoints to keep (default 2)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in OUT/checkpoints")
    p.add_argument("--max-chars", type=int, default=None, help="read at most this many characters of text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _need_transformers() -> Optional[str]:
    """None when transformers imports, else the message that says how to install it."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return (f"train-gates needs the Hugging Face transformers package ({exc}); install the training extra: "
                "pip install 'sparse_attn[train]'")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    missing = _need_transformers()
    if missing:
        print(f"train-gates: {missing}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM

    from .. import _files
    from .data import ByteTokenizer
    from .trainer import train_gates

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not os.path.isdir(args.model):
        print(f"train-gates: --model {args.model!r} is not a directory (nothing is downloaded)", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).to(device)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except Exception as exc:  # no tokenizer files: bytes
        print(f"train-gates: no tokenizer in {args.model} ({type(exc).__name__}); using UTF-8 bytes", file=sys.stderr)
        tokenizer = ByteTokenizer()
    result = train_gates(
        model, args.data, steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        tokenizer=tokenizer, output_dir=args.out, save_every=args.save_every, resume=args.resume,
        keep_checkpoints=args.keep_checkpoints,
        max_chars=args.max_chars, seed=args.seed, progress=not args.no_progress, loss=args.loss,
        method_options={"block_size": args.block_size, **_selection(args)},
    )
    hist = result["history"]
    summary = {"steps": len(hist), "first_loss": hist[0]["loss"] if hist else None,
               "last_loss": hist[-1]["loss"] if hist else None, "out": args.out}
    _files.atomic_write(os.path.join(args.out, "train_log.json"), json.dumps(hist, indent=1).encode("utf-8"))
    print(json.dumps(summary))
    return 0


def _selection(args: argparse.Namespace) -> dict:
    """The selection rule given on the command line (the pattern's default, density 0.2, if none)."""
    given = {"density": args.density, "threshold": args.threshold, "topk": args.topk, "nz_ratio": args.nz_ratio}
    return {k: v for k, v in given.items() if v is not None}


if __name__ == "__main__":
    sys.exit(main())
