"""The router: one plan per call, overridable per context and per model, and a lean hot path."""

import threading

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNELS_MISSING, KERNELS_RUN, make_linear, make_linear4bit, \
    needs_bnb
from tinylora_kernels import (TinyLoRAGlobalParams, TinyLoRALinear, apply_tiny_lora, router,
                              set_backend, use_backend)
from tinylora_kernels.adapter_state import model_call
from tinylora_kernels.bench import count_ops
from tinylora_kernels.testing import layer_truth_and_lowp, reference_error_budget, tiny_qwen2


def _layer(base=None, u=5):
    gp = TinyLoRAGlobalParams(u_dim=u, dtype=torch.float32)
    layer = TinyLoRALinear(base if base is not None else make_linear(24, 32), global_params_ref=gp,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(u, generator=torch.Generator().manual_seed(1)))
    return layer, gp


def test_plan_names_the_path_and_why(monkeypatch):
    monkeypatch.delenv("TINYLORA_BACKEND", raising=False)
    layer, _ = _layer()
    x = torch.randn(3, 32)
    plan = router.explain(layer, x)
    assert plan.path == "torch" and plan.backend == "auto" and "cpu" in plan.reason
    assert plan.compute_dtype == plan.out_dtype == torch.float32
    with use_backend("reference"):
        assert "reference backend" in router.explain(layer, x).reason
    assert "torch" in str(plan)


def test_context_beats_model_beats_environment(monkeypatch):
    monkeypatch.setenv("TINYLORA_BACKEND", "reference")
    model = torch.nn.Module()
    model.q_proj = make_linear(16, 64)
    apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=3), progress=False)
    layer = model.q_proj
    x = torch.randn(2, 64)
    assert router.explain(layer, x).backend == "reference"
    assert set_backend(model, "auto") == 1
    assert router.explain(layer, x).backend == "auto"
    with use_backend("reference"):
        assert router.explain(layer, x).backend == "reference"
    assert router.explain(layer, x).backend == "auto"
    set_backend(model, None)
    assert router.explain(layer, x).backend == "reference"
    with pytest.raises(ValueError, match="auto, reference, triton"):
        set_backend(model, "fast")


def test_use_backend_is_per_thread():
    layer, _ = _layer()
    x = torch.randn(2, 32)
    seen = {}
    started, release = threading.Event(), threading.Event()

    def other():
        started.wait()
        seen["other"] = router.explain(layer, x).backend
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with use_backend("reference"):
        started.set()
        release.wait(10)
        seen["here"] = router.explain(layer, x).backend
    t.join(10)
    assert seen == {"here": "reference", "other": "auto"}


def test_a_bad_environment_value_is_reported_when_layers_are_applied(monkeypatch):
    monkeypatch.setenv("TINYLORA_BACKEND", "bogus")
    model = torch.nn.Module()
    model.q_proj = make_linear(8, 8)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="TINYLORA_BACKEND must be one of auto, reference, "
                                         "triton; got 'bogus'"):
        apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=3), progress=False)
    assert isinstance(model.q_proj, torch.nn.Linear) and not hasattr(model, "tiny_lora_params")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_a_bad_environment_value_is_reported_at_import():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import tinylora_kernels"], text=True,
                          capture_output=True, env={**__import__("os").environ,
                                                    "TINYLORA_BACKEND": "bogus"})
    assert proc.returncode == 0
    assert "TINYLORA_BACKEND must be one of auto, reference, triton" in proc.stderr


def test_plans_are_cached_per_m_class_and_dropped_on_moves():
    layer, _ = _layer()
    first = router.explain(layer, torch.randn(1, 32))
    assert router.explain(layer, torch.randn(2, 32)) is first        # same M class
    assert len(layer._plans_) == 1
    layer.to(torch.float64)
    assert "_plans_" not in layer.__dict__
    assert router.explain(layer, torch.randn(1, 32, dtype=torch.float64)).compute_dtype \
        == torch.float64


@pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_MISSING)
def test_forced_kernels_plan_the_fused_kernel_with_its_config():
    layer, _ = _layer(make_linear(24, 64).to(KERNEL_DEVICE))
    x = torch.randn(3, 64, device=KERNEL_DEVICE)
    with use_backend("triton"):
        plan = router.explain(layer, x)
    assert plan.path == "fused" and plan.config is not None and plan.config.BK == 64
    with use_backend("triton"), pytest.raises(RuntimeError, match="odd"):
        router.explain(_layer(make_linear(24, 33).to(KERNEL_DEVICE))[0],
                       torch.randn(2, 33, device=KERNEL_DEVICE))


