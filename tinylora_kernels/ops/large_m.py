"""The large-M path (prefill, training): decode W once into a workspace, one cuBLAS GEMM.

For many rows, decoding the NF4 weight once (:mod:`~tinylora_kernels.ops.nf4_dequant`) and
letting cuBLAS run the product beats streaming the packed weight per tile. The adapter rides in
the same GEMM as a few extra contraction columns (:func:`~tinylora_kernels.torch_path.split_operands`:
the rank-r operands split into a 16-bit part and its remainder, so the adapter keeps fp32 accuracy
in a 16-bit GEMM, and the (M, N) output is written once).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..nf4 import NF4Weight
from ..torch_path import AdapterFactors, mm_fp32_split, split_operands
from .configs import EXT_ALIGN
from .nf4_dequant import dequantize_nf4_triton

__all__ = ["dequant_cublas_linear", "dequant_cublas_grad_x"]


def dequant_cublas_linear(x: torch.Tensor, weight: NF4Weight, bias: Optional[torch.Tensor],
                          factors: Optional[AdapterFactors], *, out_dtype: torch.dtype,
                          store_ax: bool = False):
    """``x Wᵀ + B (R (A x)) + bias`` as ``[x | z_hi z_lo z_hi | 0] @ [W | B_hi B_hi B_lo | 0]ᵀ``.

    z = (A x) Rᵀ (M x r); cuBLAS accumulates ``z Bᵀ`` with the base product, and the split parts
    keep the adapter fp32-accurate (only lo x lo, ~2^-16 relative, is dropped). The padding keeps
    the contraction a multiple of :data:`~tinylora_kernels.ops.configs.EXT_ALIGN`. Returns y (and
    ``A x``, fp32, with ``store_ax``).
    """
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    cd = x.dtype
    ax = None
    if factors is None:
        w = dequantize_nf4_triton(weight, cd)
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(cd))
    else:
        ax = mm_fp32_split(x2, factors.A.t())
        left, right = split_operands(ax @ factors.R.float().t(), factors.B, cd, 1, EXT_ALIGN)
        w_ext = torch.empty(n, k + right.shape[1], dtype=cd, device=x.device)
        dequantize_nf4_triton(weight, cd, out=w_ext)
        w_ext[:, k:] = right
        x_ext = torch.cat((x2, left), 1)
        y = (torch.addmm(bias.to(cd), x_ext, w_ext.t()) if bias is not None
             else x_ext @ w_ext.t())
    y = y.to(out_dtype).view(*lead, n)
    return (y, ax) if store_ax else y


def dequant_cublas_grad_x(g: torch.Tensor, weight: NF4Weight,
                          factors: Optional[AdapterFactors], *, x_dtype: torch.dtype):
    """``(g W + ((g B) R) A, g B)`` as ``[g | t_hi t_lo t_hi | 0] @ [W ; A_hi ; A_hi ; A_lo ; 0]``.

    t = (g B) R (M x r), the split as in :func:`dequant_cublas_linear`; gb = g B (fp32, for d R)
    from one GEMM against ``[B_hi | B_lo]``. Returns (grad_x, gb).
    """
    n, k = weight.shape
    lead = g.shape[:-1]
    cd = g.dtype
    g2 = g.reshape(-1, n)
    if factors is None:
        w = dequantize_nf4_triton(weight, cd)
        return (g2 @ w).to(x_dtype).view(*lead, k), None
    gb = mm_fp32_split(g2, factors.B)
    left, right = split_operands(gb @ factors.R.float(), factors.A, cd, 0, EXT_ALIGN)
    w_ext = torch.empty(n + right.shape[0], k, dtype=cd, device=g.device)
    dequantize_nf4_triton(weight, cd, out=w_ext[:n])
    w_ext[n:] = right
    g_ext = torch.cat((g2, left), 1)
    return (g_ext @ w_ext).to(x_dtype).view(*lead, k), gb
