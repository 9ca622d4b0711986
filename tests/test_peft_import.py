"""import_peft_tinylora against adapters written by the real peft TinyLoRA implementation."""

import json

import pytest
import torch

from conftest import KERNELS_MISSING, KERNELS_RUN, needs_bnb
from tinylora_kernels import (CheckpointError, TinyLoRALinear, export_lora, import_peft_tinylora,
                              save_tiny_lora, tiny_lora_layers)
from tinylora_kernels.interop import peft_tinylora_groups
from tinylora_kernels.nf4 import dequantize_nf4
from tinylora_kernels.bnb import is_linear4bit, nf4_of
from tinylora_kernels.testing import layer_truth_and_lowp, reference_error_budget, tiny_qwen2

peft = pytest.importorskip("peft")
if not hasattr(peft, "TinyLoraConfig"):
    pytest.skip("peft >= 0.19 (TinyLoRA) is needed", allow_module_level=True)

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _peft_adapter(directory, *, weight_tying=0.0, save_projection=True, u=5, r=2,
                  targets=TARGETS, seed=11):
    """Train-free PEFT TinyLoRA adapter with non-zero v, saved by PEFT; returns the PeftModel."""
    base = tiny_qwen2(quantized=False, dtype=torch.float32)
    cfg = peft.TinyLoraConfig(r=r, u=u, weight_tying=weight_tying, target_modules=targets,
                              projection_seed=seed, save_projection=save_projection,
                              init_weights="uniform", init_v_bound=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = peft.get_peft_model(base, cfg)
    model.save_pretrained(str(directory))
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [n for n, _ in model.named_modules()])


def _assert_unchanged(model, snap):
    state, grads, names = snap
    assert [n for n, _ in model.named_modules()] == names
    assert not tiny_lora_layers(model) and not hasattr(model, "tiny_lora_groups")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("weight_tying,save_projection", [(0.0, True), (0.5, True), (1.0, True),
                                                          (0.3, False)])
def test_logits_match_peft_on_the_unquantized_model(tmp_path, weight_tying, save_projection):
    peft_model = _peft_adapter(tmp_path, weight_tying=weight_tying,
                               save_projection=save_projection)
    n_layers = 2 * len(TARGETS)
    expected_groups = max(peft_tinylora_groups(n_layers, weight_tying)) + 1
    peft_logits = _logits(peft_model)
    truth = _logits(peft_model.double())                    # PEFT's own formula in float64
    plain = _logits(tiny_qwen2(quantized=False, dtype=torch.float64))

    ours = tiny_qwen2(quantized=False, dtype=torch.float32)
    if save_projection:
        groups = import_peft_tinylora(ours, tmp_path)
    else:
        with pytest.warns(UserWarning, match="regenerating P"):
            groups = import_peft_tinylora(ours, tmp_path)
    assert len(groups) == expected_groups and ours.tiny_lora_groups is groups
    assert len(tiny_lora_layers(ours)) == n_layers
    got = _logits(ours)
    err, budget = reference_error_budget(got, peft_logits, truth, atol=1e-5)
    assert err <= budget, (err, budget)
    assert (truth - plain).abs().max() > 100 * budget     # the adapter is really there


def test_factors_and_groups_are_peft_values(tmp_path):
    peft_model = _peft_adapter(tmp_path, weight_tying=0.5)
    ours = tiny_qwen2(quantized=False, dtype=torch.float32)
    groups = import_peft_tinylora(ours, tmp_path)
    theirs = dict(peft_model.base_model.model.named_modules())
    v = peft_model.base_model.tinylora_v["default"]
    for name, layer in tiny_lora_layers(ours):
        peft_layer = theirs[name]
        assert torch.equal(layer.Vh, peft_layer.tinylora_A["default"])
        assert torch.equal(layer.U, peft_layer.tinylora_B["default"])
        assert torch.equal(layer.P, peft_layer.tinylora_P["default"])
        key = peft_layer._tinylora_v_key["default"]
        assert layer.global_params_ref is groups[int(key)]
        assert torch.equal(layer.global_params_ref.global_v, v[key])
        assert layer.rng_scheme == "peft"


