"""The adapter in the call's 16-bit dtype: two GEMMs, one pass over the output.

Where the input, the base product and the output share one 16-bit dtype (a bf16/fp16 model on a
GPU: bitsandbytes' compute dtype is the activations' dtype), a layer call adds its adapter as

    zax = x [Aᵀ Rᵀ | Aᵀ]             (M, 2r)   one GEMM, reads x once
    out = base + zax[:, :r] Bᵀ        (M, N)    one ``addmm``: reads base, writes out

each GEMM accumulating in fp32 inside cuBLAS and rounding its result to the 16-bit dtype once.
The operands ``w = [Aᵀ Rᵀ | Aᵀ]`` (K, 2r) and ``Bᵀ`` (r, N) are in the 16-bit dtype: w formed for
every layer at once per model call (:func:`tinylora_kernels.adapter_state.half_operands`), B kept.
The backward is three more GEMMs over g and x's shapes and one small product for v:

    gb = g B (M, r);   d x = gb (R A) = gb w[:, :r]ᵀ;   d R = gbᵀ (x Aᵀ);   d v = P·d R

The fp32 form (:mod:`tinylora_kernels.torch_path`) instead upcasts the base output and adds the
adapter in fp32 so that every sequence of a batch gets the bits it would get alone; on a GPU that
costs several passes over an fp32 (M, N) tensor and ~5 more launches per call. This form rounds
z (M, r) and the operands to 16 bits, which moves the adapter term by ~2^-8 of itself — far
inside the equivalence rule (the tests hold it to 2x torch's own 16-bit error against float64) —
and a sequence's bits may then depend on the batch it is in (cuBLAS picks kernels by shape), as
the base product's bits already do on a GPU. The router chooses it for 16-bit calls on the
devices in :data:`HALF_FORM_DEVICES`.
"""

from __future__ import annotations

import torch

from .torch_path import mm_fp32, no_autocast

__all__ = ["HALF_FORM_DEVICES", "use_half", "half_adapter", "half_layer_adapter"]

#: Device types whose 16-bit calls use this form. CPUs keep the fp32 form: there a GEMM launch
#: costs no host time worth saving, and it keeps each sequence's bits independent of its batch.
HALF_FORM_DEVICES = frozenset({"cuda"})

_HALF = (torch.float16, torch.bfloat16)


def use_half(device: torch.device, x_dtype: torch.dtype, compute_dtype: torch.dtype,
             out_dtype: torch.dtype) -> bool:
    """Whether a call adds its adapter in 16 bits: input, base product and output all in one
    16-bit dtype, on a device in :data:`HALF_FORM_DEVICES`."""
    return (device.type in HALF_FORM_DEVICES and x_dtype in _HALF
            and x_dtype == compute_dtype == out_dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def half_adapter(base: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                 bt: torch.Tensor) -> torch.Tensor:
    """``base + (x w)[:, :r] Bᵀ`` without autograd: two GEMMs (see the module docstring).

    ``w`` = [Aᵀ Rᵀ | Aᵀ] (K, 2r) and ``bt`` = Bᵀ (r, N), in the dtype of x and base."""
    with no_autocast(x.device.type):
        zax = torch.mm(_rows(x), w)
        out = torch.addmm(_rows(base), zax[:, :bt.shape[0]], bt)
    return out if base.dim() == 2 else out.view(base.shape)


class _HalfLayerAdapter(torch.autograd.Function):
    """:func:`half_adapter` differentiable in base, x and v (R's values come in w; its gradient
    is formed here and taken on to v: ``full`` R = Σ v_i P_i gives d v_i = <P_i, d R>,
    ``diagonal`` R = diag(v P) gives d v = P diag(d R), both one product with ``p``)."""

    @staticmethod
    def forward(ctx, base, x, v, w, bt, p, projection):
        with no_autocast(x.device.type):
            zax = torch.mm(_rows(x), w)
            out = torch.addmm(_rows(base), zax[:, :bt.shape[0]], bt)
        ctx.save_for_backward(zax, w, bt)
        ctx.meta = (p, projection, x.shape, v.dtype)
        return out if base.dim() == 2 else out.view(base.shape)

    @staticmethod
    def backward(ctx, g):
        zax, w, bt = ctx.saved_tensors
        p, projection, x_shape, v_dtype = ctx.meta
        need = ctx.needs_input_grad
        r = bt.shape[0]
        grad_x = grad_v = None
        with no_autocast(g.device.type):
            gb = torch.mm(_rows(g), bt.t())                                  # (M, r)
            if need[1]:
                grad_x = torch.mm(gb, w[:, :r].t())
                grad_x = grad_x if len(x_shape) == 2 else grad_x.view(x_shape)
            if need[2]:
                grad_r = mm_fp32(gb.t(), zax[:, r:])                          # (r, r) fp32
                grad_r = grad_r.view(-1) if projection == "full" else torch.diagonal(grad_r)
                grad_v = torch.mv(p, grad_r).to(v_dtype)
        return (g if need[0] else None), grad_x, grad_v, None, None, None, None


def half_layer_adapter(base: torch.Tensor, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                       bt: torch.Tensor, p: torch.Tensor, projection: str) -> torch.Tensor:
    """``base + (x w)[:, :r] Bᵀ`` differentiable in base, x and v (``v``: the call's view of v
    that w was formed from; ``p``: P as (u, r*r) [full] or (u, r) [diagonal], fp32)."""
    return _HalfLayerAdapter.apply(base, x, v, w, bt, p, projection)
