"""The factorized math: equal to the float64 ΔW formula, differentiable in x and v, never N x K."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_linear
from tinylora_kernels import TinyLoRAGlobalParams, TinyLoRALinear
from tinylora_kernels.reference import AdapterFactors, adapter_delta, projection_matrix
from tinylora_kernels.testing import tinylora_f64


@pytest.mark.parametrize("projection", ["full", "diagonal"])
def test_projection_matrix(projection, rng):
    u, r = 7, 3
    v = torch.randn(u, generator=rng)
    P = torch.randn((u, r, r) if projection == "full" else (u, r), generator=rng)
    R = projection_matrix(v, P, projection)
    expected = (torch.einsum("u,urs->rs", v.double(), P.double()) if projection == "full"
                else torch.diag(v.double() @ P.double()))
    torch.testing.assert_close(R.double(), expected, rtol=1e-6, atol=1e-6)


def test_projection_shape_errors():
    with pytest.raises(ValueError, match="'full' projection needs P of shape"):
        projection_matrix(torch.zeros(4), torch.zeros(4, 2), "full")
    with pytest.raises(ValueError, match="4 entries"):
        projection_matrix(torch.zeros(4), torch.zeros(5, 2, 2), "full")
    with pytest.raises(ValueError, match="projection must be one of"):
        projection_matrix(torch.zeros(4), torch.zeros(4, 2), "sideways")


@pytest.mark.parametrize("projection", ["full", "diagonal"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck_float64_x_and_v(projection, bias, rng):
    base = make_linear(9, 11, bias=bias, dtype=torch.float64)
    gp = TinyLoRAGlobalParams(u_dim=5, dtype=torch.float64)
    layer = TinyLoRALinear(base, rank=3, global_params_ref=gp, projection=projection)
    holder = torch.nn.ModuleDict({"gp": gp, "layer": layer})
    x = torch.randn(2, 4, 11, generator=rng, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, generator=rng, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(lambda x, v: _call(holder, x, v), (x, v))


def _call(holder, x, v):
    """The layer's forward with v substituted (v is a module parameter, gradcheck needs an input)."""
    gp, layer = holder["gp"], holder["layer"]
    saved = gp.global_v
    try:
        del gp.global_v
        gp.global_v = v
        return layer(x)
    finally:
        del gp.global_v
        gp.global_v = saved


def test_adapter_delta_fp32_for_low_precision_inputs(rng):
    x = torch.randn(6, 10, generator=rng).to(torch.bfloat16)
    A = torch.randn(2, 10, generator=rng)
    B = torch.randn(8, 2, generator=rng)
    R = torch.randn(2, 2, generator=rng)
    got = adapter_delta(x, AdapterFactors(A=A, B=B, R=R))
    expected = x.double() @ (B.double() @ R.double() @ A.double()).T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not func.is_view:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("projection", ["full", "diagonal"])
def test_no_out_by_in_tensor_forward_or_backward(projection):
    n, k = 48, 40
    base = make_linear(n, k)
    gp = TinyLoRAGlobalParams(u_dim=6, dtype=torch.float32)
    layer = TinyLoRALinear(base, global_params_ref=gp, projection=projection)
    x = torch.randn(5, k, requires_grad=True)
    with _RecordShapes() as rec:
        layer(x).sum().backward()
    big = [(f, s) for f, s in rec.shapes if s in ((n, k), (k, n))]
    assert not big, f"an out x in tensor was formed: {big}"
    assert gp.global_v.grad is not None and x.grad is not None


