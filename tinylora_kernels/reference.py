"""The TinyLoRA math in plain torch: the CPU fallback and the oracle every kernel is tested against.

A TinyLoRA layer computes ``y = base(x) + B (R (A x))`` with

* ``A = Vh``            (r x K): top-r right singular vectors of the frozen weight W (N x K);
* ``B = U diag(S)``     (N x r): top-r left singular vectors scaled by the singular values;
* ``R``                 (r x r): built from the shared trainable vector v and fixed random P
  (:func:`projection_matrix`).

Nothing here ever forms the N x K matrix ``B R A``: the delta costs O(M (K + N) r) instead of
O(M N K), forward and backward. The rank-r products run in fp32 whatever the activation dtype
(autocast is switched off around them), so this path is at least as exact as the users' program,
which rounds the whole ΔW to bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight, dequantize_nf4

__all__ = [
    "PROJECTIONS",
    "AdapterFactors",
    "projection_matrix",
    "adapter_delta",
    "add_adapter",
    "nf4_linear_reference",
    "tinylora_linear_reference",
]

#: The two ways v and P make R. ``full``: P is (u, r, r) and R = sum_i v_i P_i (the paper, the
#: first users' program, the checkpoint documentation). ``diagonal``: P is (u, r), drawn then
#: divided by sqrt(r), and R = diag(v @ P) (the later users' program, all known real checkpoints).
PROJECTIONS = ("full", "diagonal")


def projection_matrix(v: torch.Tensor, P: torch.Tensor, projection: str = "full") -> torch.Tensor:
    """R (r x r, fp32) from the trainable vector v (u,) and the fixed projections P.

    Differentiable in v; the products are formed in fp32 (float64 for float64 v) whatever dtype
    v and P are stored in.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    u = v.shape[0]
    if P.shape[0] != u:
        raise ValueError(f"P holds {P.shape[0]} projections but v has {u} entries")
    with torch.autocast(v.device.type, enabled=False):
        acc = torch.promote_types(v.dtype, torch.float32)
        v32 = v.to(acc)
        if projection == "full":
            if P.dim() != 3 or P.shape[1] != P.shape[2]:
                raise ValueError(f"the 'full' projection needs P of shape (u, r, r), got "
                                 f"{tuple(P.shape)}")
            r = P.shape[1]
            return (v32 @ P.to(acc).reshape(u, r * r)).reshape(r, r)
        if P.dim() != 2:
            raise ValueError(f"the 'diagonal' projection needs P of shape (u, r), got "
                             f"{tuple(P.shape)}")
        return torch.diag(v32 @ P.to(acc))


@dataclass(frozen=True)
class AdapterFactors:
    """The rank-r adapter of one layer: ``delta(x) = B (R (A x))``.

    Any (A, B, R) triple works (TinyLoRA's, PEFT's, a plain LoRA's with R = I).
    """

    A: torch.Tensor   # (r, K)
    B: torch.Tensor   # (N, r)
    R: torch.Tensor   # (r, r)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def adapter_delta(x: torch.Tensor, f: AdapterFactors) -> torch.Tensor:
    """``B (R (A x))`` for x of shape (..., K), shape (..., N), in fp32 (float64 for float64 x)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        ax = x.to(acc) @ f.A.to(acc).t()                    # (..., r)
        return (ax @ f.R.to(acc).t()) @ f.B.to(acc).t()     # (..., N)


#: Elements of fp32 scratch per row block when adding the adapter on a CPU (1 MB: L2-sized).
_CPU_CHUNK_ELEMENTS = 1 << 18
_HALF = (torch.float16, torch.bfloat16)
_MM_OUT_DTYPE = [True]


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result; 16-bit operands are not upcast first on
    CUDA (``torch.mm(..., out_dtype=torch.float32)``, where this torch has it)."""
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE[0] = False
    return a.float() @ b.float()


def _split16(t: torch.Tensor, dtype: torch.dtype):
    """(hi, lo) in a 16-bit dtype with hi + lo == t to ~2^-16 relative (t fp32)."""
    hi = t.to(dtype)
    return hi, (t - hi.float()).to(dtype)