# -- the hot path: what one call issues ---------------------------------------------------------
#: Operations that only describe a tensor differently (no data read or written): counted apart.
METADATA_OPS = {"view", "reshape", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute",
                "unbind", "select", "slice", "as_strided", "_unsafe_view", "alias", "detach"}
#: aten operations that read or write data, beyond bitsandbytes' own call, for a no-grad call of
#: a 4-bit layer inside a model call (v's state computed once for all layers): the adapter's
#: cast of x, one product, the fp32 copy of the base output, one batched addmm and the
#: rounding (5); every R and Aᵀ Rᵀ come from the call's one batched product, the constants are
#: kept by the layer.
EXTRA_OPS_NO_GRAD = 5
#: ... for a layer called on its own (no model call around it), which computes its own state:
#: R from v in float64 (2 casts, mv) and Aᵀ Rᵀ (mm) besides the 5.
EXTRA_OPS_NO_GRAD_ALONE = 9
#: ... and with autograd (forward + backward of x and v): the forward's 5 plus R from v (2 casts,
#: mv), its product with Aᵀ and A x for the backward; the backward's g B, (g B) R, its product
#: with A and the cast to x's dtype, d R and its map to d v, casts.
EXTRA_OPS_FWD_BWD = 21


def _split(ops):
    """(operations that move data, metadata-only operations)."""
    meta = [op for op in ops if op in METADATA_OPS]
    return len(ops) - len(meta), len(meta)


@needs_bnb
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "fwd+bwd"])
def test_a_layer_call_issues_a_bounded_number_of_operations(grad, monkeypatch):
    monkeypatch.setenv("TINYLORA_CPU_DECODED_MB", "0")    # the same base product as bitsandbytes
    base, _ = make_linear4bit(64, 128, bias=False, compute_dtype=torch.bfloat16)
    base.train()
    layer, gp = _layer(base)
    x = torch.randn(1, 128).to(torch.bfloat16).requires_grad_(grad)
    gy = torch.randn(1, 64).to(torch.bfloat16)

    def bare():
        if grad:
            torch.autograd.grad(base(x), [x], gy)
        else:
            with torch.no_grad():
                base(x)

    def ours():
        if grad:
            torch.autograd.grad(layer(x), [x, gp.global_v], gy)
        else:
            with torch.no_grad():
                layer(x)

    ours()                                  # the first call builds the layer's kept constants
    (ours_data, ours_meta), (bare_data, bare_meta) = _split(count_ops(ours)), \
        _split(count_ops(bare))
    budget = EXTRA_OPS_FWD_BWD if grad else EXTRA_OPS_NO_GRAD_ALONE
    assert ours_data - bare_data <= budget, count_ops(ours)
    assert ours_meta - bare_meta <= 10, count_ops(ours)


@needs_bnb
def test_a_model_call_issues_a_bounded_number_of_operations_per_layer(monkeypatch):
    monkeypatch.setenv("TINYLORA_CPU_DECODED_MB", "0")    # the same base product as bitsandbytes
    # the whole model as users run it: v's state once per call, then 5 operations per layer
    bare = tiny_qwen2(quantized=True, compute_dtype=torch.bfloat16, num_hidden_layers=2)
    model = tiny_qwen2(quantized=True, compute_dtype=torch.bfloat16, num_hidden_layers=2)
    for m in (bare, model):
        m.train()                           # no bitsandbytes repacking on AVX512-BF16 CPUs
    gp = TinyLoRAGlobalParams(u_dim=16, dtype=torch.float32)
    n_layers = apply_tiny_lora(model, gp, progress=False)
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(0))

    def run(m):
        with torch.no_grad():
            m(ids)

    run(model)
    run(model)                              # the layers joined the call's batch
    (ours_data, ours_meta), (bare_data, bare_meta) = _split(count_ops(lambda: run(model))), \
        _split(count_ops(lambda: run(bare)))
    # per layer the 5 above; per call v's copy, and per input width (2 here) v in float64, one
    # mv, R's rounding and one bmm
    assert ours_data - bare_data <= EXTRA_OPS_NO_GRAD * n_layers + 1 + 2 * 4, \
        (ours_data - bare_data, n_layers)
    # per layer x, the base output and the result reshaped, Bᵀ broadcast, z as a batch of one;
    # per input width R's view, a transpose, two broadcasts and two unbinds
    assert ours_meta - bare_meta <= 5 * n_layers + 2 * 6, (ours_meta - bare_meta, n_layers)


