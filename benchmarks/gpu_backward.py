"""GPU: the backward pass (grad x and grad v) and a training step, against the peers (PERF T7).

Qwen2.5-Coder-3B linear shapes at M = 4096 (bf16):

* ``fused``: our backward as the layer runs it (``kernel_grad_x``, path ``large_m``: at this M, decode W once +
  one cuBLAS GEMM carrying the adapter; grad R from the saved A·x) — the forward's A·x given;
* ``fused_kernel``: the single-kernel backward (grad x reading NF4 transposed, g·B fused);
* ``bnb_peft``: bitsandbytes ``matmul_4bit`` + the factorized adapter, gradients by autograd;
* ``dense_bf16``: ``F.linear`` on the bf16 weight, grad x by autograd (cuBLAS).

Then one forward+backward training step of a 4-decoder-layer Qwen2 with the 3B shapes, loaded in
4-bit NF4 (double quant), TinyLoRA applied, 2 x 2048 tokens, for each backend. Times are medians
of ``triton.testing.do_bench``; peak memory is ``torch.cuda.max_memory_allocated`` per case.
Writes JSON and prints a table generated from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from gpu_forward import SHAPES_3B, environment, make_case, write_results
from tinylora_kernels.ops.custom_ops import kernel_grad_x
from tinylora_kernels.ops.fused_linear import fused_linear
from tinylora_kernels.ops.grad_x import fused_grad_x


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        ms = do_bench(fn, warmup=10, rep=50)
    except Exception as exc:       # report, do not abort the other cases
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"median_us": ms * 1e3,
            "peak_extra_MB": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}


def layer_cases(m: int):
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES_3B.items():
        w, packed, qs, nf4, x, f = make_case(n, k, m, gen)
        g = torch.randn(m, n, generator=gen).to("cuda", torch.bfloat16)
        _, ax = fused_linear(x, nf4, None, f, store_ax=True)
        xr = x.clone().requires_grad_(True)
        R = f.R.clone().requires_grad_(True)

        def fused():
            gx, gb = kernel_grad_x("large_m", g, nf4, f, x_dtype=torch.bfloat16)
            return gx, gb.t() @ ax

        def fused_kernel():
            gx, gb = fused_grad_x(g, nf4, f, x_dtype=torch.bfloat16, store_gb=True)
            return gx, gb.t() @ ax

        def bnb_peft():
            y = bnb.matmul_4bit(xr, packed.t(), quant_state=qs) + \
                ((xr @ f.A.t()).float() @ R.t()).to(torch.bfloat16) @ f.B.to(torch.bfloat16).t()
            return torch.autograd.grad(y, (xr, R), g)

        def dense():
            y = F.linear(xr, w)
            return torch.autograd.grad(y, (xr,), g)

        row = {"shape": name, "N": n, "K": k, "M": m, "times": {}}
        for pname, fn in (("fused", fused), ("fused_kernel", fused_kernel), ("bnb_peft", bnb_peft),
                          ("dense_bf16", dense)):
            row["times"][pname] = timed(fn)
        rows.append(row)
        print(name, {p: t.get("median_us", t.get("error")) for p, t in row["times"].items()},
              flush=True)
    return rows


def train_step_cases(tokens: int):
    from tinylora_kernels import TinyLoRAGlobalParams, apply_tiny_lora
    from tinylora_kernels.backend import use_backend as forced
    from tinylora_kernels.testing import tiny_qwen2

    ids = torch.randint(0, 1024, (2, tokens // 2), generator=torch.Generator().manual_seed(1))
    ids = ids.cuda()
    out = {}
    for backend in ("reference", "triton"):
        model = tiny_qwen2(quantized=True, compute_dtype=torch.bfloat16, device="cuda",
                           num_hidden_layers=4, hidden_size=2048, intermediate_size=11008,
                           num_attention_heads=16, num_key_value_heads=2, vocab_size=1024)
        model.requires_grad_(False)
        model.config.use_cache = False
        gp = TinyLoRAGlobalParams(u_dim=13, device="cuda", dtype=torch.float32)
        torch.manual_seed(0)
        apply_tiny_lora(model, gp, projection="diagonal", svd="device", progress=False)
        gp.global_v.requires_grad_(True)
        model.train()

        def step():
            gp.global_v.grad = None
            model(ids, labels=ids).loss.backward()

        with forced(backend):
            out[backend] = timed(step)
        print("train step", backend, out[backend], flush=True)
        model = gp = None                   # free this backend's model before the next one
        torch.cuda.empty_cache()
    return out


def table(data) -> str:
    lines = ["| shape | M | fused µs | bnb_peft µs | dense_bf16 µs | bnb_peft/fused (T7) | "
             "fused/dense | peak MB fused / bnb_peft |", "|---|---|---|---|---|---|---|---|"]
    for r in data["layers"]:
        t = {p: r["times"][p].get("median_us", float("nan")) for p in r["times"]}
        mem = {p: r["times"][p].get("peak_extra_MB", float("nan")) for p in r["times"]}
        lines.append(f"| {r['shape']} | {r['M']} | {t['fused']:.1f} | {t['bnb_peft']:.1f} | "
                     f"{t['dense_bf16']:.1f} | {t['bnb_peft'] / t['fused']:.2f} | "
                     f"{t['fused'] / t['dense_bf16']:.2f} | {mem['fused']:.0f} / "
                     f"{mem['bnb_peft']:.0f} |")
    step = data.get("train_step", {})
    if step:
        lines += ["", "Training step, 4 decoder layers (3B shapes, NF4), 2 x 2048 tokens:", ""]
        for backend, t in step.items():
            lines.append(f"- {backend}: {t}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--no-train-step", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu_backward.json")
    args = ap.parse_args()
    data = {"env": environment(), "layers": layer_cases(args.m)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1))     # keep what is done
    if not args.no_train_step:
        data["train_step"] = train_step_cases(4096)
    write_results(args.out, data, table(data))


if __name__ == "__main__":
    main()
