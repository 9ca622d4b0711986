"""Fused ``y = x Wᵀ + B (R (A x)) [+ bias]`` with W in NF4 (bitsandbytes storage) or dense.

One Triton kernel, specialized by ``tl.constexpr`` flags (NF4 or dense weight, double quant,
adapter, bias), tiled over (M, N) with a K loop:

* the weight tile is read straight from bitsandbytes' packed storage and decoded in registers
  (:func:`_nf4_tile`, the one NF4 decode every kernel uses): level table x block scale, the
  double-quantized scale decoded in-kernel with ``offset`` read through its pointer;
* ``x`` tiles feed both the main product and the rank-r projection ``A x``, accumulated in the
  same K loop (fp32);
* the epilogue adds ``(A x) Rᵀ Bᵀ`` (fp32) and the bias, and rounds once to the output dtype;
  optionally it writes ``A x`` (M x r, fp32) for the backward pass.

No atomics: every output element is written by exactly one program, so results are
deterministic. The launcher checks its inputs, allocates the output and launches; nothing in it
synchronizes with the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ..reference import AdapterFactors, _ax_fp32, _gb_fp32, _split16
from . import interpreting

__all__ = ["fused_linear", "fused_linear_group", "fused_grad_x", "dequant_cublas_linear",
           "dequant_cublas_grad_x", "dequantize_nf4_triton", "tinylora_linear", "tinylora_grad_x",
           "forward_path", "KernelConfig", "pick_config", "check_supported", "CUBLAS_MIN_M"]

_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest rank the kernel takes (the adapter is padded to a 16-wide tile for tl.dot).
MAX_RANK = 16


@triton.jit
def _nf4_levels(code_ptr):
    """The 16 NF4 levels as 16 scalars, loaded once per program (they then live in registers)."""
    return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2),
            tl.load(code_ptr + 3), tl.load(code_ptr + 4), tl.load(code_ptr + 5),
            tl.load(code_ptr + 6), tl.load(code_ptr + 7), tl.load(code_ptr + 8),
            tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14),
            tl.load(code_ptr + 15))


@triton.jit
def _nf4_lookup(c, levels):
    """levels[c] for a tensor of 4-bit codes, by a 4-level select tree on the code's bits.

    No memory access: a gather from a table in memory depends on the loaded byte and so cannot
    be software-pipelined, which stalls every K step on a second load latency.
    """
    (l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15) = levels
    b0 = (c & 1) != 0
    b1 = (c & 2) != 0
    b2 = (c & 4) != 0
    b3 = (c & 8) != 0
    p0 = tl.where(b1, tl.where(b0, l3, l2), tl.where(b0, l1, l0))
    p1 = tl.where(b1, tl.where(b0, l7, l6), tl.where(b0, l5, l4))
    p2 = tl.where(b1, tl.where(b0, l11, l10), tl.where(b0, l9, l8))
    p3 = tl.where(b1, tl.where(b0, l15, l14), tl.where(b0, l13, l12))
    return tl.where(b3, tl.where(b2, p3, p2), tl.where(b2, p1, p0))


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels,
              rn, k0, N, K, KH,
              BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE2: tl.constexpr,
              DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr = False):
    """Decode the NF4 weight tile W[rn, k0:k0+BK] as two (BN, BK/2) fp32 halves.

    Element e = n*K + k sits in byte e // 2: the high nibble holds the even column, the low
    nibble the odd one. Rather than interleave them (a register shuffle per tile), the tile is
    returned as (even columns, odd columns) and the caller splits x the same way. BK is the NF4
    block size and K a multiple of it, so the tile is one block per row: one scale per row.
    Row n's bytes start at n * KH (KH = K / 2, passed so the compiler sees 16-byte alignment).
    ``levels`` is the 16 levels as scalars (select tree), or with ``TABLE`` the pointer to the
    16-entry table (one L1-resident gather per nibble).
    """
    rn64 = rn.to(tl.int64)                        # N*K passes 2**31 for the largest layers
    mask_n = rn < N
    rj = tl.arange(0, BK // 2)
    byte = tl.load(packed_ptr + rn64[:, None] * KH + (k0 // 2 + rj)[None, :],
                   mask=mask_n[:, None], other=0).to(tl.int32)
    if TABLE:
        even = tl.load(levels + (byte >> 4))
        odd = tl.load(levels + (byte & 15))
    else:
        even = _nf4_lookup(byte >> 4, levels)
        odd = _nf4_lookup(byte & 15, levels)
    blk = rn64 * (K // BK) + k0 // BK
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask_n, other=0).to(tl.int32)
        group_scale = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask_n, other=0.0)
        # multiply then add, separately rounded (the launch disables FMA contraction), as
        # bitsandbytes decodes it
        scale = tl.load(code2_ptr + q) * group_scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask_n, other=0.0)
    return even * scale[:, None], odd * scale[:, None]


@triton.jit
def _weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels,
                 rn, k0, ke, mask_n, mask_k, N, K, KH, stride_wn, stride_wk,
                 BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                 IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr = False):
    """W[rn, k0:k0+BK] as (even columns, odd columns), from NF4 storage or a dense tensor."""
    if IS_NF4:
        w_even, w_odd = _nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                  levels, rn, k0, N, K, KH, BN, BK, BLOCKSIZE2, DOUBLE_QUANT,
                                  TABLE)
    else:
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
        mask_w = mask_n[:, None] & mask_k[None, :]
        w_even = tl.load(w_rows + ke[None, :] * stride_wk, mask=mask_w, other=0.0)
        w_odd = tl.load(w_rows + (ke + 1)[None, :] * stride_wk, mask=mask_w, other=0.0)
    return w_even, w_odd


@triton.jit
def _linear_tile(
    pid_m, pid_n,
    x_ptr, out_ptr, bias_ptr, ax_ptr,
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    a_ptr, b_ptr, r_ptr,
    M, N, K, KH, RANK,
    stride_xm, stride_xk, stride_om, stride_on, stride_wn, stride_wk,
    stride_an, stride_ak,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_ADAPTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_AX: tl.constexpr, FP32_DOT: tl.constexpr,
    AX_DOT: tl.constexpr, TABLE: tl.constexpr,
):
    """Output tile (pid_m, pid_n): x[M, K] @ W[N, K]ᵀ (+ B R A x) (+ bias), fp32 accumulation.

    The K loop runs over pairs of half tiles (even and odd columns), each a tensor-core dot of
    depth BK/2: NF4 bytes decode straight into that layout.
    """
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rj = tl.arange(0, BK // 2)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    mask_r = rr < RANK

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ax = tl.zeros((BM, R_PAD), dtype=tl.float32)
    if IS_NF4:
        if TABLE:
            levels = code_ptr
        else:
            levels = _nf4_levels(code_ptr)
    else:
        levels = 0                               # unused: the weight is dense

    # -- K loop: main product and A x from the same x tiles -------------------------------------
    for k0 in range(0, K, BK):
        ke = k0 + 2 * rj                         # even columns of this K tile
        mask_k = ke < K
        x_rows = x_ptr + rm64[:, None] * stride_xm
        x_even = tl.load(x_rows + ke[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x_odd = tl.load(x_rows + (ke + 1)[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_even, w_odd = _weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                     levels, rn, k0, ke, mask_n, mask_k, N, K, KH, stride_wn,
                                     stride_wk, BN, BK, BLOCKSIZE2, IS_NF4, DOUBLE_QUANT, TABLE)
        w_even = w_even.to(x_even.dtype)
        w_odd = w_odd.to(x_even.dtype)
        if FP32_DOT:
            acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision="ieee")
            acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_even, tl.trans(w_even), acc)
            acc = tl.dot(x_odd, tl.trans(w_odd), acc)
        if HAS_ADAPTER and AX_DOT:
            # A x on the tensor cores, A padded to R_PAD rows (idle MMA units at decode)
            a_rows = a_ptr + rr[:, None] * stride_an
            mask_a = mask_r[:, None] & mask_k[None, :]
            a_even = tl.load(a_rows + ke[None, :] * stride_ak, mask=mask_a, other=0.0)
            a_odd = tl.load(a_rows + (ke + 1)[None, :] * stride_ak, mask=mask_a, other=0.0)
            ax = tl.dot(x_even, tl.trans(a_even.to(x_even.dtype)), ax)
            ax = tl.dot(x_odd, tl.trans(a_odd.to(x_even.dtype)), ax)
        elif HAS_ADAPTER:
            # r (<= 16) dot products per row on the CUDA cores: A x costs r/BN of the main
            # product's work and needs no padded tensor-core tile
            for i in range(RANK):
                a_row = a_ptr + i * stride_an
                a_even = tl.load(a_row + ke * stride_ak, mask=mask_k, other=0.0).to(tl.float32)
                a_odd = tl.load(a_row + (ke + 1) * stride_ak, mask=mask_k,
                                other=0.0).to(tl.float32)
                part = tl.sum(x_even.to(tl.float32) * a_even[None, :]
                              + x_odd.to(tl.float32) * a_odd[None, :], axis=1)
                ax += tl.where(rr[None, :] == i, part[:, None], 0.0)

    # -- epilogue: + ((A x) Rᵀ) Bᵀ, + bias, one rounding ----------------------------------------
    if HAS_ADAPTER:
        for i in range(RANK):
            # z_i = sum_j ax_j R[i, j], then acc += z_i B[:, i]
            r_row = tl.load(r_ptr + i * RANK + rr, mask=mask_r, other=0.0)
            z_i = tl.sum(ax * r_row[None, :], axis=1)
            b_col = tl.load(b_ptr + rn64 * RANK + i, mask=mask_n, other=0.0)
            acc += z_i[:, None] * b_col[None, :]
        if STORE_AX:
            if pid_n == 0:
                tl.store(ax_ptr + rm64[:, None] * RANK + rr[None, :], ax,
                         mask=mask_m[:, None] & mask_r[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])




@triton.jit
def _fused_linear_kernel(
    # pointers: activations and outputs
    x_ptr, out_ptr, bias_ptr, ax_ptr,
    # pointers: the weight (dense: w_ptr; NF4: w_ptr = packed bytes + the scale tensors)
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    # pointers: the adapter, A (r x K, any float dtype), B (N x r, fp32), R (r x r, fp32)
    a_ptr, b_ptr, r_ptr,
    # sizes (KH = K // 2: bytes per row of packed NF4)
    M, N, K, KH, RANK,
    # strides
    stride_xm, stride_xk, stride_om, stride_on, stride_wn, stride_wk,
    stride_an, stride_ak,
    # meta-parameters
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_ADAPTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_AX: tl.constexpr, FP32_DOT: tl.constexpr,
    AX_DOT: tl.constexpr, TABLE: tl.constexpr,
):
    """out[M, N] = x[M, K] @ W[N, K]ᵀ (+ B R A x) (+ bias): one output tile per program."""
    # program id -> output tile, grouped along M so neighbouring programs share W tiles
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    _linear_tile(pid_m, pid_n, x_ptr, out_ptr, bias_ptr, ax_ptr,
                 w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                 a_ptr, b_ptr, r_ptr, M, N, K, KH, RANK,
                 stride_xm, stride_xk, stride_om, stride_on, stride_wn, stride_wk,
                 stride_an, stride_ak, BM, BN, BK, R_PAD, BLOCKSIZE2, IS_NF4, DOUBLE_QUANT,
                 HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT, TABLE)


@triton.jit
def _fused_group_kernel(
    x_ptr, M, K, KH, RANK, stride_xm, stride_xk,
    # projection 0
    o0, bias0, ax0, w0, am0, am20, c20, off0, code0, a0, b0, r0, N0, som0, son0, swn0, swk0,
    san0, sak0,
    # projection 1
    o1, bias1, ax1, w1, am1, am21, c21, off1, code1, a1, b1, r1, N1, som1, son1, swn1, swk1,
    san1, sak1,
    # projection 2 (ignored when NUM_PROJ == 2)
    o2, bias2, ax2, w2, am2, am22, c22, off2, code2, a2, b2, r2, N2, som2, son2, swn2, swk2,
    san2, sak2,
    NUM_PROJ: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_ADAPTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_AX: tl.constexpr, FP32_DOT: tl.constexpr,
    AX_DOT: tl.constexpr, TABLE: tl.constexpr,
):
    """Two or three projections of the same x (q/k/v, gate/up) in one launch.

    The programs cover the N tiles of every projection in turn; each computes one output tile of
    its projection exactly as the single kernel does, with that projection's weight, scales,
    adapter and bias.
    """
    t0 = tl.cdiv(N0, BN)
    t1 = tl.cdiv(N1, BN)
    t2 = tl.cdiv(N2, BN) if NUM_PROJ == 3 else 0
    tiles = t0 + t1 + t2
    pid = tl.program_id(0)
    pid_m = pid // tiles
    t = pid % tiles
    if t < t0:
        _linear_tile(pid_m, t, x_ptr, o0, bias0, ax0, w0, am0, am20, c20, off0, code0,
                     a0, b0, r0, M, N0, K, KH, RANK, stride_xm, stride_xk, som0, son0,
                     swn0, swk0, san0, sak0, BM, BN, BK, R_PAD, BLOCKSIZE2, IS_NF4,
                     DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT, TABLE)
    elif t < t0 + t1:
        _linear_tile(pid_m, t - t0, x_ptr, o1, bias1, ax1, w1, am1, am21, c21, off1, code1,
                     a1, b1, r1, M, N1, K, KH, RANK, stride_xm, stride_xk, som1, son1,
                     swn1, swk1, san1, sak1, BM, BN, BK, R_PAD, BLOCKSIZE2, IS_NF4,
                     DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT, TABLE)
    else:
        if NUM_PROJ == 3:
            _linear_tile(pid_m, t - t0 - t1, x_ptr, o2, bias2, ax2, w2, am2, am22, c22, off2,
                         code2, a2, b2, r2, M, N2, K, KH, RANK, stride_xm, stride_xk, som2,
                         son2, swn2, swk2, san2, sak2, BM, BN, BK, R_PAD, BLOCKSIZE2, IS_NF4,
                         DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT, TABLE)


@triton.jit
def _grad_x_kernel(
    # pointers: upstream gradient, outputs
    g_ptr, gx_ptr, gb_ptr,
    # pointers: the weight (dense: w_ptr; NF4: packed bytes + scale tensors)
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    # pointers: the adapter A (r x K), B (N x r, fp32), R (r x r, fp32)
    a_ptr, b_ptr, r_ptr,
    # sizes
    M, N, K, KH, RANK,
    # strides
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_an, stride_ak,
    # meta-parameters
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr,
    BLOCKSIZE2: tl.constexpr, IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_ADAPTER: tl.constexpr, STORE_GB: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """grad_x[M, K] = g[M, N] @ W[N, K] + ((g B) R) A, W read transposed straight from storage.

    One (BM, BK) tile of grad_x per program, a loop over N: the W tile of rows n0..n0+BN and this
    program's K columns is decoded as for the forward (even and odd column halves), so the
    (N, K) weight is never materialized. g B (M x r) is accumulated in the same loop; the
    programs of the first K tile also write it (fp32) for the gradient of R.
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
        levels = _nf4_levels(code_ptr)
    else:
        levels = 0                               # unused: the weight is dense
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        mask_n = rn < N
        rn64 = rn.to(tl.int64)
        g = tl.load(g_ptr + rm64[:, None] * stride_gm + rn64[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_even, w_odd = _weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
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
        if HAS_ADAPTER:
            g32 = g.to(tl.float32)
            for i in range(RANK):
                b_col = tl.load(b_ptr + rn64 * RANK + i, mask=mask_n, other=0.0)
                part = tl.sum(g32 * b_col[None, :], axis=1)
                gb += tl.where(rr[None, :] == i, part[:, None], 0.0)

    if HAS_ADAPTER:
        # + ((g B) R) A: gbr_j = sum_i gb_i R[i, j], then grad_x += gbr_j A[j, :]
        for j in range(RANK):
            r_col = tl.load(r_ptr + rr * RANK + j, mask=mask_r, other=0.0)
            gbr_j = tl.sum(gb * r_col[None, :], axis=1)
            a_row = a_ptr + j * stride_an
            a_even = tl.load(a_row + ke * stride_ak, mask=mask_k, other=0.0).to(tl.float32)
            a_odd = tl.load(a_row + (ke + 1) * stride_ak, mask=mask_k, other=0.0).to(tl.float32)
            acc_even += gbr_j[:, None] * a_even[None, :]
            acc_odd += gbr_j[:, None] * a_odd[None, :]
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
def _nf4_decode_kernel(
    out_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    N, KH, stride_on,
    BN: tl.constexpr, BJ: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, PACK: tl.constexpr,
):
    """Decode bytes [BJ columns of packed bytes] x [BN rows]: W[n, 2j] and W[n, 2j+1] from byte j.

    Bandwidth-bound by design: each byte is loaded once (16 per thread, vectorized), its two
    levels come from the 16-entry table (L1-resident, 64 bytes) and are scaled in fp32 and
    rounded once, as bitsandbytes decodes. With ``PACK`` (16-bit outputs) the pair is stored as
    one 32-bit word, so the stores are contiguous and full-width; ``out_ptr`` is then the output
    viewed as int32 and ``stride_on`` its row stride in words.
    """
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rj = tl.program_id(1) * BJ + tl.arange(0, BJ)
    mask = (rn < N)[:, None] & (rj < KH)[None, :]
    rn64 = rn.to(tl.int64)
    byte = tl.load(packed_ptr + rn64[:, None] * KH + rj[None, :], mask=mask, other=0)
    byte = byte.to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))
    lo = tl.load(code_ptr + (byte & 15))
    blk = rn64[:, None] * (KH // (BLOCKSIZE // 2)) + (rj // (BLOCKSIZE // 2))[None, :]
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        group_scale = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = tl.load(code2_ptr + q) * group_scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    if PACK:
        if PACK == 2:
            even = (hi * scale).to(tl.bfloat16).to(tl.int16, bitcast=True)
            odd = (lo * scale).to(tl.bfloat16).to(tl.int16, bitcast=True)
        else:
            even = (hi * scale).to(tl.float16).to(tl.int16, bitcast=True)
            odd = (lo * scale).to(tl.float16).to(tl.int16, bitcast=True)
        even = even.to(tl.int32) & 0xFFFF
        odd = odd.to(tl.int32)
        # little-endian: the even column is the low half of the word
        tl.store(out_ptr + rn64[:, None] * stride_on + rj[None, :], even | (odd << 16),
                 mask=mask)
    else:
        dtype = out_ptr.dtype.element_ty
        rows = out_ptr + rn64[:, None] * stride_on + 2 * rj[None, :]
        tl.store(rows, (hi * scale).to(dtype), mask=mask)
        tl.store(rows + 1, (lo * scale).to(dtype), mask=mask)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of the fused kernel (see :func:`pick_config`)."""

    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8
    #: A x on the tensor cores (16-bit inputs only) instead of r CUDA-core reductions per step
    ax_dot: bool = False
    #: NF4 levels gathered from the 16-entry table (L1) instead of the register select tree
    table_lookup: bool = False


def pick_config(M: int, N: int, K: int) -> KernelConfig:
    """The tile shape of the fused kernel for a problem: its one dispatch table.

    BK is 64 (the NF4 block: one scale per row per step, 32 bytes per row). By M:

    * M <= 16 (decode): one 16-row tile, N tiles narrow enough that N / BN programs cover the
      132 SMs of an H100/H200 (BN 32 for N <= 4096, 64 above);
    * M <= 64: 64-row tiles;
    * larger M: 128 x 128 tiles grouped along M for L2 reuse (the forward sends M above
      :data:`CUBLAS_MIN_M` to dequantize + cuBLAS instead, see :func:`forward_path`).
    Under the interpreter one small tile keeps CPU runs short.
    """
    if interpreting():
        return KernelConfig(BM=16, BN=32, BK=64, num_warps=1, num_stages=1)
    if M <= 16:
        return KernelConfig(BM=16, BN=32 if N <= 4096 else 64, BK=64, num_warps=4, num_stages=4)
    if M <= 64:
        return KernelConfig(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)
    return KernelConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def check_supported(x: torch.Tensor, weight: Union[NF4Weight, torch.Tensor],
                    compute_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the kernel takes (x, weight), else the reason it does not.

    ``compute_dtype``: the dtype x will be cast to before the launch (default: x's own).
    """
    dtype = x.dtype if compute_dtype is None else compute_dtype
    if not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
        return (f"x is on {x.device}; the Triton kernels run on CUDA devices, or on the CPU under "
                "TRITON_INTERPRET=1")
    wdev = weight.device
    if wdev != x.device:
        return f"x is on {x.device} but the weight is on {wdev}"
    if dtype not in _DOT_DTYPES:
        return f"unsupported activation dtype {dtype}"
    if interpreting() and torch.bfloat16 in (dtype, x.dtype):
        # it truncates instead of rounding to bf16, and its bf16 dots are wrong
        return "Triton's interpreter mishandles bf16; bf16 runs on a GPU"
    if isinstance(weight, NF4Weight):
        if weight.shape[1] % weight.blocksize != 0:
            return (f"K={weight.shape[1]} is not a multiple of the NF4 block size "
                    f"{weight.blocksize}, so rows do not start on a block")
        if weight.blocksize != 64:
            return f"NF4 block size {weight.blocksize} is not supported by the kernel (64 is)"
        if weight.double_quant and weight.offset.device != x.device:
            return "the double-quant offset is not on the weight's device"
    elif weight.dtype not in _DOT_DTYPES:
        return f"unsupported weight dtype {weight.dtype}"
    elif weight.shape[1] % 2:
        return f"K={weight.shape[1]} is odd; the kernel reads columns in pairs"
    return None


def _check_projection(x: torch.Tensor, weight, bias, factors, who: str):
    """Validate one (weight, bias, factors) for input x; return (N, K)."""
    why = check_supported(x, weight)
    if why is not None:
        raise ValueError(f"{who}: {why}")
    n, k = weight.shape if isinstance(weight, NF4Weight) else tuple(weight.shape)
    if x.shape[-1] != k:
        raise ValueError(f"{who}: x has {x.shape[-1]} features, the weight expects {k}")
    if factors is not None:
        rank = factors.A.shape[0]
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"{who}: adapter rank {rank} is outside [1, {MAX_RANK}]")
        if factors.A.shape != (rank, k) or factors.B.shape != (n, rank) or \
                factors.R.shape != (rank, rank):
            raise ValueError(f"{who}: adapter shapes A {tuple(factors.A.shape)}, B "
                             f"{tuple(factors.B.shape)}, R {tuple(factors.R.shape)} do not fit "
                             f"an ({n}, {k}) layer")
        for name, t in (("A", factors.A), ("B", factors.B), ("R", factors.R)):
            if t.device != x.device:
                raise ValueError(f"{who}: adapter factor {name} is on {t.device}, x on "
                                 f"{x.device}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"{who}: bias must be ({n},) on {x.device}")
    return n, k


def _weight_args(weight, dummy):
    """(6 weight pointers, (stride_wn, stride_wk)) for NF4 storage or a dense tensor."""
    if isinstance(weight, NF4Weight):
        return _nf4_pointer_args(weight, dummy), (0, 0)
    return (weight,) + (dummy,) * 5, weight.stride()


def _adapter_args(factors, dummy):
    """(A, B fp32, R fp32, (stride_an, stride_ak)); placeholders without an adapter."""
    if factors is None:
        return dummy, dummy, dummy, (0, 0)
    return (factors.A, factors.B.to(torch.float32).contiguous(),
            factors.R.to(torch.float32).contiguous(), factors.A.stride())


def _projection_args(weight, bias, factors, out, ax):
    """The 19 kernel arguments of one projection, in ``_linear_tile``'s order."""
    dummy = out                                           # placeholder, never read
    A, B, R, stride_a = _adapter_args(factors, dummy)
    w_args, stride_w = _weight_args(weight, dummy)
    return (out, dummy if bias is None else bias, dummy if ax is None else ax, *w_args, A, B, R,
            weight.shape[0], out.stride(0), out.stride(1), *stride_w, *stride_a)


def _meta(weight, factors, bias, ax, x, cfg: KernelConfig):
    is_nf4 = isinstance(weight, NF4Weight)
    rank = 0 if factors is None else factors.A.shape[0]
    return dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
                R_PAD=max(16, triton.next_power_of_2(max(rank, 1))),
                BLOCKSIZE2=weight.blocksize2 if is_nf4 else 256,
                IS_NF4=is_nf4, DOUBLE_QUANT=is_nf4 and weight.double_quant,
                HAS_ADAPTER=factors is not None, HAS_BIAS=bias is not None,
                STORE_AX=ax is not None, FP32_DOT=x.dtype == torch.float32,
                AX_DOT=cfg.ax_dot and x.dtype != torch.float32, TABLE=cfg.table_lookup,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)


