"""The registered torch ops: schema, fake (shape) implementations, autograd registrations.

``torch.library.opcheck`` runs each op eagerly, under fake tensors and through AOT autograd and
compares; the fused ops run on the CPU through Triton's interpreter.
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNELS_MISSING, KERNELS_RUN, needs_bnb
from tinylora_kernels.nf4 import NF4Weight

import tinylora_kernels.torch_path  # noqa: F401  (registers tinylora::add_adapter)


def _factors(n, k, r, gen, device="cpu"):
    A = (torch.randn(r, k, generator=gen) / k ** 0.5).to(device)
    B = torch.randn(n, r, generator=gen).to(device)
    R = torch.randn(r, r, generator=gen).to(device).requires_grad_(True)
    return A, B, R


@pytest.mark.parametrize("split16", [False, True], ids=["fp32", "split16"])
@pytest.mark.parametrize("trainable_factors", [False, True], ids=["frozen-AB", "trainable-AB"])
def test_opcheck_add_adapter(trainable_factors, split16):
    gen = torch.Generator().manual_seed(0)
    m, n, k, r = 5, 24, 40, 3
    dt = torch.float16 if split16 else torch.float32
    x = torch.randn(2, m, k, generator=gen).to(dt).requires_grad_(True)
    base = torch.randn(2, m, n, generator=gen).to(dt).requires_grad_(True)
    A, B, R = _factors(n, k, r, gen)
    A.requires_grad_(trainable_factors)
    B.requires_grad_(trainable_factors)
    torch.library.opcheck(torch.ops.tinylora.add_adapter.default,
                          (base, x, A, B, R, dt, split16))


def _weights(quantized, n, k, gen):
    from tinylora_kernels.ops.custom_ops import pack_weight

    w = torch.randn(n, k, generator=gen) * 0.05
    if not quantized:
        return pack_weight(w.to(KERNEL_DEVICE))
    import bitsandbytes.functional as bnbF

    packed, qs = bnbF.quantize_4bit(w.to(KERNEL_DEVICE), quant_type="nf4")
    return pack_weight(NF4Weight.from_quant_state(packed, qs))


@pytest.mark.parametrize("quantized,path", [
    (False, "fused"), pytest.param(True, "fused", marks=needs_bnb),
    pytest.param(True, "large_m", marks=needs_bnb)], ids=["dense", "nf4", "nf4-large_m"])
def test_opcheck_fused_ops(quantized, path):
    if not KERNELS_RUN:
        pytest.skip(KERNELS_MISSING)
    gen = torch.Generator().manual_seed(1)
    m, n, k, r = 5, 24, 64, 2
    tensors, meta, wdtype = _weights(quantized, n, k, gen)
    A, B, R = _factors(n, k, r, gen, KERNEL_DEVICE)
    x = torch.randn(m, k, generator=gen).to(KERNEL_DEVICE).requires_grad_(True)
    g = torch.randn(m, n, generator=gen).to(KERNEL_DEVICE).requires_grad_(True)
    dt = torch.float32
    torch.library.opcheck(torch.ops.tinylora.fused_linear.default,
                          (x, tensors, meta, wdtype, None, A, B, R, dt, path))
    torch.library.opcheck(torch.ops.tinylora.fused_grad_x.default,
                          (g, tensors, meta, wdtype, A, B, R, dt, path))


def test_fused_grad_x_double_backward_matches_the_formula():
    """d/dg and d/dR of ``g W + ((g B) R) A`` through the op, against autograd of the formula."""
    if not KERNELS_RUN:
        pytest.skip(KERNELS_MISSING)
    gen = torch.Generator().manual_seed(2)
    m, n, k, r = 7, 24, 64, 3
    tensors, meta, wdtype = _weights(False, n, k, gen)
    W = tensors[0]
    A, B, R = _factors(n, k, r, gen, KERNEL_DEVICE)
    g = torch.randn(m, n, generator=gen).to(KERNEL_DEVICE).requires_grad_(True)
    h = torch.randn(m, k, generator=gen).to(KERNEL_DEVICE)
    gx, _ = torch.ops.tinylora.fused_grad_x(g, tensors, meta, wdtype, A, B, R, torch.float32,
                                           "fused")
    got = torch.autograd.grad(gx, (g, R), h)
    ref = g @ W + ((g @ B) @ R) @ A
    expected = torch.autograd.grad(ref, (g, R), h)
    torch.testing.assert_close(gx, ref.detach(), rtol=1e-4, atol=1e-4)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
