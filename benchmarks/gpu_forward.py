"""GPU: the fused NF4 + TinyLoRA forward against the floor and the peers, one run, one card.

Qwen2.5-Coder-3B linear shapes (q/o 2048x2048, k/v 256x2048, gate/up 11008x2048,
down 2048x11008), M in {1, 16, 64, 256, 4096} by default, bf16 activations, random data.
Providers:

* ``fused``: the fused kernel, NF4 weight + adapter in one launch;
* ``fused_noadapter``: the same kernel with the adapter compiled out (PERF_TARGETS T8);
* ``deq_cublas``: decode W to a bf16 scratch, one cuBLAS GEMM with the adapter as extra K
  columns; ``deq_cublas_noadapter``: the same without the adapter;
* ``bnb_base``: bitsandbytes ``matmul_4bit`` alone (its own dispatch), no adapter;
* ``bnb_peft``: bitsandbytes + the factorized adapter in plain torch (PEFT-style);
* ``dense_bf16``: ``F.linear`` on the unquantized bf16 weight (cuBLAS), no adapter.

Times are ``triton.testing.do_bench`` medians (L2 flushed before every repetition) with the 20th
and 80th percentiles. The floor is max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both
ceilings measured in the same run. Also checks that a CUDA graph replay of the fused layer
equals its eager output. Writes JSON (and prints a table generated from it).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from tinylora_kernels.nf4 import NF4Weight, dequantize_nf4
from tinylora_kernels.ops.configs import CUBLAS_MIN_M, KernelConfig, pick_config
from tinylora_kernels.ops.fused_linear import fused_linear
from tinylora_kernels.ops.large_m import dequant_cublas_linear
from tinylora_kernels.bench import capture_cuda_graph
from tinylora_kernels.torch_path import AdapterFactors

SHAPES_3B = {"q/o": (2048, 2048), "k/v": (256, 2048), "gate/up": (11008, 2048),
             "down": (2048, 11008)}
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def bench(fn):
    lo, med, hi = do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return {"median_us": med * 1e3, "p20_us": lo * 1e3, "p80_us": hi * 1e3}


def bench_graph(fn):
    """The same call captured in a CUDA graph: GPU time without the Python launch cost."""
    try:
        return bench(capture_cuda_graph(fn).replay)
    except Exception as exc:    # a provider that cannot be captured: say so, time nothing
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def ceilings():
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")       # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=200)
    return {"copy_GBps": 2 * src.numel() / copy_ms / 1e6,
            "bf16_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


def make_case(n, k, m, gen):
    import bitsandbytes.functional as bnbF

    w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
    nf4 = NF4Weight.from_quant_state(packed, qs)
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    f = AdapterFactors(A=(torch.randn(2, k, generator=gen) / k ** 0.5).to("cuda", torch.bfloat16),
                       B=torch.randn(n, 2, generator=gen).to("cuda"),
                       R=torch.randn(2, 2, generator=gen).to("cuda"))
    return w, packed, qs, nf4, x, f


def run_case(name, n, k, m, gen, cap):
    import bitsandbytes as bnb

    w, packed, qs, nf4, x, f = make_case(n, k, m, gen)
    A, B, R = f.A, f.B.to(torch.bfloat16), f.R.to(torch.bfloat16)
    bf = torch.bfloat16
    providers = {
        "fused": lambda: fused_linear(x, nf4, None, f),
        "fused_noadapter": lambda: fused_linear(x, nf4, None, None),
        "deq_cublas": lambda: dequant_cublas_linear(x, nf4, None, f, out_dtype=bf),
        "deq_cublas_noadapter": lambda: dequant_cublas_linear(x, nf4, None, None, out_dtype=bf),
        "bnb_base": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs),
        "bnb_peft": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)
        + ((x @ A.t()) @ R.t()) @ B.t(),
        "dense_bf16": lambda: F.linear(x, w),
    }
    # correctness of the fused output on this very case, against float64
    W64 = dequantize_nf4(nf4, torch.float64)          # the exact fp32 products
    x64 = x.double()
    truth = x64 @ W64.T + ((x64 @ f.A.double().T) @ f.R.double().T) @ f.B.double().T
    lowp_err = (providers["bnb_peft"]().double() - truth).abs().max().item()
    errs = {p: (providers[p]().double() - truth).abs().max().item()
            for p in ("fused", "deq_cublas")}

    nbytes = n * k * NF4_BYTES_PER_WEIGHT + 2 * m * (k + n)
    flops = 2 * m * n * k
    floor_us = max(nbytes / (cap["copy_GBps"] * 1e3), flops / (cap["bf16_TFLOPs"] * 1e6))
    row = {"shape": name, "N": n, "K": k, "M": m, "floor_us": floor_us,
           "config": pick_config(m, n, k).__dict__, "auto_path": "large_m" if m >= CUBLAS_MIN_M else "fused",
           "max_err": errs, "bnb_peft_max_err": lowp_err, "times": {}}
    for pname, fn in providers.items():
        row["times"][pname] = bench(fn)
    if m <= 16:   # decode: also the GPU time alone, under CUDA graphs
        row["graph_times"] = {p: bench_graph(providers[p])
                              for p in ("fused", "fused_noadapter", "bnb_base", "bnb_peft")}
    return row


def decode_sweep(gen, cap):
    """Decode tile shapes of the fused kernel under CUDA graphs (for pick_config)."""
    rows = []
    for name in ("gate/up", "q/o"):
        n, k = SHAPES_3B[name]
        _, _, _, nf4, x, f = make_case(n, k, 1, gen)
        floor_us = (n * k * NF4_BYTES_PER_WEIGHT + 2 * (k + n)) / (cap["copy_GBps"] * 1e3)
        for bn in (16, 32, 64):
            for warps in (4, 8):
                for ax_dot, table in ((False, False), (True, False), (False, True), (True, True)):
                    cfg = KernelConfig(BM=16, BN=bn, BK=64, num_warps=warps, num_stages=3,
                                       ax_dot=ax_dot, table_lookup=table)
                    t = bench_graph(lambda: fused_linear(x, nf4, None, f, config=cfg))
                    rows.append({"shape": name, "M": 1, "config": cfg.__dict__,
                                 "floor_us": floor_us, **t})
    return rows


def graph_check(gen):
    """Capture the fused forward at M=1 in a CUDA graph; its replay must equal eager."""
    n, k = 11008, 2048
    _, _, _, nf4, x, f = make_case(n, k, 1, gen)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    g = capture_cuda_graph(lambda: fused_linear(x, nf4, None, f, out=out))   # runs once eagerly
    eager = out.clone()
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    return {"graph_equals_eager": bool(torch.equal(out, eager)),
            "graph_replay_us": bench(g.replay)["median_us"]}


def write_results(out, data: dict, md: str) -> None:
    """The raw JSON at ``out``, the Markdown generated from it beside it; the table is printed."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text(md.rstrip("\n") + "\n")
    print(md)


