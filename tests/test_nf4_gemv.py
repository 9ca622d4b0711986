"""The NF4 GEMV (M <= 4, split over K, adapter folded in) against the float64 formula.

Rule: error against float64 at most twice torch's own low-precision computation of the same
function (plus a small atol), on fresh random inputs, odd shapes, a NaN-poisoned output buffer.
"""

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNELS_MISSING, KERNELS_RUN, make_linear4bit, needs_bnb

pytestmark = [needs_bnb, pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_MISSING)]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
if KERNEL_DEVICE == "cuda":
    DTYPES["bf16"] = torch.bfloat16


def _problem(n, k, m, dtype, dq, bias, adapter, rng):
    from tinylora_kernels.nf4 import NF4Weight
    from tinylora_kernels.torch_path import AdapterFactors

    base, _ = make_linear4bit(n, k, bias=bias, double_quant=dq,
                              seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    base = base.to(KERNEL_DEVICE)
    w = NF4Weight.from_bnb(base.weight)
    f = None
    if adapter:
        f = AdapterFactors(
            A=(torch.randn(2, k, generator=rng) / k ** 0.5).bfloat16().to(KERNEL_DEVICE),
            B=torch.randn(n, 2, generator=rng).to(KERNEL_DEVICE),
            R=torch.randn(2, 2, generator=rng).to(KERNEL_DEVICE))
    b = None if not bias else base.bias.detach().to(dtype)
    x = torch.randn(m, k, generator=rng).to(KERNEL_DEVICE, dtype)
    return x, w, b, f


def _f64(x, w, f, b):
    from tinylora_kernels.nf4 import dequantize_nf4

    y = x.double() @ dequantize_nf4(w, torch.float64).T
    if f is not None:
        y = y + (x.double() @ f.A.double().T) @ f.R.double().T @ f.B.double().T
    return y if b is None else y + b.double()


@pytest.mark.parametrize("split,prefetch", [(1, False), (3, False), (1, True), (3, True)],
                         ids=["split1", "split3", "split1-prefetch", "split3-prefetch"])
@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("n,k", [(40, 192), (33, 320)], ids=["40x192", "33x320"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("bias,adapter", [(True, True), (False, False)],
                         ids=["bias+adapter", "bare"])
def test_gemv_vs_float64(split, prefetch, m, n, k, dtype, dq, bias, adapter, rng):
    from tinylora_kernels.ops.configs import GemvConfig
    from tinylora_kernels.ops.nf4_gemv import nf4_gemv
    from tinylora_kernels.reference import tinylora_linear_reference

    dt = DTYPES[dtype]
    x, w, b, f = _problem(n, k, m, dt, dq, bias, adapter, rng)
    cfg = GemvConfig(BN=16, BKH=32, split=split, num_warps=1, prefetch=prefetch)
    out = torch.full((m, n), float("nan"), dtype=dt, device=KERNEL_DEVICE)
    y = nf4_gemv(x, w, b, f, out_dtype=dt, config=cfg, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    truth = _f64(x, w, f, b)
    lowp = tinylora_linear_reference(x, w, f, b)        # torch in x's dtype, W decoded
    err = (y.double() - truth).abs().max().item()
    budget = 2 * (lowp.double() - truth).abs().max().item() + 1e-5
    assert err <= budget, f"error {err:.3e} > budget {budget:.3e}"
    again = nf4_gemv(x, w, b, f, out_dtype=dt, config=cfg)
    assert torch.equal(again, y)                          # deterministic, split or not


def test_gemv_rejects_more_rows_than_it_takes(rng):
    from tinylora_kernels.ops.nf4_gemv import nf4_gemv

    x, w, b, f = _problem(40, 64, 5, torch.float32, True, False, False, rng)
    with pytest.raises(ValueError, match="at most 4 rows"):
        nf4_gemv(x, w, b, f, out_dtype=torch.float32)


@pytest.mark.parametrize("m", [1, 4, 5])
def test_layer_routes_decode_to_the_gemv_and_trains_through_it(m, rng):
    from tinylora_kernels import TinyLoRAGlobalParams, TinyLoRALinear, router, use_backend
    from tinylora_kernels.testing import layer_truth_and_lowp, reference_error_budget

    base, _ = make_linear4bit(48, 128, compute_dtype=torch.float32)
    gp = TinyLoRAGlobalParams(u_dim=4, dtype=torch.float32).to(KERNEL_DEVICE)
    layer = TinyLoRALinear(base.to(KERNEL_DEVICE), global_params_ref=gp)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(4, generator=rng))
    x = torch.randn(m, 128, generator=rng).to(KERNEL_DEVICE).requires_grad_(True)
    with use_backend("triton"):
        assert router.explain(layer, x).path == ("gemv" if m <= 4 else "fused")
        y = layer(x)
        gx, gv = torch.autograd.grad(y, (x, gp.global_v), torch.ones_like(y))
    truth, lowp = layer_truth_and_lowp(layer, x.detach())
    err, budget = reference_error_budget(y, lowp, truth)
    assert err <= budget
    with use_backend("reference"):
        y_ref = layer(x)
        ex, ev = torch.autograd.grad(y_ref, (x, gp.global_v), torch.ones_like(y_ref))
    torch.testing.assert_close(gx, ex, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gv, ev, rtol=1e-4, atol=1e-4)


def test_split_k_reduces_in_one_launch_and_leaves_its_counts_at_zero(rng):
    """Split over K, the GEMV is one launch: the slice that finishes last for a row tile sums
    the slices (in order: the same bits as one slice at a time) and sets its count back to zero,
    so the next call, of any shape, starts clean."""
    from tinylora_kernels.ops import nf4_gemv as G
    from tinylora_kernels.ops.configs import GemvConfig

    launched = []
    real = G._nf4_gemv_kernel

    class Counting:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    G._nf4_gemv_kernel = Counting()
    try:
        for n, k, split in ((40, 320, 3), (72, 192, 2)):
            x, w, b, f = _problem(n, k, 2, torch.float32, True, True, True, rng)
            cfg = GemvConfig(BN=16, BKH=32, split=split, num_warps=1)
            y = G.nf4_gemv(x, w, b, f, out_dtype=torch.float32, config=cfg)
            truth = _f64(x, w, f, b)
            assert (y.double() - truth).abs().max().item() < 1e-3
            assert all(int(c.abs().sum()) == 0 for c in G._COUNTS.values())
    finally:
        G._nf4_gemv_kernel = real
    assert len(launched) == 2 and [g[1] for g in launched] == [3, 2]


@pytest.mark.parametrize("ns", [(40, 24, 24), (72, 40)], ids=["qkv-like", "gate-up-like"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bias,adapter", [(True, True), (False, False)],
                         ids=["bias+adapter", "bare"])
def test_gemv_group_is_each_projection_in_one_launch(ns, split, m, bias, adapter, rng):
    """Projections of one x in one launch give each projection's GEMV bit for bit (same launch
    shape), within the float64 rule; the output buffers start poisoned."""
    from tinylora_kernels.ops import nf4_gemv as G
    from tinylora_kernels.ops.configs import GemvConfig

    k = 320
    probs = [_problem(n, k, m, torch.float32, True, bias, adapter, rng) for n in ns]
    x = probs[0][0]
    cfg = GemvConfig(BN=16, BKH=32, split=split, num_warps=1)
    real_empty = torch.empty

    def poisoned(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = poisoned
    try:
        outs = G.nf4_gemv_group(x, [(w, b, f) for _, w, b, f in probs],
                                out_dtype=torch.float32, config=cfg)
    finally:
        torch.empty = real_empty
    for (_, w, b, f), y in zip(probs, outs):
        alone = G.nf4_gemv(x, w, b, f, out_dtype=torch.float32, config=cfg)
        assert torch.equal(y, alone)
        truth = _f64(x, w, f, b)
        from tinylora_kernels.reference import tinylora_linear_reference
        lowp = tinylora_linear_reference(x, w, f, b)
        budget = 2 * (lowp.double() - truth).abs().max().item() + 1e-5
        assert (y.double() - truth).abs().max().item() <= budget


def test_gemv_group_refuses_mismatched_projections(rng):
    from tinylora_kernels.ops.nf4_gemv import nf4_gemv_group

    x, w, b, f = _problem(40, 320, 1, torch.float32, True, True, True, rng)
    _, w2, b2, f2 = _problem(24, 192, 1, torch.float32, True, True, True, rng)
    with pytest.raises(ValueError, match="differs from projection 0"):
        nf4_gemv_group(x, [(w, b, f), (w2, b2, f2)], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="differs from projection 0"):
        nf4_gemv_group(x, [(w, b, f), (w, None, f)], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="2 or 3 projections"):
        nf4_gemv_group(x, [(w, b, f)], out_dtype=torch.float32)
    with pytest.raises(ValueError, match="at most"):
        nf4_gemv_group(torch.cat([x] * 5), [(w, b, f), (w, b, f)], out_dtype=torch.float32)
