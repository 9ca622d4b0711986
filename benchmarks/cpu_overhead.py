"""CPU: forward+backward time of TinyLoRALinear over its bare base layer (PERF_TARGETS.md T9).

Layer 11008 x 2048 (Qwen2.5-Coder-3B gate/up), 512 tokens, x requires grad, the adapter's v
requires grad. Three layers per base kind, timed on the same input in interleaved rounds:

* ``base``: the bare base layer: ``nn.Linear`` fp32, or bitsandbytes ``Linear4bit`` NF4 with
  double quant, computing in fp16 (the users' setup: ``bnb_4bit_compute_dtype=torch.float16``,
  fp16 activations) or in bf16 (bf16 activations, the fastest CPU path);
* ``tinylora``: our ``TinyLoRALinear`` around the same base (the reference path);
* ``materialized``: the users' program's layer (ΔW = U S R Vh rebuilt on every call, bf16).

Writes raw JSON (every round's times, the environment) and prints a table generated from it.
Run: ``python benchmarks/cpu_overhead.py [--rounds 7] [--out benchmarks/results/cpu_overhead.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tinylora_kernels import TinyLoRAGlobalParams, TinyLoRALinear

N, K, M = 11008, 2048, 512


class MaterializedTinyLoRA(torch.nn.Module):
    """The users' program's forward: the whole ΔW rebuilt per call (for comparison only)."""

    def __init__(self, layer: TinyLoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        lay = self.layer
        v = lay.global_params_ref.global_v
        R = torch.einsum("u,urs->rs", v.to(lay.P.dtype), lay.P)
        delta = lay.U @ lay.S @ R @ lay.Vh
        base = lay.base_layer(x)
        return base + (x.to(delta.dtype) @ delta.T).to(base.dtype)


KINDS = ("linear-fp32", "linear4bit-nf4-dq-fp16", "linear4bit-nf4-dq-bf16")


def make_base(kind: str):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    if kind == "linear-fp32":
        lin = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin.requires_grad_(False), torch.float32
    import bitsandbytes as bnb

    dtype = torch.float16 if kind.endswith("fp16") else torch.bfloat16
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=True,
                            quant_type="nf4")
    # quantized from bf16, as a model loaded in bf16 is: the weight decodes to bf16
    lin.weight = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, quant_type="nf4").to("cpu")
    return lin, dtype


def fwd_bwd(module, x, v):
    x.grad = None
    if v is not None:
        v.grad = None
    y = module(x)
    y.backward(torch.ones_like(y))


def run(rounds: int, reps: int):
    results = {}
    for kind in KINDS:
        base, dtype = make_base(kind)
        gp = TinyLoRAGlobalParams(u_dim=13, dtype=torch.float32)
        torch.manual_seed(0)
        layer = TinyLoRALinear(base, global_params_ref=gp)
        with torch.no_grad():
            gp.global_v.normal_()
        base.train()
        layer.train()
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype)
        x.requires_grad_(True)
        contenders = {"base": (base, None), "tinylora": (layer, gp.global_v),
                      "materialized": (MaterializedTinyLoRA(layer), gp.global_v)}
        times = {name: [] for name in contenders}
        for name, (mod, v) in contenders.items():   # warm-up
            fwd_bwd(mod, x, v)
        for _ in range(rounds):
            for name, (mod, v) in contenders.items():
                start = time.perf_counter()
                for _ in range(reps):
                    fwd_bwd(mod, x, v)
                times[name].append((time.perf_counter() - start) / reps)
        results[kind] = times
    return results


def table(data) -> str:
    """Ratios of medians and of minima (the minimum is the least noisy estimate on a shared CPU)."""
    lines = ["| base layer | bare base ms (median / min) | TinyLoRALinear ms | ratio median | "
             "ratio min | users' layer ms | ratio median |", "|---|---|---|---|---|---|---|"]
    for kind, times in data["results"].items():
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        low = {k: min(v) * 1e3 for k, v in times.items()}
        lines.append(
            f"| {kind} | {med['base']:.1f} / {low['base']:.1f} | {med['tinylora']:.1f} / "
            f"{low['tinylora']:.1f} | {med['tinylora'] / med['base']:.3f} | "
            f"{low['tinylora'] / low['base']:.3f} | {med['materialized']:.1f} | "
            f"{med['materialized'] / med['base']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_overhead.json"))
    args = ap.parse_args()
    data = {
        "what": f"fwd+bwd of a {N}x{K} layer at M={M} tokens (grad x and grad v), CPU",
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "bitsandbytes": __import__("bitsandbytes").__version__},
        "rounds": args.rounds, "reps_per_round": args.reps,
        "results": run(args.rounds, args.reps),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1))
    md = table(data)
    Path(args.out).with_suffix(".md").write_text(
        f"{data['what']}; medians of {args.rounds} rounds x {args.reps}; torch "
        f"{data['env']['torch']}, {data['env']['threads']} threads\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
