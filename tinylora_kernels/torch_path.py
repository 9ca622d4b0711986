"""The production torch path: the base layer's own product plus the factorized adapter.

A TinyLoRA layer computes ``y = base(x) + B (R (A x))`` with

* ``A = Vh``            (r x K): top-r right singular vectors of the frozen weight W (N x K);
* ``B = U diag(S)``     (N x r): top-r left singular vectors scaled by the singular values;
* ``R``                 (r x r): built from the shared trainable vector v and fixed random P
  (:func:`projection_matrix`).

Nothing here ever forms the N x K matrix ``B R A``: the delta costs O(M (K + N) r) instead of
O(M N K), forward and backward. The rank-r products run in fp32 whatever the activation dtype, and
the output is rounded once. Two ways of adding the adapter, chosen by the router
(:mod:`tinylora_kernels.router`), the same function to fp32 accuracy:

* ``fp32``: ``addmm`` on the upcast base (in ~1 MB row blocks on a CPU);
* ``split16`` (16-bit tensors on CUDA, large outputs): ONE 16-bit cuBLAS ``addmm`` whose rank-r
  operands are split into a 16-bit part and its rounding remainder (:func:`split_operands`), so
  the output is read and written once, with no fp32 copy of an M x N tensor.

All the precision tricks of the package's torch code live in this module (the kernels' large-M
path uses the same helpers). The float64 oracle the tests judge against is in
:mod:`tinylora_kernels.reference`, kept apart on purpose.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

__all__ = ["PROJECTIONS", "AdapterFactors", "projection_matrix", "add_adapter", "add_adapter_rows",
           "folded_operand",
           "add_adapter_inference", "split16", "split_operands", "mm_fp32", "mm_fp32_split",
           "SPLIT16_MIN_ELEMENTS"]

#: The two ways v and P make R. ``full``: P is (u, r, r) and R = sum_i v_i P_i (the paper, the
#: first users' program, the checkpoint documentation). ``diagonal``: P is (u, r), drawn then
#: divided by sqrt(r), and R = diag(v @ P) (the later users' program, all known real checkpoints).
PROJECTIONS = ("full", "diagonal")

#: Elements of fp32 scratch per row block when adding the adapter on a CPU (1 MB: L2-sized).
CPU_CHUNK_ELEMENTS = 1 << 18

#: Output elements from which the split 16-bit path pays: it saves ~20 bytes of traffic per
#: output element (the fp32 round trip) but issues ~15 more small operations, and on the H200
#: machine each costs ~15 µs of host time (benchmarks/results/TUNING.md, v4); below this
#: (decode, small layers) the fp32 path is cheaper. An estimate from those figures, not yet measured.
SPLIT16_MIN_ELEMENTS = 1 << 24

_HALF = (torch.float16, torch.bfloat16)
_NO_CONTEXT = contextlib.nullcontext()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: float64 stays, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def r_from(v: torch.Tensor, pt: torch.Tensor, projection: str,
           pt64: Optional[torch.Tensor] = None) -> torch.Tensor:
    """R from v and ``pt`` = P reshaped to (u, r*r) [full] or (u, r) [diagonal] and transposed,
    in pt's dtype: one matrix-vector product (plus a view or a diag).

    The sums over u are formed in float64 (``pt64``: pt in float64, when kept) and rounded once,
    so R has the same bits whichever product forms it — this one, one for all layers, or one for
    every adapter of a batch (:mod:`tinylora_kernels.adapter_state`)."""
    pt64 = pt.double() if pt64 is None else pt64
    flat = torch.mv(pt64, v.to(torch.float64)).to(pt.dtype)
    if projection == "full":
        r = math.isqrt(pt.shape[0])
        return flat.view(r, r)
    return torch.diag(flat)


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type`` (a no-op context when it is off already:
    entering autocast costs microseconds a layer call cannot spare)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


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
    with no_autocast(v.device.type):
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


# -- precision helpers -------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _mm_has_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` works for ``dtype`` on ``device``
    (probed once per device and dtype)."""
    try:
        a = torch.zeros(1, 1, dtype=dtype, device=device)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result; 16-bit operands are not upcast first on
    CUDA (``torch.mm(..., out_dtype=torch.float32)``, where this torch has it)."""
    if a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype and \
            _mm_has_out_dtype(a.device, a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def split16(t: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) in a 16-bit dtype with hi + lo == t to ~2^-16 relative (t fp32)."""
    hi = t.to(dtype)
    return hi, (t - hi.float()).to(dtype)


