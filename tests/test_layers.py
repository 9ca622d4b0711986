"""The drop-in modules on real layer types: values, dtypes, shapes, gradients, RNG, round trips."""

import copy

import pytest
import torch

from conftest import HAS_BNB, make_linear, make_linear4bit, needs_bnb
from tinylora_kernels import TinyLoRAGlobalParams, TinyLoRALinear, apply_tiny_lora
from tinylora_kernels.nf4 import NF4Weight, dequantize_nf4
from tinylora_kernels.testing import layer_truth_and_lowp, reference_error_budget

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _adapt(base, projection="full", u=13, v_scale=0.5, seed=0, rank=2):
    gp = TinyLoRAGlobalParams(u_dim=u, dtype=torch.float32)
    torch.manual_seed(seed)
    layer = TinyLoRALinear(base, rank=rank, global_params_ref=gp, projection=projection)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(u, generator=torch.Generator().manual_seed(seed + 1))
                          * v_scale)
    return layer, gp


def _check_against_f64(layer, x):
    y = layer(x)
    truth, lowp = layer_truth_and_lowp(layer, x)
    err, budget = reference_error_budget(y, lowp, truth)
    assert err <= budget, f"error {err:.3e} > budget {budget:.3e}"
    return y


# -- TinyLoRAGlobalParams -------------------------------------------------------------------------
def test_global_params():
    gp = TinyLoRAGlobalParams()
    assert gp.global_v.shape == (16,) and gp.global_v.dtype == torch.bfloat16
    assert torch.count_nonzero(gp.global_v) == 0 and gp() is gp.global_v
    assert [n for n, _ in gp.named_parameters()] == ["global_v"]
    gp = TinyLoRAGlobalParams(u_dim=5, device="cpu", dtype=torch.float32)
    assert gp.global_v.shape == (5,) and gp.global_v.dtype == torch.float32
    with pytest.raises(ValueError, match="u_dim"):
        TinyLoRAGlobalParams(u_dim=0)


# -- constructor ------------------------------------------------------------------------------------
def test_constructor_errors():
    base = make_linear(8, 6)
    with pytest.raises(ValueError, match="global_params_ref"):
        TinyLoRALinear(base)
    gp = TinyLoRAGlobalParams(u_dim=4)
    with pytest.raises(ValueError, match="u=5 but"):
        TinyLoRALinear(base, u=5, global_params_ref=gp)
    with pytest.raises(ValueError, match="rank"):
        TinyLoRALinear(base, rank=7, global_params_ref=gp)
    with pytest.raises(ValueError, match="projection"):
        TinyLoRALinear(base, global_params_ref=gp, projection="nope")
    with pytest.raises(TypeError, match="nn.Linear"):
        TinyLoRALinear(torch.nn.Conv1d(2, 2, 1), global_params_ref=gp)


@pytest.mark.parametrize("projection", ["full", "diagonal"])
def test_buffers_follow_the_users_program(projection):
    base = make_linear(20, 12)
    gp = TinyLoRAGlobalParams(u_dim=7)
    torch.manual_seed(5)
    layer = TinyLoRALinear(base, global_params_ref=gp, projection=projection)
    U, S, Vh = torch.linalg.svd(base.weight.detach().float().cpu(), full_matrices=False)
    torch.manual_seed(5)
    if projection == "full":
        P = torch.randn(7, 2, 2, dtype=torch.bfloat16)
        S_expected = torch.diag(S[:2]).to(torch.bfloat16)
    else:
        P = torch.randn(7, 2, dtype=torch.bfloat16) / 2 ** 0.5
        S_expected = S[:2].to(torch.bfloat16)
    assert torch.equal(layer.U, U[:, :2].to(torch.bfloat16))
    assert torch.equal(layer.S, S_expected)
    assert torch.equal(layer.Vh, Vh[:2].to(torch.bfloat16))
    assert torch.equal(layer.P, P)
    for name in ("U", "S", "Vh", "P"):
        assert getattr(layer, name).dtype == torch.bfloat16
    assert layer.base_layer is base
    assert not any(p.requires_grad for p in base.parameters())
    # v is referenced, not owned; the base is frozen
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    assert "global_v" not in " ".join(n for n, _ in layer.named_parameters())


