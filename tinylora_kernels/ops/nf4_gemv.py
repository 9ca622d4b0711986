"""NF4 GEMV for decode (M = 1..4): ``y = x Wᵀ + (B R) (A x) [+ bias]``, split over K.

Shaped for bandwidth rather than for tensor cores:

* each program owns BN rows and one K slice (``SPLIT`` slices in all, so that small N — k/v —
  and long K — down — still put enough programs on the card); it streams BKH packed bytes per
  row per step (the loads are contiguous along K: 16 bytes per lane);
* the NF4 levels come from the 16-entry table (a gather, no compare tree); each 64-weight block
  sums ``level x x`` first and multiplies by its scale once (``Σ_b s_b Σ_j l_j x_j``), fp32
  throughout — the weight is never rounded to 16 bits, so this is at least as exact as decoding;
* the adapter is folded in: the same x slice gives this slice's share of ``A x`` (r numbers per
  row of x), which meets ``B R`` (N x r, fp32, one small product per call) in the
  same program — no extra launch, no extra pass over the output;
* slices are summed in a fixed order by a second small kernel (deterministic: same input, same
  bits); with one slice the GEMV kernel writes the output itself.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ..torch_path import AdapterFactors
from . import interpreting
from .configs import GEMV_MAX_M, GemvConfig, gemv_config
from .tiles import block_scale, nf4_pointer_args

__all__ = ["nf4_gemv"]

@triton.jit
def _nf4_gemv_kernel(
    # pointers: input, partial sums (SPLIT, M, N) fp32 or the output, bias
    x_ptr, out_ptr, bias_ptr,
    # pointers: the NF4 weight
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    # pointers: the adapter, A (r, K) and BR = B R (N, r) fp32
    a_ptr, br_ptr,
    # sizes; K_SLICE: weights per K slice (a multiple of 2 BKH)
    M, N, K, K_SLICE,
    # strides
    stride_xm, stride_xk, stride_an, stride_ak,
    # meta-parameters
    BN: tl.constexpr, BKH: tl.constexpr, M_PAD: tl.constexpr, RANK: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_ADAPTER: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
):
    """Rows pid_n*BN.., K slice pid_k: acc[n, m] = Σ_k W[n, k] x[m, k] (+ BR[n] · A x[m])."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    mask_n = rn < N
    rn64 = rn.to(tl.int64)
    rj = tl.arange(0, BKH)
    cols = tl.arange(0, M_PAD)
    rr = tl.arange(0, R_PAD)
    mask_r = rr < RANK
    kh = K // 2
    k_lo = pid_k * K_SLICE
    k_hi = tl.minimum(K, k_lo + K_SLICE)

    acc = tl.zeros((BN, M_PAD), dtype=tl.float32)
    ax = tl.zeros((M_PAD, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, 2 * BKH):
        ke = k0 + 2 * rj                               # the even column of each byte
        mask_k = ke < k_hi
        mask_w = mask_n[:, None] & mask_k[None, :]
        byte = tl.load(packed_ptr + rn64[:, None] * kh + (k0 // 2 + rj)[None, :], mask=mask_w,
                       other=0).to(tl.int32)
        lev_even = tl.load(code_ptr + (byte >> 4))     # (BN, BKH): levels, unscaled
        lev_odd = tl.load(code_ptr + (byte & 15))
        rb = tl.arange(0, BKH // 32)                   # the 64-weight blocks of this step
        blk = rn64[:, None] * (K // 64) + (k0 // 64 + rb)[None, :]
        mask_b = mask_n[:, None] & ((k0 + 64 * rb) < k_hi)[None, :]
        scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask_b,
                            BLOCKSIZE2, DOUBLE_QUANT)  # (BN, BKH/32): once per block
        if HAS_ADAPTER:
            a_even = tl.load(a_ptr + rr[:, None] * stride_an + ke[None, :] * stride_ak,
                             mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            a_odd = tl.load(a_ptr + rr[:, None] * stride_an + (ke + 1)[None, :] * stride_ak,
                            mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        for m in tl.static_range(M_PAD):
            x_row = x_ptr + m * stride_xm
            # (the row test as a tensor of ke's shape: a scalar operand gives the mask a dtype
            # that Triton 3.9's interpreter refuses)
            mask_x = mask_k & ((ke * 0 + m) < M)
            x_even = tl.load(x_row + ke * stride_xk, mask=mask_x, other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + (ke + 1) * stride_xk, mask=mask_x, other=0.0).to(tl.float32)
            per_byte = lev_even * x_even[None, :] + lev_odd * x_odd[None, :]
            per_block = tl.sum(tl.reshape(per_byte, (BN, BKH // 32, 32)), axis=2)
            part = tl.sum(per_block * scale, axis=1)                  # (BN,)
            acc += tl.where(cols[None, :] == m, part[:, None], 0.0)
            if HAS_ADAPTER:
                ax_m = tl.sum(a_even * x_even[None, :] + a_odd * x_odd[None, :], axis=1)
                ax += tl.where(cols[:, None] == m, ax_m[None, :], 0.0)

    if HAS_ADAPTER:
        # this slice's share of (B R)(A x): BR (BN, r) against A x (M, r)
        br = tl.load(br_ptr + rn64[:, None] * RANK + rr[None, :],
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        for m in tl.static_range(M_PAD):
            ax_m = tl.sum(tl.where(cols[:, None] == m, ax, 0.0), axis=0)   # (R_PAD,)
            part = tl.sum(br * ax_m[None, :], axis=1)
            acc += tl.where(cols[None, :] == m, part[:, None], 0.0)
    mask_out = mask_n[:, None] & (cols < M)[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + cols[None, :].to(tl.int64) * N + rn64[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        base = pid_k.to(tl.int64) * M * N
        tl.store(out_ptr + base + cols[None, :].to(tl.int64) * N + rn64[:, None], acc,
                 mask=mask_out)


@triton.jit
def _sum_slices_kernel(part_ptr, out_ptr, bias_ptr, MN, N, SPLIT: tl.constexpr,
                       BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out = Σ_s part[s] (+ bias), the slices added in order 0, 1, ... (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        total += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_gemv(x: torch.Tensor, weight: NF4Weight, bias: Optional[torch.Tensor],
             factors: Optional[AdapterFactors], *, out_dtype: torch.dtype,
             config: Optional[GemvConfig] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x Wᵀ + B (R (A x)) + bias`` for x (..., K) with at most :data:`GEMV_MAX_M` rows.

    The caller has checked the call (the router's plan: NF4 storage with 64-weight blocks, x on
    the weight's device). B R (N x r, fp32) is formed here, one small product per call.
    ``out``: a contiguous (M, N) buffer to write into.
    """
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"nf4_gemv takes at most {GEMV_MAX_M} rows, got {m}")
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m == 0:
        return out.view(*lead, n)
    cfg = config or gemv_config(n, k)
    rank = 0 if factors is None else factors.A.shape[0]
    br = None if factors is None else (factors.B.float() @ factors.R.float()).contiguous()
    step = 2 * cfg.BKH
    k_slice = step * triton.cdiv(triton.cdiv(k, cfg.split), step)
    split = triton.cdiv(k, k_slice)
    direct = split == 1
    target = out if direct else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    A = factors.A if factors is not None else out
    packed, absmax, absmax2, code2, offset, code = nf4_pointer_args(weight, out)
    _nf4_gemv_kernel[(triton.cdiv(n, cfg.BN), split)](
        x2, target, bias if bias is not None else out,
        packed, absmax, absmax2, code2, offset, code,
        A, br if br is not None else out,
        m, n, k, k_slice,
        x2.stride(0), x2.stride(1), A.stride(0) if rank else 0, A.stride(1) if rank else 0,
        BN=cfg.BN, BKH=cfg.BKH, M_PAD=triton.next_power_of_2(m), RANK=max(rank, 1),
        R_PAD=triton.next_power_of_2(max(rank, 1)), BLOCKSIZE2=weight.blocksize2,
        DOUBLE_QUANT=weight.double_quant, HAS_ADAPTER=factors is not None,
        HAS_BIAS=bias is not None, DIRECT=direct, num_warps=cfg.num_warps,
        enable_fp_fusion=False)
    if not direct:
        block = 1024 if not interpreting() else 64
        _sum_slices_kernel[(triton.cdiv(m * n, block),)](
            target, out, bias if bias is not None else out, m * n, n, SPLIT=split, BLOCK=block,
            HAS_BIAS=bias is not None)
    return out.view(*lead, n)
