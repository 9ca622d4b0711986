"""NF4 decode to a dense matrix in one bandwidth-bound launch (the large-M path's workspace)."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from . import interpreting
from .configs import DECODE_TILE
from .tiles import block_scale, nf4_pointer_args

__all__ = ["dequantize_nf4_triton"]


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
    scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blk, mask, BLOCKSIZE2,
                        DOUBLE_QUANT)
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
    _nf4_decode_kernel[grid](target, *nf4_pointer_args(weight, out), n, kh, target.stride(0),
                             BN=bn, BJ=bj, BLOCKSIZE=weight.blocksize,
                             BLOCKSIZE2=weight.blocksize2, DOUBLE_QUANT=weight.double_quant,
                             PACK=pack, num_warps=4, enable_fp_fusion=False)
    return out