@pytest.mark.parametrize("projection", ["full", "diagonal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_factorized_forward_vs_float64_formula(projection, dtype, rng):
    base = make_linear(37, 29, dtype=dtype)
    gp = TinyLoRAGlobalParams(u_dim=11, dtype=torch.float32)
    layer = TinyLoRALinear(base, global_params_ref=gp, projection=projection)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(11, generator=rng))
    x = torch.randn(3, 5, 29, generator=rng).to(dtype)
    y = layer(x)
    truth = tinylora_f64(x, base.weight, layer.U, layer.S, layer.Vh, layer.P, gp.global_v,
                         projection, base.bias)
    # torch's own computation in this dtype, ΔW formed (the users' program)
    S = layer.S.to(dtype)
    S = S if S.dim() == 2 else torch.diag(S)
    R = (torch.einsum("u,urs->rs", gp.global_v.to(dtype), layer.P.to(dtype)) if projection == "full"
         else torch.diag(gp.global_v.to(dtype) @ layer.P.to(dtype)))
    lowp = base(x) + x @ (layer.U.to(dtype) @ S @ R @ layer.Vh.to(dtype)).T
    err = (y.double() - truth).abs().max().item()
    budget = 2 * (lowp.double() - truth).abs().max().item() + 1e-5
    assert y.dtype == dtype and y.shape == (3, 5, 37)
    assert err <= budget, f"error {err:.3e} > budget {budget:.3e}"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_adapter_row_blocks_match_one_pass(out_dtype, rng):
    # N = 4096 puts the CPU path in row blocks of 64: 150 rows cross two block edges
    from tinylora_kernels.torch_path import CPU_CHUNK_ELEMENTS, add_adapter

    m, n, k = 150, 4096, 24
    assert m > CPU_CHUNK_ELEMENTS // n
    x = torch.randn(m, k, generator=rng).to(out_dtype).requires_grad_(True)
    base = torch.randn(m, n, generator=rng).to(out_dtype).requires_grad_(True)
    f = AdapterFactors(A=torch.randn(2, k, generator=rng), B=torch.randn(n, 2, generator=rng),
                       R=torch.randn(2, 2, generator=rng, requires_grad=True))
    got = add_adapter(base, x, f)
    from tinylora_kernels.torch_path import folded_operand

    one_pass = torch.addmm(base.float(), x.float() @ folded_operand(f.A.t(), f.R.t()),
                           f.B.t()).to(out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, one_pass)
    g = torch.randn(m, n, generator=rng).to(out_dtype)
    gx, gbase, gr = torch.autograd.grad(got, (x, base, f.R), g)
    ex, ebase, er = torch.autograd.grad(one_pass, (x, base, f.R), g)
    assert torch.equal(gbase, ebase)
    # two fp32 orders of one sum, each rounded once to the output dtype: they may differ by one
    # unit in the last place of that dtype (a BLAS detail), judged against the float64 truth
    truth_x = (g.double() @ f.B.double()) @ f.R.detach().double() @ f.A.double()
    ulp = torch.finfo(out_dtype).eps * truth_x.abs()
    # plus the fp32 summation's own bound (n terms of magnitude |g| |B R A|)
    sums = (g.double().abs() @ f.B.double().abs()) @ f.R.detach().double().abs() \
        @ f.A.double().abs()
    fp32 = 4 * torch.finfo(torch.float32).eps * sums
    assert ((gx.double() - truth_x).abs() <= 2 * (ex.double() - truth_x).abs() + ulp
            + fp32).all()
    truth_r = (g.double() @ f.B.double()).t() @ (x.detach().double() @ f.A.double().t())
    err, budget = (gr.double() - truth_r).abs().max(), 2 * (er.double() - truth_r).abs().max()
    assert err <= budget + 1e-6 * truth_r.abs().max(), (err, budget)


def test_add_adapter_gradients_for_trainable_factors(rng):
    # PEFT-style factors (A, B trainable) get their gradients too, checked in float64
    from tinylora_kernels.reference import add_adapter

    x = torch.randn(5, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    base = torch.randn(5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    R = torch.randn(3, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda base, x, A, B, R: add_adapter(base, x, AdapterFactors(A=A, B=B, R=R)),
        (base, x, A, B, R))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split16_adapter_path_vs_float64(dtype, rng):
    """The CUDA path for 16-bit tensors (one 16-bit addmm with split z / B, split A for A x,
    split (g B) R / A for grad x), forced on the CPU: output and gradients within the 2x rule."""
    from tinylora_kernels.torch_path import add_adapter

    m, n, k, r = 37, 90, 70, 3
    x = torch.randn(m, k, generator=rng).to(dtype).requires_grad_(True)
    base = (torch.randn(m, n, generator=rng) * 4).to(dtype).requires_grad_(True)
    A = (torch.randn(r, k, generator=rng) / k ** 0.5).bfloat16()
    B = torch.randn(n, r, generator=rng) * 3
    R = torch.randn(r, r, generator=rng).requires_grad_(True)
    g = torch.randn(m, n, generator=rng).to(dtype)
    out = add_adapter(base, x, AdapterFactors(A=A, B=B, R=R), dtype, split16=True)
    gx, gbase, gr = torch.autograd.grad(out, (x, base, R), g)
    # float64 truth and torch's own low-precision evaluation (ΔW formed in the 16-bit dtype)
    x64, A64, B64, R64, g64 = (t.detach().double() for t in (x, A, B, R, g))
    truth = base.detach().double() + x64 @ (B64 @ R64 @ A64).T
    lowp = base.detach() + x.detach() @ (B.to(dtype) @ R.detach().to(dtype) @ A.to(dtype)).T
    gx_truth = g64 @ (B64 @ R64 @ A64)
    gx_lowp = g @ (B.to(dtype) @ R.detach().to(dtype) @ A.to(dtype))
    gr_truth = (g64 @ B64).T @ (x64 @ A64.T)
    for got, t, lo in ((out, truth, lowp), (gx, gx_truth, gx_lowp)):
        err = (got.double() - t).abs().max().item()
        budget = 2 * (lo.double() - t).abs().max().item() + 1e-3
        assert err <= budget, (err, budget)
    assert torch.equal(gbase, g)
    torch.testing.assert_close(gr.double(), gr_truth, rtol=1e-4, atol=1e-3)
    assert out.dtype == gx.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 40), (3, 1, 40), (2, 5, 40), (7, 40), (1, 40)])
@pytest.mark.parametrize("n", [24, 3000])
def test_the_unrolled_decode_add_gives_the_bits_of_the_general_one(dtype, shape, n):
    # add_adapter_inference unrolls _add_low_rank for small outputs on a CPU: same products,
    # so every bit must agree with the general route
    from tinylora_kernels.torch_path import _add_low_rank, add_adapter_inference

    g = torch.Generator().manual_seed(n + len(shape))
    x = torch.randn(*shape, generator=g).to(dtype)
    base = torch.randn(*shape[:-1], n, generator=g).to(dtype)
    rat, bt = torch.randn(40, 2, generator=g), torch.randn(2, n, generator=g)
    kept = base.clone()
    got = add_adapter_inference(base, x, rat, bt, dtype)
    assert torch.equal(base, kept)                 # the base output is left as it was
    want = _add_low_rank(base, x.reshape(-1, 40).float(), rat, bt, dtype).view(got.shape)
    assert got.shape == base.shape and got.dtype == dtype
    assert torch.equal(got, want)