def test_groups_train_independently(tmp_path):
    _peft_adapter(tmp_path, weight_tying=0.5)
    ours = tiny_qwen2(quantized=False, dtype=torch.float32)
    groups = import_peft_tinylora(ours, tmp_path)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {f"tiny_lora_groups.{i}.global_v" for i in range(len(groups))} <= trainable
    assert not any(".base_layer." in n for n in trainable)     # the adapted bases are frozen
    ours(input_ids=IDS).logits.float().pow(2).mean().backward()
    assert all(g.global_v.grad is not None and g.global_v.grad.abs().sum() > 0 for g in groups)
    # a layer's output only depends on its own group's v
    name, layer = tiny_lora_layers(ours)[0]
    x = torch.randn(3, layer.base_layer.in_features)
    y0 = layer(x)
    other = next(g for g in groups if g is not layer.global_params_ref)
    with torch.no_grad():
        other.global_v.add_(1.0)
    torch.testing.assert_close(layer(x), y0, rtol=0, atol=0)
    with torch.no_grad():
        layer.global_params_ref.global_v.add_(1.0)
    assert not torch.allclose(layer(x), y0)


@needs_bnb
def test_import_onto_a_4bit_base(tmp_path):
    """PEFT cannot put TinyLoRA on Linear4bit; we can. Judged against PEFT's own model on the
    decoded 4-bit weights in float64, with the adapter loaded by PEFT from the same directory."""
    every = TARGETS + ["k_proj", "up_proj"]
    _peft_adapter(tmp_path, weight_tying=0.5, targets=every)
    q = tiny_qwen2(quantized=True, compute_dtype=torch.float32, dtype=torch.float32)
    groups = import_peft_tinylora(q, tmp_path)
    layers = tiny_lora_layers(q)
    assert len(layers) == 2 * len(every) and all(l.is_quantized for _, l in layers)

    # per layer: the 2x rule against the float64 formula on the decoded weight
    gen = torch.Generator().manual_seed(2)
    for name, layer in layers:
        x = torch.randn(5, layer.base_layer.in_features, generator=gen)
        with torch.no_grad():
            y = layer(x)
        truth, lowp = layer_truth_and_lowp(layer, x)
        err, budget = reference_error_budget(y, lowp, truth)
        assert err <= budget, (name, err, budget)

    # whole model: the same base, decoded to float64, adapted by PEFT from the directory
    f64 = tiny_qwen2(quantized=False, dtype=torch.float64)
    q_modules = dict(q.named_modules())
    with torch.no_grad():
        for name, module in f64.named_modules():
            if isinstance(module, torch.nn.Linear):
                src = q_modules[name]
                src = src.base_layer if isinstance(src, TinyLoRALinear) else src
                w = (dequantize_nf4(nf4_of(src), torch.float32) if is_linear4bit(src)
                     else src.weight)
                module.weight.copy_(w.double())
    plain_truth = _logits(f64)
    truth = _logits(peft.PeftModel.from_pretrained(f64, str(tmp_path)).double())
    got = _logits(q)
    # the scale: the same 4-bit model with v = 0 (its base alone) against its float64 decode
    saved = [g.global_v.detach().clone() for g in groups]
    with torch.no_grad():
        for g in groups:
            g.global_v.zero_()
        base_only = _logits(q)
        for g, v in zip(groups, saved):
            g.global_v.copy_(v)
    err, budget = reference_error_budget(got, base_only, plain_truth, atol=1e-5)
    err = (got - truth).abs().max().item()
    assert err <= budget, (err, budget)
    assert (truth - plain_truth).abs().max() > 100 * budget


def test_kernel_path_computes_an_imported_layer(tmp_path, monkeypatch):
    if not KERNELS_RUN:
        pytest.skip(KERNELS_MISSING)
    _peft_adapter(tmp_path, targets=["down_proj"])
    ours = tiny_qwen2(quantized=False, dtype=torch.float32)
    import_peft_tinylora(ours, tmp_path)
    _, layer = tiny_lora_layers(ours)[0]
    x = torch.randn(3, layer.base_layer.in_features, dtype=torch.float16)
    layer.half()                                  # the base; the imported factors stay fp32
    assert layer.base_layer.weight.dtype == torch.float16 and layer.Vh.dtype == torch.float32
    monkeypatch.setenv("TINYLORA_BACKEND", "triton")
    with torch.no_grad():
        got = layer(x)
    truth, lowp = layer_truth_and_lowp(layer, x)
    err, budget = reference_error_budget(got, lowp, truth)
    assert err <= budget, (err, budget)


