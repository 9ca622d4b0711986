"""The base weight as it is now, in every call: whatever is derived from it (the CPU decoded copy
of an NF4 weight, the kernels' view of its storage, a merge record) follows every way users change
it, judged against a float64 evaluation on the CURRENT weight."""

import copy
import logging

import pytest
import torch

from conftest import make_linear, make_linear4bit, needs_bnb
from tinylora_kernels import (TinyLoRAGlobalParams, TinyLoRALinear, merge_tiny_lora,
                              unmerge_tiny_lora)
from tinylora_kernels import bnb as glue
from tinylora_kernels.testing import layer_truth_and_lowp, reference_error_budget


def _adapted(base, seed=0):
    gp = TinyLoRAGlobalParams(u_dim=5, dtype=torch.float32)
    torch.manual_seed(seed)
    layer = TinyLoRALinear(base, 2, None, gp)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(5, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return layer


def _check(layer, x):
    with torch.no_grad():
        y = layer(x)
    truth, lowp = layer_truth_and_lowp(layer, x)
    err, budget = reference_error_budget(y, lowp, truth)
    assert err <= budget, (err, budget)


def _nf4_layer(seed, k=128):
    base = make_linear4bit(48 if k <= 128 else 256, k, compute_dtype=torch.float32, seed=seed)[0]
    base.train()        # bitsandbytes' own eval-mode CPU forward would repack it
    return base


def _copy_bytes(layer, other):
    layer.base_layer.weight.data.copy_(other.weight.data)


def _scale_absmax(layer, other):
    qs = layer.base_layer.weight.quant_state
    if qs.nested:
        qs.absmax.data.copy_(other.weight.quant_state.absmax)
    else:
        qs.absmax.data.mul_(1.5)


def _scale_absmax2(layer, other):
    layer.base_layer.weight.quant_state.state2.absmax.data.mul_(1.5)


def _shift_offset(layer, other):
    layer.base_layer.weight.quant_state.offset.data.add_(0.01)


def _assign_data(layer, other):
    layer.base_layer.weight.data = other.weight.data.clone()


def _load_state_dict(layer, other):
    # bitsandbytes' Linear4bit loads its bytes and bias this way (its quant state keys are
    # transformers' to load)
    layer.base_layer.load_state_dict(other.state_dict(), strict=False)


def _reload_parent(layer, other):
    sd = {k: v for k, v in layer.state_dict().items()}
    for k, v in other.state_dict().items():
        sd["base_layer." + k] = v
    layer.load_state_dict(sd, strict=False)


def _one_byte(layer, other):
    layer.base_layer.weight.data.view(-1)[7] ^= 0x11


def _swap_rows(layer, other):
    data = layer.base_layer.weight.data.view(-1)
    half = data.numel() // 2
    tmp = data[:512].clone()
    data[:512] = data[half:half + 512]
    data[half:half + 512] = tmp


ROUTES = {"data.copy_ bytes": _copy_bytes, "absmax in place": _scale_absmax,
          "state2.absmax in place": _scale_absmax2, "offset in place": _shift_offset,
          "data = new": _assign_data, "base load_state_dict": _load_state_dict,
          "parent load_state_dict": _reload_parent, "one byte": _one_byte,
          "exchanged blocks": _swap_rows}


@needs_bnb
@pytest.mark.parametrize("k", [128, 640], ids=["small", "over-64KiB"])
@pytest.mark.parametrize("route", ROUTES)
def test_cpu_decoded_copy_follows_every_change_of_the_nf4_weight(route, k, rng):
    # small packed storage is compared byte for byte, larger by block sums: both routes
    layer = _adapted(_nf4_layer(0, k))
    other = _nf4_layer(1, k)
    x = torch.randn(3, k, generator=rng)
    _check(layer, x)                                  # the decoded copy is kept now
    assert glue._DECODED.get(layer.base_layer) is not None
    before = layer(x).detach()
    ROUTES[route](layer, other)
    _check(layer, x)
    assert not torch.equal(layer(x).detach(), before)


@needs_bnb
def test_unchanged_weight_keeps_its_decoded_copy():
    layer = _adapted(_nf4_layer(0))
    x = torch.randn(2, 128)
    with torch.no_grad():
        layer(x)
        kept = glue._DECODED[layer.base_layer][1]
        layer(x)
    assert glue._DECODED[layer.base_layer][1] is kept


@needs_bnb
def test_kernel_view_follows_replaced_quant_state_tensors():
    layer = _adapted(_nf4_layer(0))
    first = layer.kernel_weight()
    qs = layer.base_layer.weight.quant_state
    qs.state2.absmax = qs.state2.absmax * 2
    second = layer.kernel_weight()
    assert second.absmax2 is qs.state2.absmax and first.absmax2 is not second.absmax2
    qs.absmax = qs.absmax.clone()
    assert layer.kernel_weight().absmax is qs.absmax


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "-5", "lots"])
def test_bad_decoded_budget_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("TINYLORA_CPU_DECODED_MB", raw)
    with pytest.raises(ValueError, match="TINYLORA_CPU_DECODED_MB"):
        glue.decoded_budget_bytes()