def _split_operands(parts_left, parts_right, dim_left: int, dim_right: int):
    """Concatenate the split parts of a rank-r product's two operands along its contraction,
    zero-padded to a multiple of 8 (16-byte rows: cuBLAS' aligned kernels). One ``cat`` each:
    the operation count matters as much as the bytes here."""
    width = sum(t.shape[dim_left] for t in parts_left)
    pad = -width % 8
    if pad:
        zl, zr = parts_left[0], parts_right[0]
        parts_left = (*parts_left, zl.new_zeros(*(pad if d == dim_left else s
                                                  for d, s in enumerate(zl.shape))))
        parts_right = (*parts_right, zr.new_zeros(*(pad if d == dim_right else s
                                                    for d, s in enumerate(zr.shape))))
    return torch.cat(parts_left, dim_left), torch.cat(parts_right, dim_right)


def _ax_fp32(x2: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x2 Aᵀ`` (M, r) in fp32 for 16-bit x2: one GEMM when A is exact in x2's dtype (a bf16
    buffer with bf16 activations), else against A split into its 16-bit part and remainder."""
    r = A.shape[0]
    if A.dtype == x2.dtype:
        return _mm_fp32(x2, A.t())
    ax2 = _mm_fp32(x2, torch.cat(_split16(A.float(), x2.dtype)).t())      # (M, 2r)
    return ax2[:, :r] + ax2[:, r:]


#: Output elements from which the split 16-bit path pays: it saves ~20 bytes of traffic per
#: output element (the fp32 round trip) but issues ~15 more small operations, and on the H200
#: machine each costs ~15 µs of host time (benchmarks/TUNING.md, v4); below this (decode, small
#: layers) the fp32 path is cheaper. An estimate from those figures, not yet measured.
_SPLIT16_MIN_ELEMENTS = 1 << 24


def _gb_fp32(g2: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``g2 B`` (M, r) in fp32 for 16-bit g2 (M, N), B split into its 16-bit part and
    remainder: one GEMM, no fp32 copy of g2."""
    r = B.shape[1]
    gb2 = _mm_fp32(g2, torch.cat(_split16(B.float(), g2.dtype), 1))       # (M, 2r)
    return gb2[:, :r] + gb2[:, r:]


def _use_split16(base, x, out_dtype, acc) -> bool:
    """Whether the adapter is added by one 16-bit GEMM with split operands (CUDA, all 16-bit,
    large outputs)."""
    return (base.is_cuda and acc == torch.float32 and base.dtype in _HALF
            and x.dtype == base.dtype == out_dtype and base.numel() >= _SPLIT16_MIN_ELEMENTS)


def _use_split16_grad(g, x_dtype, acc) -> bool:
    """The backward's counterpart of :func:`_use_split16`."""
    return (g.is_cuda and acc == torch.float32 and g.dtype in _HALF and x_dtype == g.dtype
            and g.numel() >= _SPLIT16_MIN_ELEMENTS)