# -- grouped launch of q/k/v and gate/up ----------------------------------------------------------
def _adapted_one_layer_model():
    """A one-layer 4-bit Qwen2 (fp16 compute) adapted with a fixed, non-zero v."""
    model = tiny_qwen2(quantized=True, compute_dtype=torch.float16, num_hidden_layers=1,
                       device=KERNEL_DEVICE)
    gp = TinyLoRAGlobalParams(u_dim=4, device=KERNEL_DEVICE, dtype=torch.float32)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(4, generator=torch.Generator().manual_seed(3)))
    return model


@needs_bnb
@pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_MISSING)
def test_qkv_and_gate_up_share_one_launch_and_match(monkeypatch):
    from tinylora_kernels.ops import fused_linear as fl

    model = _adapted_one_layer_model()
    launches = []
    real = fl.fused_linear_group
    monkeypatch.setattr(fl, "fused_linear_group",
                        lambda *a, **k: launches.append(len(a[1])) or real(*a, **k))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # 8 rows: the fused kernel (NF4 calls of up to 4 rows go to the GEMV: the test below)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE,
                                                                          torch.float16)
    with torch.no_grad(), use_backend("triton"):
        with model_call(model):         # as the model's own forward calls them
            grouped = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x),
                       mlp.up_proj(x)]
        assert launches == [3, 2]
        # outside a model call each layer computes its own
        alone = [layer(x.clone()) for layer in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                mlp.gate_proj, mlp.up_proj)]
    assert launches == [3, 2]
    for layer, got in zip((attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj),
                          grouped):
        truth, lowp = layer_truth_and_lowp(layer, x)
        err, budget = reference_error_budget(got, lowp, truth)
        assert err <= budget, (layer.layer_name, err, budget)
    for a, b in zip(grouped, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_bnb
@pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_MISSING)
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_qkv_and_gate_up_share_one_gemv_launch(monkeypatch, rows):
    """At decode (M <= 4) a model call launches q/k/v as one GEMV and gate/up as one: 4
    launches per decoder layer instead of 7, each output within the float64 rule."""
    from tinylora_kernels.ops import nf4_gemv as G

    model = _adapted_one_layer_model()
    groups = []
    real_group = G.nf4_gemv_group
    monkeypatch.setattr(G, "nf4_gemv_group",
                        lambda *a, **k: groups.append(len(a[1])) or real_group(*a, **k))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    layers = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE,
                                                                             torch.float16)
    with torch.no_grad(), use_backend("triton"):
        assert router.explain(attn.q_proj, x).path == "gemv"
        with model_call(model):
            grouped = [layer(x) for layer in layers]
    assert groups == [3, 2]
    for layer, got in zip(layers, grouped):
        truth, lowp = layer_truth_and_lowp(layer, x)
        err, budget = reference_error_budget(got, lowp, truth)
        assert err <= budget, (layer.layer_name, err, budget)


@needs_bnb
@pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_MISSING)
def test_a_sibling_never_reuses_a_stale_grouped_output():
    model = tiny_qwen2(quantized=True, compute_dtype=torch.float16, num_hidden_layers=1,
                       device=KERNEL_DEVICE)
    gp = TinyLoRAGlobalParams(u_dim=4, device=KERNEL_DEVICE, dtype=torch.float32)
    apply_tiny_lora(model, gp, progress=False)
    attn = model.model.layers[0].self_attn
    x = torch.randn(8, 64).to(KERNEL_DEVICE, torch.float16)
    with torch.no_grad(), use_backend("triton"):
        attn.q_proj(x)                      # leaves k and v their outputs for this x
        x.mul_(2)                           # the same tensor, changed in place
        k_changed = attn.k_proj(x)
        with use_backend("reference"):
            k_ref = attn.k_proj(x.clone())
        attn.q_proj(x)
        gp.global_v.add_(0.5)               # v changes between the leader and the sibling
        v_after = attn.v_proj(x)
    with torch.no_grad(), use_backend("triton"):
        fresh_v = attn.v_proj(x.clone())
    torch.testing.assert_close(v_after, fresh_v, rtol=0, atol=0)
    assert k_changed.shape == k_ref.shape
    torch.testing.assert_close(k_changed.float(), k_ref.float(), rtol=2e-3, atol=2e-3)
