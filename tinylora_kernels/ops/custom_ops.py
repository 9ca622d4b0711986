"""The kernel paths as torch ops: ``tinylora::fused_linear`` and ``tinylora::fused_grad_x``.

Both are ``torch.library`` custom ops with fake (shape) implementations, and ``fused_linear``
carries its backward (derivation in :func:`_fused_linear_backward`), so eager autograd and
``torch.compile(fullgraph=True)`` see single opaque nodes. Each takes the ``path`` the router
planned: ``"gemv"`` (the NF4 GEMV for M <= 4, :mod:`.nf4_gemv`), ``"fused"`` (the fused
kernels, :mod:`.fused_linear` and :mod:`.grad_x`) or ``"large_m"`` (decode + cuBLAS,
:mod:`.large_m`); the backward follows its forward's path (the GEMV's is the fused one).
Plain inference calls the launcher directly: no dispatcher, no graph.

A custom op takes tensors and plain values only, so an :class:`NF4Weight` travels as its tensors
(``packed, absmax, code[, absmax2, code2, offset]``), its sizes as ints and its decode dtype.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..nf4 import NF4Weight
from ..torch_path import AdapterFactors
from .fused_linear import launch_fused_linear
from .grad_x import fused_grad_x
from .large_m import dequant_cublas_grad_x, dequant_cublas_linear
from .nf4_gemv import nf4_gemv

__all__ = ["KERNEL_PATHS", "fused_tinylora_linear", "kernel_forward", "kernel_forward_rows",
           "kernel_grad_x", "pack_weight", "unpack_weight"]

#: The kernel paths a plan can name.
KERNEL_PATHS = ("gemv", "fused", "large_m")


def kernel_forward(path: str, x, weight, bias, factors, *, out_dtype, store_ax=False,
                   config=None):
    """``x Wᵀ + B (R (A x)) + bias`` by the kernel path ``path`` (no checks: planned calls)."""
    if path == "large_m":
        return dequant_cublas_linear(x, weight, bias, factors, out_dtype=out_dtype,
                                     store_ax=store_ax)
    if path == "gemv":
        y = nf4_gemv(x, weight, bias, factors, out_dtype=out_dtype, config=config)
        if not store_ax:
            return y
        ax = None if factors is None else \
            x.reshape(-1, x.shape[-1]).float() @ factors.A.float().t()   # (M <= 4, r)
        return y, ax
    return launch_fused_linear(x, weight, bias, factors, out_dtype=out_dtype, store_ax=store_ax,
                               config=config)


def kernel_forward_rows(plan, x, weight, bias, layer, Rt_rows, out_dtype):
    """``layer(x)`` by the planned kernel with each sequence's own R (``Rt_rows`` (B, r, r):
    each sequence's Rᵀ); None when the planned kernel does not take per-row adapters (the caller
    then uses the torch path)."""
    nb = Rt_rows.shape[0]
    if x.dim() < 2 or x.shape[0] != nb:
        return None
    rows_per_seq = x.numel() // (x.shape[-1] * nb) if x.numel() else 0
    row_codes = torch.arange(nb, device=x.device, dtype=torch.int32).repeat_interleave(
        rows_per_seq)                                           # row of x -> its sequence
    # A and B are the layer's kept constants; R is each sequence's (nothing formed from v here)
    factors = AdapterFactors(A=layer.Vh, B=layer._constants(Rt_rows.dtype).b,
                             R=Rt_rows.transpose(1, 2).contiguous())
    if plan.path == "gemv":
        return nf4_gemv(x, weight, bias, factors, out_dtype=out_dtype, config=plan.config,
                        row_codes=row_codes)
    return launch_fused_linear(x, weight, bias, factors, out_dtype=out_dtype,
                               config=plan.config, row_codes=row_codes)


def kernel_grad_x(path: str, g, weight, factors, *, x_dtype):
    """``(g W + ((g B) R) A, g B)`` by the kernel path ``path`` (the GEMV's backward is the
    fused kernel's)."""
    if path == "large_m":
        return dequant_cublas_grad_x(g, weight, factors, x_dtype=x_dtype)
    return fused_grad_x(g, weight, factors, x_dtype=x_dtype, store_gb=True)


def pack_weight(weight) -> Tuple[List[torch.Tensor], List[int], torch.dtype]:
    """(tensors, ints, dtype) describing a weight (NF4Weight or dense) to a custom op."""
    if isinstance(weight, NF4Weight):
        tensors = [weight.packed, weight.absmax, weight.code]
        if weight.double_quant:
            tensors += [weight.absmax2, weight.code2, weight.offset]
        return tensors, [1, *weight.shape, weight.blocksize, weight.blocksize2], weight.dtype
    return [weight], [0], weight.dtype


def unpack_weight(tensors: List[torch.Tensor], meta: List[int], dtype: torch.dtype):
    """The inverse of :func:`pack_weight`."""
    if meta[0] == 0:
        return tensors[0]
    _, n, k, blocksize, blocksize2 = meta
    dq = len(tensors) == 6
    return NF4Weight(packed=tensors[0], absmax=tensors[1], code=tensors[2], shape=(n, k),
                     dtype=dtype, blocksize=blocksize, absmax2=tensors[3] if dq else None,
                     code2=tensors[4] if dq else None, offset=tensors[5] if dq else None,
                     blocksize2=blocksize2)


def _weight_shape(tensors, meta):
    return (meta[1], meta[2]) if meta[0] == 1 else tuple(tensors[0].shape)


# -- forward ------------------------------------------------------------------------------------
@torch.library.custom_op(
    "tinylora::fused_linear", mutates_args=(),
    schema="(Tensor x, Tensor[] weight, int[] weight_meta, ScalarType weight_dtype, Tensor? bias, "
           "Tensor A, Tensor B, Tensor R, ScalarType out_dtype, str path) -> (Tensor, Tensor)")
def _fused_linear_op(x, weight, weight_meta, weight_dtype, bias, A, B, R, out_dtype, path):
    """``(x Wᵀ + B (R (A x)) + bias, A x)`` by the kernel path ``path``."""
    return kernel_forward(path, x, unpack_weight(weight, weight_meta, weight_dtype), bias,
                          AdapterFactors(A=A, B=B, R=R), out_dtype=out_dtype, store_ax=True)


@_fused_linear_op.register_fake
def _fused_linear_fake(x, weight, weight_meta, weight_dtype, bias, A, B, R, out_dtype, path):
    n, _ = _weight_shape(weight, weight_meta)
    rows = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], n), dtype=out_dtype),
            x.new_empty((rows, A.shape[0]), dtype=torch.float32))


