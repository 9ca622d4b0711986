"""The adapter in the call's 16-bit dtype (half_path.py): what 16-bit calls on a GPU run.

On a CPU the router keeps the fp32 form; these tests turn the half form on for the CPU
(``HALF_FORM_DEVICES``) and hold it to the float64 formula under the 2x-torch rule, forward and
backward, to v read fresh every call, to the model call's batch giving the bits a lone layer
gets, and to a fixed number of passes over the (M, N) output."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tinylora_kernels.half_path as half_path
from conftest import HAS_BNB, make_linear, make_linear4bit, needs_bnb, needs_cuda
from tinylora_kernels import TinyLoRAGlobalParams, TinyLoRALinear, apply_tiny_lora, router
from tinylora_kernels.nf4 import NF4Weight, dequantize_nf4
from tinylora_kernels.testing import layer_truth_and_lowp, reference_error_budget

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def half_on_cpu(monkeypatch):
    monkeypatch.setattr(half_path, "HALF_FORM_DEVICES", frozenset({"cpu", "cuda"}))


def _layer(kind, dt, n, k, projection="full", seed=0):
    if kind == "4bit":
        base = make_linear4bit(n, k, compute_dtype=dt, seed=seed)[0]
    else:
        base = make_linear(n, k, dtype=dt, seed=seed)
    gp = TinyLoRAGlobalParams(u_dim=13, dtype=torch.float32)
    torch.manual_seed(seed)
    layer = TinyLoRALinear(base, rank=2, global_params_ref=gp, projection=projection)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(13, generator=torch.Generator().manual_seed(seed + 7)))
    return layer, gp


def _weight64(layer):
    base = layer.base_layer
    if layer.is_quantized:
        return dequantize_nf4(NF4Weight.from_bnb(base.weight), torch.float64)
    return base.weight.double()


def _formula(layer, x, v, W, cd):
    """The users' formula (ΔW formed, added as a second product, as layer_truth_and_lowp does)
    in dtype ``cd``; differentiable in x and v."""
    P, S = layer.P.to(cd), layer.S.to(cd)
    S = S if S.dim() == 2 else torch.diag(S)
    R = torch.einsum("u,urs->rs", v, P) if layer.projection == "full" else torch.diag(v @ P)
    y = x @ W.to(cd).T + x @ (layer.U.to(cd) @ S @ R @ layer.Vh.to(cd)).T
    bias = layer.base_layer.bias
    return y if bias is None else y + bias.to(cd)


def test_the_router_asks_for_it_only_for_16_bit_calls_on_a_gpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    assert half_path.use_half(cuda, bf, bf, bf) and half_path.use_half(cuda, fp, fp, fp)
    assert not half_path.use_half(cpu, bf, bf, bf)
    assert not half_path.use_half(cuda, f32, f32, f32)
    assert not half_path.use_half(cuda, f32, bf, f32)        # fp32 activations, 16-bit base
    assert not half_path.use_half(cuda, bf, fp, bf)


@pytest.mark.parametrize("kind", ["dense", "4bit"])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("n,k,rows", [(96, 128, (1,)), (37, 64, (3, 5)), (130, 192, (29,))])
@pytest.mark.parametrize("projection", ["full", "diagonal"])
def test_forward_equals_the_float64_formula(half_on_cpu, kind, dt, n, k, rows, projection):
    if kind == "4bit" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    layer, _ = _layer(kind, HALF[dt], n, k, projection, seed=n + k)
    x = torch.randn(*rows, k, generator=torch.Generator().manual_seed(n)).to(HALF[dt])
    assert router.explain(layer, x).half
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == HALF[dt] and y.shape == (*rows, n)
    truth, lowp = layer_truth_and_lowp(layer, x)
    err, budget = reference_error_budget(y, lowp, truth)
    assert err <= budget, f"error {err:.3e} > budget {budget:.3e}"


@pytest.mark.parametrize("kind", ["dense", "4bit"])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("projection", ["full", "diagonal"])
def test_gradients_equal_the_float64_formula(half_on_cpu, kind, dt, projection):
    if kind == "4bit" and not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    cd = HALF[dt]
    layer, gp = _layer(kind, cd, 72, 128, projection, seed=3)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 9, 128, generator=gen).to(cd).requires_grad_(True)
    y = layer(x)
    assert router.explain(layer, x).half
    g = torch.randn(y.shape, generator=gen).to(cd)
    gx, gv = torch.autograd.grad(y, (x, gp.global_v), g)
    W = _weight64(layer)
    grads = {}
    for name, dtype in (("truth", torch.float64), ("lowp", cd)):
        xl = x.detach().to(dtype).requires_grad_(True)
        vl = gp.global_v.detach().to(dtype).requires_grad_(True)
        grads[name] = torch.autograd.grad(_formula(layer, xl, vl, W, dtype), (xl, vl),
                                          g.to(dtype))
    for i, got in enumerate((gx, gv)):
        truth, lowp = grads["truth"][i], grads["lowp"][i]
        err, budget = reference_error_budget(got, lowp, truth, atol=1e-3 * truth.abs().max())
        assert err <= budget, f"grad {i}: error {err:.3e} > budget {budget:.3e}"


def test_inference_and_training_give_the_same_bits_and_v_is_read_every_call(half_on_cpu):
    layer, gp = _layer("dense", torch.bfloat16, 40, 64)
    x = torch.randn(6, 64).to(torch.bfloat16)
    with torch.no_grad():
        y0 = layer(x)
    assert torch.equal(layer(x.clone().requires_grad_(True)), y0)
    gp.global_v.data[0] += 1.0                     # written behind autograd's back
    with torch.no_grad():
        y1 = layer(x)
    assert not torch.equal(y1, y0)
    gp.global_v.data[0] -= 1.0
    with torch.no_grad():
        assert torch.equal(layer(x), y0)


@needs_bnb
def test_a_model_call_gives_each_layer_the_bits_it_gets_alone(half_on_cpu):
    from tinylora_kernels.testing import tiny_qwen2

    model = tiny_qwen2(compute_dtype=torch.bfloat16)
    gp = TinyLoRAGlobalParams(u_dim=13, dtype=torch.float32)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(13, generator=torch.Generator().manual_seed(5)))
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append((m, a[0], out)))
             for m in model.modules() if isinstance(m, TinyLoRALinear)]
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for v_shift in (0.0, 0.5):           # a second call after v changed uses the new v
            gp.global_v.data += v_shift
            seen.clear()
            model(ids)
            assert len(seen) == 14
            for layer, x, out in list(seen):        # (the calls below append to seen)
                assert router.explain(layer, x).half
                assert torch.equal(layer(x), out), layer.layer_name
    for h in hooks:
        h.remove()


_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "slice", "expand", "as_strided",
          "detach", "alias", "unsqueeze", "squeeze", "select", "permute", "diagonal"}


class _Passes(TorchDispatchMode):
    """Reads and writes of tensors with ``numel`` elements by dispatched ops (views excluded)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.reads, self.writes = numel, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in _VIEWS:
            def big(leaves):
                return sum(isinstance(t, torch.Tensor) and t.numel() == self.numel
                           for t in leaves)
            self.reads += big(tree_leaves((args, kwargs)))
            self.writes += big(tree_leaves(out))
        return out


