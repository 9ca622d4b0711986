"""The oracle: the TinyLoRA math written plainly, the judge of every computation path.

Nothing here is on a hot path and nothing is clever: the NF4 decode is the format's executable
spec (:mod:`tinylora_kernels.nf4`), the adapter is ``B (R (A x))`` in fp32, and
:func:`tinylora_f64` evaluates a layer in float64 with ΔW formed explicitly, the other way round
from the factorized paths it judges. The production torch path (bitsandbytes' matmul plus the
factorized adapter, with its precision tricks) is :mod:`tinylora_kernels.torch_path`.

``AdapterFactors`` and ``projection_matrix`` are defined with the production path and re-exported
here, where the public API has always had them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight, dequantize_nf4
from .torch_path import PROJECTIONS, AdapterFactors, add_adapter, projection_matrix

__all__ = [
    "PROJECTIONS",
    "AdapterFactors",
    "projection_matrix",
    "adapter_delta",
    "add_adapter",
    "nf4_linear_reference",
    "tinylora_linear_reference",
    "tinylora_f64",
]


def adapter_delta(x: torch.Tensor, f: AdapterFactors) -> torch.Tensor:
    """``B (R (A x))`` for x of shape (..., K), shape (..., N), in fp32 (float64 for float64 x)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        ax = x.to(acc) @ f.A.to(acc).t()                    # (..., r)
        return (ax @ f.R.to(acc).t()) @ f.B.to(acc).t()     # (..., N)


def nf4_linear_reference(x: torch.Tensor, w: NF4Weight, bias: Optional[torch.Tensor] = None,
                         compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The base NF4 matmul as bitsandbytes defines it, in plain torch.

    x is cast to ``compute_dtype`` (default: x's dtype), W decoded to the same dtype, then one
    ``F.linear``; the result has ``compute_dtype``. Differentiable in x and bias.
    """
    compute_dtype = x.dtype if compute_dtype is None else compute_dtype
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the NF4 weight expects {w.shape[1]}")
    bias = None if bias is None else bias.to(compute_dtype)
    return F.linear(x.to(compute_dtype), dequantize_nf4(w, compute_dtype), bias)


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
    return (base.to(torch.promote_types(x.dtype, torch.float32))
            + adapter_delta(x, factors)).to(base.dtype)


def tinylora_f64(x: torch.Tensor, W: torch.Tensor, U: torch.Tensor, S: torch.Tensor,
                 Vh: torch.Tensor, P: torch.Tensor, v: torch.Tensor, projection: str,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The TinyLoRA layer evaluated in float64 from its stored values, ΔW formed explicitly.

    ``y = x W^T + x (U diag(S) R Vh)^T + b`` with R = Σ v_i P_i (full) or diag(v P) (diagonal).
    Deliberately written the other way round from the factorized paths it judges.
    """
    d = torch.float64
    x, W, U, Vh, P, v = (t.detach().to(d) for t in (x, W, U, Vh, P, v))
    S = S.detach().to(d)
    S = S if S.dim() == 2 else torch.diag(S)
    if projection == "full":
        R = (v[:, None, None] * P).sum(0)
    else:
        R = torch.diag((v[:, None] * P).sum(0))
    delta_w = U @ S @ R @ Vh
    y = x @ (W + delta_w).T
    return y if bias is None else y + bias.detach().to(d)
