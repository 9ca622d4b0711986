"""Where the prefill forward's time goes, part by part, on a model's linears at M rows.

Contenders (each a piece of the package's large-M path, ``decode + cuBLAS``, beside
bitsandbytes' own pieces and the whole paths), on one random weight per linear:

* ``decode_triton`` / ``decode_bnb``: NF4 -> the compute dtype for the whole weight (ours,
  GPU only / bitsandbytes');
* ``gemm_k`` / ``gemm_k_ext``: ``x Wᵀ`` at the layer's K and at the K the adapter's extra
  columns make;
* ``ax``: ``A x`` with an fp32 result; ``adapter_add_only``: the package's adapter added to a
  given base output;
* ``large_m_path``: the package's whole large-M forward, adapter included (GPU only);
* ``bnb``: ``matmul_4bit``; ``bnb_adapter``: it plus the factorized adapter as separate torch
  ops (PEFT-style); ``reference``: it plus this package's one-rounding adapter (the torch path).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .cases import MODELS, _Linear, cpu_note
from .report import result
from .timing import environment, measure, timing_method

__all__ = ["prefill_parts", "PARTS_LEGEND"]

PARTS_LEGEND = {
    "decode_triton": "this package's NF4 decode kernel, whole weight to the compute dtype",
    "decode_bnb": "bitsandbytes' dequantize_4bit, whole weight",
    "gemm_k": "x Wᵀ (torch matmul) at the layer's K",
    "gemm_k_ext": "x Wᵀ at the K the adapter's extra columns make (the large-M path's GEMM)",
    "ax": "A x with an fp32 result",
    "adapter_add_only": "this package's adapter added to a given base output (add_adapter)",
    "large_m_path": "this package's whole large-M forward: decode + one GEMM with the adapter",
    "bnb": "bitsandbytes' matmul_4bit alone",
    "bnb_adapter": "matmul_4bit + the factorized adapter as separate torch ops (PEFT-style)",
    "reference": "matmul_4bit + this package's one-rounding adapter (the torch path)",
}


def _parts(lin: _Linear, x: torch.Tensor, gen: torch.Generator) -> Dict[str, Optional[Callable]]:
    """The contenders for one linear (None: needs the Triton kernels on a GPU)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from ..nf4 import NF4Weight
    from ..ops.configs import EXT_ALIGN
    from ..torch_path import add_adapter, mm_fp32

    dtype, device = x.dtype, x.device
    packed, qs = lin.lin4.weight, lin.lin4.weight.quant_state
    f = lin.layer.adapter_factors()
    n, k = lin.dense.shape
    rank = f.A.shape[0]
    k_ext = k + EXT_ALIGN * -(-3 * rank // EXT_ALIGN)
    x_ext = torch.randn(x.shape[0], k_ext, generator=gen).to(device, dtype)
    w_ext = torch.randn(n, k_ext, generator=gen).to(device, dtype)
    a_t = f.A.to(dtype).t()
    B, R = f.B.to(dtype), f.R.to(dtype)
    base = bnb.matmul_4bit(x, packed.t(), quant_state=qs)
    kernels = device.type == "cuda"
    if kernels:
        from ..ops.large_m import dequant_cublas_linear
        from ..ops.nf4_dequant import dequantize_nf4_triton

        nf4 = NF4Weight.from_bnb(packed)
    return {
        "decode_triton": (lambda: dequantize_nf4_triton(nf4, dtype)) if kernels else None,
        "decode_bnb": lambda: bnbF.dequantize_4bit(packed, qs),
        "gemm_k": lambda: x @ lin.dense.t(),
        "gemm_k_ext": lambda: x_ext @ w_ext.t(),
        "ax": lambda: mm_fp32(x, a_t),
        "adapter_add_only": lambda: add_adapter(base, x, f, dtype),
        "large_m_path": (lambda: dequant_cublas_linear(x, nf4, None, f, out_dtype=dtype))
        if kernels else None,
        "bnb": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs),
        "bnb_adapter": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=qs)
        + ((x @ a_t) @ R.t()) @ B.t(),
        "reference": lambda: add_adapter(bnb.matmul_4bit(x, packed.t(), quant_state=qs), x, f,
                                         dtype),
    }


def prefill_parts(model: Optional[str] = None, m: Optional[int] = None, device: str = "cpu",
                  layers=None, budget_s: float = 60.0, progress=None) -> dict:
    """Time every part above on each linear of ``model`` at ``m`` rows, without grad (default:
    Qwen2.5-Coder-3B shapes at M = 4096 on a GPU, the reduced shapes at M = 128 on a CPU)."""
    say = progress or (lambda msg: None)
    model = model or ("qwen2.5-coder-3b" if device == "cuda" else "cpu-reduced")
    m = m or (4096 if device == "cuda" else 128)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {name: nk for name, nk in MODELS[model]["shapes"].items()
              if layers is None or name in layers}
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, (n, k) in shapes.items():
            say(f"{name} {n} x {k}, M = {m}")
            lin = _Linear(n, k, device, dtype, gen)
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            fns = _parts(lin, x, gen)
            runnable = {p: fn for p, fn in fns.items() if fn is not None}
            stats = measure(runnable, device, budget_s / max(1, len(shapes)), rounds=5)
            providers = {p: stats.get(p, {"not_run": "a Triton kernel: timed on a GPU"})
                         for p in fns}
            rows.append({"case": {"model": model, "layer": name, "N": n, "K": k, "M": m},
                         "floor_us": None, "providers": providers})
    return result(
        "parts", f"the prefill forward part by part, {model} linears at M = {m}, no grad",
        device, timing_method(device, rounds=5), rows, env=environment(device),
        dtype=str(dtype), baseline="bnb", legend=PARTS_LEGEND,
        note=None if device == "cuda" else cpu_note([model], "the Triton parts and GPU figures "
                                                     "need a GPU"))