def _add_adapter_values(base, x, A, B, R, out_dtype, split16: Optional[bool] = None):
    """(out, x in acc dtype, A x, z = (A x) Rᵀ): the forward of ``tinylora::add_adapter``.

    Two ways, the same function to fp32 accuracy and one rounding of the output:

    * 16-bit tensors on CUDA (``split16``): ``out = base + [z_hi z_lo z_hi] [B_hi B_hi B_lo]ᵀ``
      as ONE cuBLAS ``addmm`` in the 16-bit dtype. cuBLAS accumulates in fp32 and adds base in
      fp32 before rounding once; z and B, each split into its 16-bit part and remainder, keep
      fp32 accuracy (only lo x lo, ~2^-16 of the adapter term, is dropped). The output is read
      and written once (no fp32 copy of an M x N tensor); A x comes the same way from
      ``x [A_hi; A_lo]ᵀ`` with an fp32 result.
    * otherwise: in fp32 (float64 for float64 x), ``addmm`` on the upcast base, in ~1 MB row
      blocks on a CPU.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    n, k = base.shape[-1], x.shape[-1]
    if split16 is None:
        split16 = _use_split16(base, x, out_dtype, acc)
    with torch.autocast(x.device.type, enabled=False):
        if split16:
            cd = base.dtype
            x2 = x.reshape(-1, k)
            ax = _ax_fp32(x2, A)
            z = ax @ R.float().t()
            z_hi, z_lo = _split16(z, cd)
            b_hi, b_lo = _split16(B.float(), cd)
            left, right = _split_operands((z_hi, z_lo, z_hi), (b_hi, b_hi, b_lo), 1, 1)
            out = torch.addmm(base.reshape(-1, n), left, right.t())
            return out.view(base.shape), x2, ax, z
        x2 = x.reshape(-1, k).to(acc)
        ax = x2 @ A.to(acc).t()
        z = ax @ R.to(acc).t()
        base2, bt = base.reshape(-1, n), B.to(acc).t()
        rows = base2.shape[0]
        step = max(1, _CPU_CHUNK_ELEMENTS // max(n, 1))
        if base2.device.type != "cpu" or rows <= step or base2.dtype == acc == out_dtype:
            out = torch.addmm(base2.to(acc), z, bt).to(out_dtype)
        else:
            # the fp32 temporary of a whole (M, N) output does not fit in cache on a CPU;
            # row blocks of ~1 MB do (2x faster at 512 x 11008, same bits)
            out = torch.empty(rows, n, dtype=out_dtype, device=base2.device)
            for i in range(0, rows, step):
                out[i:i + step] = torch.addmm(base2[i:i + step].to(acc), z[i:i + step], bt)
    return out.view(base.shape), x2, ax, z


# -- the differentiable op ---------------------------------------------------------------------
# ``tinylora::add_adapter`` is a torch.library custom op: eager autograd and torch.compile
# (fullgraph, any backend) see one opaque node with a fake (shape) implementation and the
# backward below, instead of tracing through its internals.
@torch.library.custom_op(
    "tinylora::add_adapter", mutates_args=(),
    schema="(Tensor base, Tensor x, Tensor A, Tensor B, Tensor R, ScalarType out_dtype) "
           "-> (Tensor, Tensor)")
def _add_adapter_op(base: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    R: torch.Tensor, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(round(base + B (R (A x))), A x)``; see :func:`_add_adapter_backward`."""
    out, _, ax, _ = _add_adapter_values(base, x, A, B, R, out_dtype)
    return out, ax


@_add_adapter_op.register_fake
def _add_adapter_fake(base, x, A, B, R, out_dtype):
    acc = torch.promote_types(x.dtype, torch.float32)
    rows = math.prod(x.shape[:-1])
    return base.new_empty(base.shape, dtype=out_dtype), x.new_empty((rows, A.shape[0]), dtype=acc)


def _add_adapter_setup(ctx, inputs, output):
    base, x, A, B, R, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], A, B, R, x if ctx.needs_input_grad[2] else None)
    ctx.meta = (base.dtype, x.dtype, x.shape)


def _add_adapter_backward(ctx, g, _g_ax):
    """Gradients of ``out = round(base + B (R (A x)))``, one rounding, products in fp32.

    Shapes: x (M, K), base (M, N), A (r, K), B (N, r), R (r, r); float64 for float64 x. With
    ``ax = x Aᵀ`` (M, r), ``z = ax Rᵀ`` and ``out = base + z Bᵀ``, the chain rule for an upstream
    gradient g (M, N) gives, with ``gb = g B`` (M, r):

    * d base = g;
    * d x = (gb R) A                     (M, K)   -- never through an N x K matrix;
    * d R = gbᵀ ax                       (r, r)   -- then autograd takes it on to v;
    * d A = (gb R)ᵀ x, d B = gᵀ z        (only when A or B require grad, e.g. PEFT-style factors).

    Only ``ax`` (M x r) is saved besides the small factors; x is kept only for d A.
    """
    ax, A, B, R, x = ctx.saved_tensors
    base_dtype, x_dtype, x_shape = ctx.meta
    need = ctx.needs_input_grad
    acc = ax.dtype
    n = g.shape[-1]
    # 16-bit on CUDA: the same split-operand GEMMs as the forward (no fp32 copy of g)
    split16 = _use_split16_grad(g, x_dtype, acc)
    with torch.autocast(g.device.type, enabled=False):
        if split16:
            g2 = g.reshape(-1, n)
            gb = _gb_fp32(g2, B)
        else:
            g2 = g.reshape(-1, n).to(acc)
            gb = g2 @ B.to(acc)                                   # (M, r)
        gbr = gb @ R.to(acc)                                      # (M, r)
        grad_base = g.to(base_dtype) if need[0] else None
        grad_x = None
        if need[1] and split16:
            t_hi, t_lo = _split16(gbr, g.dtype)
            if A.dtype == g.dtype:                   # A exact in 16 bits: no remainder part
                left, right = _split_operands((t_hi, t_lo), (A, A), 1, 0)
            else:
                a_hi, a_lo = _split16(A.float(), g.dtype)
                left, right = _split_operands((t_hi, t_lo, t_hi), (a_hi, a_hi, a_lo), 1, 0)
            grad_x = (left @ right).view(x_shape)
        elif need[1]:
            grad_x = (gbr @ A.to(acc)).view(x_shape).to(x_dtype)
        grad_a = (gbr.t() @ x.reshape(-1, x_shape[-1]).to(acc)).to(A.dtype) if need[2] else None
        grad_b = (g2.to(acc).t() @ (ax @ R.to(acc).t())).to(B.dtype) if need[3] else None
        grad_r = (gb.t() @ ax).to(R.dtype) if need[4] else None
    return grad_base, grad_x, grad_a, grad_b, grad_r, None