@needs_bnb
def test_svd_of_4bit_layer_uses_the_dequantized_weight():
    base, _ = make_linear4bit(24, 64, compute_dtype=torch.float16)
    gp = TinyLoRAGlobalParams(u_dim=3)
    layer = TinyLoRALinear(base, global_params_ref=gp)
    import bitsandbytes.functional as bnbF
    W = bnbF.dequantize_4bit(base.weight.data, base.weight.quant_state).float().cpu()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.equal(layer.U, U[:, :2].to(torch.bfloat16))
    assert torch.equal(layer.Vh, Vh[:2].to(torch.bfloat16))


# -- forward values -------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", ["full", "diagonal"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("wdtype", list(DTYPES), ids=lambda d: f"w-{d}")
@pytest.mark.parametrize("xdtype", list(DTYPES), ids=lambda d: f"x-{d}")
def test_dense_base(projection, bias, wdtype, xdtype, rng):
    base = make_linear(45, 33, bias=bias, dtype=DTYPES[wdtype])
    layer, _ = _adapt(base, projection)
    x = torch.randn(2, 7, 33, generator=rng).to(DTYPES[xdtype])
    y = _check_against_f64(layer, x)
    # the base layer's own output dtype where it has one, x's where nn.Linear would refuse
    assert y.dtype == DTYPES[wdtype if wdtype == xdtype else xdtype]
    assert y.shape == (2, 7, 45)


