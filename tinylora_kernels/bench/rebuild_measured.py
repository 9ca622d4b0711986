"""Rebuild, from git history, the kernel launches an earlier H200 forward run timed, and read them.

Each ``benchmarks/results/h200/gpu_forward_v*.json`` timed the fused kernel of one earlier commit
(with and without the adapter) at the 3B shapes, each row with the launch configuration it used.
This script checks that commit out in a temporary git worktree, calls its own ``fused_linear`` on
CPU tensors of each row's shapes and dtypes (NF4 double quant from bitsandbytes, bf16 x, the
adapter's A bf16, B and R fp32, no bias, as that run did) with the JIT's launch recorded instead of
run (the same binder as :mod:`tinylora_kernels.compile_check`), compiles each launch for sm_90 and
writes per row: grid, warps, stages, constexprs, the SASS statistics of
:func:`tinylora_kernels.static_report.sass_stats`, and the measured times (eager and, where the
run had them, CUDA-graph replays). No GPU is used; bitsandbytes and git are needed.

    python -m tinylora_kernels.bench.rebuild_measured    # the three runs below, into
                                                         # benchmarks/results/compiled/measured/

(from a git checkout of the package: it needs the repository's history).

The results are what a static model of the kernels' speed is fitted and checked against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

#: run name -> (the commit whose kernels it timed, its results file)
RUNS = {"v1": ("982014a", "benchmarks/results/h200/gpu_forward_v1.json"),
        "v2": ("1745e72", "benchmarks/results/h200/gpu_forward_v2.json"),
        "v3": ("604a04b", "benchmarks/results/h200/gpu_forward_v3.json")}


def _recorder(backend, launches, bind_launch):
    """A ``JITFunction.run`` that records the launch as the JIT would specialize it
    (:func:`tinylora_kernels.compile_check.bind_launch`)."""
    binders: dict = {}

    def record(fn, *args, grid, warmup, **kwargs):
        bound, options, signature, constexprs, attrs = bind_launch(fn, backend, binders, args,
                                                                   kwargs)
        launches.append({"fn": fn, "signature": dict(signature), "constexprs": dict(constexprs),
                         "attrs": dict(attrs), "options": options,
                         "grid": [int(g) for g in (grid(bound) if callable(grid) else grid)]})
    return record


def _read_launch(launch, target, sass_stats) -> dict:
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(launch["fn"], launch["signature"], launch["constexprs"], launch["attrs"])
    compiled = triton.compile(src, target=target, options=launch["options"].__dict__)
    stats = sass_stats(compiled.asm["cubin"])
    stats["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0))
    names = list(launch["signature"])
    cx = {names[p[0]]: v for p, v in launch["constexprs"].items() if len(p) == 1}
    return {"kernel": launch["fn"].fn.__name__, "grid": launch["grid"],
            "num_warps": launch["options"].num_warps,
            "num_stages": launch["options"].num_stages,
            "constexprs": {k: v for k, v in cx.items() if isinstance(v, (int, bool))},
            "sass": stats}


def _load_own(name: str):
    """This checkout's ``tinylora_kernels/<name>.py``, loaded by path (``tinylora_kernels`` is
    the worktree's package in :func:`rebuild`'s process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"_own_{name}", os.path.join(ROOT, "tinylora_kernels", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rebuild(worktree: str, results: str) -> list:
    """Every row of ``results`` rebuilt with the package in ``worktree`` (run in a fresh process:
    the worktree's package is imported as ``tinylora_kernels``)."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, worktree)
    import bitsandbytes.functional as bnbF
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    report, check = (_load_own(name) for name in ("static_report", "compile_check"))
    from tinylora_kernels.nf4 import NF4Weight
    from tinylora_kernels.ops import fused_linear as FL
    from tinylora_kernels.torch_path import AdapterFactors

    target = GPUTarget("cuda", 90, 32)
    launches: list = []
    JITFunction.run = _recorder(make_backend(target), launches, check.bind_launch)
    FL.check_supported = lambda *a, **k: None            # CPU tensors: recorded, never run
    gen = torch.Generator().manual_seed(0)
    weights, out = {}, []
    for row in json.load(open(results))["cases"]:
        n, k, m = row["N"], row["K"], row["M"]
        if (n, k) not in weights:
            w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
            packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True,
                                            blocksize=64)
            weights[(n, k)] = NF4Weight.from_quant_state(packed, qs)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        f = AdapterFactors(A=torch.randn(2, k, generator=gen).to(torch.bfloat16),
                           B=torch.randn(n, 2, generator=gen), R=torch.randn(2, 2, generator=gen))
        for provider, factors in (("fused", f), ("fused_noadapter", None)):
            before = len(launches)
            FL.fused_linear(x, weights[(n, k)], None, factors,
                            config=FL.KernelConfig(**row["config"]))
            out.append({"shape": row["shape"], "N": n, "K": k, "M": m, "provider": provider,
                        "launches": [_read_launch(lc, target, report.sass_stats)
                                     for lc in launches[before:]],
                        "measured_us": row["times"][provider]["median_us"],
                        "graph_us": ((row.get("graph_times") or {}).get(provider) or {})
                        .get("median_us")})
    return out


def _run_one(name: str, out_dir: str) -> str:
    commit, results = RUNS[name]
    path = os.path.join(out_dir, f"{name}.json")
    with tempfile.TemporaryDirectory() as tmp:
        wt = os.path.join(tmp, "wt")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", wt, commit],
                       check=True, capture_output=True)
        try:
            # this file loaded on its own (not as part of the package: the worktree's package
            # is the one imported as tinylora_kernels there)
            code = ("import importlib.util, json; "
                    "s = importlib.util.spec_from_file_location('_rebuild', %r); "
                    "r = importlib.util.module_from_spec(s); s.loader.exec_module(r); "
                    "rows = r.rebuild(%r, %r); json.dump({'commit': %r, 'results': %r, "
                    "'target': 'sm_90', 'rows': rows}, open(%r, 'w'), indent=1)"
                    % (os.path.abspath(__file__), wt, os.path.join(ROOT, results), commit,
                       results, path))
            subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt],
                           capture_output=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help="which of " + ", ".join(RUNS))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compiled",
                                                 "measured"))
    args = p.parse_args(argv)
    names = [r for r in args.runs.split(",") if r]
    unknown = [r for r in names if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}; known: {sorted(RUNS)}")
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        print(f"{name}: the kernels of {RUNS[name][0]} ...", flush=True)
        print("  wrote", _run_one(name, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
