"""``sparse-attn``: the package's command line.

Subcommands::

    sparse-attn bench [...]          kernel microbenchmarks (same flags as ``bench/run.py``)
    sparse-attn train-gates [...]    train SeerAttention gates on a frozen model
    sparse-attn demo [...]           the README demo
    sparse-attn --version            the installed version

Each subcommand imports only what it needs, so ``sparse-attn bench --help`` works without
transformers installed.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

_COMMANDS = {
    "bench": ("sparse_attn.benchmark", "main", "kernel microbenchmarks vs SDPA / FlexAttention / flash-attn"),
    "train-gates": ("sparse_attn.training.cli", "main", "train SeerAttention gates (distillation)"),
    "demo": ("sparse_attn.demo", "main", "the README demo on built-in sample inputs"),
}


def _usage() -> str:
    lines = ["usage: sparse-attn [--version] <command> [args...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"sparse-attn {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"sparse-attn: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = _COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
