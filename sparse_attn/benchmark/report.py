"""Outputs of a benchmark run: JSON, CSV, a markdown table, PNG plots, and the run's metadata.

JSON/CSV/markdown are rewritten after every case (through ``*.tmp`` + rename), so a run cut
short still leaves its results; the plots are drawn at the end (matplotlib is optional).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["COLUMNS", "metadata", "markdown_table", "targets_summary", "write_outputs", "write_plots", "sanitize"]

# Every row has these keys, in this order (CSV and JSON).
COLUMNS = [
    "suite", "pattern", "pattern_args", "seq", "density", "blocks_frac", "kernel", "pass", "status",
    "ms", "ms_p20", "ms_p80", "tflops", "tflops_effective", "roofline", "speedup_vs_sdpa", "speedup_vs_flex",
    "layout_ms", "layout_uncached_ms", "work_ratio", "tiles", "check", "check_ref", "max_err", "first_call_s",
    "bwd_method",
    "batch", "heads", "kv_heads", "head_dim", "block", "dtype", "pairs", "dense_pairs", "flops", "dense_flops",
    "error", "note",
]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def sanitize(name: str) -> str:
    """A file-name-safe version of ``name``.

    Example::

        >>> sanitize("NVIDIA H100 80GB HBM3")
        'NVIDIA_H100_80GB_HBM3'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def _run(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=_PKG_DIR, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def _versions() -> Dict[str, Any]:
    info: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        info["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        info["cudnn"] = None
    try:
        from torch.nn import attention

        impl = getattr(attention, "current_flash_attention_impl", None)
        info["sdpa_flash_impl"] = str(impl()) if impl is not None else None
    except Exception:  # noqa: BLE001
        info["sdpa_flash_impl"] = None
    try:
        import flash_attn

        info["flash_attn"] = getattr(flash_attn, "__version__", "installed")
    except Exception:  # noqa: BLE001
        info["flash_attn"] = None
    return info


def metadata(*, cpu: bool, suite: str, argv: List[str], baseline: str, peaks: Dict[str, Optional[float]],
             peak_source: str, timer: str, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything a reader needs to trust or reproduce a result file.

    Args:
        cpu: the CPU smoke run (its numbers are not speed claims).
        suite: the preset (``default``, ``quick``, ``s2``).
        argv: the command line.
        baseline: the SDPA kernel speed-ups are relative to.
        peaks: ``{dtype: dense peak TFLOP/s or None}`` used for the roofline column.
        peak_source: where the peaks came from (table / ``--peak-tflops`` / unknown GPU).
        timer: how kernels were timed.
        extra: more fields.

    Returns:
        dict with ``gpu``, ``driver``, ``torch``, ``triton``, ``git_commit``, ``date`` and more.

    Example::

        >>> m = metadata(cpu=True, suite="quick", argv=[], baseline="sdpa_math", peaks={}, peak_source="-",
        ...              timer="perf_counter")
        >>> m["gpu"], m["speed_claims"]
        ('cpu', False)
    """
    if not cpu and torch.cuda.is_available():
        dev = torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(dev)
        cap = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        driver = _run(["nvidia-smi", "-i", str(dev), "--query-gpu=driver_version", "--format=csv,noheader"])
        mem_gib = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    else:
        gpu, cap, driver, mem_gib = "cpu", None, None, None
    commit = _run(["git", "rev-parse", "HEAD"]) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    meta = dict(
        mode="cpu-smoke" if cpu else "cuda", suite=suite, speed_claims=not cpu,
        gpu=gpu, compute_capability=cap, gpu_memory_gib=mem_gib, driver=driver,
        **_versions(),
        python=platform.python_version(), host_cpu=platform.processor() or platform.machine(),
        git_commit=commit, git_dirty=None if commit == "unknown" or dirty is None else bool(dirty),
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), argv=list(argv),
        baseline=baseline, peak_tflops=peaks, peak_source=peak_source, timer=timer,
        flops="fwd = 4 * D * pairs; bwd = 2.5x, fwd_bwd = 3.5x; pairs = causally visible (query, key) "
              "pairs in the computed blocks over batch x query heads; effective = the same time with "
              "the dense causal pairs",
        roofline="tflops / dense tensor-core peak of the GPU for the dtype (blank: unknown GPU or fp32)",
    )
    meta.update(extra or {})
    return meta


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}g}" if abs(x) < 1e-2 and x != 0 else f"{x:.{nd}f}"
    return str(x)


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


TABLE_HEAD = ["pattern", "seq", "density", "blocks frac", "kernel", "pass", "ms (p20-p80)", "TFLOP/s",
              "eff. TFLOP/s", "roofline", "vs SDPA", "vs flex", "layout ms", "work ratio", "check", "max err", "note"]


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    """One table line per timed or failed row (skipped rows are listed by :func:`write_outputs`).

    Example::

        >>> markdown_table([]).splitlines()[0].startswith("| pattern | seq |")
        True
    """
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join("---" for _ in TABLE_HEAD) + "|"]
    for r in rows:
        if r.get("status") == "skipped":
            continue
        ms = (f"{_fmt(r['ms'])} ({_fmt(r['ms_p20'])}-{_fmt(r['ms_p80'])})" if r.get("ms") is not None else "ERROR")
        check = "-" if r.get("check") is None else f"{r['check']} vs {r['check_ref']}"
        layout = _fmt(r.get("layout_ms"), 3)
        if r.get("layout_uncached_ms") is not None:
            layout += f" (uncached {_fmt(r['layout_uncached_ms'], 3)})"
        pattern = r["pattern"] + (f"[{r['pattern_args']}]" if r.get("pattern_args") else "")
        note = r.get("error") or r.get("note") or ""
        cells = [
            pattern, str(r["seq"]), _fmt(r.get("density"), 2), _fmt(r.get("blocks_frac"), 3), r["kernel"],
            r["pass"], ms, _fmt(r.get("tflops"), 1), _fmt(r.get("tflops_effective"), 1),
            "-" if r.get("roofline") is None else f"{100 * r['roofline']:.1f}%",
            _x(r.get("speedup_vs_sdpa")), _x(r.get("speedup_vs_flex")), layout, _fmt(r.get("work_ratio"), 2), check,
            _fmt(r.get("max_err"), 3), str(note).replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The targets (H100, bf16, D=128, causal), checked on the rows of our Triton kernel.
TARGETS = [
    ("dense-equivalent layout, fwd >= 0.95x SDPA-flash", dict(pattern="dense", pass_="fwd"), "sdpa", 0.95),
    ("dense-equivalent layout, bwd >= 0.9x SDPA-flash", dict(pattern="dense", pass_="bwd"), "sdpa", 0.9),
    ("10% density at 32k, fwd >= 8x SDPA-flash", dict(density=0.1, seq=32768, pass_="fwd"), "sdpa", 8.0),
    ("same block mask, fwd >= 1.25x FlexAttention", dict(pass_="fwd"), "flex", 1.25),
    ("same block mask, bwd >= 1.25x FlexAttention", dict(pass_="bwd"), "flex", 1.25),
]


def targets_summary(rows: List[Dict[str, Any]], kernel: str = "ours_triton") -> List[str]:
    """One line per target of the issue: the worst speed-up of ``kernel`` over the matching rows.

    Example::

        >>> targets_summary([])[0].endswith("no data")
        True
    """
    out = []
    for text, want, vs, goal in TARGETS:
        vals: List[Tuple[float, str]] = []
        for r in rows:
            if r["kernel"] != kernel or r["pass"] != want["pass_"] or r.get("status") != "ok":
                continue
            if any(r.get(k) != v for k, v in want.items() if k != "pass_"):
                continue
            s = r.get("speedup_vs_sdpa" if vs == "sdpa" else "speedup_vs_flex")
            if s is not None:
                vals.append((s, f"{r['pattern']}@{_fmt(r.get('density'), 2)} seq {r['seq']}"))
        if not vals:
            out.append(f"- {text}: no data")
            continue
        worst = min(vals)
        verdict = "met" if worst[0] >= goal else "NOT met"
        out.append(f"- {text}: worst {worst[0]:.2f}x ({worst[1]}; {len(vals)} rows) -> {verdict}")
    return out


def write_outputs(out_dir: str, stem: str, meta: Dict[str, Any], rows: List[Dict[str, Any]],
                  columns: Optional[List[str]] = None, sections: Optional[List[Tuple[str, str]]] = None,
                  table: Optional[Callable[[List[Dict[str, Any]]], str]] = None) -> Dict[str, str]:
    """Write ``<stem>.json`` (meta + rows), ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``.

    ``columns`` (default :data:`COLUMNS`), ``sections`` (``(heading, text)`` pairs written before
    the results; default: the prefill targets) and ``table`` (default :func:`markdown_table`) let
    another benchmark family (decode) use the same writer.

    Returns ``{"json": path, "csv": path, "md": path}``.

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> sorted(write_outputs(d, "x", {"gpu": "cpu", "mode": "cpu-smoke", "speed_claims": False}, []))
        ['csv', 'json', 'md']
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "csv", "md")}
    cols = list(COLUMNS if columns is None else columns)
    extra = sorted({k for r in rows for k in r} - set(cols))
    tmp = {ext: p + ".tmp" for ext, p in paths.items()}
    with open(tmp["json"], "w") as f:
        json.dump(dict(meta=meta, columns=cols + extra, rows=rows), f, indent=1, default=str)
    with open(tmp["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + [c for c in extra if c != "traceback"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with open(tmp["md"], "w") as f:
        f.write(f"# sparse_attn benchmark: {meta['gpu']} ({meta['mode']}, suite {meta.get('suite')})\n\n")
        if not meta["speed_claims"]:
            f.write("**CPU smoke run: checks the harness only; these numbers are NOT speed claims.**\n\n")
        for k, v in meta.items():
            f.write(f"- **{k}**: {v}\n")
        if sections is None:
            sections = [("Targets (our Triton kernel, table tiles)", "\n".join(targets_summary(rows)))]
            if any(r["kernel"] == "ours_triton_tuned" for r in rows):
                sections.append(("Targets (our Triton kernel, SPARSE_ATTN_AUTOTUNE=1)",
                                 "\n".join(targets_summary(rows, "ours_triton_tuned"))))
        for heading, text in sections:
            f.write(f"\n## {heading}\n\n{text}\n")
        f.write("\n## Results\n\n" + (table or markdown_table)(rows) + "\n")
        skipped: Dict[Tuple[str, str], int] = {}
        for r in rows:
            if r.get("status") == "skipped":
                key = (r["kernel"], str(r.get("error")))
                skipped[key] = skipped.get(key, 0) + 1
        if skipped:
            f.write("\n## Skipped\n\n")
            for (kernel, why), n in skipped.items():
                f.write(f"- {kernel}: {why} ({n} rows)\n")
    for ext in paths:
        os.replace(tmp[ext], paths[ext])
    return paths


def _finish_axis(ax: Any, title: str) -> None:
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=5, ncol=2)


def _save_figure(plt: Any, fig: Any, title: str, path: str) -> str:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out_dir: str, stem: str, rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> Tuple[List[str], str]:
    """PNG plots: ``<stem>_speedup.png`` (speed-up over the SDPA baseline vs computed density, one
    line per sequence length and kernel) and ``<stem>_tflops.png`` (TFLOP/s vs sequence length,
    one line per kernel and pattern); one panel per pass.

    Returns ``(paths written, message)``; without matplotlib nothing is written and the message
    says so (the other outputs do not depend on it).

    Example::

        >>> import tempfile
        >>> paths, msg = write_plots(tempfile.mkdtemp(), "x", [], {"gpu": "cpu", "mode": "cpu-smoke"})
        >>> paths
        []
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return [], (f"matplotlib is not available ({type(exc).__name__}); PNG plots skipped "
                    f"(pip install matplotlib); JSON/CSV/markdown were written")
    timed = [r for r in rows if r.get("status") == "ok" and r.get("ms")]
    passes = [p for p in ("fwd", "bwd", "fwd_bwd") if any(r["pass"] == p for r in timed)]
    if not passes:
        return [], "no timed rows to plot"
    title = f"{meta.get('gpu')} ({meta.get('mode')})"
    paths = []

    markers = dict(zip(sorted({r["pattern"] for r in timed}), "osD^vP*Xph"))

    def pattern_label(r: Dict[str, Any]) -> str:
        return r["pattern"] + (f"[{r['pattern_args']}]" if r.get("pattern_args") else "")

    def seq_ticks(ax: Any, seqs: List[int]) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs)
        ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s) for s in seqs])
        ax.minorticks_off()

    # 1) speed-up over the baseline vs computed density: colour = sequence length, marker =
    #    pattern, solid = ours, dashed = a masked peer; lines join the densities of one pattern.
    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.4), squeeze=False)
    seqs = sorted({r["seq"] for r in timed})
    colors = {s: plt.cm.viridis(i / max(1, len(seqs) - 1)) for i, s in enumerate(seqs)}
    for ax, p in zip(axes[0], passes):
        sparse = [r for r in timed if r["pass"] == p and r.get("speedup_vs_sdpa") is not None
                  and r.get("block") is not None]
        series: Dict[Tuple[str, int, str], List[Tuple[float, float]]] = {}
        for r in sparse:
            series.setdefault((r["kernel"], r["seq"], pattern_label(r)), []).append(
                (r["blocks_frac"], r["speedup_vs_sdpa"]))
        for (kernel, s, pat), pts in sorted(series.items()):
            ours = kernel.startswith("ours")
            ax.plot(*zip(*sorted(pts)), "-" if ours else "--", marker=markers.get(pat.split("[")[0], "o"),
                    color=colors[s], mfc=colors[s] if ours else "none", label=f"{kernel} {pat} S={s}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("computed fraction of causal blocks")
        ax.set_ylabel(f"speed-up over {meta.get('baseline')} (dense causal)")
        ax.set_yscale("log")
        _finish_axis(ax, p)
    paths.append(_save_figure(plt, fig, f"speed-up vs density: {title}",
                              os.path.join(out_dir, f"{stem}_speedup.png")))

    # 2) TFLOP/s (computed blocks) vs sequence length: colour = pattern, solid = ours,
    #    dashed = masked peer, dotted = dense peers.
    fig, axes = plt.subplots(1, len(passes), figsize=(5.5 * len(passes), 4.4), squeeze=False)
    labels = sorted({pattern_label(r) + (f"@{r['density']:g}" if r.get("density") is not None else "")
                     for r in timed if r.get("block") is not None})
    pcolors = {lab: plt.cm.tab20(i % 20) for i, lab in enumerate(labels)}
    for ax, p in zip(axes[0], passes):
        series2: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
        for r in timed:
            if r["pass"] != p or r.get("tflops") is None:
                continue
            lab = "" if r.get("block") is None else (
                pattern_label(r) + (f"@{r['density']:g}" if r.get("density") is not None else ""))
            series2.setdefault((r["kernel"], lab), []).append((r["seq"], r["tflops"]))
        for (kernel, lab), pts in sorted(series2.items()):
            style = ":" if not lab else ("-" if kernel.startswith("ours") else "--")
            ax.plot(*zip(*sorted(pts)), style, marker="o", color=pcolors.get(lab, "black") if lab else None,
                    label=f"{kernel} {lab}".strip())
        peaks = [v for v in (meta.get("peak_tflops") or {}).values() if v]
        if peaks:
            ax.axhline(max(peaks), color="red", lw=0.8, ls=":", label="dense peak")
        seq_ticks(ax, seqs)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s (computed blocks)")
        _finish_axis(ax, p)
    paths.append(_save_figure(plt, fig, f"TFLOP/s vs sequence length: {title}",
                              os.path.join(out_dir, f"{stem}_tflops.png")))
    return paths, "wrote " + ", ".join(paths)


_SKIPS_SAID: set = set()  # (kernel, reason) of skipped rows already explained in this process


def print_rows(rows: List[Dict[str, Any]], tag: str,
               status: Optional[Callable[[Dict[str, Any]], str]] = None) -> None:
    """One progress line per row on stdout; a kernel's passes skipped for one reason share a line,
    and a reason already given (e.g. "needs TRITON_INTERPRET" on every case) is not repeated.
    ``status(row)`` formats an ``ok`` row (default: ms, TFLOP/s and the check)."""
    done = set()
    for r in rows:
        if r.get("status") == "skipped":
            reason = str(r.get("error"))
            if (r["kernel"], reason) in done:
                continue
            done.add((r["kernel"], reason))
            passes = "/".join(x["pass"] for x in rows if x["kernel"] == r["kernel"] and x.get("error") == reason
                              and x.get("status") == "skipped")
            said = (r["kernel"], reason) in _SKIPS_SAID
            _SKIPS_SAID.add((r["kernel"], reason))
            text = "skipped (reason above)" if said else (reason if reason.startswith("skipped") else
                                                         f"skipped: {reason}")
            print(f"[{tag}] {r['kernel']:>14} {passes:>7}: {text}", flush=True)
            continue
        if r.get("status") == "ok":
            text = status(r) if status is not None else f"{r['ms']:.3f} ms  {_fmt(r.get('tflops'), 1)} TFLOP/s"
            if r.get("check"):
                text += f"  check {r['check']} ({_fmt(r.get('max_err'))})"
        else:
            text = str(r.get("error"))
            text = text if text.startswith(r["status"]) else f"{r['status']}: {text}"
        print(f"[{tag}] {r['kernel']:>14} {r['pass']:>7}: {text}", flush=True)
    sys.stdout.flush()