def fused_linear(x: torch.Tensor, weight: Union[NF4Weight, torch.Tensor],
                 bias: Optional[torch.Tensor] = None, factors: Optional[AdapterFactors] = None,
                 *, out_dtype: Optional[torch.dtype] = None, store_ax: bool = False,
                 out: Optional[torch.Tensor] = None, config: Optional[KernelConfig] = None):
    """``x Wᵀ + B (R (A x)) + bias`` in one kernel launch. x: (..., K), any strides.

    x must already be in the dtype the product is computed in (the caller casts it, as the
    base layer would). Returns ``out`` (..., N) in ``out_dtype`` (default x's), and, with
    ``store_ax``, also ``A x`` as an (M, r) fp32 tensor. ``out``, when given, is a contiguous
    (M, N) tensor the result is written into (e.g. a buffer captured by a CUDA graph).
    """
    n, k = _check_projection(x, weight, bias, factors, "fused_linear")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)            # a view when it can be; the kernel takes any strides
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous() \
            or out.device != x.device:
        raise ValueError(f"fused_linear: out must be a contiguous ({m}, {n}) {out_dtype} tensor "
                         f"on {x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    rank = 0 if factors is None else factors.A.shape[0]
    ax = (torch.empty(m, rank, dtype=torch.float32, device=x.device)
          if store_ax and factors is not None else None)
    if m > 0:
        cfg = config or pick_config(m, n, k)
        args = _projection_args(weight, bias, factors, out, ax)
        # the single kernel takes x first and the sizes in another order than the group one
        (o, b_, a_x, w, am, am2, c2, off, code, A, B, R, _, som, son, swn, swk, san, sak) = args
        grid = (triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN),)
        _fused_linear_kernel[grid](
            x2, o, b_, a_x, w, am, am2, c2, off, code, A, B, R,
            m, n, k, k // 2, rank, x2.stride(0), x2.stride(1), som, son, swn, swk, san, sak,
            GROUP_M=cfg.GROUP_M, **_meta(weight, factors, bias, ax, x, cfg))
    out = out.view(*lead, n)
    return (out, ax) if store_ax else out


