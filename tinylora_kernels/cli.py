"""tinylora-kernels (also: python -m tinylora_kernels).

Commands:
  check     (the default when no command is given) build small random models (4-bit NF4 and
            dense), apply TinyLoRA, and compare every available computation path with a float64
            evaluation of the formula; prints a table and exits with 1 when a path is outside
            its error budget.
  inspect   say what a tiny_lora_v.pt checkpoint holds and what restoring it needs.
  bench     the benchmark harness: the suite (every provider side by side against the floor:
            forward, backward, forward + backward), or one of its other modes (--parts,
            --host-cost, --setup, --gemv-sweep, --generate, --adapters, --compiled, --compare).

Run "tinylora-kernels COMMAND --help" for a command's options.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from . import argtypes
from .backend import use_backend as _backend
from .bench.cli import add_bench_parser, run_bench

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _paths(device: str) -> List[tuple]:
    """(name, why it cannot run here or None) for every computation path of this version."""
    from .ops import interpreting, triton_missing

    why_not = triton_missing()
    if why_not is None and device == "cpu" and not interpreting():
        why_not = ("on a CPU the Triton kernels run only under Triton's interpreter: run "
                   "TRITON_INTERPRET=1 tinylora-kernels check (slow: minutes); on a GPU use "
                   "--device cuda")
    return [("reference", None), ("triton", why_not)]


def paths_not_run(device: str) -> List[str]:
    """One line per computation path ``check`` cannot run here, saying what it needs."""
    return [f"not run here: the {name} path ({why})" for name, why in _paths(device) if why]


def run_check(seed: int = 0, rows: int = 64, dtypes=("fp32", "fp16", "bf16"),
              progress: bool = False, device: str = "cpu", plans: bool = False) -> List[dict]:
    """Evaluate every path that runs here on small random models; one result row per case
    (:func:`paths_not_run` says which paths cannot run here and what they need).

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
        for name in [n for n, why in _paths(device) if why is None]:
            for dname in dtypes:
                dtype = _DTYPES[dname]
                row = {"model": label, "projection": projection, "path": name, "dtype": dname}
                reason, worst, n_layers = None, None, 0
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


def _quiet_bitsandbytes():
    """Keep bitsandbytes' import-time notice about an optional CPU kernel (the ``kernels``
    package from a model hub, not needed) out of this command's output."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tinylora-kernels``."""
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
    p_check.add_argument("--rows", type=argtypes.positive_int, default=64,
                         help="input rows per layer (default: 64)")
    p_check.add_argument("--dtypes", type=argtypes.choices_list(tuple(_DTYPES), "dtype"),
                         default=list(_DTYPES),
                         help="activation dtypes, comma-separated from fp32, fp16, bf16 "
                              "(default: all three)")
    p_check.add_argument("--device", type=argtypes.device, default="cpu",
                         help="cpu or cuda (default: cpu)")
    p_check.add_argument("--plans", action="store_true",
                         help="also print the router's plan for each model's first layer")
    p_inspect = sub.add_parser(
        "inspect", formatter_class=raw, help="what a tiny_lora_v.pt checkpoint holds",
        description="Read a tiny_lora_v.pt checkpoint (the users' format or this package's), "
        "check it, and say what it holds and what restoring it needs. Exits with 2 when the "
        "file is not a valid checkpoint.")
    p_inspect.add_argument("checkpoint", help="path of the tiny_lora_v.pt file")
    add_bench_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``tinylora-kernels``; returns the process exit code."""
    _quiet_bitsandbytes()
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.command == "bench":
        return run_bench(args)

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
    not_run = paths_not_run(device)
    for line in not_run:
        print(line)
    failed = [r for r in results if r["status"] == "FAIL"]
    print(f"{len(results) - len(failed)} ok, {len(failed)} failed"
          + (f", {len(not_run)} path(s) not run here (said above)" if not_run else "")
          + f" ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
