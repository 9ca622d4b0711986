"""The shared trainable vector v of a TinyLoRA model: ``TinyLoRAGlobalParams``."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import adapter_state
from .validation import as_int

__all__ = ["TinyLoRAGlobalParams"]


class TinyLoRAGlobalParams(nn.Module):
    """The one trainable vector v (``global_v``, zeros of shape (u_dim,)) shared by every layer.

    Calling the module returns ``global_v``. Whole-model dtype casts (``model.half()``,
    ``model.to(torch.bfloat16)``) move v but keep its dtype: trained entries are often ~1e-5,
    which fp16 would flush towards zero. Choose v's dtype at construction (or assign
    ``global_v.data``).
    """

    def __init__(self, u_dim: int = 16, device="cpu", dtype=torch.bfloat16):
        super().__init__()
        u_dim = as_int(u_dim, "u_dim")
        if u_dim < 1:
            raise ValueError(f"u_dim must be a positive int, got {u_dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype (v is trained by gradients), "
                            f"got {dtype!r}")
        self.global_v = nn.Parameter(torch.zeros(u_dim, device=device, dtype=dtype))

    def forward(self) -> torch.Tensor:
        return self.global_v

    def compute_view(self, device) -> torch.Tensor:
        """v in fp32 (float64 for float64 v) on ``device``, from v's values now: one tensor per
        model call, read by every layer (see :mod:`tinylora_kernels.adapter_state`)."""
        return adapter_state.v_view(self, device)

    def _apply(self, fn, recurse=True):
        old, old_grad = self.global_v.data, self.global_v.grad
        super()._apply(fn, recurse)
        v = self.global_v
        if v.dtype != old.dtype:
            v.data = old.to(v.device)
        if old_grad is not None and v.grad is not None and v.grad.dtype != v.dtype:
            # the gradient follows v (an optimizer step would otherwise mix the two dtypes)
            v.grad = old_grad.to(device=v.device, dtype=v.dtype)
        return self