def environment():
    def smi(q):
        try:
            return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip()
        except OSError:
            return "unknown"

    import bitsandbytes as bnb

    return {"gpu": torch.cuda.get_device_name(), "driver": smi("driver_version"),
            "torch": torch.__version__, "triton": triton.__version__,
            "bitsandbytes": bnb.__version__, "python": platform.python_version(),
            "bnb_dispatch": "gemm_4bit (fused kernel for small M, dequantize + cuBLAS above)"}


def sweep_table(rows) -> str:
    if not rows:
        return ""
    out = ["", "Decode sweep (M=1, CUDA graphs), µs:", "",
           "| shape | BN | warps | A x on tensor cores | levels from table | median µs | / floor |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        med = r.get("median_us", float("nan"))
        out.append(f"| {r['shape']} | {c['BN']} | {c['num_warps']} | {c['ax_dot']} | "
                   f"{c.get('table_lookup', False)} | {med:.1f} | {med / r['floor_us']:.1f} |")
    return "\n".join(out) + "\n"


def table(data) -> str:
    cols = ["fused", "fused_noadapter", "deq_cublas", "deq_cublas_noadapter", "bnb_base",
            "bnb_peft", "dense_bf16"]
    lines = ["| shape | M | floor µs | " + " | ".join(f"{c} µs" for c in cols)
             + " | best | best/floor | bnb_peft/best | bnb_base/best | best/dense | adapter cost |",
             "|---|---|---|" + "---|" * (len(cols) + 6)]
    for r in data["cases"]:
        t = {c: r["times"][c]["median_us"] for c in cols}
        best = min(("fused", "deq_cublas"), key=lambda c: t[c])
        lines.append(
            f"| {r['shape']} | {r['M']} | {r['floor_us']:.1f} | "
            + " | ".join(f"{t[c]:.1f}" for c in cols)
            + f" | {best} | {t[best] / r['floor_us']:.2f} | {t['bnb_peft'] / t[best]:.2f} | "
              f"{t['bnb_base'] / t[best]:.2f} | {t[best] / t['dense_bf16']:.2f} | "
              f"{100 * (t[best] / t[best + ('_noadapter')] - 1):+.1f}% |")
    glines = ["", "Decode under CUDA graphs (GPU time, no Python launch cost), µs:", "",
              "| shape | M | floor | fused | fused_noadapter | bnb_base | bnb_peft | fused/floor |"
              " bnb_peft/fused | bnb_base/fused |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["cases"]:
        g = r.get("graph_times")
        if not g:
            continue
        t = {p: g[p].get("median_us", float("nan")) for p in g}
        glines.append(f"| {r['shape']} | {r['M']} | {r['floor_us']:.1f} | {t['fused']:.1f} | "
                      f"{t['fused_noadapter']:.1f} | {t['bnb_base']:.1f} | {t['bnb_peft']:.1f} | "
                      f"{t['fused'] / r['floor_us']:.2f} | {t['bnb_peft'] / t['fused']:.2f} | "
                      f"{t['bnb_base'] / t['fused']:.2f} |")
    return "\n".join(lines + glines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", default="1,16,4096")
    ap.add_argument("--sweep", action="store_true",
                    help="also time decode tile shapes of the fused kernel (CUDA graphs)")
    ap.add_argument("--out", default="benchmarks/results/gpu_forward.json")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    cap = ceilings()
    data = {"env": environment(), "ceilings": cap, "cases": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(data["env"]), json.dumps(cap), flush=True)
    for m in (int(v) for v in args.m.split(",")):
        for name, (n, k) in SHAPES_3B.items():
            row = run_case(name, n, k, m, gen, cap)
            data["cases"].append(row)
            Path(args.out).write_text(json.dumps(data, indent=1))   # keep what is done
            print(f"{name} M={m}: fused {row['times']['fused']['median_us']:.1f} us, "
                  f"deq_cublas {row['times']['deq_cublas']['median_us']:.1f} us, errors "
                  f"{row['max_err']} (bnb+torch {row['bnb_peft_max_err']:.2e})", flush=True)
    data["cuda_graph"] = graph_check(gen)
    if args.sweep:
        data["decode_sweep"] = decode_sweep(gen, cap)
    md = (f"{data['env']['gpu']}, torch {data['env']['torch']}, triton {data['env']['triton']}, "
          f"bitsandbytes {data['env']['bitsandbytes']}; copy {cap['copy_GBps']:.0f} GB/s, bf16 "
          f"{cap['bf16_TFLOPs']:.0f} TFLOP/s; medians, L2 flushed\n\n" + table(data)
          + f"\n\nCUDA graph (11008x2048, M=1): {data['cuda_graph']}\n"
          + sweep_table(data.get("decode_sweep", [])))
    write_results(args.out, data, md)


if __name__ == "__main__":
    main()
