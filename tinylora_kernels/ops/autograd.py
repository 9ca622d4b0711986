"""The autograd wrapper of the fused forward: launch, save, return.

Forward: ``y = x Wᵀ + B (R (A x)) + bias``, saving only ``A x`` (M x r, fp32) besides the small
factors (x itself is never saved: the weight is frozen). With ``gb = g B`` (M x r) for an upstream
gradient g (M x N), the chain rule gives

* d x = g W + (gb R) A      -- one kernel (:func:`fused_grad_x`) reading W transposed from its
  storage and accumulating gb in the same pass over N; no N x K matrix is formed;
* d R = gbᵀ (A x)           -- r x r; autograd takes it on to v through R = Σ v_i P_i (or diag);
* d bias = Σ_rows g         -- only when the bias is trainable.

"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import AdapterFactors
from .fused_linear import fused_grad_x, tinylora_linear


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
        factors = AdapterFactors(A=A, B=B, R=R)
        grad_x = grad_r = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x, gb = fused_grad_x(g.to(x_dtype), ctx.weight, factors, x_dtype=x_dtype,
                                      store_gb=True)
            grad_x = grad_x.view(x_shape)
        elif ctx.needs_input_grad[1]:
            gb = g.reshape(-1, g.shape[-1]).float() @ B.float()
        if ctx.needs_input_grad[1]:
            grad_r = (gb.t() @ ax).to(R.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g.reshape(-1, g.shape[-1]).float().sum(0).to(g.dtype)
        return grad_x, grad_r, grad_bias, None, None, None, None


def fused_tinylora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor],
                          factors: AdapterFactors, out_dtype: torch.dtype) -> torch.Tensor:
    """``x Wᵀ + B (R (A x)) + bias`` by the fused kernel, differentiable in x, R (so v) and bias."""
    return _FusedTinyLoRALinear.apply(x, factors.R, bias, weight, factors.A, factors.B, out_dtype)
