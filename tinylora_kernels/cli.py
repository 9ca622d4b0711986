"""tinylora-kernels (also: python -m tinylora_kernels).

Commands:
  check     (the default when no command is given) build small random models (4-bit NF4 and
            dense), apply TinyLoRA, and compare every available computation path with a float64
            evaluation of the formula; prints a table and exits with 1 when a path is outside
            its error budget.
  inspect   say what a tiny_lora_v.pt checkpoint holds and what restoring it needs.
  bench     the benchmark suite: every provider side by side against the floor, or one of its
            other modes (--compare, --host-cost, --generate, --compiled, --gemv-sweep).

Run "tinylora-kernels COMMAND --help" for a command's options.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from .backend import use_backend as _backend

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _paths(device: str) -> List[tuple]:
    """(name, why it cannot run here or None) for every computation path of this version."""
    from .ops import interpreting, triton_missing

    why_not = triton_missing()
    if why_not is None and device == "cpu" and not interpreting():
        why_not = ("CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter, slow); on a GPU "
                   "use --device cuda")
    return [("reference", None), ("triton", why_not)]


def run_check(seed: int = 0, rows: int = 64, dtypes=("fp32", "fp16", "bf16"),
              progress: bool = False, device: str = "cpu", plans: bool = False) -> List[dict]:
    """Evaluate every available path on small random models; one result row per case.

    With ``plans``, each row also carries the router's plan for the model's first layer."""
    from . import TinyLoRAGlobalParams, apply_tiny_lora, router, tiny_lora_layers
    from .testing import layer_truth_and_lowp, reference_error_budget, tiny_qwen2

    kinds = [("qwen2 4-bit nf4 dq", dict(quantized=True, double_quant=True)),
             ("qwen2 4-bit nf4", dict(quantized=True, double_quant=False,
                                      compute_dtype=torch.bfloat16)),
             ("qwen2 dense fp32", dict(quantized=False, dtype=torch.float32))]
    gen = torch.Generator().manual_seed(seed)
    results = []
    for (label, kwargs), projection in ((k, p) for k in kinds for p in ("full", "diagonal")):
        try:
            model = tiny_qwen2(seed=seed, device=device, **kwargs)
        except ImportError as exc:  # no bitsandbytes: check what can be checked
            results.append({"model": label, "projection": projection, "path": "-", "dtype": "-",
                            "status": f"not run: {exc}"})
            continue
        gp = TinyLoRAGlobalParams(u_dim=13, device=device, dtype=torch.float32)
        torch.manual_seed(seed)
        apply_tiny_lora(model, gp, projection=projection, progress=progress)
        with torch.no_grad():
            gp.global_v.copy_(torch.randn(13, generator=gen) * 0.5)
        for name, why in _paths(device):
            for dname in dtypes:
                dtype = _DTYPES[dname]
                row = {"model": label, "projection": projection, "path": name, "dtype": dname}
                reason = why
                if reason is not None:
                    results.append({**row, "status": f"not run: {reason}"})
                    continue
                worst, n_layers = None, 0
                for _, layer in tiny_lora_layers(model):
                    x = torch.randn(rows, layer.base_layer.in_features, generator=gen)
                    x = x.to(device=device, dtype=dtype)
                    try:
                        with torch.no_grad(), _backend(name):
                            y = layer(x)
                            if plans and "plan" not in row:
                                row["plan"] = f"{label} {dname}: {router.explain(layer, x)}"
                    except RuntimeError as exc:   # a forced path that cannot take this call
                        reason = str(exc).split(": ", 1)[-1]
                        break
                    truth, lowp = layer_truth_and_lowp(layer, x)
                    err, budget = reference_error_budget(y, lowp, truth)
                    n_layers += 1
                    if worst is None or err / budget > worst[0] / worst[1]:
                        worst = (err, budget)
                if reason is not None:
                    results.append({**row, "status": f"not run: {reason}"})
                    continue
                ok = worst[0] <= worst[1]
                results.append({**row, "layers": n_layers, "max_err": worst[0],
                                "budget": worst[1], "status": "ok" if ok else "FAIL"})
    return results


def format_table(results: List[dict]) -> str:
    """The check results as an aligned text table."""
    head = ("model", "projection", "path", "dtype", "layers", "worst err", "budget", "status")
    lines = []
    for r in results:
        lines.append((r["model"], r["projection"], r["path"], r["dtype"], str(r.get("layers", "-")),
                      f"{r['max_err']:.3e}" if "max_err" in r else "-",
                      f"{r['budget']:.3e}" if "budget" in r else "-", r["status"]))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _choices_list(valid, what: str, pattern: str = None):
    """An argparse type: a comma-separated list, each item one of ``valid`` (or matching the
    regular expression ``pattern``)."""
    import re

    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given")
        bad = [s for s in items if s not in valid and not (pattern and re.fullmatch(pattern, s))]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(valid)}")
        return items
    return parse


def _int_list(text: str) -> List[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        if not items:
            raise argparse.ArgumentTypeError("none given")
        return [_positive_int(s) for s in items]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: row counts are comma-separated whole "
                                         f"numbers >= 1 ({exc})") from None


def _device(text: str) -> str:
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose from cpu, cuda")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda, but torch sees no CUDA device here "
                                         f"(torch {torch.__version__})")
    return text


def _result_file(text: str) -> str:
    import json
    from pathlib import Path

    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a JSON result file ({exc})") from None
    if not isinstance(data, dict) or "rows" not in data:
        raise argparse.ArgumentTypeError(f"{text}: not a result file of tinylora-kernels bench "
                                         "(no 'rows')")
    return text


def _quiet_bitsandbytes():
    """Keep bitsandbytes' import-time notice about an optional CPU kernel (the ``kernels``
    package from a model hub, not needed) out of this command's output."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tinylora-kernels``."""
    from . import bench

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="tinylora-kernels", description=__doc__,
                                     formatter_class=raw)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_check = sub.add_parser(
        "check", formatter_class=raw, help="compare every computation path with float64",
        description="Build small random models (4-bit NF4 and dense), apply TinyLoRA, and "
        "compare every available computation path with a float64 evaluation of the formula. "
        "A path passes when its error is at most twice torch's own low-precision error (plus "
        "1e-5). Exits with 1 when any path fails.")
    p_check.add_argument("--seed", type=int, default=0,
                         help="seed of the random models and inputs (default: 0)")
    p_check.add_argument("--rows", type=_positive_int, default=64,
                         help="input rows per layer (default: 64)")
    p_check.add_argument("--dtypes", type=_choices_list(tuple(_DTYPES), "dtype"),
                         default=list(_DTYPES),
                         help="activation dtypes, comma-separated from fp32, fp16, bf16 "
                              "(default: all three)")
    p_check.add_argument("--device", type=_device, default="cpu",
                         help="cpu or cuda (default: cpu)")
    p_check.add_argument("--plans", action="store_true",
                         help="also print the router's plan for each model's first layer")
    p_inspect = sub.add_parser(
        "inspect", formatter_class=raw, help="what a tiny_lora_v.pt checkpoint holds",
        description="Read a tiny_lora_v.pt checkpoint (the users' format or this package's), "
        "check it, and say what it holds and what restoring it needs. Exits with 2 when the "
        "file is not a valid checkpoint.")
    p_inspect.add_argument("checkpoint", help="path of the tiny_lora_v.pt file")
    p_bench = sub.add_parser(
        "bench", formatter_class=raw, help="the benchmark suite",
        description="Time every provider side by side against the floor (on a CPU: reduced "
        "shapes and CPU timings; GPU figures need a GPU), and write JSON, Markdown and a plot "
        "into --out under new file names. Instead of the suite, one mode: --compare, "
        "--host-cost, --generate, --compiled (no GPU needed) or --gemv-sweep (GPU).")
    p_bench.add_argument("--models", type=_choices_list(tuple(bench.MODELS), "model"),
                         help="model shapes, comma-separated from " + ", ".join(bench.MODELS)
                         + " (default: qwen2.5-coder-3b on a GPU, cpu-reduced on a CPU; the "
                         "full-size shapes take minutes per case on a CPU)")
    p_bench.add_argument("--m", type=_int_list,
                         help="row counts M (tokens per call), comma-separated (default: "
                         "1,16,128,4096 on a GPU, 1,16,128 on a CPU)")
    layer_names = tuple(dict.fromkeys(n for m in bench.MODELS.values() for n in m["shapes"]))
    p_bench.add_argument("--layers", type=_choices_list(layer_names + ("decoder_layer",
                                                                       "stack<N>"),
                                                        "layer", r"stack[1-9][0-9]*"),
                         help="comma-separated: q_proj ... down_proj, decoder_layer (the 7 "
                         "linears of one layer), stack<N> (N decoder layers) (default: every "
                         "linear and decoder_layer)")
    p_bench.add_argument("--modes", type=_choices_list(bench.MODES, "mode"), default=["fwd"],
                         help="what is timed, comma-separated from fwd (forward), bwd (backward "
                         "alone), fwd+bwd (default: fwd)")
    p_bench.add_argument("--providers", type=_choices_list(bench.PROVIDERS, "provider"),
                         default=list(bench.PROVIDERS),
                         help="contenders, comma-separated from " + ", ".join(bench.PROVIDERS)
                         + " (default: all; the Markdown's legend says what each runs)")
    p_bench.add_argument("--budget-s", type=_positive_float, default=600.0,
                         help="time budget of the whole run in seconds; once spent, the "
                         "remaining cases are marked 'time budget spent' and what was measured "
                         "is written (default: 600)")
    p_bench.add_argument("--out", default=".",
                         help="directory for the result files (default: the current one); "
                         "existing files are never overwritten")
    p_bench.add_argument("--name", default=None,
                         help="file name stem (default: bench-<device>-<date>-<time>, or the "
                         "mode's name)")
    p_bench.add_argument("--compare", nargs=2, metavar=("A_JSON", "B_JSON"), type=_result_file,
                         help="instead of timing: compare two result files of this command")
    p_bench.add_argument("--gemv-sweep", action="store_true",
                         help="instead of the suite: time every NF4 GEMV launch shape on the "
                         "model's linears (needs a GPU)")
    p_bench.add_argument("--host-cost", action="store_true",
                         help="instead of the suite: the per-call host cost of a tiny layer "
                         "against bitsandbytes' Linear4bit (on a GPU also through the kernels)")
    p_bench.add_argument("--compiled", action="store_true",
                         help="instead of timing: compile what a Qwen2.5-Coder-3B decoder layer "
                         "launches for Hopper (sm_90) and project it against the H200 roofline "
                         "(no GPU needed; every figure projected, none measured)")
    p_bench.add_argument("--adapters", action="store_true",
                         help="instead of the suite: the cost of a different v in every row of "
                         "a batch against one shared v (a layer at M = 64, and generate)")
    p_bench.add_argument("--generate", action="store_true",
                         help="instead of the suite: tokens per second of eager generate on an "
                         "8-layer 4-bit tiny Qwen2, with and without the adapter")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``tinylora-kernels``; returns the process exit code."""
    _quiet_bitsandbytes()
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "bench":
        return _bench(args)

    if args.command == "inspect":
        from .checkpoint import CheckpointError, read_checkpoint

        try:
            print(read_checkpoint(args.checkpoint).describe())
        except (CheckpointError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    seed = getattr(args, "seed", 0)
    rows = getattr(args, "rows", 64)
    dtypes = tuple(getattr(args, "dtypes", list(_DTYPES)))
    device = getattr(args, "device", "cpu")
    start = time.perf_counter()
    print(f"tinylora_kernels check: torch {torch.__version__}, device {device}; every path vs a "
          "float64 evaluation of U diag(S) R Vh (budget: 2x torch's own low-precision error + "
          "1e-5)", flush=True)
    results = run_check(seed=seed, rows=rows, dtypes=dtypes, device=device,
                        plans=getattr(args, "plans", False))
    print(format_table(results))
    for line in sorted({r["plan"] for r in results if r.get("plan")}):
        print("plan:", line)
    failed = [r for r in results if r["status"] == "FAIL"]
    print(f"{len(results) - len(failed)} ok or not run, {len(failed)} failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


def _free_stem(out_dir, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... : the first with no file of that name yet."""
    candidate, i = stem, 1
    while any(out_dir.glob(f"{candidate}.*")):
        i += 1
        candidate = f"{stem}-{i}"
    return candidate