_add_adapter_op.register_autograd(_add_adapter_backward, setup_context=_add_adapter_setup)


def add_adapter(base: torch.Tensor, x: torch.Tensor, f: AdapterFactors,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``base + B (R (A x))``, accumulated in fp32 (float64 for float64 x), rounded once.

    ``base`` (..., N) is the base layer's output for x (..., K); the result has ``out_dtype``
    (default: base's). One pass over the output (``addmm``), forward and backward. With autograd
    or under torch.compile this is the ``tinylora::add_adapter`` op; plain inference calls its
    implementation directly (no dispatcher, no graph).
    """
    out_dtype = base.dtype if out_dtype is None else out_dtype
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t.requires_grad for t in (base, x, f.A, f.B, f.R))):
        return _add_adapter_op(base, x, f.A, f.B, f.R, out_dtype)[0]
    return _add_adapter_values(base, x, f.A, f.B, f.R, out_dtype)[0]   # inference: no graph


class _NF4Linear(torch.autograd.Function):
    """``x @ dequant(W).T + bias`` that decodes W again in backward instead of keeping it.

    Saving the decoded W (N x K) for backward would cost more memory than the quantized model;
    decoding twice is what bitsandbytes does too. Only x gets a gradient (W is frozen).
    """

    @staticmethod
    def forward(ctx, x, w: NF4Weight, bias, compute_dtype):
        ctx.w, ctx.compute_dtype = w, compute_dtype
        return F.linear(x, dequantize_nf4(w, compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.w, grad_out.dtype)
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


def nf4_linear_reference(x: torch.Tensor, w: NF4Weight, bias: Optional[torch.Tensor] = None,
                         compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The base NF4 matmul as bitsandbytes defines it, in plain torch.

    x is cast to ``compute_dtype`` (default: x's dtype), W decoded to the same dtype, then one
    ``F.linear``; the result has ``compute_dtype``.
    """
    compute_dtype = x.dtype if compute_dtype is None else compute_dtype
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the NF4 weight expects {w.shape[1]}")
    x = x.to(compute_dtype)
    bias = None if bias is None else bias.to(compute_dtype)
    return _NF4Linear.apply(x, w, bias, compute_dtype)


def tinylora_linear_reference(x: torch.Tensor, weight, factors: Optional[AdapterFactors],
                              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole fused problem, ``x W^T + B (R (A x)) + bias``, in plain torch.

    ``weight`` is an :class:`NF4Weight` (decoded to x's dtype, as the kernels' compute dtype) or a
    dense (N, K) tensor. The base product is in x's dtype, the adapter in fp32, the sum rounded
    once to x's dtype. This is the contract the fused kernels implement.
    """
    if isinstance(weight, NF4Weight):
        base = nf4_linear_reference(x, weight, bias)
    else:
        base = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if factors is None:
        return base
    return add_adapter(base, x, factors)
