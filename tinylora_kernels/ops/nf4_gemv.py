"""NF4 GEMV for decode (M = 1..4): ``y = x Wᵀ + (B R) (A x) [+ bias]``, split over K.

Shaped for bandwidth rather than for tensor cores:

* each program owns BN rows and one K slice (``SPLIT`` slices in all, so that small N — k/v —
  and long K — down — still put enough programs on the card); it streams BKH packed bytes per
  row per step as NB = BKH / 32 whole NF4 blocks, so masks are per block and each lane's bytes
  load as one vector;
* each byte gives both its levels by one gather from a 256-entry table of level pairs; each
  64-weight block sums ``level x x`` first and multiplies by its scale once
  (``Σ_b s_b Σ_j l_j x_j``), fp32 throughout — the weight is never rounded to 16 bits, so this
  is at least as exact as decoding; the per-block sums stay in their block slot across steps
  and are reduced once, after the loop;
* the adapter is folded in: after the weight loop, a short loop over the same K slice gives the
  slice's share of ``A x`` (r numbers per row of x; products kept per element, reduced across
  threads once), which meets ``B R`` (N x r, fp32, one small product per call) in the same
  program — no extra launch, no extra pass over the output, and nothing of the adapter in the
  weight loop;
* split over K, each slice stores fp32 partial sums and the slice that finishes last for its
  rows (an arrival count per row tile) adds them in slice order and writes the output — one
  launch per call, and deterministic (same input, same bits); with one slice the GEMV kernel
  writes the output directly;
* projections of one x (q/k/v, gate/up) can share one launch (:func:`nf4_gemv_group`), each
  tile computed as the single GEMV computes it.
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
from .tiles import nf4_pointer_args, rows_ax

__all__ = ["nf4_gemv", "nf4_gemv_group"]


# One projection's arguments, in this order (the single and the grouped kernel take them alike):
#   out_ptr: fp32 partial sums (SPLIT, M, N) (or the output, DIRECT); y_ptr: the output (M, N);
#   bias_ptr; the NF4 weight: packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, and
#   pair_ptr: 256 int64, byte b -> (level[b >> 4], level[b & 15]); the adapter: a_ptr A (r, K)
#   and br_ptr BR = B R (N, r) fp32 (ROW_ADAPTERS: (n, N, r), one per adapter); N; A's strides.
# Shared: x_ptr (M, K); count_ptr: one int32 arrival count per row tile (zero between launches;
# split K only); rows_ptr: the adapter of each row of x (int32, ROW_ADAPTERS only); M, K,
# KH = K / 2 (bytes per row), K_SLICE (weights per K slice, a multiple of 2 BKH), x's strides.
@triton.jit
def _nf4_gemv_kernel(
    x_ptr, count_ptr, rows_ptr, M, K, KH, K_SLICE, stride_xm, stride_xk,
    out_ptr, y_ptr, bias_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    pair_ptr, a_ptr, br_ptr, N, stride_an, stride_ak,
    BN: tl.constexpr, BKH: tl.constexpr, M_PAD: tl.constexpr, RANK: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_ADAPTER: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_ADAPTERS: tl.constexpr, BKA: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One projection: program (pid_n, pid_k) computes row tile pid_n over K slice pid_k."""
    _gemv_tile(tl.program_id(0), tl.program_id(1), x_ptr, count_ptr, rows_ptr, M, K, KH, K_SLICE,
               stride_xm, stride_xk, out_ptr, y_ptr, bias_ptr, packed_ptr, absmax_ptr,
               absmax2_ptr, code2_ptr, offset_ptr, pair_ptr, a_ptr, br_ptr, N, stride_an,
               stride_ak, BN, BKH, M_PAD, RANK, R_PAD, BLOCKSIZE2, DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS,
               DIRECT, EVEN_K, ROW_ADAPTERS, BKA, PREFETCH)