def _write_mode(out_dir, stem: str, data: dict, table: str, shown: Optional[str] = None) -> int:
    """Write a bench mode's JSON and Markdown under new names in ``out_dir``; print the table."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(out_dir, stem)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out_dir / f"{stem}.md").write_text(table)
    print(table if shown is None else shown, end="")
    print(f"wrote {out_dir / stem}.json, .md")
    return 0


def _bench(args) -> int:
    import json
    from pathlib import Path

    from . import bench

    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print(bench.compare(a, b), end="")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out {args.out} is a file, not a directory", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.gemv_sweep:
        if device != "cuda":
            print("error: --gemv-sweep times GPU kernels; torch sees no CUDA device here",
                  file=sys.stderr)
            return 2
        data = bench.gemv_sweep(model=(args.models or ["qwen2.5-coder-3b"])[0])
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{_free_stem(out_dir, args.name or f'gemv-sweep-{stamp}')}.json"
        path.write_text(json.dumps(data, indent=1))
        for r in data["best"]:
            print(f"{r['layer']:>10} M={r['M']}: BN={r['BN']} BKH={r['BKH']} split={r['split']} "
                  f"warps={r['num_warps']} {r['median_us']:.1f} µs = {r['time_over_floor']:.2f}x "
                  "floor")
        print(f"wrote {path}")
        return 0
    if args.host_cost:
        data = bench.host_cost(device=device, backends=("reference", "triton")
                               if device == "cuda" else ("reference",))
        stem = _free_stem(out_dir, args.name or f"host-cost-{stamp}")
        paths = bench.write_host_cost(data, out_dir, stem)
        print(bench.host_cost_markdown(data), end="")
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    if args.compiled:
        import os

        from .static_report import static_report, static_report_markdown

        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("error: --compiled compiles the kernels; unset TRITON_INTERPRET",
                  file=sys.stderr)
            return 2
        data = static_report(progress=lambda msg: print(msg, flush=True))
        table = static_report_markdown(data)
        return _write_mode(out_dir, args.name or f"compiled-sm90-{stamp}", data, table,
                           shown=table.split("\n\nPer launch")[0] + "\n")
    if args.adapters:
        from .bench.adapters import adapter_batch_cost, adapter_batch_markdown

        data = adapter_batch_cost(device=device, progress=lambda msg: print(msg, flush=True))
        return _write_mode(out_dir, args.name or f"adapters-{stamp}", data,
                           adapter_batch_markdown(data))
    if args.generate:
        from .bench.generate import generate_cost, generate_cost_markdown

        data = generate_cost(device=device, progress=lambda msg: print(msg, flush=True))
        return _write_mode(out_dir, args.name or f"generate-{stamp}", data,
                           generate_cost_markdown(data))
    cases = bench.default_cases(device, models=args.models, ms=args.m, modes=args.modes,
                                layers=args.layers)
    if device == "cpu":
        print("No GPU here: CPU timings on reduced shapes; GPU figures need a GPU.", flush=True)
    data = bench.run_suite(cases, args.providers, device=device, budget_s=args.budget_s)
    stem = _free_stem(out_dir, args.name or f"bench-{device}-{stamp}")
    paths = bench.write_report(data, out_dir, stem)
    print(bench.markdown(data), end="")
    print("wrote " + ", ".join(str(p) for p in paths) + (f" ({data['plot']})"
                                                        if data.get("plot") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
