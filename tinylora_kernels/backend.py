"""Which implementation computes a TinyLoRA layer: decided here, and only here.

``TINYLORA_BACKEND`` picks the path:

* ``auto`` (default): the path measured fastest for the call (:data:`AUTO_USES_KERNELS`); the
  reference path wherever the kernel cannot run (CPU tensors, Triton missing, a 4-bit layer
  whose K is not a multiple of its NF4 block);
* ``reference``: always the pure-torch path (bitsandbytes' own matmul for a 4-bit base);
* ``triton``: always the kernel; CPU tensors run through Triton's interpreter when
  ``TRITON_INTERPRET=1``. When the kernel cannot take the call, this raises and says why,
  instead of quietly computing something else.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "reference", "triton")

#: Whether ``auto`` sends CUDA calls to the Triton kernels. Measured on an H200 (torch 2.11,
#: triton 3.6, bitsandbytes 0.50.2; benchmarks/results/h200/bench-gpu.json, TUNING.md v4): the
#: kernels are correct but slower than bitsandbytes' own 4-bit matmul plus the factorized adapter
#: at Qwen2.5-Coder-3B sizes, e.g. gate/up at M = 1 under CUDA graphs 108.8 vs 33.1 µs, at
#: M = 4096 478.5 vs 444.5 µs, and a 4-decoder-layer training step 68.4 vs 26.1 ms; only their
#: backward per layer at M = 4096 is ahead (1.8-2.0x). Until a measurement says otherwise, ``auto``
#: keeps the reference path; ``TINYLORA_BACKEND=triton`` selects the kernels.
AUTO_USES_KERNELS = False


def requested() -> str:
    """The backend asked for by ``TINYLORA_BACKEND`` (validated)."""
    value = os.environ.get("TINYLORA_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"TINYLORA_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def kernel_refusal(x: torch.Tensor, weight, compute_dtype=None) -> "str | None":
    """None when the fused kernel can compute this call, else the reason it cannot."""
    from .ops import triton_missing

    why = triton_missing()
    if why is not None:
        return why
    from .ops.fused_linear import check_supported

    return check_supported(x, weight, compute_dtype)


def select(x: torch.Tensor, weight, compute_dtype=None) -> str:
    """``"triton"`` or ``"reference"`` for input x and a layer's weight (NF4Weight or tensor).

    ``weight`` may be a no-argument callable returning it (only called when the kernels are
    considered). ``compute_dtype`` is the dtype the layer computes the product in (default: x's).
    """
    choice = requested()
    if choice == "reference":
        return "reference"
    if choice == "auto" and not (x.is_cuda and AUTO_USES_KERNELS):
        return "reference"
    if callable(weight):
        weight = weight()
    why = kernel_refusal(x, weight, compute_dtype)
    if why is None:
        return "triton"
    if choice == "triton":
        raise RuntimeError(f"TINYLORA_BACKEND=triton, but the Triton kernel cannot compute this "
                           f"layer: {why}")
    return "reference"


@contextmanager
def forced(name: str):
    """Within the block, ``TINYLORA_BACKEND`` is ``name`` (restored after)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    old = os.environ.get("TINYLORA_BACKEND")
    os.environ["TINYLORA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TINYLORA_BACKEND", None)
        else:
            os.environ["TINYLORA_BACKEND"] = old