def fused_linear_group(x: torch.Tensor, projections, *, out_dtype: Optional[torch.dtype] = None,
                       store_ax: bool = False, config: Optional[KernelConfig] = None):
    """Two or three projections of one input in ONE launch: q/k/v, or gate/up.

    ``projections``: a sequence of ``(weight, bias, factors)``, each as :func:`fused_linear`
    takes them, all NF4 (same double-quant setting) or all dense, with the same K, all with or
    all without bias and adapter (same rank). Returns the list of outputs (and, with
    ``store_ax``, the list of ``A x``). At decode the k/v projections alone are far below one
    launch's cost; here they ride in the q launch.
    """
    projections = list(projections)
    if not 2 <= len(projections) <= 3:
        raise ValueError(f"fused_linear_group takes 2 or 3 projections, got {len(projections)}")
    shapes = [_check_projection(x, w, b, f, f"fused_linear_group[{i}]")
              for i, (w, b, f) in enumerate(projections)]
    first_w, first_b, first_f = projections[0]

    def kind(w):
        return ("nf4", w.double_quant, w.blocksize2) if isinstance(w, NF4Weight) else ("dense",)

    for i, (w, b, f) in enumerate(projections[1:], 1):
        if kind(w) != kind(first_w):
            raise ValueError(f"fused_linear_group: projection {i} is stored as {kind(w)}, "
                             f"projection 0 as {kind(first_w)}")
        if (b is None) != (first_b is None) or (f is None) != (first_f is None):
            raise ValueError("fused_linear_group: every projection needs a bias, or none; an "
                             "adapter, or none")
        if f is not None and f.A.shape[0] != first_f.A.shape[0]:
            raise ValueError("fused_linear_group: the adapters' ranks differ")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    k = shapes[0][1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    outs = [torch.empty(m, n, dtype=out_dtype, device=x.device) for n, _ in shapes]
    rank = 0 if first_f is None else first_f.A.shape[0]
    axs = [torch.empty(m, rank, dtype=torch.float32, device=x.device)
           if store_ax and first_f is not None else None for _ in projections]
    if m > 0:
        cfg = config or pick_config(m, max(n for n, _ in shapes), k)
        packs = [_projection_args(w, b, f, o, a)
                 for (w, b, f), o, a in zip(projections, outs, axs)]
        packs += [packs[-1]] * (3 - len(packs))          # an unused third slot
        tiles = sum(triton.cdiv(n, cfg.BN) for n, _ in shapes)
        _fused_group_kernel[(triton.cdiv(m, cfg.BM) * tiles,)](
            x2, m, k, k // 2, rank, x2.stride(0), x2.stride(1), *packs[0], *packs[1], *packs[2],
            NUM_PROJ=len(projections), **_meta(first_w, first_f, first_b, axs[0], x, cfg))
    outs = [o.view(*lead, n) for o, (n, _) in zip(outs, shapes)]
    return (outs, axs) if store_ax else outs


#: (rows, packed bytes per row) of one decode program: 16 KB of output, 16 bytes in per thread.
DECODE_TILE = (16, 256)


def _nf4_pointer_args(weight: NF4Weight, dummy: torch.Tensor):
    return (weight.packed, weight.absmax,
            weight.absmax2 if weight.double_quant else dummy,
            weight.code2 if weight.double_quant else dummy,
            weight.offset if weight.double_quant else dummy, weight.code)


def dequantize_nf4_triton(weight: NF4Weight, dtype: torch.dtype,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode an NF4 weight to (N, K) in ``dtype`` with one kernel (bandwidth-bound).

    ``out`` may be a wider (N, K') row-major buffer; its first K columns are written.
    """
    n, k = weight.shape
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=weight.device)
    if out.shape[0] != n or out.shape[1] < k or out.stride(1) != 1:
        raise ValueError(f"dequantize_nf4_triton: out must be ({n}, >= {k}) with unit column "
                         f"stride, got {tuple(out.shape)} strides {out.stride()}")
    kh = k // 2
    pack = {torch.bfloat16: 2, torch.float16: 1}.get(out.dtype, 0)
    if pack and (out.stride(0) % 2 or out.storage_offset() % 2):
        pack = 0                                  # rows not word-aligned: two stores per byte
    target = out.view(torch.int32) if pack else out
    bn, bj = (4, 32) if interpreting() else DECODE_TILE
    grid = (triton.cdiv(n, bn), triton.cdiv(kh, bj))
    _nf4_decode_kernel[grid](target, *_nf4_pointer_args(weight, out), n, kh, target.stride(0),
                             BN=bn, BJ=bj, BLOCKSIZE=weight.blocksize,
                             BLOCKSIZE2=weight.blocksize2, DOUBLE_QUANT=weight.double_quant,
                             PACK=pack, num_warps=4, enable_fp_fusion=False)
    return out


#: The adapter's extra GEMM columns (3 r) are zero-padded to a multiple of this, so the GEMM's
#: contraction length stays a multiple of cuBLAS' K tile (64) when the layer's own K is.
EXT_ALIGN = 64

#: From this many rows up, the forward decodes the NF4 weight once into a scratch matrix and
#: lets cuBLAS do the product (the adapter rides in the same GEMM as extra K columns); below,
#: the fused kernel streams the packed weight. Measured on an H200 (benchmarks/results/h200/
#: gpu_forward_v2.md, Qwen2.5-Coder-3B shapes): at M = 64 the fused kernel was ahead on 3 of 4
#: shapes, at M = 256 decode + cuBLAS was ahead or level on all 4; M = 128 was not measured.
CUBLAS_MIN_M = 128


def forward_path(M: int, N: int, K: int) -> str:
    """``"fused"`` (one Triton kernel) or ``"dequant_cublas"`` for an (M, N, K) NF4 forward."""
    if interpreting():
        return "fused"
    return "dequant_cublas" if M >= CUBLAS_MIN_M else "fused"


def dequant_cublas_linear(x: torch.Tensor, weight: NF4Weight, bias: Optional[torch.Tensor],
                          factors: Optional[AdapterFactors], *, out_dtype: torch.dtype,
                          store_ax: bool = False):
    """Prefill/training forward: decode W once, one cuBLAS GEMM computes base and adapter.

    With the adapter, the GEMM runs over a few extra K columns, ``[x | z_hi z_lo z_hi | 0] @
    [W | B_hi B_hi B_lo | 0]ᵀ`` with z = (A x) Rᵀ (M x r): cuBLAS accumulates ``z Bᵀ`` with the
    base product (no extra pass over the (M, N) output). z and B are each split into a part in
    x's dtype and the rounding remainder (``hi + lo``), so the adapter keeps fp32 accuracy
    (only lo x lo, ~2^-16 relative, is dropped) although the GEMM runs in 16-bit.
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
        rank = factors.A.shape[0]
        k_ext = k + EXT_ALIGN * triton.cdiv(3 * rank, EXT_ALIGN)
        w_ext = torch.empty(n, k_ext, dtype=cd, device=x.device)
        dequantize_nf4_triton(weight, cd, out=w_ext)
        b_hi, b_lo = _split16(factors.B.float(), cd)
        w_ext[:, k:k + 3 * rank] = torch.cat((b_hi, b_hi, b_lo), dim=1)
        w_ext[:, k + 3 * rank:] = 0
        x_ext = torch.empty(x2.shape[0], k_ext, dtype=cd, device=x.device)
        x_ext[:, :k] = x2
        ax = _ax_fp32(x2, factors.A)
        z_hi, z_lo = _split16(ax @ factors.R.float().t(), cd)
        x_ext[:, k:k + 3 * rank] = torch.cat((z_hi, z_lo, z_hi), dim=1)
        x_ext[:, k + 3 * rank:] = 0
        y = (torch.addmm(bias.to(cd), x_ext, w_ext.t()) if bias is not None
             else x_ext @ w_ext.t())
    y = y.to(out_dtype).view(*lead, n)
    return (y, ax) if store_ax else y


def tinylora_linear(x: torch.Tensor, weight: Union[NF4Weight, torch.Tensor],
                    bias: Optional[torch.Tensor], factors: Optional[AdapterFactors], *,
                    out_dtype: torch.dtype, store_ax: bool = False):
    """The forward, by the path :func:`forward_path` picks for this size."""
    m = x.numel() // max(x.shape[-1], 1)
    if (isinstance(weight, NF4Weight) and m > 0
            and forward_path(m, *weight.shape) == "dequant_cublas"):
        return dequant_cublas_linear(x, weight, bias, factors, out_dtype=out_dtype,
                                     store_ax=store_ax)
    return fused_linear(x, weight, bias, factors, out_dtype=out_dtype, store_ax=store_ax)


def dequant_cublas_grad_x(g: torch.Tensor, weight: NF4Weight,
                          factors: Optional[AdapterFactors], *, x_dtype: torch.dtype):
    """Training backward for x at large M: decode W once, one cuBLAS GEMM for ``g W + (gb R) A``.

    As in :func:`dequant_cublas_linear`, the adapter rides in the GEMM as extra contraction rows:
    ``[g | t_hi t_lo t_hi | 0] @ [W ; A_hi ; A_hi ; A_lo ; 0]`` with t = (g B) R (M x r) and A
    split into its 16-bit part and remainder (fp32-accurate, one rounding). gb = g B (fp32, for
    d R) comes from one GEMM against ``[B_hi | B_lo]``. Returns (grad_x, gb).
    """
    n, k = weight.shape
    lead = g.shape[:-1]
    cd = g.dtype
    g2 = g.reshape(-1, n)
    if factors is None:
        w = dequantize_nf4_triton(weight, cd)
        return (g2 @ w).to(x_dtype).view(*lead, k), None
    rank = factors.A.shape[0]
    n_ext = n + EXT_ALIGN * triton.cdiv(3 * rank, EXT_ALIGN)
    w_ext = torch.empty(n_ext, k, dtype=cd, device=g.device)
    dequantize_nf4_triton(weight, cd, out=w_ext[:n])
    a_hi, a_lo = _split16(factors.A.float(), cd)
    w_ext[n:n + 3 * rank] = torch.cat((a_hi, a_hi, a_lo), dim=0)
    w_ext[n + 3 * rank:] = 0
    gb = _gb_fp32(g2, factors.B)
    t_hi, t_lo = _split16(gb @ factors.R.float(), cd)
    g_ext = torch.empty(g2.shape[0], n_ext, dtype=cd, device=g.device)
    g_ext[:, :n] = g2
    g_ext[:, n:n + 3 * rank] = torch.cat((t_hi, t_lo, t_hi), dim=1)
    g_ext[:, n + 3 * rank:] = 0
    return (g_ext @ w_ext).to(x_dtype).view(*lead, k), gb


def tinylora_grad_x(g: torch.Tensor, weight: Union[NF4Weight, torch.Tensor],
                    factors: Optional[AdapterFactors], *, x_dtype: torch.dtype):
    """``(g W + ((g B) R) A, g B)`` by the path :func:`forward_path` picks for this size."""
    m = g.numel() // max(g.shape[-1], 1)
    if (isinstance(weight, NF4Weight) and m > 0
            and forward_path(m, *weight.shape) == "dequant_cublas"):
        return dequant_cublas_grad_x(g, weight, factors, x_dtype=x_dtype)
    return fused_grad_x(g, weight, factors, x_dtype=x_dtype, store_gb=True)


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
        A, B, R, stride_a = _adapter_args(factors, dummy)
        w_args, stride_w = _weight_args(weight, dummy)
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
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    gx = gx.view(*lead, k)
    return (gx, gb) if store_gb else gx
