"""Which implementation computes a TinyLoRA layer: decided here, and only here.

``TINYLORA_BACKEND`` picks the path:

* ``auto`` (default): the fused Triton kernel for CUDA inputs the kernel supports, the reference
  path otherwise (CPU tensors, Triton missing, a 4-bit layer whose K is not a multiple of its
  NF4 block);
* ``reference``: always the pure-torch path (bitsandbytes' own matmul for a 4-bit base);
* ``triton``: always the kernel; CPU tensors run through Triton's interpreter when
  ``TRITON_INTERPRET=1``. When the kernel cannot take the call, this raises and says why,
  instead of quietly computing something else.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton")


def requested() -> str:
    """The backend asked for by ``TINYLORA_BACKEND`` (validated)."""
    value = os.environ.get("TINYLORA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TINYLORA_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def kernel_refusal(x: torch.Tensor, weight) -> "str | None":
    """None when the fused kernel can compute this call, else the reason it cannot."""
    from .ops import triton_missing

    why = triton_missing()
    if why is not None:
        return why
    from .ops.fused_linear import check_supported

    return check_supported(x, weight)


def select(x: torch.Tensor, weight) -> str:
    """``"triton"`` or ``"reference"`` for input x and a layer's weight (NF4Weight or tensor)."""
    choice = requested()
    if choice == "reference":
        return "reference"
    if choice == "auto" and not x.is_cuda:
        return "reference"
    why = kernel_refusal(x, weight)
    if why is None:
        return "triton"
    if choice == "triton":
        raise RuntimeError(f"TINYLORA_BACKEND=triton, but the Triton kernel cannot compute this "
                           f"layer: {why}")
    return "reference"
