"""The autograd wrapper of the fused forward: launch, save, return.

Backward, until the fused backward kernels land, runs the reference math on the saved state:

* d x = g · dequant(W) + ((g B) R) A      (the weight decoded in the gradient's dtype)
* d R = (g B)ᵀ (A x)                       (A x saved by the forward kernel: M x r, fp32)
* d bias = Σ_rows g                        (only when the bias is trainable)

v receives its gradient through R = f(v, P), which autograd differentiates outside.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..nf4 import NF4Weight
from ..reference import AdapterFactors
from .fused_linear import dequantize_nf4_triton, tinylora_linear


class _FusedTinyLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, bias, weight, A, B, out_dtype):
        need_grad = any(ctx.needs_input_grad[:3])
        result = tinylora_linear(x, weight, bias, AdapterFactors(A=A, B=B, R=R),
                                 out_dtype=out_dtype, store_ax=need_grad)
        if not need_grad:
            return result
        out, ax = result
        ctx.save_for_backward(ax, A, B, R)
        ctx.weight = weight
        ctx.x_meta = (x.dtype, x.shape)
        return out

    @staticmethod
    def backward(ctx, g):
        ax, A, B, R = ctx.saved_tensors
        x_dtype, x_shape = ctx.x_meta
        n = g.shape[-1]
        g2 = g.reshape(-1, n)
        gb = g2.float() @ B.float()                                # (M, r)
        grad_x = grad_r = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.weight
            dense = (dequantize_nf4_triton(w, x_dtype) if isinstance(w, NF4Weight)
                     else w.to(x_dtype))
            grad_x = g2.to(x_dtype) @ dense
            grad_x = (grad_x.float() + (gb @ R.float()) @ A.float()).to(x_dtype).view(x_shape)
        if ctx.needs_input_grad[1]:
            grad_r = (gb.t() @ ax).to(R.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.float().sum(0).to(g.dtype)
        return grad_x, grad_r, grad_bias, None, None, None, None


def fused_tinylora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor],
                          factors: AdapterFactors, out_dtype: torch.dtype) -> torch.Tensor:
    """``x Wᵀ + B (R (A x)) + bias`` by the fused kernel, differentiable in x, R (so v) and bias."""
    return _FusedTinyLoRALinear.apply(x, factors.R, bias, weight, factors.A, factors.B, out_dtype)