def test_the_adapter_passes_over_the_output_a_fixed_number_of_times(half_on_cpu):
    """M x N is the largest tensor a large-M call touches: the half form reads the base product
    once and writes the output once (forward), and reads the upstream gradient once
    (backward); the whole dense layer adds the base product's one write."""
    m, n, k = 48, 80, 64                        # M*N differs from every other tensor's size
    layer, gp = _layer("dense", torch.bfloat16, n, k)
    x = torch.randn(m, k).to(torch.bfloat16)
    base = layer.base_layer(x)
    w, bt = half_path_operands(layer)
    with torch.no_grad(), _Passes(m * n) as c:
        half_path.half_adapter(base, x, w, bt)
    assert (c.reads, c.writes) == (1, 1)
    xg = x.clone().requires_grad_(True)
    base = layer.base_layer(x).detach()
    v = gp.global_v.float()
    p = layer._constants(torch.float32).p
    with _Passes(m * n) as c:
        y = half_path.half_layer_adapter(base, xg, v, w, bt, p, "full")
    assert (c.reads, c.writes) == (1, 1)
    g = torch.randn(m, n).to(torch.bfloat16)
    with _Passes(m * n) as c:
        torch.autograd.backward(y, g)
    assert (c.reads, c.writes) == (1, 0)            # g read once
    assert xg.grad is not None
    # the whole dense layer: + the base product's write (forward) and its d x's read of g
    with torch.no_grad(), _Passes(m * n) as c:
        layer(x)
    assert (c.reads, c.writes) == (1, 2)
    xg.grad = None
    with _Passes(m * n) as c:
        torch.autograd.backward(layer(xg), g)
    assert (c.reads, c.writes) == (3, 2)