def _fused_linear_setup(ctx, inputs, output):
    x, weight, weight_meta, weight_dtype, bias, A, B, R, out_dtype, path = inputs
    ax = output[1]
    ctx.mark_non_differentiable(ax)
    ctx.save_for_backward(ax, A, B, R, *weight)
    ctx.meta = (list(weight_meta), weight_dtype, x.dtype, x.shape, path)


def _fused_linear_backward(ctx, g, _g_ax):
    """Backward of ``y = x Wᵀ + B (R (A x)) + bias``, W frozen (NF4 or dense).

    Shapes: x (M, K), W (N, K), A (r, K), B (N, r), R (r, r) = f(v). The forward saved only
    ``ax = A x`` (M x r, fp32) besides the small factors and W's storage; x is not saved (W is
    frozen, so no gradient needs it). With an upstream gradient g (M, N) and ``gb = g B`` (M, r):

    * y depends on x through ``x Wᵀ`` and ``((x Aᵀ) Rᵀ) Bᵀ``, so
      d x = g W + ((g B) R) A = g W + (gb R) A — one kernel (``tinylora::fused_grad_x``) reads W
      transposed from its storage and accumulates gb in the same pass over N;
    * y_mn depends on R_ij through ``Σ_i B_ni Σ_j R_ij ax_mj``, so d R_ij = Σ_m gb_mi ax_mj,
      i.e. d R = gbᵀ ax (r x r); autograd carries it on to v through R = Σ v_i P_i (full) or
      diag(v P) (diagonal), in fp32 (see ``TinyLoRAGlobalParams.compute_view``);
    * d bias = Σ_rows g, only when the bias is trainable.

    When g is wider than the compute dtype (fp32 activations around an fp16 product), gb for
    d R is formed from g itself, not from the rounded g the kernel reads.
    """
    ax, A, B, R, *weight = ctx.saved_tensors
    weight_meta, weight_dtype, x_dtype, x_shape, path = ctx.meta
    need = ctx.needs_input_grad
    grad_x = grad_r = grad_bias = None
    # g wider than the compute dtype (fp32 activations, fp16 product): the kernel reads g
    # rounded, like the base product's backward; v's gradient is taken from the fp32 g instead
    wide_g = g.dtype.itemsize > x_dtype.itemsize
    if need[0]:
        grad_x, gb = torch.ops.tinylora.fused_grad_x(g.to(x_dtype), weight, weight_meta,
                                                     weight_dtype, A, B, R, x_dtype, path)
        grad_x = grad_x.view(x_shape)
    if need[7] and (wide_g or not need[0]):
        gb = g.reshape(-1, g.shape[-1]).float() @ B.float()
    if need[7]:
        grad_r = (gb.t() @ ax).to(R.dtype)
    if need[4]:
        grad_bias = g.reshape(-1, g.shape[-1]).float().sum(0).to(g.dtype)
    # the weight is a tensor list: its (absent) gradients are a list of the same length
    return grad_x, [None] * len(weight), None, None, grad_bias, None, None, grad_r, None, None


