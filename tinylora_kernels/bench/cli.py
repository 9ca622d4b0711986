"""``tinylora-kernels bench``: its options and how each mode runs and writes its result."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .. import argtypes
from . import report
from .cases import MODELS, MODES, PROVIDERS, cpu_note, default_cases

#: the modes other than the suite: option -> what it does (for --help)
OTHER_MODES = {
    "parts": "the prefill forward part by part (our decode, bitsandbytes' decode, the GEMMs, "
             "A x, the adapter, the whole paths) on --models' linears at --m rows (default: "
             "M = 4096 on a GPU, 128 on a CPU)",
    "host_cost": "the per-call host cost of a tiny layer against bitsandbytes' Linear4bit (on a "
                 "GPU also through the kernels)",
    "setup": "apply_tiny_lora's set-up (SVD of every weight) on --decoder-layers decoder layers "
             "of --models' shapes, without cache, with an empty and with a filled factor cache",
    "gemv_sweep": "every NF4 GEMV launch shape on --models' linears at M = 1 and 4 (needs a "
                  "GPU)",
    "generate": "tokens per second of eager generate on an 8-layer 4-bit tiny Qwen2, with and "
                "without the adapter (with --models: --decoder-layers layers of that model's "
                "shapes)",
    "adapters": "a different v in every row of a batch against one shared v (a layer at M = 64, "
                "and generate)",
    "profile": "where the time of one decoder-layer call goes: every operation, host and device "
               "µs per call (torch.profiler), at --m rows (default 1 and 4096 on a GPU, 1 and 128 "
               "on a CPU), forward and fwd+bwd, the package's torch path against bitsandbytes "
               "alone",
    "compiled": "no timing: compile what a Qwen2.5-Coder-3B decoder layer launches for Hopper "
                "(sm_90) and project it against the H200 roofline (no GPU needed; every figure "
                "projected, none measured)",
}


def add_bench_parser(sub) -> argparse.ArgumentParser:
    """The ``bench`` subcommand's options, added to ``sub``."""
    p = sub.add_parser(
        "bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the benchmark harness",
        description="Time every provider side by side against the floor in the modes fwd, bwd, "
        "fwd+bwd (on a CPU: reduced shapes and CPU timings; GPU figures need a GPU), or run one "
        "other mode; write the result as JSON, a Markdown table generated from it (and for the "
        "suite a plot) into --out under new file names. Every mode writes the same JSON format "
        "(the timing method is stated in it); --compare compares any two results.")
    p.add_argument("--models", type=argtypes.choices_list(tuple(MODELS), "model"),
                   help="model shapes, comma-separated from " + ", ".join(MODELS)
                   + " (default: qwen2.5-coder-3b on a GPU, cpu-reduced on a CPU; the full-size "
                   "shapes take minutes per case on a CPU)")
    p.add_argument("--m", type=argtypes.int_list,
                   help="row counts M (tokens per call), comma-separated (default: 1,16,128,4096 "
                   "on a GPU, 1,16,128 on a CPU)")
    layer_names = tuple(dict.fromkeys(n for m in MODELS.values() for n in m["shapes"]))
    p.add_argument("--layers", type=argtypes.choices_list(
        layer_names + ("decoder_layer", "stack<N>"), "layer", r"stack[1-9][0-9]*"),
        help="comma-separated: q_proj ... down_proj, decoder_layer (the 7 linears of one "
        "layer), stack<N> (N decoder layers) (default: every linear and decoder_layer)")
    p.add_argument("--modes", type=argtypes.choices_list(MODES, "mode"), default=["fwd"],
                   help="what is timed, comma-separated from fwd (forward, no grad), bwd "
                   "(backward alone, the forward's graph given), fwd+bwd (default: fwd; all "
                   "three add the check that fwd + bwd matches fwd+bwd)")
    p.add_argument("--providers", type=argtypes.choices_list(PROVIDERS, "provider"),
                   default=list(PROVIDERS),
                   help="contenders, comma-separated from " + ", ".join(PROVIDERS)
                   + " (default: all; the Markdown's legend says what each runs)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="activation and compute dtype of the suite (default: bf16 on a GPU, fp32 "
                   "on a CPU)")
    p.add_argument("--budget-s", type=argtypes.positive_float, default=600.0,
                   help="time budget of the whole run in seconds; once spent, the remaining cases "
                   "are marked 'time budget spent' and what was measured is written (default: "
                   "600)")
    p.add_argument("--decoder-layers", type=argtypes.positive_int, default=1,
                   help="decoder layers built for --setup and --generate --models (default: 1)")
    p.add_argument("--out", default=".",
                   help="directory for the result files (default: the current one); existing "
                   "files are never overwritten")
    p.add_argument("--name", default=None, type=argtypes.file_stem,
                   help="file name stem (default: bench-<device>-<date>-<time> for the suite, "
                   "<mode>-<device>-<date>-<time> for another mode)")
    p.add_argument("--compare", nargs=2, metavar=("A_JSON", "B_JSON"),
                   type=argtypes.result_file,
                   help="instead of timing: compare two result files of this command")
    for name, text in OTHER_MODES.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true",
                       help="instead of the suite: " + text)
    return p


