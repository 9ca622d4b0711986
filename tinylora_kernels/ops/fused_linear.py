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

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ..reference import AdapterFactors
from . import interpreting

__all__ = ["fused_linear", "KernelConfig", "pick_config", "check_supported"]

_DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest rank the kernel takes (the adapter is padded to a 16-wide tile for tl.dot).
MAX_RANK = 16


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
              rn, k0, N, K,
              BN: tl.constexpr, BK: tl.constexpr, BLOCKSIZE: tl.constexpr,
              BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Decode W[rn, k0:k0+BK] (BN x BK, fp32) from NF4 storage.

    Element e = n*K + k sits in byte e // 2, high nibble when e is even. The kernel requires
    K % BLOCKSIZE == 0 (so rows start on a block and a byte), so a row's bytes are contiguous.
    """
    tl.static_assert(BK % BLOCKSIZE == 0, "BK must be a multiple of the NF4 block size")
    NB: tl.constexpr = BK // BLOCKSIZE
    rn64 = rn.to(tl.int64)                        # N*K passes 2**31 for the largest layers
    mask_n = rn < N
    rj = tl.arange(0, BK // 2)
    mask_bytes = mask_n[:, None] & (k0 + 2 * rj < K)[None, :]
    byte = tl.load(packed_ptr + ((rn64[:, None] * K + k0) // 2 + rj[None, :]),
                   mask=mask_bytes, other=0)
    hi = (byte >> 4).to(tl.int32)
    lo = (byte & 15).to(tl.int32)
    levels = tl.load(code_ptr + tl.reshape(tl.join(hi, lo), (BN, BK)))   # 16-entry table, cached

    rb = (k0 // BLOCKSIZE) + tl.arange(0, NB)
    blk = rn64[:, None] * (K // BLOCKSIZE) + rb[None, :]
    mask_blk = mask_n[:, None] & (rb < K // BLOCKSIZE)[None, :]
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask_blk, other=0).to(tl.int32)
        group_scale = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask_blk, other=0.0)
        # multiply then add, separately rounded (the launch disables FMA contraction), as
        # bitsandbytes decodes it
        scale = tl.load(code2_ptr + q) * group_scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask_blk, other=0.0)
    w = tl.reshape(levels, (BN, NB, BLOCKSIZE)) * scale[:, :, None]
    return tl.reshape(w, (BN, BK))


@triton.jit
def _fused_linear_kernel(
    # pointers: activations and outputs
    x_ptr, out_ptr, bias_ptr, ax_ptr,
    # pointers: the weight (dense: w_ptr; NF4: w_ptr = packed bytes + the scale tensors)
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    # pointers: the adapter, A (r x K, any float dtype), B (N x r, fp32), R (r x r, fp32)
    a_ptr, b_ptr, r_ptr,
    # sizes
    M, N, K, RANK,
    # strides
    stride_xm, stride_xk, stride_om, stride_on, stride_wn, stride_wk,
    stride_an, stride_ak,
    # meta-parameters
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_ADAPTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_AX: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """out[M, N] = x[M, K] @ W[N, K]ᵀ (+ B R A x) (+ bias), fp32 accumulation."""
    # -- program id -> output tile, grouped along M so neighbouring programs share W tiles ---
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rr = tl.arange(0, R_PAD)
    mask_r = rr < RANK
    ax = tl.zeros((BM, R_PAD), dtype=tl.float32)

    # -- K loop: main product and A x from the same x tile --------------------------------------
    for k0 in range(0, K, BK):
        kk = k0 + rk
        mask_k = kk < K
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if IS_NF4:
            w = _nf4_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
                          rn, k0, N, K, BN, BK, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        else:
            w = tl.load(w_ptr + rn64[:, None] * stride_wn + kk[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w = w.to(x.dtype)
        if FP32_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        if HAS_ADAPTER:
            a = tl.load(a_ptr + rr[:, None] * stride_an + kk[None, :] * stride_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(x.dtype)
            if FP32_DOT:
                ax = tl.dot(x, tl.trans(a), ax, input_precision="ieee")
            else:
                ax = tl.dot(x, tl.trans(a), ax)

    # -- epilogue: + (A x) Rᵀ Bᵀ, + bias, one rounding -------------------------------------------
    if HAS_ADAPTER:
        r = tl.load(r_ptr + rr[:, None] * RANK + rr[None, :],
                    mask=mask_r[:, None] & mask_r[None, :], other=0.0)
        z = tl.dot(ax, tl.trans(r), input_precision="ieee")                     # (BM, R_PAD)
        b = tl.load(b_ptr + rn64[:, None] * RANK + rr[None, :],
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)          # (BN, R_PAD)
        acc += tl.dot(z, tl.trans(b), input_precision="ieee")
        if STORE_AX:
            if pid_n == 0:
                tl.store(ax_ptr + rm64[:, None] * RANK + rr[None, :], ax,
                         mask=mask_m[:, None] & mask_r[None, :])
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class KernelConfig:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8


def pick_config(M: int, N: int, K: int) -> KernelConfig:
    """The tile shape for a problem: the one place the forward's dispatch is decided.

    * M <= 16 (decode): one 16-row tile, narrow N tiles so that N / BN programs fill the GPU
      and each streams its rows of W with 16-byte loads (BK/2 = 64 bytes per row per step);
    * M <= 64: the same, taller;
    * larger M (prefill, training): 128 x 128 tensor-core tiles, grouped along M for L2 reuse.
    Under the interpreter one small tile keeps CPU runs short.
    """
    if interpreting():
        return KernelConfig(BM=16, BN=32, BK=64, num_warps=1, num_stages=1)
    if M <= 16:
        return KernelConfig(BM=16, BN=32 if N <= 4096 else 64, BK=128, num_warps=4, num_stages=4)
    if M <= 64:
        return KernelConfig(BM=64, BN=64, BK=128, num_warps=4, num_stages=4)
    return KernelConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def check_supported(x: torch.Tensor, weight: Union[NF4Weight, torch.Tensor]) -> Optional[str]:
    """None when the kernel takes (x, weight), else the reason it does not."""
    if not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
        return (f"x is on {x.device}; the Triton kernels run on CUDA devices, or on the CPU under "
                "TRITON_INTERPRET=1")
    wdev = weight.device
    if wdev != x.device:
        return f"x is on {x.device} but the weight is on {wdev}"
    if x.dtype not in _DOT_DTYPES:
        return f"unsupported activation dtype {x.dtype}"
    if isinstance(weight, NF4Weight):
        if weight.shape[1] % weight.blocksize != 0:
            return (f"K={weight.shape[1]} is not a multiple of the NF4 block size "
                    f"{weight.blocksize}, so rows do not start on a block")
        if weight.blocksize not in (64, 128, 256):
            return f"NF4 block size {weight.blocksize} is not supported by the kernel"
        if weight.double_quant and weight.offset.device != x.device:
            return "the double-quant offset is not on the weight's device"
    elif weight.dtype not in _DOT_DTYPES:
        return f"unsupported weight dtype {weight.dtype}"
    return None


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
    why = check_supported(x, weight)
    if why is not None:
        raise ValueError(f"fused_linear: {why}")
    is_nf4 = isinstance(weight, NF4Weight)
    n, k = weight.shape if is_nf4 else tuple(weight.shape)
    if x.shape[-1] != k:
        raise ValueError(f"fused_linear: x has {x.shape[-1]} features, the weight expects {k}")
    if factors is not None:
        rank = factors.A.shape[0]
        if not 1 <= rank <= MAX_RANK:
            raise ValueError(f"fused_linear: adapter rank {rank} is outside [1, {MAX_RANK}]")
        if factors.A.shape != (rank, k) or factors.B.shape != (n, rank) or \
                factors.R.shape != (rank, rank):
            raise ValueError(f"fused_linear: adapter shapes A {tuple(factors.A.shape)}, B "
                             f"{tuple(factors.B.shape)}, R {tuple(factors.R.shape)} do not fit "
                             f"an ({n}, {k}) layer")
        for name, t in (("A", factors.A), ("B", factors.B), ("R", factors.R)):
            if t.device != x.device:
                raise ValueError(f"fused_linear: adapter factor {name} is on {t.device}, x on "
                                 f"{x.device}")
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"fused_linear: bias must be ({n},) on {x.device}")

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
    if m == 0:
        return (out.view(*lead, n), ax) if store_ax else out.view(*lead, n)

    cfg = config or pick_config(m, n, k)
    if factors is not None:
        A = factors.A
        B = factors.B.to(torch.float32).contiguous()
        R = factors.R.to(torch.float32).contiguous()
    else:
        A = B = R = out                                  # placeholders, never read
    dummy = out
    if is_nf4:
        w_args = (weight.packed, weight.absmax,
                  weight.absmax2 if weight.double_quant else dummy,
                  weight.code2 if weight.double_quant else dummy,
                  weight.offset if weight.double_quant else dummy, weight.code)
        stride_w = (0, 0)
    else:
        w_args = (weight, dummy, dummy, dummy, dummy, dummy)
        stride_w = weight.stride()
    grid = (triton.cdiv(m, cfg.BM) * triton.cdiv(n, cfg.BN),)
    _fused_linear_kernel[grid](
        x2, out, bias if bias is not None else dummy, ax if ax is not None else dummy,
        *w_args, A, B, R,
        m, n, k, rank,
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), *stride_w,
        A.stride(0) if factors is not None else 0, A.stride(1) if factors is not None else 0,
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
        R_PAD=max(16, triton.next_power_of_2(max(rank, 1))),
        BLOCKSIZE=weight.blocksize if is_nf4 else 64,
        BLOCKSIZE2=weight.blocksize2 if is_nf4 else 256,
        IS_NF4=is_nf4, DOUBLE_QUANT=is_nf4 and weight.double_quant,
        HAS_ADAPTER=factors is not None, HAS_BIAS=bias is not None, STORE_AX=ax is not None,
        FP32_DOT=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    out = out.view(*lead, n)
    return (out, ax) if store_ax else out