@needs_bnb
def test_bad_decoded_budget_is_reported_by_apply_and_changes_nothing(monkeypatch):
    from tinylora_kernels import apply_tiny_lora
    from tinylora_kernels.testing import tiny_qwen2

    model = tiny_qwen2(quantized=False, dtype=torch.float32)
    names = [n for n, _ in model.named_modules()]
    monkeypatch.setenv("TINYLORA_CPU_DECODED_MB", "nan")
    with pytest.raises(ValueError, match="TINYLORA_CPU_DECODED_MB"):
        apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=3), progress=False)
    assert [n for n, _ in model.named_modules()] == names


@needs_bnb
def test_lowering_the_budget_frees_kept_copies(monkeypatch):
    layers = [_adapted(_nf4_layer(s)) for s in range(3)]
    x = torch.randn(2, 128)
    with torch.no_grad():
        for layer in layers:
            layer(x)
    assert all(glue._DECODED.get(m.base_layer) is not None for m in layers)
    size = 48 * 128 * 4
    monkeypatch.setenv("TINYLORA_CPU_DECODED_MB", str(1.5 * size / (1 << 20)))
    with torch.no_grad():
        _check(layers[0], x)
    kept = [m for m in layers if glue._DECODED.get(m.base_layer) is not None]
    assert len(kept) <= 1 and glue._kept_bytes() <= 1.5 * size
    monkeypatch.setenv("TINYLORA_CPU_DECODED_MB", "0")
    _check(layers[1], x)
    assert glue._kept_bytes() == 0


# -- a merged dense layer whose base weight is reloaded -------------------------------------------
def _merged_dense(seed=0):
    base = make_linear(40, 56, seed=seed)
    original = base.weight.detach().clone()
    layer = _adapted(base)
    model = torch.nn.Sequential(layer)
    assert merge_tiny_lora(model) == 1
    return model, layer, original


RELOADS = {
    "base load_state_dict": lambda layer, w: layer.base_layer.load_state_dict(
        {"weight": w, "bias": layer.base_layer.bias.detach().clone()}),
    "data.copy_": lambda layer, w: layer.base_layer.weight.data.copy_(w),
    "data = new": lambda layer, w: setattr(layer.base_layer.weight, "data", w.clone()),
    "no_grad copy_": lambda layer, w: _no_grad_copy(layer.base_layer.weight, w),
}


def _no_grad_copy(param, w):
    with torch.no_grad():
        param.copy_(w)


@pytest.mark.parametrize("route", RELOADS)
def test_merged_layer_whose_base_weight_is_reloaded_is_no_longer_merged(route, caplog):
    model, layer, original = _merged_dense()
    x = torch.randn(4, 56)
    with caplog.at_level(logging.WARNING):
        RELOADS[route](layer, original)
        _check(layer, x)                             # the adapter is added again
    assert not layer.merged and "reloaded" in caplog.text
    assert unmerge_tiny_lora(model) == 0
    assert torch.equal(layer.base_layer.weight.detach(), original)