@triton.jit
def _nf4_gemv_group_kernel(
    x_ptr, count_ptr, rows_ptr, M, K, KH, K_SLICE, stride_xm, stride_xk,
    o0, y0, bias0, p0, am0, am20, c20, off0, pair0, a0, br0, N0, san0, sak0,
    o1, y1, bias1, p1, am1, am21, c21, off1, pair1, a1, br1, N1, san1, sak1,
    # projection 2 (ignored when NUM_PROJ == 2)
    o2, y2, bias2, p2, am2, am22, c22, off2, pair2, a2, br2, N2, san2, sak2,
    NUM_PROJ: tl.constexpr,
    BN: tl.constexpr, BKH: tl.constexpr, M_PAD: tl.constexpr, RANK: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_ADAPTER: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_ADAPTERS: tl.constexpr, BKA: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Two or three projections of the same x (q/k/v, gate/up) in ONE launch: the programs
    along axis 0 cover the row tiles of every projection in turn (their arrival counts too);
    each computes its tile exactly as the single kernel does."""
    t0 = tl.cdiv(N0, BN)
    t1 = tl.cdiv(N1, BN)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    if pid < t0:
        _gemv_tile(pid, pid_k, x_ptr, count_ptr, rows_ptr, M, K, KH, K_SLICE, stride_xm,
                   stride_xk, o0, y0, bias0, p0, am0, am20, c20, off0, pair0, a0, br0, N0, san0,
                   sak0, BN, BKH, M_PAD, RANK, R_PAD, BLOCKSIZE2, DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS,
               DIRECT, EVEN_K, ROW_ADAPTERS, BKA, PREFETCH)
    elif pid < t0 + t1:
        _gemv_tile(pid - t0, pid_k, x_ptr, count_ptr + t0, rows_ptr, M, K, KH, K_SLICE,
                   stride_xm, stride_xk, o1, y1, bias1, p1, am1, am21, c21, off1, pair1, a1,
                   br1, N1, san1, sak1, BN, BKH, M_PAD, RANK, R_PAD, BLOCKSIZE2, DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS,
               DIRECT, EVEN_K, ROW_ADAPTERS, BKA, PREFETCH)
    else:
        if NUM_PROJ == 3:
            _gemv_tile(pid - t0 - t1, pid_k, x_ptr, count_ptr + t0 + t1, rows_ptr, M, K, KH,
                       K_SLICE, stride_xm, stride_xk, o2, y2, bias2, p2, am2, am22, c22, off2,
                       pair2, a2, br2, N2, san2, sak2, BN, BKH, M_PAD, RANK, R_PAD, BLOCKSIZE2, DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS,
               DIRECT, EVEN_K, ROW_ADAPTERS, BKA, PREFETCH)


@triton.jit
def _gemv_tile(
    pid_n, pid_k, x_ptr, count_ptr, rows_ptr, M, K, KH, K_SLICE, stride_xm, stride_xk,
    out_ptr, y_ptr, bias_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    pair_ptr, a_ptr, br_ptr, N, stride_an, stride_ak,
    BN: tl.constexpr, BKH: tl.constexpr, M_PAD: tl.constexpr, RANK: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_ADAPTER: tl.constexpr, HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_ADAPTERS: tl.constexpr, BKA: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Rows pid_n*BN.., K slice pid_k: acc[n, m] = Σ_k W[n, k] x[m, k] (+ BR[n] · A x[m]).

    A step reads BKH bytes of each of BN rows as a (BN, NB, 32) tile: NB = BKH / 32 NF4 blocks
    of 32 bytes (64 weights). Each byte gives both its levels by ONE gather from the 256-entry
    pair table (8 bytes: the two fp32 levels side by side). Per block, Σ level x is reduced over
    the block's 32 bytes and multiplied by the block's scale once; the (BN, NB) partial sums stay
    per block slot across steps and are reduced once after the loop (no cross-thread reduction
    in the loop). With ``EVEN_K`` (every slice a whole number of steps) the byte loads are masked
    by row only, so each thread's 16 bytes load as one vector.
    """
    NB: tl.constexpr = BKH // 32
    rn = pid_n * BN + tl.arange(0, BN)
    mask_n = rn < N
    rn64 = rn.to(tl.int64)
    rb = tl.arange(0, NB)
    rj = tl.arange(0, 32)
    cols = tl.arange(0, M_PAD)
    k_lo = pid_k * K_SLICE
    k_hi = tl.minimum(K, k_lo + K_SLICE)
    # byte offsets of one step within the rows' K range: (NB, 32), and the x pairs: (NB, 32, 2)
    step_bytes = rb[:, None] * 32 + rj[None, :]
    xcol = (2 * step_bytes)[:, :, None] + tl.arange(0, 2)[None, None, :]

    acc = tl.zeros((BN, NB, M_PAD), dtype=tl.float32)
    ax = tl.zeros((M_PAD, R_PAD), dtype=tl.float32)        # A x of this slice (adapter only)
    step = 2 * BKH
    if PREFETCH:
        byte, s_raw, s_group = _step_loads(packed_ptr, absmax_ptr, absmax2_ptr, rn64, mask_n,
                                           rb, step_bytes, k_lo, k_hi, K, KH, BLOCKSIZE2,
                                           DOUBLE_QUANT, EVEN_K)
    for k0 in range(k_lo, k_hi, step):
        if PREFETCH:
            # the NEXT step's weight bytes and block scales are loaded first, so that their
            # memory latency overlaps this step's work (two stages in registers; Triton
            # pipelines only loops that feed tl.dot). The last step loads itself again, unused.
            k_next = tl.maximum(k_lo, tl.minimum(k0 + step, k_hi - step))
            byte_n, s_raw_n, s_group_n = _step_loads(packed_ptr, absmax_ptr, absmax2_ptr, rn64,
                                                     mask_n, rb, step_bytes, k_next, k_hi, K,
                                                     KH, BLOCKSIZE2, DOUBLE_QUANT, EVEN_K)
        else:
            byte, s_raw, s_group = _step_loads(packed_ptr, absmax_ptr, absmax2_ptr, rn64,
                                               mask_n, rb, step_bytes, k0, k_hi, K, KH,
                                               BLOCKSIZE2, DOUBLE_QUANT, EVEN_K)
        acc = _step_sums(acc, byte, s_raw, s_group, x_ptr, code2_ptr, offset_ptr, pair_ptr, rb,
                         xcol, cols, k0, k_hi, M, stride_xm, stride_xk, M_PAD, DOUBLE_QUANT,
                         EVEN_K)
        if PREFETCH:
            byte, s_raw, s_group = byte_n, s_raw_n, s_group_n

    out = tl.sum(acc, axis=1)                                        # (BN, M_PAD)
    if HAS_ADAPTER:
        ax = rows_ax(x_ptr, a_ptr, k_lo, k_hi, M, stride_xm, stride_xk, stride_an, stride_ak,
                     M_PAD, RANK, R_PAD, BKA)
    out = _adapter_epilogue(out, ax, br_ptr, rows_ptr, rn, mask_n, M, N, RANK, R_PAD, M_PAD,
                            HAS_ADAPTER, ROW_ADAPTERS)
    _gemv_store(out, out_ptr, y_ptr, bias_ptr, count_ptr, rn, mask_n, M, N, pid_n, pid_k, BN,
                M_PAD, HAS_BIAS, DIRECT)


@triton.jit
def _step_sums(acc, byte, s_raw, s_group, x_ptr, code2_ptr, offset_ptr, pair_ptr, rb, xcol,
               cols, k0, k_hi, M, stride_xm, stride_xk, M_PAD: tl.constexpr,
               DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr):
    """``acc`` (BN, NB, M_PAD) plus one step's per-block sums Σ level x, scaled, for every row
    of x, from the step's loaded bytes and raw scales (:func:`_step_loads`)."""
    if EVEN_K:
        in_k = rb >= 0
    else:
        in_k = (k0 + 64 * rb) < k_hi                         # (NB,)
    pair = tl.load(pair_ptr + byte.to(tl.int32))             # (BN, NB, 32) int64
    lev_even = pair.to(tl.int32).to(tl.float32, bitcast=True)
    lev_odd = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    if DOUBLE_QUANT:
        # multiply then add, separately rounded (the launch disables FMA contraction), as
        # bitsandbytes decodes it
        scale = tl.load(code2_ptr + s_raw) * s_group + tl.load(offset_ptr)
    else:
        scale = s_raw                                        # (BN, NB): once per block
    kx = k0 + xcol                                           # (NB, 32, 2)
    mask_kx = in_k[:, None, None] & (xcol >= 0)
    for m in tl.static_range(M_PAD):
        # (the row test as a tensor of kx's shape: a scalar operand gives the mask a dtype
        # that Triton 3.9's interpreter refuses)
        mask_x = mask_kx & ((kx * 0 + m) < M)
        xp = tl.load(x_ptr + m * stride_xm + kx * stride_xk, mask=mask_x,
                     other=0.0).to(tl.float32)               # (NB, 32, 2)
        x_even, x_odd = tl.split(xp)
        per_byte = lev_even * x_even[None, :, :] + lev_odd * x_odd[None, :, :]
        per_block = tl.sum(per_byte, axis=2) * scale         # (BN, NB)
        acc += tl.where(cols[None, None, :] == m, per_block[:, :, None], 0.0)
    return acc


@triton.jit
def _step_loads(packed_ptr, absmax_ptr, absmax2_ptr, rn64, mask_n, rb, step_bytes, k0, k_hi, K,
                KH, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, EVEN_K: tl.constexpr):
    """The memory reads of one GEMV step at K offset ``k0``, nothing computed from them: the
    packed bytes (BN, NB, 32) and the blocks' raw scales — (absmax code uint8 as int32, its
    group's absmax2) with double quantization, else (absmax, absmax)."""
    # K slices and K are whole blocks: masks are per block (uniform over its 32 bytes, so each
    # thread's bytes still load as one vector), and by row only with EVEN_K
    if EVEN_K:
        in_k = rb >= 0
    else:
        in_k = (k0 + 64 * rb) < k_hi                                 # (NB,)
    mask_b = mask_n[:, None] & in_k[None, :]                         # (BN, NB)
    b_ptrs = rn64[:, None, None] * KH + (k0 // 2 + step_bytes)[None, :, :]
    byte = tl.load(packed_ptr + b_ptrs, mask=mask_b[:, :, None], other=0)
    blk = rn64[:, None] * (K // 64) + (k0 // 64 + rb)[None, :]
    if DOUBLE_QUANT:
        raw = tl.load(absmax_ptr + blk, mask=mask_b, other=0).to(tl.int32)
        group = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask_b, other=0.0)
    else:
        raw = tl.load(absmax_ptr + blk, mask=mask_b, other=0.0).to(tl.float32)
        group = raw
    return byte, raw, group


@triton.jit
def _adapter_epilogue(out, ax, br_ptr, rows_ptr, rn, mask_n, M, N, RANK: tl.constexpr,
                      R_PAD: tl.constexpr, M_PAD: tl.constexpr, HAS_ADAPTER: tl.constexpr,
                      ROW_ADAPTERS: tl.constexpr):
    """``out`` (BN, M_PAD) plus this slice's share of (B R)(A x) (``ax`` (M_PAD, R_PAD): A x of
    the slice) when there is an adapter."""
    if HAS_ADAPTER:
        # BR (BN, r) against A x (M, r)
        rn64 = rn.to(tl.int64)
        cols = tl.arange(0, M_PAD)
        rr = tl.arange(0, R_PAD)
        mask_r = rr < RANK
        br_offs = rn64[:, None] * RANK + rr[None, :]
        mask_br = mask_n[:, None] & mask_r[None, :]
        br = tl.load(br_ptr + br_offs, mask=mask_br, other=0.0)
        for m in tl.static_range(M_PAD):
            if ROW_ADAPTERS:       # row m's own adapter (rows past M read row M - 1's: unused)
                code = tl.load(rows_ptr + tl.minimum(M - 1, m)).to(tl.int64)
                br = tl.load(br_ptr + code * N * RANK + br_offs, mask=mask_br, other=0.0)
            ax_m = tl.sum(tl.where(cols[:, None] == m, ax, 0.0), axis=0)   # (R_PAD,)
            part = tl.sum(br * ax_m[None, :], axis=1)
            out += tl.where(cols[None, :] == m, part[:, None], 0.0)
    return out


@triton.jit
def _gemv_store(out, part_ptr, y_ptr, bias_ptr, count_ptr, rn, mask_n, M, N, pid_n, pid_k,
                BN: tl.constexpr, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                DIRECT: tl.constexpr):
    """Store the slice's sums ``out`` (BN, M_PAD): with one slice (``DIRECT``) into the output
    with the bias. Split over K, into slice ``pid_k``'s fp32 partial sums; then the slice that
    arrives last at its row tile's count adds every slice's partial sums in the order 0, 1, ...
    (the same bits whichever finishes last), adds the bias, writes the output and sets the count
    back to zero: no second launch."""
    rn64 = rn.to(tl.int64)
    cols = tl.arange(0, M_PAD)
    mask_out = mask_n[:, None] & (cols < M)[None, :]
    offs = cols[None, :].to(tl.int64) * N + rn64[:, None]
    if DIRECT:
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask_out)
    else:
        split = tl.num_programs(1)
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + offs, out, mask=mask_out)
        # every thread's stores before the count; the count's release/acquire orders them
        # against the last slice's loads (which skip L1, filled before the other SMs wrote)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == split - 1:
            total = tl.zeros((BN, M_PAD), dtype=tl.float32)
            slice_ptrs = part_ptr + offs
            for _ in range(0, split):
                total += tl.load(slice_ptrs, mask=mask_out, other=0.0, cache_modifier=".cg")
                slice_ptrs += M * N
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=mask_out)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")