def _suite(args, device, say):
    from .suite import DTYPES, run_suite

    cases = default_cases(device, models=args.models, ms=args.m, modes=args.modes,
                          layers=args.layers)
    if device == "cpu":
        print(cpu_note(c.model for c in cases) + ".", flush=True)
    return run_suite(cases, args.providers, device=device, budget_s=args.budget_s,
                     dtype=DTYPES[args.dtype] if args.dtype else None)


def _parts(args, device, say):
    from .parts import prefill_parts

    return prefill_parts(model=(args.models or [None])[0], m=(args.m or [None])[0],
                         device=device, layers=args.layers, budget_s=min(args.budget_s, 120.0),
                         progress=say)


def _host_cost(args, device, say):
    from .host import host_cost

    return host_cost(device=device, backends=("reference", "triton") if device == "cuda"
                     else ("reference",))


def _setup(args, device, say):
    from .setup_cost import setup_cost

    return setup_cost(model=(args.models or ["qwen2.5-coder-3b"])[0],
                      n_layers=args.decoder_layers, device=device, progress=say)


def _gemv_sweep(args, device, say):
    from .gemv import gemv_sweep

    return gemv_sweep(model=(args.models or ["qwen2.5-coder-3b"])[0])


def _generate(args, device, say):
    from .generate import generate_cost

    model = (args.models or [None])[0]
    return generate_cost(device=device, progress=say, model=None if model == "cpu-reduced"
                         else model, layers=args.decoder_layers if model else 8)


def _adapters(args, device, say):
    from .adapters import adapter_batch_cost

    return adapter_batch_cost(device=device, progress=say)


def _profile(args, device, say):
    from .profile import profile_layer

    return profile_layer(device=device, model=(args.models or [None])[0],
                         ms=args.m or ((1, 4096) if device == "cuda" else (1, 128)), progress=say)


def _compiled(args, device, say):
    from ..static_report import static_report

    return static_report(progress=say)


_RUNNERS = {"suite": _suite, "parts": _parts, "host_cost": _host_cost, "setup": _setup,
            "gemv_sweep": _gemv_sweep, "generate": _generate, "adapters": _adapters,
            "compiled": _compiled, "profile": _profile}


def _refusal(mode: str, device: str):
    """Why ``mode`` cannot run here, or None."""
    if mode == "gemv_sweep" and device != "cuda":
        return "--gemv-sweep times GPU kernels; torch sees no CUDA device here"
    if mode == "compiled" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "--compiled compiles the kernels; unset TRITON_INTERPRET"
    return None


def run_bench(args) -> int:
    """Run the mode ``args`` selects, write its result; returns the exit code."""
    if args.compare:
        a, b = (report.upgrade(json.loads(Path(p).read_text())) for p in args.compare)
        if a.get("mode") != b.get("mode"):
            print(f"error: --compare needs two results of the same mode; {args.compare[0]} is "
                  f"{a.get('mode')!r}, {args.compare[1]} is {b.get('mode')!r}", file=sys.stderr)
            return 2
        table = report.compare(a, b)
        if table.count("\n") <= 2:
            print(f"error: --compare: no case measured in both {args.compare[0]} and "
                  f"{args.compare[1]} (same mode {a.get('mode')!r}, other cases or "
                  "contenders)", file=sys.stderr)
            return 1
        print(table, end="")
        return 0
    chosen = [m for m in OTHER_MODES if getattr(args, m)]
    if len(chosen) > 1:
        print("error: choose one mode at a time, not " + ", ".join(
            "--" + m.replace("_", "-") for m in chosen), file=sys.stderr)
        return 2
    mode = chosen[0] if chosen else "suite"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out {args.out} is a file, not a directory", file=sys.stderr)
        return 2
    why = _refusal(mode, device)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    data = _RUNNERS[mode](args, device, lambda msg: print(msg, flush=True))
    table = None
    if mode == "compiled":
        from ..static_report import static_report_markdown

        table = static_report_markdown(data)
    elif mode == "profile":
        from .profile import profile_markdown

        table = profile_markdown(data)
    prefix = "bench" if mode == "suite" else mode.replace("_", "-")
    stem = args.name or f"{prefix}-{device}-{time.strftime('%Y%m%d-%H%M%S')}"
    from .suite import plot

    paths = report.write(data, out_dir, stem, table, figure=plot if mode == "suite" else None)
    shown = table.split("\n\nPer launch")[0] + "\n" if table else paths[1].read_text()
    print(shown, end="")
    print("wrote " + ", ".join(str(p) for p in paths)
          + (f" ({data['plot']})" if data.get("plot") else ""))
    return 0
