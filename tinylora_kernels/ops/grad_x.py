"""The fused backward for x: ``grad_x = g W + ((g B) R) A`` in one launch, W read transposed
straight from its NF4 (or dense) storage; also ``g B`` (M x r, fp32) for the gradient of R.

The kernel of the decode and small-M sizes; at large M the router sends the backward to
:mod:`tinylora_kernels.ops.large_m` instead.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ..torch_path import AdapterFactors
from .configs import KernelConfig, check_supported, pick_config
from .tiles import adapter_args, nf4_levels, padded_rows_ax, weight_args, weight_tile

__all__ = ["fused_grad_x"]


@triton.jit
def _grad_x_kernel(
    # pointers: upstream gradient, outputs
    g_ptr, gx_ptr, gb_ptr,
    # pointers: the weight (dense: w_ptr; NF4: packed bytes + scale tensors)
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    # pointers: the adapter A (r x K), B (N x r, fp32), R (r x r, fp32)
    a_ptr, b_ptr, r_ptr,
    # sizes
    M, N, K, KH, RANK: tl.constexpr,
    # strides
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_an, stride_ak,
    # meta-parameters
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr,
    BLOCKSIZE2: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_ADAPTER: tl.constexpr, STORE_GB: tl.constexpr, FP32_DOT: tl.constexpr,
    GB_AFTER: tl.constexpr = False, R_TAIL: tl.constexpr = 1, BKA: tl.constexpr = 128,
):
    """grad_x[M, K] = g[M, N] @ W[N, K] + ((g B) R) A, W read transposed straight from storage.

    One (BM, BK) tile of grad_x per program, a loop over N: the W tile of rows n0..n0+BN and this
    program's K columns is decoded as for the forward (even and odd column halves), so the
    (N, K) weight is never materialized. g B (M x r) is accumulated in the same loop, or with
    ``GB_AFTER`` (16-row tiles) after it by :func:`~.tiles.padded_rows_ax`, leaving the loop
    nothing of the adapter; the programs of the first K tile also write it (fp32) for the
    gradient of R.
    """
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BK)
    pid_m = pid // num_k
    pid_k = pid % num_k
    k0 = pid_k * BK
    rm = pid_m * BM + tl.arange(0, BM)
    rj = tl.arange(0, BK // 2)
    ke = k0 + 2 * rj
    mask_m = rm < M
    mask_k = ke < K
    rm64 = rm.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    mask_r = rr < RANK

    acc_even = tl.zeros((BM, BK // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BM, BK // 2), dtype=tl.float32)
    gb = tl.zeros((BM, R_PAD), dtype=tl.float32)
    if IS_NF4:
        levels = nf4_levels(code_ptr)
    else:
        levels = 0                               # unused: the weight is dense
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        mask_n = rn < N
        rn64 = rn.to(tl.int64)
        g = tl.load(g_ptr + rm64[:, None] * stride_gm + rn64[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_even, w_odd = weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                    levels, rn, k0, ke, mask_n, mask_k, N, K, KH, stride_wn,
                                    stride_wk, BN, BK, BLOCKSIZE2, IS_NF4, DOUBLE_QUANT)
        w_even = w_even.to(g.dtype)
        w_odd = w_odd.to(g.dtype)
        if FP32_DOT:
            acc_even = tl.dot(g, w_even, acc_even, input_precision="ieee")
            acc_odd = tl.dot(g, w_odd, acc_odd, input_precision="ieee")
        else:
            acc_even = tl.dot(g, w_even, acc_even)
            acc_odd = tl.dot(g, w_odd, acc_odd)
        if HAS_ADAPTER and not GB_AFTER:
            g32 = g.to(tl.float32)
            for i in tl.static_range(RANK):     # unrolled: a loop inside would keep the
                # N loop from being software-pipelined
                b_col = tl.load(b_ptr + rn64 * RANK + i, mask=mask_n, other=0.0)
                part = tl.sum(g32 * b_col[None, :], axis=1)
                gb += tl.where(rr[None, :] == i, part[:, None], 0.0)

    if HAS_ADAPTER and GB_AFTER:
        # g B after the loop, B (N, r) read as Bᵀ: no reduction inside the N loop
        gb = padded_rows_ax(gb, g_ptr, b_ptr, pid_m * BM, M, N, stride_gm, stride_gn, 1, RANK,
                            BM, RANK, R_PAD, R_TAIL, BKA)
    if HAS_ADAPTER:
        acc_even, acc_odd = _add_gbra(acc_even, acc_odd, gb, r_ptr, a_ptr, ke, mask_k, rr,
                                      mask_r, stride_an, stride_ak, RANK)
        if STORE_GB:
            if pid_k == 0:
                tl.store(gb_ptr + rm64[:, None] * RANK + rr[None, :], gb,
                         mask=mask_m[:, None] & mask_r[None, :])
    dtype = gx_ptr.dtype.element_ty
    rows = gx_ptr + rm64[:, None] * stride_xm
    mask = mask_m[:, None] & mask_k[None, :]
    tl.store(rows + ke[None, :] * stride_xk, acc_even.to(dtype), mask=mask)
    tl.store(rows + (ke + 1)[None, :] * stride_xk, acc_odd.to(dtype), mask=mask)


@triton.jit
def _add_gbra(acc_even, acc_odd, gb, r_ptr, a_ptr, ke, mask_k, rr, mask_r, stride_an, stride_ak,
              RANK: tl.constexpr):
    """The tile's even and odd columns plus ((g B) R) A: gbr_j = Σ_i gb_i R[i, j], then
    grad_x += gbr_j A[j, :]."""
    for j in range(RANK):
        r_col = tl.load(r_ptr + rr * RANK + j, mask=mask_r, other=0.0)
        gbr_j = tl.sum(gb * r_col[None, :], axis=1)
        a_row = a_ptr + j * stride_an
        a_even = tl.load(a_row + ke * stride_ak, mask=mask_k, other=0.0).to(tl.float32)
        a_odd = tl.load(a_row + (ke + 1) * stride_ak, mask=mask_k, other=0.0).to(tl.float32)
        acc_even += gbr_j[:, None] * a_even[None, :]
        acc_odd += gbr_j[:, None] * a_odd[None, :]
    return acc_even, acc_odd


def fused_grad_x(g: torch.Tensor, weight: Union[NF4Weight, torch.Tensor],
                 factors: Optional[AdapterFactors], *, x_dtype: torch.dtype,
                 store_gb: bool = False, out: Optional[torch.Tensor] = None,
                 config: Optional[KernelConfig] = None):
    """Backward of :func:`fused_linear` for x: ``g W + ((g B) R) A`` in one launch.

    g: (..., N) upstream gradient, in the dtype the forward product was computed in. Returns
    grad_x (..., K) in ``x_dtype`` and, with ``store_gb``, ``g B`` as an (M, r) fp32 tensor (the
    gradient of R is then ``(g B)ᵀ (A x)``). ``out``: a contiguous (M, K) buffer to write into.
    """
    n, k = weight.shape if isinstance(weight, NF4Weight) else tuple(weight.shape)
    if g.shape[-1] != n:
        raise ValueError(f"fused_grad_x: g has {g.shape[-1]} columns, the weight {n} rows")
    why = check_supported(g, weight)
    if why is not None:
        raise ValueError(f"fused_grad_x: {why}")
    lead = g.shape[:-1]
    g2 = g.reshape(-1, n)
    m = g2.shape[0]
    if out is None:
        gx = torch.empty(m, k, dtype=x_dtype, device=g.device)
    elif out.shape != (m, k) or out.dtype != x_dtype or not out.is_contiguous():
        raise ValueError(f"fused_grad_x: out must be a contiguous ({m}, {k}) {x_dtype} tensor")
    else:
        gx = out
    rank = 0 if factors is None else factors.A.shape[0]
    gb = (torch.empty(m, rank, dtype=torch.float32, device=g.device)
          if store_gb and factors is not None else None)
    if m > 0:
        cfg = config or pick_config(m, k, n)
        dummy = gx
        A, B, R, stride_a = adapter_args(factors, dummy)
        w_args, stride_w = weight_args(weight, dummy)
        is_nf4 = isinstance(weight, NF4Weight)
        bk = 64
        _grad_x_kernel[(triton.cdiv(m, cfg.BM) * triton.cdiv(k, bk),)](
            g2, gx, dummy if gb is None else gb, *w_args, A, B, R,
            m, n, k, k // 2, rank, g2.stride(0), g2.stride(1), gx.stride(0), gx.stride(1),
            *stride_w, *stride_a,
            BM=cfg.BM, BN=cfg.BN, BK=bk, R_PAD=max(16, triton.next_power_of_2(max(rank, 1))),
            BLOCKSIZE2=weight.blocksize2 if is_nf4 else 256, IS_NF4=is_nf4,
            DOUBLE_QUANT=is_nf4 and weight.double_quant, HAS_ADAPTER=factors is not None,
            STORE_GB=gb is not None, FP32_DOT=g.dtype == torch.float32,
            GB_AFTER=cfg.ax_after, R_TAIL=triton.next_power_of_2(max(rank, 1)), BKA=128,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    gx = gx.view(*lead, k)
    return (gx, gb) if store_gb else gx
