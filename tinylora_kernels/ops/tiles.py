"""The Triton helpers every kernel shares: the one NF4 tile decode, the weight tile, and the host
side packing of a weight and an adapter into kernel arguments."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight


@triton.jit
def nf4_levels(code_ptr):
    """The 16 NF4 levels as 16 scalars, loaded once per program (they then live in registers)."""
    return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2),
            tl.load(code_ptr + 3), tl.load(code_ptr + 4), tl.load(code_ptr + 5),
            tl.load(code_ptr + 6), tl.load(code_ptr + 7), tl.load(code_ptr + 8),
            tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14),
            tl.load(code_ptr + 15))


@triton.jit
def nf4_lookup(c, levels):
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
def nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels,
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
        even = nf4_lookup(byte >> 4, levels)
        odd = nf4_lookup(byte & 15, levels)
    blk = rn64 * (K // BK) + k0 // BK
    scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask_n, BLOCKSIZE2,
                        DOUBLE_QUANT)
    return even * scale[:, None], odd * scale[:, None]


@triton.jit
def block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask,
                BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The fp32 scale of NF4 blocks ``blk``: absmax, or with double quantization
    ``code2[absmax[b]] * absmax2[b // BLOCKSIZE2] + offset``."""
    # One return, after an if/else: Triton (3.6 at least) type-checks every return statement of
    # a jit function, including one after an ``if DOUBLE_QUANT: return ...`` block, and a uint8
    # absmax would then make the two disagree.
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        group_scale = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        # multiply then add, separately rounded (the launch disables FMA contraction), as
        # bitsandbytes decodes it
        scale = tl.load(code2_ptr + q) * group_scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels,
                rn, k0, ke, mask_n, mask_k, N, K, KH, stride_wn, stride_wk,
                BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TABLE: tl.constexpr = False):
    """W[rn, k0:k0+BK] as (even columns, odd columns), from NF4 storage or a dense tensor."""
    if IS_NF4:
        w_even, w_odd = nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                 levels, rn, k0, N, K, KH, BN, BK, BLOCKSIZE2, DOUBLE_QUANT,
                                 TABLE)
    else:
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
        mask_w = mask_n[:, None] & mask_k[None, :]
        w_even = tl.load(w_rows + ke[None, :] * stride_wk, mask=mask_w, other=0.0)
        w_odd = tl.load(w_rows + (ke + 1)[None, :] * stride_wk, mask=mask_w, other=0.0)
    return w_even, w_odd


def nf4_pointer_args(weight: NF4Weight, dummy: torch.Tensor):
    """(packed, absmax, absmax2, code2, offset, code) pointers; ``dummy`` where a tensor is absent."""
    return (weight.packed, weight.absmax,
            weight.absmax2 if weight.double_quant else dummy,
            weight.code2 if weight.double_quant else dummy,
            weight.offset if weight.double_quant else dummy, weight.code)


def weight_args(weight, dummy):
    """(6 weight pointers, (stride_wn, stride_wk)) for NF4 storage or a dense tensor."""
    if isinstance(weight, NF4Weight):
        return nf4_pointer_args(weight, dummy), (0, 0)
    return (weight,) + (dummy,) * 5, weight.stride()


def adapter_args(factors, dummy):
    """(A, B fp32, R fp32, (stride_an, stride_ak)); placeholders without an adapter."""
    if factors is None:
        return dummy, dummy, dummy, (0, 0)
    return (factors.A, factors.B.to(torch.float32).contiguous(),
            factors.R.to(torch.float32).contiguous(), factors.A.stride())


@triton.jit
def rows_ax(x_ptr, a_ptr, k_lo, k_hi, M, stride_xm, stride_xk, stride_an, stride_ak,
            M_PAD: tl.constexpr, RANK: tl.constexpr, R_PAD: tl.constexpr, BKA: tl.constexpr):
    """A x of rows 0..M-1 of x over the K columns [k_lo, k_hi): (M_PAD, R_PAD) fp32.

    Run after a kernel's main loop, not inside it: the products accumulate element-wise in a
    (M_PAD, R_PAD, BKA) tile and are reduced across threads once, at the end — summed inside
    the main loop, A x costs a block-wide reduction (barriers, shuffles) every step, a dependent
    chain each step waits on. Each step first loads the next step's x and A (masked off past
    the end), so their latency overlaps the step's products. A and x are loaded straight into
    the tile's shape, (1, R_PAD, BKA) and (M_PAD, 1, BKA): no layout conversion."""
    rm = tl.arange(0, M_PAD)[:, None, None]
    rr = tl.arange(0, R_PAD)[None, :, None]
    rk = tl.arange(0, BKA)[None, None, :]
    a_ptrs = a_ptr + rr * stride_an + (k_lo + rk) * stride_ak
    x_ptrs = x_ptr + rm * stride_xm + (k_lo + rk) * stride_xk
    a = tl.load(a_ptrs, mask=(rr < RANK) & (k_lo + rk < k_hi), other=0.0)
    xv = tl.load(x_ptrs, mask=(rm < M) & (k_lo + rk < k_hi), other=0.0)
    part = tl.zeros((M_PAD, R_PAD, BKA), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BKA):
        in_next = k0 + BKA + rk < k_hi
        a_next = tl.load(a_ptrs + (k0 + BKA - k_lo) * stride_ak, mask=(rr < RANK) & in_next,
                         other=0.0)
        x_next = tl.load(x_ptrs + (k0 + BKA - k_lo) * stride_xk, mask=(rm < M) & in_next,
                         other=0.0)
        part += xv.to(tl.float32) * a.to(tl.float32)
        a = a_next
        xv = x_next
    return tl.sum(part, axis=2)


@triton.jit
def padded_rows_ax(ax, x_ptr, a_ptr, m0, M, K, stride_xm, stride_xk, stride_an, stride_ak,
                   BM: tl.constexpr, RANK: tl.constexpr, R_PAD: tl.constexpr,
                   R_TAIL: tl.constexpr, BKA: tl.constexpr):
    """``ax`` (BM, R_PAD) plus A x of rows m0..m0+BM-1 of x over all K columns, formed after a
    kernel's main loop by :func:`rows_ax` as (BM, R_TAIL) and placed into ax's first RANK
    columns (the tensor-core tiles pad r to 16)."""
    tail = rows_ax(x_ptr + m0 * stride_xm, a_ptr, 0, K, M - m0, stride_xm, stride_xk,
                   stride_an, stride_ak, BM, RANK, R_TAIL, BKA)
    rt = tl.arange(0, R_TAIL)
    rr = tl.arange(0, R_PAD)
    for i in tl.static_range(RANK):
        col = tl.sum(tl.where(rt[None, :] == i, tail, 0.0), axis=1)
        ax += tl.where(rr[None, :] == i, col[:, None], 0.0)
    return ax
