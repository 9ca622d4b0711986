"""GPU: where the prefill forward's time goes, part by part (Qwen2.5-Coder-3B shapes, M = 4096).

Times (median µs, L2 flushed, ``triton.testing.do_bench``) of each piece of
``dequant_cublas_linear`` beside bitsandbytes' own pieces and the whole paths:

* ``decode_triton`` / ``decode_bnb``: NF4 -> bf16 of the whole weight (ours / bitsandbytes');
* ``gemm_k`` / ``gemm_k_ext``: cuBLAS ``x Wᵀ`` at the layer's K and at the extended K the adapter
  columns add;
* ``ax``: ``A x`` with an fp32 result; ``fused_path``: our whole forward (adapter included);
* ``bnb``: ``matmul_4bit``; ``bnb_adapter``: it plus the factorized adapter as PEFT-style code
  runs it; ``reference``: it plus this package's one-rounding adapter (the ``auto`` path).

Writes JSON and prints a table generated from it.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from gpu_forward import SHAPES_3B, environment, make_case, write_results
from tinylora_kernels.ops.configs import EXT_ALIGN
from tinylora_kernels.ops.large_m import dequant_cublas_linear
from tinylora_kernels.ops.nf4_dequant import dequantize_nf4_triton
from tinylora_kernels.torch_path import add_adapter, mm_fp32


def us(fn):
    try:
        return do_bench(fn, warmup=10, rep=40) * 1e3
    except Exception as exc:       # report, do not abort the other parts
        return f"{type(exc).__name__}: {exc}"[:200]


def parts(m: int):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES_3B.items():
        w, packed, qs, nf4, x, f = make_case(n, k, m, gen)
        rank = f.A.shape[0]
        k_ext = k + EXT_ALIGN * -(-3 * rank // EXT_ALIGN)
        x_ext = torch.randn(m, k_ext, generator=gen).to("cuda", torch.bfloat16)
        w_ext = torch.randn(n, k_ext, generator=gen).to("cuda", torch.bfloat16)
        a16 = f.A.to(torch.bfloat16).t()
        base = bnb.matmul_4bit(x, packed.t(), quant_state=qs)
        t = {
            "decode_triton": us(lambda: dequantize_nf4_triton(nf4, torch.bfloat16)),
            "decode_bnb": us(lambda: bnbF.dequantize_4bit(packed, qs)),
            "gemm_k": us(lambda: x @ w.t()),
            "gemm_k_ext": us(lambda: x_ext @ w_ext.t()),
            "ax": us(lambda: mm_fp32(x, a16)),
            "fused_path": us(lambda: dequant_cublas_linear(x, nf4, None, f,
                                                           out_dtype=torch.bfloat16)),
            "bnb": us(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)),
            "bnb_adapter": us(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)
                              + ((x @ a16) @ f.R.to(torch.bfloat16).t())
                              @ f.B.to(torch.bfloat16).t()),
            "reference": us(lambda: add_adapter(bnb.matmul_4bit(x, packed.t(), quant_state=qs),
                                                x, f, torch.bfloat16)),
            "adapter_add_only": us(lambda: add_adapter(base, x, f, torch.bfloat16)),
        }
        rows.append({"shape": name, "N": n, "K": k, "M": m, "k_ext": k_ext, "us": t})
        print(name, {p: (round(v, 1) if isinstance(v, float) else v) for p, v in t.items()},
              flush=True)
    return rows


def table(data) -> str:
    keys = list(data["rows"][0]["us"])
    lines = ["| shape | M | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in data["rows"]:
        cells = [f"{v:.1f}" if isinstance(v, float) else "err" for v in r["us"].values()]
        lines.append(f"| {r['shape']} | {r['M']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/gpu_prefill_parts.json")
    args = ap.parse_args()
    with torch.no_grad():
        data = {"env": environment(), "rows": parts(args.m)}
    write_results(args.out, data, table(data))


if __name__ == "__main__":
    main()