def half_path_operands(layer):
    from tinylora_kernels import adapter_state

    with torch.no_grad():
        return adapter_state.half_operands(layer, torch.bfloat16)


# -- on a GPU: what the router really runs there --------------------------------------------------
@needs_cuda
@needs_bnb
@pytest.mark.parametrize("projection", ["full", "diagonal"])
def test_bf16_4bit_layer_on_cuda_equals_the_float64_formula(projection):
    layer, gp = _layer("4bit", torch.bfloat16, 200, 320, projection, seed=4)
    layer.cuda()
    gen = torch.Generator().manual_seed(12)
    for rows in ((1,), (3, 5), (600,)):
        x = torch.randn(*rows, 320, generator=gen).to("cuda", torch.bfloat16)
        assert router.explain(layer, x).half
        with torch.no_grad():
            y = layer(x)
        truth, lowp = layer_truth_and_lowp(layer, x)
        err, budget = reference_error_budget(y, lowp, truth)
        assert err <= budget, f"M={rows}: error {err:.3e} > budget {budget:.3e}"
    x = x.requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, generator=gen).to("cuda", torch.bfloat16)
    gx, gv = torch.autograd.grad(y, (x, gp.global_v), g)
    W = _weight64(layer)
    for i, got in enumerate((gx, gv)):
        want = []
        for dtype in (torch.float64, torch.bfloat16):
            xl = x.detach().to(dtype).requires_grad_(True)
            vl = gp.global_v.detach().to(dtype).requires_grad_(True)
            want.append(torch.autograd.grad(_formula(layer, xl, vl, W, dtype), (xl, vl),
                                            g.to(dtype))[i])
        err, budget = reference_error_budget(got, want[1], want[0],
                                             atol=1e-3 * want[0].abs().max())
        assert err <= budget, f"grad {i}: error {err:.3e} > budget {budget:.3e}"


@needs_cuda
@needs_bnb
def test_a_training_and_a_decode_step_on_cuda_never_synchronize():
    """Every adapted layer of a 4-bit model, forward and backward inside one model call, and a
    no-grad decode call, under ``torch.cuda.set_sync_debug_mode("error")``."""
    from tinylora_kernels import adapter_state
    from tinylora_kernels.testing import tiny_qwen2

    model = tiny_qwen2(compute_dtype=torch.bfloat16, device="cuda")
    gp = TinyLoRAGlobalParams(u_dim=13, device="cuda", dtype=torch.float32)
    apply_tiny_lora(model, gp, progress=False)
    layers = [m for m in model.modules() if isinstance(m, TinyLoRALinear)]
    inputs = [torch.randn(4, 9, m.base_layer.in_features, device="cuda",
                          dtype=torch.bfloat16) for m in layers]
    for _ in range(2):                       # the second round with everything warm
        torch.cuda.set_sync_debug_mode("error")
        try:
            with adapter_state.model_call(model):
                loss = sum(m(x.requires_grad_(True)).float().square().mean()
                           for m, x in zip(layers, inputs))
            loss.backward()
            with adapter_state.model_call(model), torch.no_grad():
                for m, x in zip(layers, inputs):
                    m(x[:, -1:])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert gp.global_v.grad is not None and torch.isfinite(gp.global_v.grad).all()
