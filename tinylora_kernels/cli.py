"""``tinylora-kernels`` (also ``python -m tinylora_kernels``).

* ``check`` (the default): build small random models (4-bit NF4 and dense), apply TinyLoRA, and
  report every available computation path against the float64 formula, as a table. Exits 1 when
  a path is outside its error budget.
* ``inspect CKPT``: what a ``tiny_lora_v.pt`` holds and what it needs to be restored.
* ``bench``: the benchmark suite (see :mod:`tinylora_kernels.bench`); ``bench --compare A B``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from .backend import forced as _backend

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
              progress: bool = False, device: str = "cpu") -> List[dict]:
    """Evaluate every available path on small random models; one result row per case."""
    from . import TinyLoRAGlobalParams, apply_tiny_lora, tiny_lora_layers
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


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``tinylora-kernels``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="tinylora-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_check = sub.add_parser("check", help="every available path vs the float64 formula")
    p_check.add_argument("--seed", type=int, default=0)
    p_check.add_argument("--rows", type=int, default=64, help="input rows per layer")
    p_check.add_argument("--dtypes", default="fp32,fp16,bf16",
                         help="comma-separated, from fp32, fp16, bf16")
    p_check.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p_inspect = sub.add_parser("inspect", help="what a tiny_lora_v.pt holds")
    p_inspect.add_argument("checkpoint")
    p_bench = sub.add_parser("bench", help="every provider side by side against the floor")
    p_bench.add_argument("--models", help="comma-separated: qwen2.5-coder-3b, qwen2.5-7b, "
                         "cpu-reduced (default: 3b on a GPU, cpu-reduced on a CPU)")
    p_bench.add_argument("--m", help="comma-separated row counts (default 1,16,128,4096 on a "
                         "GPU, 1,16,128 on a CPU)")
    p_bench.add_argument("--layers", help="comma-separated: q_proj ... down_proj, "
                         "decoder_layer, stack<N> (default: every linear + decoder_layer)")
    p_bench.add_argument("--modes", default="fwd", help="comma-separated: fwd, bwd, fwd+bwd")
    p_bench.add_argument("--providers", default=",".join(
        ("materialized", "peft_style", "bnb_base", "dense_bf16", "reference", "fused")))
    p_bench.add_argument("--budget-s", type=float, default=600.0, help="total time budget")
    p_bench.add_argument("--out", default="benchmarks/results", help="output directory")
    p_bench.add_argument("--name", default=None, help="file stem (default: bench-<device>)")
    p_bench.add_argument("--compare", nargs=2, metavar=("A_JSON", "B_JSON"),
                         help="compare two result files instead of running")
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
    dtypes = tuple(getattr(args, "dtypes", "fp32,fp16,bf16").split(","))
    unknown = [d for d in dtypes if d not in _DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; choose from {list(_DTYPES)}")
    device = getattr(args, "device", "cpu")
    start = time.perf_counter()
    print(f"tinylora_kernels check: torch {torch.__version__}, device {device}; every path vs a "
          "float64 evaluation of U diag(S) R Vh (budget: 2x torch's own low-precision error + "
          "1e-5)", flush=True)
    results = run_check(seed=seed, rows=rows, dtypes=dtypes, device=device)
    print(format_table(results))
    failed = [r for r in results if r["status"] == "FAIL"]
    print(f"{len(results) - len(failed)} ok or not run, {len(failed)} failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


def _bench(args) -> int:
    import json
    from pathlib import Path

    from . import bench

    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        print(bench.compare(a, b), end="")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    split = lambda v: [s for s in v.split(",") if s] if v else None   # noqa: E731
    models = split(args.models)
    unknown = [m for m in (models or []) if m not in bench.MODELS]
    if unknown:
        print(f"error: unknown model(s) {unknown}; choose from {list(bench.MODELS)}",
              file=sys.stderr)
        return 2
    cases = bench.default_cases(device, models=models,
                                ms=[int(v) for v in split(args.m)] if args.m else None,
                                modes=split(args.modes), layers=split(args.layers))
    providers = split(args.providers)
    bad = [p for p in providers if p not in bench.PROVIDERS]
    if bad:
        print(f"error: unknown provider(s) {bad}; choose from {list(bench.PROVIDERS)}",
              file=sys.stderr)
        return 2
    if device == "cpu":
        print("No GPU here: CPU timings on reduced shapes; GPU figures need a GPU.")
    data = bench.run_suite(cases, providers, device=device, budget_s=args.budget_s)
    paths = bench.write_report(data, Path(args.out), args.name or f"bench-{device}")
    print(bench.markdown(data), end="")
    print("wrote " + ", ".join(str(p) for p in paths) + (f" ({data['plot']})"
                                                        if data.get("plot") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
