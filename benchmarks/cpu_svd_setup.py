"""CPU: set-up time of apply_tiny_lora on Qwen2.5-Coder-3B-shaped 4-bit layers (PERF_TARGETS T10).

Builds ``--layers`` decoder layers' worth of random NF4 (double quant) linears with the 3B shapes
(q/o 2048x2048, k/v 256x2048, gate/up 11008x2048, down 2048x11008), then times
``apply_tiny_lora`` three ways on identical copies: without a cache (the users' path: CPU fp32
LAPACK SVD), with an empty cache (SVD + store), and with the filled cache (hits only).
Writes JSON and a Markdown table under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tinylora_kernels import FactorCache, TinyLoRAGlobalParams, apply_tiny_lora

SHAPES_3B = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048),
             "o_proj": (2048, 2048), "gate_proj": (11008, 2048), "up_proj": (11008, 2048),
             "down_proj": (2048, 11008)}


def build(n_layers: int):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for _ in range(n_layers):
        block = torch.nn.Module()
        for name, (n, k) in SHAPES_3B.items():
            lin = bnb.nn.Linear4bit(k, n, bias=name in ("q_proj", "k_proj", "v_proj"),
                                    compute_dtype=torch.float16, compress_statistics=True,
                                    quant_type="nf4")
            w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
            lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to("cpu")
            setattr(block, name, lin)
        model.layers.append(block)
    return model


def timed_apply(n_layers, cache):
    model = build(n_layers)
    gp = TinyLoRAGlobalParams(u_dim=32)
    torch.manual_seed(0)
    start = time.perf_counter()
    apply_tiny_lora(model, gp, projection="diagonal", factor_cache=cache, progress=False)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (36 in the 3B model)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_svd_setup.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        cache = FactorCache(d)
        times = {"no_cache": timed_apply(args.layers, None),
                 "cold_cache": timed_apply(args.layers, cache),
                 "warm_cache": timed_apply(args.layers, cache)}
        assert cache.hits == 7 * args.layers
    data = {"decoder_layers": args.layers, "linears": 7 * args.layers, "seconds": times,
            "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "bitsandbytes": __import__("bitsandbytes").__version__}}
    Path(args.out).write_text(json.dumps(data, indent=1))
    md = (f"apply_tiny_lora on {7 * args.layers} Qwen2.5-Coder-3B-shaped NF4 linears "
          f"({args.layers} decoder layer(s)), CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n\n| path | seconds | per linear |\n|---|---|---|\n"
          + "".join(f"| {k} | {v:.2f} | {v / (7 * args.layers):.3f} |\n" for k, v in times.items()))
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
