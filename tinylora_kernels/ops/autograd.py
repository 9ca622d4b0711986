"""Autograd for the fused TinyLoRA linear: launch, save, return (derivation on the class)."""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import AdapterFactors
from .fused_linear import fused_grad_x, tinylora_linear


class _FusedTinyLoRALinear(torch.autograd.Function):
    """``y = x Wᵀ + B (R (A x)) + bias`` forward by the fused kernel, backward by one more.

    Shapes: x (M, K), W (N, K) frozen (NF4 or dense), A (r, K), B (N, r), R (r, r) = f(v).
    Forward saves only ``ax = A x`` (M x r, fp32) besides the small factors; x is not saved (W is
    frozen, so no gradient needs it). With an upstream gradient g (M, N) and ``gb = g B`` (M, r):

    * y depends on x through ``x Wᵀ`` and ``((x Aᵀ) Rᵀ) Bᵀ``, so
      d x = g W + ((g B) R) A = g W + (gb R) A — one kernel (:func:`fused_grad_x`) reads W
      transposed from its storage and accumulates gb in the same pass over N;
    * y_mn depends on R_ij through ``Σ_i B_ni Σ_j R_ij ax_mj``, so d R_ij = Σ_m gb_mi ax_mj,
      i.e. d R = gbᵀ ax (r x r); autograd carries it on to v through R = Σ v_i P_i (full) or
      diag(v P) (diagonal), in fp32 (see ``TinyLoRAGlobalParams.compute_view``);
    * d bias = Σ_rows g, only when the bias is trainable.
    """

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