@needs_bnb
@pytest.mark.parametrize("projection", ["full", "diagonal"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("compute", ["fp16", "bf16"], ids=lambda d: f"compute-{d}")
@pytest.mark.parametrize("xdtype", list(DTYPES), ids=lambda d: f"x-{d}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear4bit_base(projection, double_quant, compute, xdtype, bias, rng):
    base, _ = make_linear4bit(96, 128, bias=bias, double_quant=double_quant,
                              compute_dtype=DTYPES[compute])
    layer, _ = _adapt(base, projection)
    x = torch.randn(3, 5, 128, generator=rng).to(DTYPES[xdtype])
    y = _check_against_f64(layer, x)
    assert y.dtype == DTYPES[xdtype] and y.shape == (3, 5, 96)


@needs_bnb
@pytest.mark.parametrize("k", [100, 3584 // 8 + 3], ids=["k100", "k451"])
def test_linear4bit_k_not_multiple_of_64(k, rng):
    base, _ = make_linear4bit(40, k)
    layer, _ = _adapt(base)
    layer.eval()
    x = torch.randn(6, k, generator=rng).to(torch.float16)
    with torch.no_grad():
        _check_against_f64(layer, x)


@needs_bnb
def test_eval_forward_does_not_repack_storage(rng):
    # bitsandbytes' own eval forward on AVX512-BF16 CPUs rewrites weight.data in place
    base, _ = make_linear4bit(64, 128)
    before = base.weight.data.clone()
    layer, _ = _adapt(base)
    layer.eval()
    x = torch.randn(4, 128, generator=rng).to(torch.float16)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(base.weight.data, before)
    assert torch.equal(y1, y2)


@needs_bnb
def test_layer_repacked_before_wrapping_is_restored(rng):
    base, _ = make_linear4bit(64, 128, bias=False)
    base.eval()
    with torch.no_grad():
        base(torch.randn(2, 128, dtype=torch.float16))
    layer, _ = _adapt(base)   # restores the NF4 layout (with a warning) instead of misreading it
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    x = torch.randn(3, 128, generator=rng).to(torch.float16)
    with torch.no_grad():
        _check_against_f64(layer, x)


@pytest.mark.parametrize("kind", ["dense", "4bit-dq"])
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)], ids=["2d", "3d"])
def test_zero_rows(kind, shape):
    if kind == "4bit-dq" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    base = make_linear(32, 64) if kind == "dense" else make_linear4bit(32, 64)[0]
    layer, gp = _adapt(base)
    layer.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (*shape[:-1], 32) and y.dtype == x.dtype
    layer.train()
    x.requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_input(rng):
    layer, _ = _adapt(make_linear(16, 24))
    x = torch.randn(24, 9, generator=rng).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


# -- gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense-fp32", "dense-bf16", "4bit-fp16"])
def test_gradients_reach_x_and_v_only(kind, rng):
    if kind.startswith("4bit") and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    base = {"dense-fp32": lambda: make_linear(30, 64),
            "dense-bf16": lambda: make_linear(30, 64, dtype=torch.bfloat16),
            "4bit-fp16": lambda: make_linear4bit(30, 64)[0]}[kind]()
    layer, gp = _adapt(base)
    x = torch.randn(5, 64, generator=rng, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert gp.global_v.grad is not None and gp.global_v.grad.abs().sum() > 0
    for name, p in layer.named_parameters(recurse=True):
        assert not p.requires_grad, name
    # an optimizer over everything that requires grad changes v and nothing else
    frozen = {n: t.detach().clone() for n, t in layer.state_dict().items()}
    trainable = [t for t in [*layer.parameters(), *layer.buffers(), gp.global_v]
                 if t.requires_grad]
    assert trainable == [gp.global_v]
    v_before = gp.global_v.detach().clone()
    torch.optim.SGD(trainable, lr=1.0).step()
    assert not torch.equal(gp.global_v, v_before)
    for name, t in layer.state_dict().items():
        assert torch.equal(t, frozen[name]), name


@needs_bnb
def test_4bit_gradients_match_float64(rng):
    base, _ = make_linear4bit(40, 128, compute_dtype=torch.float32)
    layer, gp = _adapt(base, "full")
    x = torch.randn(7, 128, generator=rng, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, gp.global_v), g)
    W = dequantize_nf4(NF4Weight.from_bnb(base.weight), torch.float64)
    x64 = x.detach().double().requires_grad_(True)
    v64 = gp.global_v.detach().double().requires_grad_(True)
    R = torch.einsum("u,urs->rs", v64, layer.P.double())
    y64 = x64 @ (W + layer.U.double() @ layer.S.double() @ R @ layer.Vh.double()).T
    ex, ev = torch.autograd.grad(y64, (x64, v64), g.double())
    torch.testing.assert_close(gx.double(), ex, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gv.double(), ev, rtol=1e-4, atol=1e-4)


# -- module conversions ---------------------------------------------------------------------------
def test_half_and_back_keeps_bf16_buffers(rng):
    layer, gp = _adapt(make_linear(16, 24))
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    layer.half()
    assert layer.base_layer.weight.dtype == torch.float16
    layer.float()
    for n, b in layer.named_buffers():
        assert b.dtype == torch.bfloat16 and torch.equal(b, buffers[n]), n
    x = torch.randn(3, 24, generator=rng)
    _check_against_f64(layer, x)


def test_to_device_and_dtype_moves_and_keeps_values(rng):
    layer, _ = _adapt(make_linear(16, 24))
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 24, generator=rng)
    with torch.no_grad():
        before = layer(x)                   # fills the layer's caches in fp32
    moved = layer.to("cpu", torch.float64)
    assert moved is layer and layer.U.dtype == torch.bfloat16
    for name, b in layer.named_buffers():
        assert torch.equal(b, buffers[name]), name           # values and bf16 dtype kept
    assert layer.base_layer.weight.dtype == torch.float64
    assert torch.equal(layer.base_layer.weight, weight.double())
    with torch.no_grad():
        after = layer(x.double())
    # the float64 layer computes the same function, from fresh (float64) constants
    truth, _ = layer_truth_and_lowp(layer, x.double())
    assert after.dtype == torch.float64
    torch.testing.assert_close(after, truth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after.float(), before, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip(rng):
    a, gpa = _adapt(make_linear(20, 24, seed=1), seed=1)
    b, gpb = _adapt(make_linear(20, 24, seed=2), seed=2)
    x = torch.randn(4, 24, generator=rng)
    assert not torch.allclose(a(x), b(x))
    missing = b.load_state_dict(a.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    with torch.no_grad():
        gpb.global_v.copy_(gpa.global_v)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert "global_v" not in " ".join(a.state_dict())


@needs_bnb
def test_deepcopy_shares_v_consistently(rng):
    model = torch.nn.Module()
    model.q_proj = make_linear(8, 8)
    gp = TinyLoRAGlobalParams(u_dim=3)
    apply_tiny_lora(model, gp, progress=False)
    clone = copy.deepcopy(model)
    assert clone.q_proj.global_params_ref is clone.tiny_lora_params
    assert clone.tiny_lora_params is not gp


def test_inference_reuses_factors_but_never_stale_ones(rng):
    layer, gp = _adapt(make_linear(20, 24))
    x = torch.randn(3, 24, generator=rng)

    def fresh():
        with torch.enable_grad():          # the uncached path
            return layer(x).detach()

    with torch.no_grad():
        y1 = layer(x)
        assert torch.equal(layer(x), y1)
        gp.global_v.mul_(2)                                  # in-place update (optimizer step)
        y2 = layer(x)
        assert not torch.equal(y1, y2) and torch.equal(y2, fresh())
        gp.global_v.data = torch.randn(13, generator=rng)   # storage swapped
        y3 = layer(x)
        assert torch.equal(y3, fresh())
        other, _ = _adapt(make_linear(20, 24, seed=5), seed=5)
        layer.load_state_dict(other.state_dict())            # buffers replaced in place
        assert torch.equal(layer(x), fresh())


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw-fused"])
def test_inference_after_an_optimizer_step_uses_the_new_v(fused, rng):
    # fused optimizers write parameters without bumping their version counters
    layer, gp = _adapt(make_linear(20, 24))
    gp.global_v.data = gp.global_v.data.to(torch.bfloat16)     # as TRL leaves it for 4-bit models
    x = torch.randn(3, 24, generator=rng)
    with torch.no_grad():
        before = layer(x)
    opt = torch.optim.AdamW([gp.global_v], lr=0.5, fused=fused)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
    with torch.enable_grad():
        fresh = layer(x).detach()
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)


def test_operands_kept_from_an_inference_mode_call_serve_training(rng):
    # generation often runs under torch.inference_mode; what the layer keeps from such a call
    # must still be usable (and savable) by autograd in the next training step
    layer, gp = _adapt(make_linear(20, 64))
    x = torch.randn(3, 64, generator=rng)
    with torch.inference_mode():
        layer(x)
    assert not layer._constants(torch.float32).b.is_inference()
    from tinylora_kernels.adapter_state import inference_operands

    with torch.no_grad():               # per-call values: computed afresh, never kept
        rat, _ = inference_operands(layer, torch.float32)
    assert rat.grad_fn is None and not rat.requires_grad
    from tinylora_kernels.torch_path import AdapterFactors, add_adapter

    c = layer._constants(torch.float32)
    f = AdapterFactors(A=c.a, B=c.b, R=torch.eye(2, requires_grad=True))
    xh = x.half().requires_grad_(True)
    out = add_adapter(torch.zeros(3, 20, dtype=torch.float16), xh, f, split16=True)
    out.float().sum().backward()                    # saves A and B for backward
    assert xh.grad is not None and torch.isfinite(xh.grad).all()
