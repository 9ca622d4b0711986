"""Which implementation computes a TinyLoRA layer: decided here, and only here.

``TINYLORA_BACKEND`` forces a path: ``auto`` (default), ``reference`` (pure torch, plus
bitsandbytes' own matmul for a 4-bit base, as the users' layer computes it) or ``triton``.
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


def select(x: torch.Tensor) -> str:
    """The backend that computes a layer for input ``x``.

    This version ships the reference path only: ``auto`` picks it everywhere, and a forced
    ``triton`` fails loudly rather than quietly running something else.
    """
    choice = requested()
    if choice == "triton":
        raise RuntimeError("TINYLORA_BACKEND=triton, but this version of tinylora_kernels has no "
                           "Triton kernels yet; unset it or use 'reference'")
    return "reference"