#: (device, stream) -> int32 arrival counts, zero between launches (each launch resets its own)
_COUNTS: dict = {}


def _arrival_counts(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counts for ``tiles`` row tiles, kept per device and stream (launches on one
    stream run in order, so they can share them; another stream gets its own). Under CUDA graph
    capture a fresh zeroed buffer is captured with the graph instead."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(tiles, dtype=torch.int32, device=device)
        key = (device.type, device.index, stream.cuda_stream)
    else:
        key = (device.type, device.index, 0)
    counts = _COUNTS.get(key)
    if counts is None or counts.numel() < tiles:
        counts = _COUNTS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return counts


#: code tensor -> its pair table; the levels are frozen with the weight (kept by identity)
_PAIR_TABLES: dict = {}


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """The 256-entry table the GEMV gathers from: entry b holds (code[b >> 4], code[b & 15]) as
    two fp32 side by side, read as one int64 (little-endian: the even column's level is the low
    word). One table per code tensor (the 16 levels are fixed for a quantized weight)."""
    key = (code.data_ptr(), code.device, code._version)
    kept = _PAIR_TABLES.get(key)
    if kept is not None and kept[0] is code:     # (holding code: its address is not reused)
        return kept[1]
    byte = torch.arange(256, device=code.device)
    levels = code.float()
    table = torch.stack((levels[byte >> 4], levels[byte & 15]), 1).contiguous()
    table = table.view(torch.int64).reshape(256)
    if len(_PAIR_TABLES) > 64:
        _PAIR_TABLES.clear()
    _PAIR_TABLES[key] = (code, table)
    return table


def _ax_width(m: int, interpreted: bool) -> int:
    """K columns per step of the A x loop: (M_PAD x r x BKA) fp32 products held per CTA, ~16
    registers per thread at 4 warps (under the interpreter 128, wider than the tests' 64-column
    slices, so the K mask of a part-filled step is exercised)."""
    return 128 if interpreted else 1024 // triton.next_power_of_2(m)


def _slices(k: int, cfg: GemvConfig):
    """(weights per K slice, number of slices) of a launch: whole steps per slice."""
    step = 2 * cfg.BKH
    k_slice = step * triton.cdiv(triton.cdiv(k, cfg.split), step)
    return k_slice, triton.cdiv(k, k_slice)


def _projection(weight: NF4Weight, bias, factors, out: torch.Tensor, split: int) -> tuple:
    """One projection's launch arguments (the order the kernels take them); B R (N x r, fp32)
    formed here, one small product (with row adapters B @ R_set: (n, N, r), one per adapter)."""
    n, _ = weight.shape
    rank = 0 if factors is None else factors.A.shape[0]
    br = None if factors is None else (factors.B.float() @ factors.R.float()).contiguous()
    parts = out if split == 1 else torch.empty(split, *out.shape, dtype=torch.float32,
                                               device=out.device)
    A = factors.A if factors is not None else out
    packed, absmax, absmax2, code2, offset, code = nf4_pointer_args(weight, out)
    return (parts, out, bias if bias is not None else out, packed, absmax, absmax2, code2,
            offset, pair_table(code), A, br if br is not None else out, n,
            A.stride(0) if rank else 0, A.stride(1) if rank else 0)


def _meta(weight: NF4Weight, bias, factors, m: int, k: int, k_slice: int, split: int,
          cfg: GemvConfig, row_codes) -> dict:
    rank = 0 if factors is None else factors.A.shape[0]
    return dict(BN=cfg.BN, BKH=cfg.BKH, M_PAD=triton.next_power_of_2(m), RANK=max(rank, 1),
                R_PAD=triton.next_power_of_2(max(rank, 1)), BLOCKSIZE2=weight.blocksize2,
                DOUBLE_QUANT=weight.double_quant, HAS_ADAPTER=factors is not None,
                HAS_BIAS=bias is not None, DIRECT=split == 1, EVEN_K=k % k_slice == 0,
                ROW_ADAPTERS=row_codes is not None, BKA=_ax_width(m, interpreting()),
                PREFETCH=cfg.prefetch, num_warps=cfg.num_warps)


def nf4_gemv(x: torch.Tensor, weight: NF4Weight, bias: Optional[torch.Tensor],
             factors: Optional[AdapterFactors], *, out_dtype: torch.dtype,
             config: Optional[GemvConfig] = None,
             out: Optional[torch.Tensor] = None,
             row_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x Wᵀ + B (R (A x)) + bias`` for x (..., K) with at most :data:`GEMV_MAX_M` rows.

    The caller has checked the call (the router's plan: NF4 storage with 64-weight blocks, x on
    the weight's device). ``out``: a contiguous (M, N) buffer to write into. ``row_codes`` (M,)
    int32: per-row adapters; factors.R then holds one R per adapter (n, r, r) and row m uses
    R[row_codes[m]].
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
    k_slice, split = _slices(k, cfg)
    tiles = triton.cdiv(n, cfg.BN)
    counts = out if split == 1 else _arrival_counts(x.device, tiles)
    _nf4_gemv_kernel[(tiles, split)](
        x2, counts, out if row_codes is None else row_codes, m, k, k // 2, k_slice,
        x2.stride(0), x2.stride(1), *_projection(weight, bias, factors, out, split),
        **_meta(weight, bias, factors, m, k, k_slice, split, cfg, row_codes))
    return out.view(*lead, n)


def nf4_gemv_group(x: torch.Tensor, projections, *, out_dtype: torch.dtype,
                   config: Optional[GemvConfig] = None) -> list:
    """Two or three NF4 projections of one x (q/k/v, gate/up) at decode in ONE launch.

    ``projections``: ``(weight, bias, factors)`` each, as :func:`nf4_gemv` takes them, with the
    same K and storage settings, all with or all without bias and adapter (one rank). Returns
    their outputs. ``config``: one launch shape for all (default: :func:`gemv_config` of their
    rows together)."""
    projections = list(projections)
    if not 2 <= len(projections) <= 3:
        raise ValueError(f"nf4_gemv_group takes 2 or 3 projections, got {len(projections)}")
    w0, b0, f0 = projections[0]

    def kind(w, b, f):
        if not isinstance(w, NF4Weight):
            return ("not NF4", type(w).__name__)
        return (w.shape[1], w.double_quant, w.blocksize2, b is None,
                None if f is None else f.A.shape[0])

    for i, p in enumerate(projections[1:], 1):
        if kind(*p) != kind(w0, b0, f0):
            raise ValueError(f"nf4_gemv_group: projection {i} differs from projection 0 in K, "
                             f"storage, bias or adapter rank: {kind(*p)} vs {kind(w0, b0, f0)}")
    k = w0.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x.shape[-1] != k or m > GEMV_MAX_M:
        raise ValueError(f"nf4_gemv_group takes x (..., {k}) with at most {GEMV_MAX_M} rows, "
                         f"got {tuple(x.shape)}")
    outs = [torch.empty(m, w.shape[0], dtype=out_dtype, device=x.device)
            for w, _, _ in projections]
    if m > 0:
        cfg = config or gemv_config(sum(w.shape[0] for w, _, _ in projections), k)
        k_slice, split = _slices(k, cfg)
        tiles = sum(triton.cdiv(w.shape[0], cfg.BN) for w, _, _ in projections)
        counts = outs[0] if split == 1 else _arrival_counts(x.device, tiles)
        packs = [_projection(w, b, f, o, split) for (w, b, f), o in zip(projections, outs)]
        packs += [packs[-1]] * (3 - len(packs))          # an unused third slot
        _nf4_gemv_group_kernel[(tiles, split)](
            x2, counts, outs[0], m, k, k // 2, k_slice, x2.stride(0), x2.stride(1),
            *packs[0], *packs[1], *packs[2], NUM_PROJ=len(projections),
            **_meta(w0, b0, f0, m, k, k_slice, split, cfg, None))
    return [o.view(*lead, o.shape[1]) for o in outs]