# -- bad input: a clear error naming it, and the model as it was ---------------------------------
def test_refuses_a_lora_directory(tmp_path):
    peft_model = _peft_adapter(tmp_path / "tl")
    del peft_model
    from tinylora_kernels import TinyLoRAGlobalParams, apply_tiny_lora

    adapted = tiny_qwen2(quantized=False, dtype=torch.float32)
    apply_tiny_lora(adapted, TinyLoRAGlobalParams(u_dim=3), progress=False)
    export_lora(adapted, tmp_path / "lora")
    model = tiny_qwen2(quantized=False, dtype=torch.float32)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match="not a PEFT TinyLoRA adapter.*LORA"):
        import_peft_tinylora(model, tmp_path / "lora")
    _assert_unchanged(model, snap)
    # an already adapted model is refused too, and keeps its layers
    with pytest.raises(CheckpointError, match="already carries a TinyLoRA adapter"):
        import_peft_tinylora(adapted, tmp_path / "tl")


@pytest.mark.parametrize("damage", ["no_dir", "no_config", "bad_json", "no_weights", "garbage",
                                    "other_arch", "v_missing", "bad_shape", "nan", "bias",
                                    "p_partial"])
def test_bad_adapters_are_refused_and_leave_the_model_alone(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "adapter"
    _peft_adapter(d, weight_tying=0.5)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    state = load_file(str(w_path))
    config = json.loads(cfg_path.read_text())
    first = sorted(k for k in state if k.endswith("tinylora_A"))[0]
    match = {
        "no_dir": "not a directory", "no_config": "no adapter_config.json",
        "bad_json": "not readable JSON", "no_weights": "no adapter weights",
        "garbage": "could not be read", "other_arch": "is not in this model",
        "v_missing": "v groups", "bad_shape": "do not fit", "nan": "finite",
        "bias": "bias", "p_partial": "tinylora_P is saved for some",
    }[damage]
    if damage == "no_dir":
        d = tmp_path / "missing"
    elif damage == "no_config":
        cfg_path.unlink()
    elif damage == "bad_json":
        cfg_path.write_text("{not json")
    elif damage == "no_weights":
        w_path.unlink()
    elif damage == "garbage":
        w_path.write_bytes(b"\x00" * 64)
    elif damage == "other_arch":
        for part in ("A", "B", "P"):
            key = first.replace("tinylora_A", f"tinylora_{part}")
            state[key.replace("layers.0", "layers.7")] = state.pop(key)
    elif damage == "v_missing":
        del state["base_model.tinylora_v.1"]
    elif damage == "bad_shape":
        state[first] = torch.zeros(2, 3)
    elif damage == "nan":
        state[first] = torch.full_like(state[first], float("nan"))
    elif damage == "bias":
        config["bias"] = "all"
    elif damage == "p_partial":
        del state[first.replace("tinylora_A", "tinylora_P")]
    if damage in ("other_arch", "v_missing", "bad_shape", "nan", "p_partial"):
        save_file(state, str(w_path))
    if damage == "bias":
        cfg_path.write_text(json.dumps(config))
    model = tiny_qwen2(quantized=False, dtype=torch.float32)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match=match):
        import_peft_tinylora(model, d)
    _assert_unchanged(model, snap)


def test_our_checkpoint_format_refuses_imported_layers(tmp_path):
    _peft_adapter(tmp_path / "a", weight_tying=1.0)
    model = tiny_qwen2(quantized=False, dtype=torch.float32)
    import_peft_tinylora(model, tmp_path / "a")
    with pytest.raises(ValueError, match="origin 'peft'"):
        save_tiny_lora(model, tmp_path / "v.pt", seed=0, model_id="x")
    assert not (tmp_path / "v.pt").exists()
    # ...but they export as a standard LoRA adapter like any TinyLoRA layer
    out = export_lora(model, tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(tiny_qwen2(quantized=False, dtype=torch.float32),
                                          str(out))
    torch.testing.assert_close(_logits(lora), _logits(model), rtol=1e-4, atol=1e-4)


def test_group_assignment_matches_peft():
    assert peft_tinylora_groups(6, 0.0) == [0, 1, 2, 3, 4, 5]
    assert peft_tinylora_groups(6, 1.0) == [0] * 6
    assert peft_tinylora_groups(6, 0.5) == [0, 0, 1, 1, 2, 2]
    # 7 layers, 4 groups of 1 with the remainder in the last group
    assert peft_tinylora_groups(7, 0.5) == [0, 1, 2, 3, 3, 3, 3]
