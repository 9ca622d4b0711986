"""The fused linear kernel: ``y = x Wᵀ + B (R (A x)) [+ bias]`` in one launch, W in NF4
(bitsandbytes storage) or dense; the kernel of the decode and small-M sizes.

One Triton kernel, specialized by ``tl.constexpr`` flags (NF4 or dense weight, double quant,
adapter, bias), tiled over (M, N) with a K loop:

* the weight tile is read straight from bitsandbytes' packed storage and decoded in registers
  (:func:`~tinylora_kernels.ops.tiles.nf4_tile`, the one NF4 decode every kernel uses);
* ``x`` tiles feed both the main product and the rank-r projection ``A x``, accumulated in the
  same K loop (fp32);
* the epilogue adds ``(A x) Rᵀ Bᵀ`` (fp32) and the bias, and rounds once to the output dtype;
  optionally it writes ``A x`` (M x r, fp32) for the backward pass.

A second entry point launches two or three projections that share their input (q/k/v,
gate/up) at once, each read where it lies. No atomics: every output element is written by
exactly one program, so results are deterministic. The launchers check their inputs, allocate
the outputs and launch; nothing in them synchronizes with the device.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Weight
from ..torch_path import AdapterFactors
from .configs import MAX_RANK, KernelConfig, check_supported, pick_config
from .tiles import adapter_args, nf4_levels, padded_rows_ax, weight_args, weight_tile

__all__ = ["fused_linear", "fused_linear_group", "launch_fused_linear"]


@triton.jit
def _linear_tile(
    pid_m, pid_n,
    x_ptr, out_ptr, bias_ptr, ax_ptr,
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    a_ptr, b_ptr, r_ptr, rows_ptr,
    M, N, K, KH, RANK: tl.constexpr,
    stride_xm, stride_xk, stride_om, stride_on, stride_wn, stride_wk,
    stride_an, stride_ak,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_ADAPTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_AX: tl.constexpr, FP32_DOT: tl.constexpr,
    AX_DOT: tl.constexpr, TABLE: tl.constexpr, ROW_ADAPTERS: tl.constexpr,
    AX_AFTER: tl.constexpr, R_TAIL: tl.constexpr, BKA: tl.constexpr,
):
    """Output tile (pid_m, pid_n): x[M, K] @ W[N, K]ᵀ (+ B R A x) (+ bias), fp32 accumulation.
    With ROW_ADAPTERS, R holds one r x r matrix per adapter and row m uses R[rows[m]]
    (per-sequence adapters).

    The K loop runs over pairs of half tiles (even and odd columns), each a tensor-core dot of
    depth BK/2: NF4 bytes decode straight into that layout.
    """
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rj = tl.arange(0, BK // 2)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    mask_r = rr < RANK

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ax = tl.zeros((BM, R_PAD), dtype=tl.float32)
    if IS_NF4:
        if TABLE:
            levels = code_ptr
        else:
            levels = nf4_levels(code_ptr)
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
        w_even, w_odd = weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
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
        elif HAS_ADAPTER and not AX_AFTER:
            # r (<= 16) dot products per row on the CUDA cores: A x costs r/BN of the main
            # product's work and needs no padded tensor-core tile
            for i in tl.static_range(RANK):     # unrolled: a loop inside would keep the
                a_row = a_ptr + i * stride_an      # K loop from being software-pipelined
                a_even = tl.load(a_row + ke * stride_ak, mask=mask_k, other=0.0).to(tl.float32)
                a_odd = tl.load(a_row + (ke + 1) * stride_ak, mask=mask_k,
                                other=0.0).to(tl.float32)
                part = tl.sum(x_even.to(tl.float32) * a_even[None, :]
                              + x_odd.to(tl.float32) * a_odd[None, :], axis=1)
                ax += tl.where(rr[None, :] == i, part[:, None], 0.0)

    if HAS_ADAPTER and AX_AFTER and not AX_DOT:
        ax = padded_rows_ax(ax, x_ptr, a_ptr, pid_m * BM, M, K, stride_xm, stride_xk,
                            stride_an, stride_ak, BM, RANK, R_PAD, R_TAIL, BKA)
    _linear_epilogue(acc, ax, pid_n, rm, rn, out_ptr, bias_ptr, ax_ptr, b_ptr, r_ptr, rows_ptr,
                     M, N, RANK, stride_om, stride_on, R_PAD, HAS_ADAPTER, HAS_BIAS, STORE_AX,
                     ROW_ADAPTERS)


@triton.jit
def _linear_epilogue(acc, ax, pid_n, rm, rn, out_ptr, bias_ptr, ax_ptr, b_ptr, r_ptr, rows_ptr,
                     M, N, RANK, stride_om, stride_on, R_PAD: tl.constexpr,
                     HAS_ADAPTER: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AX: tl.constexpr,
                     ROW_ADAPTERS: tl.constexpr):
    """The tile's epilogue: ``acc`` (BM, BN) + ((A x) Rᵀ) Bᵀ (``ax`` (BM, R_PAD): A x of the
    tile's rows; with ROW_ADAPTERS each row's own R) + bias, rounded once and stored; A x
    stored too (``STORE_AX``, by the first column of tiles)."""
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rr = tl.arange(0, R_PAD)
    mask_r = rr < RANK
    if HAS_ADAPTER:
        if ROW_ADAPTERS:
            r_base = tl.load(rows_ptr + rm, mask=mask_m, other=0).to(tl.int64) * (RANK * RANK)
        for i in range(RANK):
            # z_i = sum_j ax_j R[i, j], then acc += z_i B[:, i]
            if ROW_ADAPTERS:
                r_rows = tl.load(r_ptr + r_base[:, None] + i * RANK + rr[None, :],
                                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                z_i = tl.sum(ax * r_rows, axis=1)
            else:
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
    # pointers: the adapter, A (r x K, any float dtype), B (N x r, fp32), R (r x r, fp32; with
    # ROW_ADAPTERS one per adapter), the adapter of each row (int32, ROW_ADAPTERS only)
    a_ptr, b_ptr, r_ptr, rows_ptr,
    # sizes (KH = K // 2: bytes per row of packed NF4)
    M, N, K, KH, RANK: tl.constexpr,
    # strides
    stride_xm, stride_xk, stride_om, stride_on, stride_wn, stride_wk,
    stride_an, stride_ak,
    # meta-parameters
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    IS_NF4: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_ADAPTER: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_AX: tl.constexpr, FP32_DOT: tl.constexpr,
    AX_DOT: tl.constexpr, TABLE: tl.constexpr, ROW_ADAPTERS: tl.constexpr = False,
    AX_AFTER: tl.constexpr = False, R_TAIL: tl.constexpr = 1, BKA: tl.constexpr = 128,
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
                 a_ptr, b_ptr, r_ptr, rows_ptr, M, N, K, KH, RANK,
                 stride_xm, stride_xk, stride_om, stride_on, stride_wn, stride_wk,
                 stride_an, stride_ak, BM, BN, BK, R_PAD, BLOCKSIZE2, IS_NF4, DOUBLE_QUANT,
                 HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT, TABLE, ROW_ADAPTERS,
                 AX_AFTER, R_TAIL, BKA)


@triton.jit
def _fused_group_kernel(
    x_ptr, M, K, KH, RANK: tl.constexpr, stride_xm, stride_xk,
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
    AX_DOT: tl.constexpr, TABLE: tl.constexpr, AX_AFTER: tl.constexpr = False,
    R_TAIL: tl.constexpr = 1, BKA: tl.constexpr = 128,
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
                     a0, b0, r0, r0, M, N0, K, KH, RANK, stride_xm, stride_xk, som0, son0,
                     swn0, swk0, san0, sak0, BM, BN, BK, R_PAD, BLOCKSIZE2, IS_NF4,
                     DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT, TABLE,
                     False, AX_AFTER, R_TAIL, BKA)
    elif t < t0 + t1:
        _linear_tile(pid_m, t - t0, x_ptr, o1, bias1, ax1, w1, am1, am21, c21, off1, code1,
                     a1, b1, r1, r1, M, N1, K, KH, RANK, stride_xm, stride_xk, som1, son1,
                     swn1, swk1, san1, sak1, BM, BN, BK, R_PAD, BLOCKSIZE2, IS_NF4,
                     DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT, TABLE,
                     False, AX_AFTER, R_TAIL, BKA)
    else:
        if NUM_PROJ == 3:
            _linear_tile(pid_m, t - t0 - t1, x_ptr, o2, bias2, ax2, w2, am2, am22, c22, off2,
                         code2, a2, b2, r2, r2, M, N2, K, KH, RANK, stride_xm, stride_xk,
                         som2, son2, swn2, swk2, san2, sak2, BM, BN, BK, R_PAD, BLOCKSIZE2,
                         IS_NF4, DOUBLE_QUANT, HAS_ADAPTER, HAS_BIAS, STORE_AX, FP32_DOT, AX_DOT,
                         TABLE, False, AX_AFTER, R_TAIL, BKA)


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


def _projection_args(weight, bias, factors, out, ax):
    """The 19 kernel arguments of one projection, in ``_linear_tile``'s order."""
    dummy = out                                           # placeholder, never read
    A, B, R, stride_a = adapter_args(factors, dummy)
    w_args, stride_w = weight_args(weight, dummy)
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
                AX_AFTER=cfg.ax_after, R_TAIL=triton.next_power_of_2(max(rank, 1)),
                BKA=128, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                enable_fp_fusion=False)


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
    m = x.numel() // k if k else 0
    if out is not None and (out.shape != (m, n) or out.dtype != out_dtype
                            or not out.is_contiguous() or out.device != x.device):
        raise ValueError(f"fused_linear: out must be a contiguous ({m}, {n}) {out_dtype} tensor "
                         f"on {x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return launch_fused_linear(x, weight, bias, factors, out_dtype=out_dtype, store_ax=store_ax,
                               out=out, config=config)


def launch_fused_linear(x: torch.Tensor, weight: Union[NF4Weight, torch.Tensor],
                        bias: Optional[torch.Tensor], factors: Optional[AdapterFactors], *,
                        out_dtype: torch.dtype, store_ax: bool = False,
                        out: Optional[torch.Tensor] = None,
                        config: Optional[KernelConfig] = None,
                        row_codes: Optional[torch.Tensor] = None):
    """:func:`fused_linear` without the checks: allocate and launch. For callers that validated
    the layer once (the router's plans). ``row_codes`` (M,) int32: per-row adapters, factors.R
    then holds one R per adapter (n, r, r) and row m uses R[row_codes[m]]."""
    n, k = weight.shape if isinstance(weight, NF4Weight) else tuple(weight.shape)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)            # a view when it can be; the kernel takes any strides
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
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
            R if row_codes is None else row_codes,
            m, n, k, k // 2, rank, x2.stride(0), x2.stride(1), som, son, swn, swk, san, sak,
            GROUP_M=cfg.GROUP_M, ROW_ADAPTERS=row_codes is not None,
            **_meta(weight, factors, bias, ax, x, cfg))
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