def mm_fp32_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (fp32 result) for 16-bit ``a`` (M, K) and a wider ``b`` (K, n) kept to fp32
    accuracy: one GEMM against ``[b_hi | b_lo]`` (or against b as it is, when b is already in
    a's dtype)."""
    if b.dtype == a.dtype:
        return mm_fp32(a, b)
    n = b.shape[1]
    hi, lo = split16(b.float(), a.dtype)
    both = mm_fp32(a, torch.cat((hi, lo), 1))
    return both[:, :n] + both[:, n:]


def split_operands(z: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, dim_b: int,
                   align: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """16-bit operands of a rank-r product ``z b`` kept to fp32 accuracy in one 16-bit GEMM.

    ``z`` (M, r) fp32; ``b`` holds the r-long side along ``dim_b`` (0: (r, n), 1: (n, r)).
    Returns ``(left, right)`` with ``left = [z_hi z_lo z_hi | 0]`` (M, w) and ``right`` =
    ``[b_hi; b_hi; b_lo; 0]`` along ``dim_b`` (``[b; b]`` when b is exact in ``dtype``), so that
    ``left @ right`` (``right.t()`` for dim_b = 1) equals ``z b`` up to lo x lo (~2^-16
    relative). The width w is padded with zeros to a multiple of ``align`` (cuBLAS' aligned
    kernels; 64 keeps a GEMM's K a multiple of its tile). One ``cat`` per operand.
    """
    z_hi, z_lo = split16(z, dtype)
    if b.dtype == dtype:
        lefts, rights = [z_hi, z_lo], [b, b]
    else:
        b_hi, b_lo = split16(b.float(), dtype)
        lefts, rights = [z_hi, z_lo, z_hi], [b_hi, b_hi, b_lo]
    width = z.shape[1] * len(lefts)
    pad = -width % align
    if pad:
        lefts.append(z_hi.new_zeros(z.shape[0], pad))
        shape = list(b.shape)
        shape[dim_b] = pad
        rights.append(rights[0].new_zeros(shape))
    return torch.cat(lefts, 1), torch.cat(rights, dim_b)


def use_split16(device: torch.device, x_dtype: torch.dtype, compute_dtype: torch.dtype,
                out_dtype: torch.dtype, out_elements: int) -> bool:
    """Whether the adapter is added by one 16-bit GEMM with split operands (CUDA, all 16-bit,
    large outputs); the router asks this once per plan."""
    return (device.type == "cuda" and x_dtype in _HALF
            and x_dtype == compute_dtype == out_dtype and out_elements >= SPLIT16_MIN_ELEMENTS)


# -- the adapter, forward ------------------------------------------------------------------------
def _add_adapter_values(base, x, A, B, R, out_dtype, split: bool, need_ax: bool = True):
    """(out, A x or None): the forward of ``tinylora::add_adapter`` (see the module docstring).

    The fp32 form computes ``z = x (Aᵀ Rᵀ)`` (one product of x; inference needs no more) and
    ``A x`` only for the backward, so inference and training round the same way.
    """
    acc = acc_dtype(x.dtype)
    n, k = base.shape[-1], x.shape[-1]
    with no_autocast(x.device.type):
        if split and acc == torch.float32 and out_dtype == base.dtype == x.dtype in _HALF:
            x2 = x.reshape(-1, k)
            ax = mm_fp32_split(x2, A.t())
            left, right = split_operands(ax @ R.float().t(), B, base.dtype, 1)
            out = torch.addmm(base.reshape(-1, n), left, right.t())
            return out.view(base.shape), ax
        x2 = x.reshape(-1, k).to(acc)
        at = A.to(acc).t()
        out = _add_low_rank(base, x2, folded_operand(at, R.to(acc).t()), B.to(acc).t(),
                            out_dtype)
        return out, (x2 @ at if need_ax else None)


def _add_low_rank(base, x2, rat, bt, out_dtype):
    """``round(base + (x2 rat) bt)`` in rat's dtype, one rounding; row blocks of ~1 MB on a CPU."""
    return _add_z(base, (x2 @ rat).unsqueeze(0), bt, out_dtype)


def _add_z(base, z3, bt, out_dtype):
    """``round(base + z bt)`` in z's dtype, one rounding, for S sequences: z3 (S, T, r), base
    (..., N) with S*T rows, bt (r, N).

    One batched product whose entries are each one sequence's (T, r) x (r, N): a sequence gets
    the same bits alone (S = 1) as in a batch where each sequence has its own adapter
    (:func:`add_adapter_rows`) — a plain ``addmm`` over all rows at once rounds differently with
    the number of rows on a CPU. On a CPU the output is formed in row blocks of ~1 MB per
    sequence (the fp32 temporary of a whole (M, N) output does not fit in cache; 2x faster at
    512 x 11008, same bits)."""
    acc = z3.dtype
    s, t = z3.shape[0], z3.shape[1]
    n = base.shape[-1]
    base3 = base.reshape(s, t, n)
    btb = bt.expand(s, -1, -1)
    if base3.device.type != "cpu" or t * n <= CPU_CHUNK_ELEMENTS or \
            base3.dtype == acc == out_dtype:
        return torch.baddbmm(base3.to(acc), z3, btb).to(out_dtype).view(base.shape)
    step = max(1, CPU_CHUNK_ELEMENTS // max(n, 1))
    out = torch.empty(s, t, n, dtype=out_dtype, device=base3.device)
    for i in range(0, t, step):
        out[:, i:i + step] = torch.baddbmm(base3[:, i:i + step].to(acc), z3[:, i:i + step], btb)
    return out.view(base.shape)


# ``tinylora::add_adapter`` is a torch.library custom op: eager autograd and torch.compile
# (fullgraph, any backend) see one opaque node with a fake (shape) implementation and the
# backward below, instead of tracing through its internals.
@torch.library.custom_op(
    "tinylora::add_adapter", mutates_args=(),
    schema="(Tensor base, Tensor x, Tensor A, Tensor B, Tensor R, ScalarType out_dtype, "
           "bool split16) -> (Tensor, Tensor)")
def _add_adapter_op(base: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    R: torch.Tensor, out_dtype: torch.dtype,
                    split16: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(round(base + B (R (A x))), A x)``; see :func:`_add_adapter_backward`."""
    return _add_adapter_values(base, x, A, B, R, out_dtype, split16)


@_add_adapter_op.register_fake
def _add_adapter_fake(base, x, A, B, R, out_dtype, split16):
    acc = acc_dtype(x.dtype)
    rows = math.prod(x.shape[:-1])
    return base.new_empty(base.shape, dtype=out_dtype), x.new_empty((rows, A.shape[0]), dtype=acc)


def _add_adapter_setup(ctx, inputs, output):
    base, x, A, B, R, _, split = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], A, B, R, x if ctx.needs_input_grad[2] else None)
    ctx.meta = (base.dtype, x.dtype, x.shape, split)


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
    base_dtype, x_dtype, x_shape, split = ctx.meta
    need = ctx.needs_input_grad
    acc = ax.dtype
    n = g.shape[-1]
    # the forward's split 16-bit path has its backward counterpart (no fp32 copy of g)
    split = split and acc == torch.float32 and g.dtype == x_dtype in _HALF
    with no_autocast(g.device.type):
        if split:
            g2 = g.reshape(-1, n)
            gb = mm_fp32_split(g2, B)
        else:
            g2 = g.reshape(-1, n).to(acc)
            gb = g2 @ B.to(acc)                                   # (M, r)
        gbr = gb @ R.to(acc)                                      # (M, r)
        grad_base = g.to(base_dtype) if need[0] else None
        grad_x = None
        if need[1] and split:
            left, right = split_operands(gbr, A, g.dtype, 0)
            grad_x = (left @ right).view(x_shape)
        elif need[1]:
            grad_x = (gbr @ A.to(acc)).view(x_shape).to(x_dtype)
        grad_a = (gbr.t() @ x.reshape(-1, x_shape[-1]).to(acc)).to(A.dtype) if need[2] else None
        grad_b = (g2.to(acc).t() @ (ax @ R.to(acc).t())).to(B.dtype) if need[3] else None
        grad_r = (gb.t() @ ax).to(R.dtype) if need[4] else None
    return grad_base, grad_x, grad_a, grad_b, grad_r, None, None


_add_adapter_op.register_autograd(_add_adapter_backward, setup_context=_add_adapter_setup)


class _AddAdapter(torch.autograd.Function):
    """The same forward and backward as ``tinylora::add_adapter``, for eager autograd: a custom
    op's Python autograd costs ~200 µs a call on a CPU, a Function ~20 µs (the op stays the form
    torch.compile sees)."""

    @staticmethod
    def forward(ctx, base, x, A, B, R, out_dtype, split):
        out, ax = _add_adapter_values(base, x, A, B, R, out_dtype, split)
        _add_adapter_setup(ctx, (base, x, A, B, R, out_dtype, split), (out, ax))
        return out, ax

    @staticmethod
    def backward(ctx, g, g_ax):
        return _add_adapter_backward(ctx, g, g_ax)


def add_adapter(base: torch.Tensor, x: torch.Tensor, f: AdapterFactors,
                out_dtype: Optional[torch.dtype] = None, *, split16: bool = False) -> torch.Tensor:
    """``base + B (R (A x))``, accumulated in fp32 (float64 for float64 x), rounded once.

    ``base`` (..., N) is the base layer's output for x (..., K); the result has ``out_dtype``
    (default: base's). One pass over the output (``addmm``), forward and backward; ``split16``
    selects the one-16-bit-GEMM form (16-bit tensors; see the module docstring). Under
    torch.compile this is the ``tinylora::add_adapter`` op; eager autograd runs the same forward
    and backward as an autograd Function; plain inference calls the implementation directly.
    """
    out_dtype = base.dtype if out_dtype is None else out_dtype
    if torch.compiler.is_compiling():
        return _add_adapter_op(base, x, f.A, f.B, f.R, out_dtype, split16)[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (base, x, f.A, f.B, f.R)):
        return _AddAdapter.apply(base, x, f.A, f.B, f.R, out_dtype, split16)[0]
    return _add_adapter_values(base, x, f.A, f.B, f.R, out_dtype, split16)[0]


class _LayerAdapter(torch.autograd.Function):
    """A TinyLoRA layer's adapter in eager training: ``round(base + ((x Aᵀ) Rᵀ) Bᵀ)`` with
    R = proj(v) formed inside, so one autograd node carries x, v and base.

    Its constants (Aᵀ, Bᵀ, P in the accumulation dtype) are the layer's kept operands; per call
    only what depends on x and v is computed. Same values as ``tinylora::add_adapter`` (z as
    ``x (Aᵀ Rᵀ)``, one rounding). Backward, with gb = g B (M, r):

    * d base = g;  d x = (gb R) A;  d R = gbᵀ (x Aᵀ);
    * d v: ``full`` R = Σ v_i P_i gives d v_i = <P_i, d R>; ``diagonal`` R = diag(v P) gives
      d v = P diag(d R); both one product with ``pt``ᵀ.
    """

    @staticmethod
    def forward(ctx, base, x, v, consts, projection, out_dtype):
        at, bt, pt = consts.at, consts.bt, consts.pt
        acc = at.dtype
        with no_autocast(x.device.type):
            R = r_from(v.to(acc), pt, projection, consts.pt64)
            x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).to(acc)
            out = _add_low_rank(base, x2, folded_operand(at, R.t()), bt, out_dtype)
            ax = x2 @ at
        ctx.save_for_backward(ax, R)
        ctx.meta = (consts, projection, base.dtype, x.dtype, x.shape, v.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        ax, R = ctx.saved_tensors
        consts, projection, base_dtype, x_dtype, x_shape, v_dtype = ctx.meta
        need = ctx.needs_input_grad
        grad_base = grad_x = grad_v = None
        with no_autocast(g.device.type):
            g2 = (g if g.dim() == 2 else g.reshape(-1, g.shape[-1])).to(consts.at.dtype)
            gb = g2 @ consts.b                                             # (M, r)
            if need[0]:
                grad_base = g.to(base_dtype)
            if need[1]:
                grad_x = ((gb @ R) @ consts.a).view(x_shape).to(x_dtype)
            if need[2]:
                grad_r = gb.t() @ ax
                grad_r = grad_r.view(-1) if projection == "full" else torch.diagonal(grad_r)
                grad_v = torch.mv(consts.p, grad_r).to(v_dtype)
        return grad_base, grad_x, grad_v, None, None, None


@dataclass(frozen=True)
class LayerConstants:
    """What a TinyLoRA layer's torch path needs besides x and v, in the accumulation dtype, each
    operand in the layout its product reads (views of three tensors): A (r, K) and Aᵀ, B (N, r)
    and Bᵀ, P as (u, r*r) [full] or (u, r) [diagonal] and its transpose ``pt``."""

    a: torch.Tensor
    at: torch.Tensor
    b: torch.Tensor
    bt: torch.Tensor
    p: torch.Tensor
    pt: torch.Tensor
    pt64: torch.Tensor = None   # pt in float64: R is summed in float64, rounded once (r_from)


def layer_adapter(base: torch.Tensor, x: torch.Tensor, v: torch.Tensor, consts: LayerConstants,
                  projection: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``round(base + B (R (A x)))`` with R from v, differentiable in base, x and v (eager)."""
    return _LayerAdapter.apply(base, x, v, consts, projection, out_dtype)


def add_adapter_inference(base: torch.Tensor, x: torch.Tensor, rat: torch.Tensor,
                          bt: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``base + (x (Aᵀ Rᵀ)) Bᵀ`` without autograd, the operands prepared.

    ``rat`` = Aᵀ Rᵀ (K, r), formed from v's values in this call (for every layer at once within a
    model call), and ``bt`` = Bᵀ (r, N), in the accumulation dtype (fp32, or float64 for float64
    x): a decode step then issues a cast, one product and one batched ``addmm`` for the adapter,
    and rounds once. The same operations in the same order as :func:`add_adapter`'s fp32 form, so
    inference and training give the same bits.
    """
    if x.device.type == "cpu" and base.numel() <= CPU_CHUNK_ELEMENTS and \
            not torch.is_autocast_enabled("cpu"):
        # a decode step: the operations of _add_low_rank / _add_z for one sequence, unrolled
        # (the same products, so the same bits; ~10 µs less host time per call)
        acc = rat.dtype
        z = torch.mm(x.reshape(-1, rat.shape[0]).to(acc), rat)
        out = torch.baddbmm(base.reshape(1, -1, base.shape[-1]).to(acc), z[None], bt[None])
        return out.to(out_dtype).view_as(base)
    x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).to(rat.dtype)
    with no_autocast(x.device.type):
        return _add_low_rank(base, x2, rat, bt, out_dtype)


def add_adapter_rows(base: torch.Tensor, x: torch.Tensor, consts: LayerConstants,
                     Rt_rows: torch.Tensor, out_dtype: torch.dtype,
                     rat_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``base + B (R_b (A x))`` with each sequence b of the batch using its own R: ``Rt_rows``
    (B, r, r) holds each sequence's Rᵀ (x is batch-first: (B, ..., K)). Batched products, no
    per-row loop, each sequence through the same products as alone with its v (``Aᵀ Rᵀ``, then
    ``x (Aᵀ Rᵀ)``, then :func:`_add_z`), so it gets the same bits; differentiable in base, x and
    Rt_rows."""
    nb = Rt_rows.shape[0]
    if x.dim() < 2 or x.shape[0] != nb:
        raise ValueError(f"per-sequence adapters: the call's batch has {nb} sequences, but this "
                         f"layer got an input of shape {tuple(x.shape)} (batch first expected)")
    k = x.shape[-1]
    acc = consts.at.dtype
    with no_autocast(x.device.type):
        if rat_rows is None:                    # (given: formed for every layer at once)
            rat_rows = folded_operand(consts.at, Rt_rows.to(acc))              # (B, K, r)
        z = torch.bmm(x.reshape(nb, -1, k).to(acc), rat_rows)                # (B, T, r)
        return _add_z(base, z, consts.bt, out_dtype)


def folded_operand(at: torch.Tensor, Rt: torch.Tensor) -> torch.Tensor:
    """``Aᵀ Rᵀ``: at (K, r) or (G, K, r), Rt (r, r) or (G, r, r) -> (K, r) or (G, K, r).

    Formed element-wise (products, then a sum over the r of them in order), not by a matrix
    product: BLAS rounds a product and a batched product of the same entries differently on
    some CPUs (fused multiply-adds in one, not the other), and every entry here must have the
    same bits however many layers or adapters are formed at once — a model's later calls (one
    batch for all its layers) must answer exactly as its first and as a fresh copy."""
    # (K, r, 1) x (r, r) broadcasts without a view of Rt: one operation fewer on the hot path
    rt = Rt if Rt.dim() == 2 else Rt.unsqueeze(-3)
    return (at.unsqueeze(-1) * rt).sum(-2)