@pytest.mark.parametrize("route", RELOADS)
def test_unmerge_after_a_reload_leaves_the_reloaded_weight(route):
    model, layer, original = _merged_dense()
    RELOADS[route](layer, original)
    assert unmerge_tiny_lora(model) == 0             # nothing subtracted from the new weight
    assert torch.equal(layer.base_layer.weight.detach(), original)
    _check(layer, torch.randn(3, 56))


def _check_merged(layer, x):
    """A merged layer computes its (merged) base weight alone."""
    with torch.no_grad():
        y = layer(x)
    base = layer.base_layer
    truth = x.double() @ base.weight.double().T + base.bias.double()
    assert torch.allclose(y.double(), truth, atol=1e-4), (y.double() - truth).abs().max()


def test_merged_layer_stays_merged_through_copies_and_conversions():
    model, layer, original = _merged_dense()
    x = torch.randn(2, 56)
    twin = copy.deepcopy(model)
    assert twin[0].merged
    _check_merged(twin[0], x)
    model.double()
    _check_merged(layer, x.double())
    assert layer.merged
    assert unmerge_tiny_lora(model) == 1
    assert torch.allclose(layer.base_layer.weight.float(), original, atol=1e-6)
    assert unmerge_tiny_lora(twin) == 1
    assert torch.allclose(twin[0].base_layer.weight, original, atol=1e-6)


def test_merged_state_dict_loaded_into_a_fresh_model_stays_merged():
    model, layer, original = _merged_dense()
    fresh = torch.nn.Sequential(_adapted(make_linear(40, 56, seed=0)))
    fresh.load_state_dict(model.state_dict())
    assert fresh[0].merged
    _check_merged(fresh[0], torch.randn(2, 56))
    assert fresh[0].merged
    assert unmerge_tiny_lora(fresh) == 1
    assert torch.allclose(fresh[0].base_layer.weight, original, atol=1e-6)


# -- CPUs with AVX512-BF16: bitsandbytes' packed kernel as the base product where faster ----------
def _needs_avx512bf16():
    if not glue._cpu_has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16 (bitsandbytes' packed CPU kernel)")


@needs_bnb
def test_packed_base_product_is_equivalent_and_follows_the_weight(monkeypatch, rng):
    _needs_avx512bf16()
    base = make_linear4bit(256, 512, compute_dtype=torch.bfloat16, seed=3)[0]
    base.train()
    layer = _adapted(base)
    monkeypatch.setitem(glue.BASE_PRODUCT_CHOICE, (256, 512), "packed")
    for m in (1, 5):
        x = torch.randn(m, 512, generator=rng).to(torch.bfloat16)
        _check(layer, x)
    assert glue._PACKED.get(base) is not None
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)  # untouched
    x = torch.randn(3, 512, generator=rng).to(torch.bfloat16)
    with torch.no_grad():
        rows = torch.cat([layer(x[i:i + 1]) for i in range(3)])
        assert torch.equal(layer(x), rows)      # each row the same bits as alone
        before = layer(x)
    _copy_bytes(layer, make_linear4bit(256, 512, compute_dtype=torch.bfloat16, seed=4)[0])
    _check(layer, x)
    with torch.no_grad():
        assert not torch.equal(layer(x), before)


@needs_bnb
def test_the_base_product_is_chosen_by_measuring_once(monkeypatch):
    _needs_avx512bf16()
    base = make_linear4bit(256, 512, compute_dtype=torch.bfloat16, seed=5)[0]
    base.train()
    layer = _adapted(base)
    monkeypatch.setattr(glue, "BASE_PRODUCT_CHOICE", {})
    calls = []
    real = glue._measure_choice
    monkeypatch.setattr(glue, "_measure_choice", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 512).to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert calls == [1] and glue.BASE_PRODUCT_CHOICE[(256, 512)] in ("packed", "decoded")
    _check(layer, x)