_fused_linear_op.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup)


# -- backward for x -----------------------------------------------------------------------------
@torch.library.custom_op(
    "tinylora::fused_grad_x", mutates_args=(),
    schema="(Tensor g, Tensor[] weight, int[] weight_meta, ScalarType weight_dtype, Tensor A, "
           "Tensor B, Tensor R, ScalarType x_dtype, str path) -> (Tensor, Tensor)")
def _fused_grad_x_op(g, weight, weight_meta, weight_dtype, A, B, R, x_dtype, path):
    """``(g W + ((g B) R) A, g B)`` by the kernel path ``path``."""
    return kernel_grad_x(path, g, unpack_weight(weight, weight_meta, weight_dtype),
                         AdapterFactors(A=A, B=B, R=R), x_dtype=x_dtype)


@_fused_grad_x_op.register_fake
def _fused_grad_x_fake(g, weight, weight_meta, weight_dtype, A, B, R, x_dtype, path):
    _, k = _weight_shape(weight, weight_meta)
    rows = math.prod(g.shape[:-1])
    return (g.new_empty((*g.shape[:-1], k), dtype=x_dtype),
            g.new_empty((rows, A.shape[0]), dtype=torch.float32))


def _fused_grad_x_setup(ctx, inputs, output):
    g, weight, weight_meta, weight_dtype, A, B, R, x_dtype, path = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], A, B, R, *weight)
    ctx.meta = (list(weight_meta), weight_dtype, g.dtype, path)


def _fused_grad_x_backward(ctx, h, _h_gb):
    """Double backward: ``gx = g W + ((g B) R) A`` is linear in g and R, so for an upstream h
    (M, K): d g = h Wᵀ + ((h Aᵀ) Rᵀ) Bᵀ, which is the forward op applied to h, and
    d R = (g B)ᵀ (h Aᵀ)."""
    gb, A, B, R, *weight = ctx.saved_tensors
    weight_meta, weight_dtype, g_dtype, path = ctx.meta
    need = ctx.needs_input_grad
    grad_g = grad_r = None
    if need[0]:
        grad_g = torch.ops.tinylora.fused_linear(h.to(g_dtype), weight, weight_meta, weight_dtype,
                                                 None, A, B, R, g_dtype, path)[0]
    if need[6]:
        ha = h.reshape(-1, h.shape[-1]).float() @ A.float().t()          # (M, r)
        grad_r = (gb.t() @ ha).to(R.dtype)
    return grad_g, [None] * len(weight), None, None, None, None, grad_r, None, None


_fused_grad_x_op.register_autograd(_fused_grad_x_backward, setup_context=_fused_grad_x_setup)


def fused_tinylora_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor],
                          factors: AdapterFactors, out_dtype: torch.dtype, path: str = "fused",
                          config=None) -> torch.Tensor:
    """``x Wᵀ + B (R (A x)) + bias`` by the kernel path ``path``, differentiable in x, R (so v)
    and bias. ``config``: the fused kernel's tile config (the router's plan; default: by size)."""
    if factors.A.requires_grad or factors.B.requires_grad:
        raise ValueError("the fused kernel differentiates x, R (so v) and the bias; A and B must "
                         "be frozen (use the reference backend to train them)")
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, factors.R, bias))
    if not needs_graph and not torch.compiler.is_compiling():
        return kernel_forward(path, x, weight, bias, factors, out_dtype=out_dtype, config=config)
    tensors, meta, dtype = pack_weight(weight)
    return _fused_linear_op(x, tensors, meta, dtype, bias, factors.A, factors.B, factors.R,
                            out_dtype, path)[0]
