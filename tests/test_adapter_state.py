"""v as it is now, in every call: however v is written, wherever the call comes from; merge
state that cannot go stale; saving checks the P the layers hold."""

import copy

import pytest
import torch

from conftest import make_linear, make_linear4bit, needs_bnb
from tinylora_kernels import (CheckpointError, TinyLoRAGlobalParams, TinyLoRALinear,
                              apply_tiny_lora, load_tiny_lora, merge_tiny_lora, save_tiny_lora,
                              unmerge_tiny_lora)
from tinylora_kernels.merge_state import MergeError
from tinylora_kernels.testing import layer_truth_and_lowp, reference_error_budget, tiny_qwen2


def _new_v(gp, seed):
    return torch.randn(gp.global_v.shape[0], generator=torch.Generator().manual_seed(seed)) * 0.7


# every way users and libraries write v; each takes (v, new values)
WRITES = {
    "data.copy_": lambda v, new: v.data.copy_(new),
    "data[:]=": lambda v, new: v.data.__setitem__(slice(None), new.to(v.dtype)),
    "data[0]+=": lambda v, new: v.data.__setitem__(0, v.data[0] + 5),
    "data=": lambda v, new: setattr(v, "data", new.to(v.dtype)),
    "set_": lambda v, new: _no_grad(lambda: v.set_(new.to(v.dtype).clone())),
    "no_grad copy_": lambda v, new: _no_grad(lambda: v.copy_(new)),
    "no_grad mul_": lambda v, new: _no_grad(lambda: v.mul_(-3)),
    "init.normal_": lambda v, new: torch.nn.init.normal_(v.data),
    "numpy view": lambda v, new: v.data.numpy().__setitem__(slice(None), new.numpy()),
}


def _no_grad(fn):
    with torch.no_grad():
        fn()


def _check_layer(layer, x):
    y = layer(x)
    truth, lowp = layer_truth_and_lowp(layer, x)
    err, budget = reference_error_budget(y, lowp, truth)
    assert err <= budget, (err, budget)
    return y


def _layer(quantized):
    base = make_linear4bit(48, 64, compute_dtype=torch.float32)[0] if quantized else \
        make_linear(48, 64)
    if quantized:
        base.train()
    gp = TinyLoRAGlobalParams(u_dim=7, dtype=torch.float32)
    torch.manual_seed(0)
    layer = TinyLoRALinear(base, 2, None, gp)
    with torch.no_grad():
        gp.global_v.copy_(_new_v(gp, 1))
    return layer, gp


@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=needs_bnb)],
                         ids=["dense", "4bit"])
@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_layer_answers_with_v_as_written(write, grad, quantized):
    layer, gp = _layer(quantized)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(grad):
        before = _check_layer(layer, x)
        before2 = _check_layer(layer, x)            # a second call, kept state warm
        assert torch.equal(before, before2)
        WRITES[write](gp.global_v, _new_v(gp, 9))
        after = _check_layer(layer, x)
    assert not torch.equal(after, before)


def _model(quantized, layers=2, seed=0):
    model = tiny_qwen2(quantized=quantized, compute_dtype=torch.float32, num_hidden_layers=layers,
                       dtype=torch.float32)
    if quantized:
        model.train()          # bitsandbytes' eval-mode CPU forward would repack the base
    gp = TinyLoRAGlobalParams(u_dim=6, dtype=torch.float32)
    torch.manual_seed(seed)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(_new_v(gp, 3))
    return model, gp


@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=needs_bnb)],
                         ids=["dense", "4bit"])
@pytest.mark.parametrize("write", ["data.copy_", "data[0]+=", "data=", "set_"])
def test_a_model_answers_with_v_as_written(write, quantized):
    model, gp = _model(quantized)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old = model(ids).logits
        model(ids)
    WRITES[write](gp.global_v, _new_v(gp, 11))
    with torch.no_grad():
        no_grad = model(ids).logits
    grad = model(ids).logits.detach()
    fresh = copy.deepcopy(model)                 # nothing kept from earlier calls
    with torch.no_grad():
        want = fresh(ids).logits
    assert not torch.allclose(no_grad, old)
    torch.testing.assert_close(no_grad, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


@needs_bnb
def test_generate_follows_v_between_calls():
    model, gp = _model(True)
    model.eval()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)
        gp.global_v.data.mul_(40)               # a large change: different tokens
        got = model.generate(ids, **kw)
        want = copy.deepcopy(model).generate(ids, **kw)
    assert torch.equal(got, want)


def test_a_compiled_model_reads_v_in_its_graph():
    model, gp = _model(False, layers=1)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        first = compiled(ids).logits
        gp.global_v.data.copy_(_new_v(gp, 21))            # no version bump, same storage
        second = compiled(ids).logits
        want = model(ids).logits
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)


def test_an_optimizer_step_reaches_every_path():
    model, gp = _model(False)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([gp.global_v], lr=0.1, fused=True)
    with torch.no_grad():
        model(ids)
    model(ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        got = model(ids).logits
        want = copy.deepcopy(model)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_error_inside_a_model_call_closes_its_state():
    model, gp = _model(False, layers=1)
    with pytest.raises(Exception):
        model(torch.full((1, 3), 10_000))            # out of the vocabulary: raises mid-call
    from tinylora_kernels.adapter_state import current_call

    assert current_call(gp) is None
    ids = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids)
        gp.global_v.data.add_(1)
        torch.testing.assert_close(model(ids).logits, copy.deepcopy(model)(ids).logits,
                                   rtol=0, atol=0)


# -- merge ---------------------------------------------------------------------------------------
def _weights(model):
    from tinylora_kernels import tiny_lora_layers

    return {n: m.base_layer.weight.detach().clone() for n, m in tiny_lora_layers(model)}


@pytest.mark.parametrize("write", ["data mul_", "no_grad mul_"])
def test_unmerge_subtracts_what_merge_added_even_after_v_changed(write):
    model, gp = _model(False)
    original = _weights(model)
    merge_tiny_lora(model)
    if write == "data mul_":                    # changed while merged, either way
        gp.global_v.data.mul_(3)
    else:
        with torch.no_grad():
            gp.global_v.mul_(3)
    unmerge_tiny_lora(model)
    for name, w in _weights(model).items():
        ulp = original[name].abs().max().item() * 2 ** -22
        assert (w - original[name]).abs().max().item() <= ulp, name


def test_a_merged_layer_refuses_a_changed_v():
    model, gp = _model(False)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        merge_tiny_lora(model)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        merged_v = gp.global_v.detach().clone()
        gp.global_v.data[0] += 1
        with pytest.raises(MergeError, match="unmerge_tiny_lora"):
            model(ids)
        gp.global_v.data.copy_(merged_v)        # back to the merged v: served again
        model(ids)


def test_loading_a_checkpoint_into_a_merged_model_is_refused(tmp_path):
    model, gp = _model(False, seed=5)
    save_tiny_lora(model, tmp_path / "a.pt", seed=5, model_id="x")
    merge_tiny_lora(model)
    before = (gp.global_v.detach().clone(), _weights(model))
    with pytest.raises(CheckpointError, match="unmerge_tiny_lora"):
        load_tiny_lora(model, tmp_path / "a.pt")
    assert torch.equal(gp.global_v, before[0])
    assert all(torch.equal(w, before[1][n]) for n, w in _weights(model).items())


def test_a_merged_state_dict_is_not_merged_twice():
    model, gp = _model(False)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(4))
    merge_tiny_lora(model)
    with torch.no_grad():
        want = model(ids).logits
    other, _ = _model(False)
    other.load_state_dict(model.state_dict())
    from tinylora_kernels import tiny_lora_layers

    assert all(m.merged for _, m in tiny_lora_layers(other))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, want, rtol=0, atol=0)
    unmerge_tiny_lora(other)
    unmerge_tiny_lora(model)
    for (n, a), (_, b) in zip(_weights(model).items(), _weights(other).items()):
        assert torch.equal(a, b), n


def test_an_unmerged_state_dict_unmerges_the_receiver_consistently():
    model, _ = _model(False)
    sd = copy.deepcopy(model.state_dict())
    merge_tiny_lora(model)
    model.load_state_dict(sd)                   # the base weights come back unmerged
    from tinylora_kernels import tiny_lora_layers

    assert not any(m.merged for _, m in tiny_lora_layers(model))


def test_an_old_state_dict_without_the_record_still_loads():
    model, _ = _model(False)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    other, _ = _model(False)
    other.load_state_dict(sd)                   # strict: the missing record means "not merged"


# -- saving checks what the layers hold ------------------------------------------------------------
def test_save_checks_the_p_the_layers_hold(tmp_path):
    src, gp_src = _model(False, seed=42)
    dst, gp_dst = _model(False, seed=1)
    dst.load_state_dict(src.state_dict())       # P of seed 42 now in dst
    with pytest.raises(ValueError, match="seed=42"):
        save_tiny_lora(dst, tmp_path / "v.pt", seed=1, model_id="x")
    assert not (tmp_path / "v.pt").exists()
    save_tiny_lora(dst, tmp_path / "v.pt", seed=42, model_id="x")
    fresh = tiny_qwen2(quantized=False, compute_dtype=torch.float32, num_hidden_layers=2,
                       dtype=torch.float32)
    load_tiny_lora(fresh, tmp_path / "v.pt", v_dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, src(ids).logits, rtol=0, atol=0)


def test_save_refuses_p_written_by_hand(tmp_path):
    model, _ = _model(False, seed=3)
    from tinylora_kernels import tiny_lora_layers

    with torch.no_grad():
        tiny_lora_layers(model)[-1][1].P.mul_(2)
    with pytest.raises(ValueError, match="does not reproduce"):
        save_tiny_lora(model, tmp_path / "v.pt", seed=3, model_id="x")


# -- a decode step whose v did not change reuses R and Aᵀ Rᵀ (CPU: compared bit for bit) ---------
def _count_batches(monkeypatch):
    from tinylora_kernels import adapter_state

    calls = []
    real = adapter_state._batch_values
    monkeypatch.setattr(adapter_state, "_batch_values",
                        lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("write", list(WRITES) + ["-0.0"])
def test_model_calls_reuse_derived_values_only_while_v_is_bit_for_bit_the_same(write,
                                                                              monkeypatch):
    model, gp = _model(False)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gp.global_v.data[0] = 0.0
        model(ids)
        model(ids)                                   # every layer in the call's batch now
        calls = _count_batches(monkeypatch)
        before = model(ids).logits
        model(ids)
    assert len(calls) == 0                           # v unchanged: the last batch served
    if write == "-0.0":
        gp.global_v.data[0] = -0.0                   # equal as numbers, not as bits
    else:
        WRITES[write](gp.global_v, _new_v(gp, 12))
    with torch.no_grad():
        got = model(ids).logits
        want = copy.deepcopy(model)(ids).logits
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if write != "-0.0":
        assert not torch.equal(got, before)


@needs_bnb
def test_a_v_written_by_a_generate_callback_takes_effect_at_the_next_step():
    from transformers import LogitsProcessor, LogitsProcessorList

    model, gp = _model(True)
    model.eval()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    steps = []

    class WriteV(LogitsProcessor):
        def __call__(self, input_ids, scores):
            steps.append(1)
            if len(steps) == 2:
                gp.global_v.data.mul_(40)           # between decode steps 2 and 3
            return scores

    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        model.generate(ids, **kw)
        before = copy.deepcopy(model)
        got = model.generate(ids, logits_processor=LogitsProcessorList([WriteV()]), **kw)
        # the same tokens scored with v as it was: steps 1-2 agree, step 3 on do not
        old = before(got.sequences[:, :-1]).logits[:, ids.shape[1] - 1:]
    for step, logits in enumerate(got.logits):
        diff = (logits - old[:, step]).abs().max().item()
        assert (diff < 1e-4) == (step < 2), (step, diff)


@needs_bnb
def test_an_adapter_buffer_written_between_two_generates_is_seen():
    model, gp = _model(True)
    model.eval()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        gp.global_v.data.mul_(20)
        model.generate(ids, **kw)
        first = model.generate(ids, **kw)
        for m in model.modules():
            if isinstance(m, TinyLoRALinear):
                m.S.mul_(3)                          # in place: a new version of the buffer
        got = model.generate(ids, **kw)
        want = copy.deepcopy(model).generate(ids, **kw)
    assert not torch.equal(torch.stack(got.logits), torch.stack(first.logits))
    assert torch.equal(torch.stack(got.logits), torch.stack(want.logits))


@pytest.mark.parametrize("k", [64, 2048, 11008])
def test_the_folded_operand_has_the_same_bits_batched_or_not(k):
    """Aᵀ Rᵀ of one layer is bit for bit the same formed alone, for a batch of layers, or for
    a batch of adapters on one A (some CPUs' BLAS rounds a matrix product and a batched one
    differently: a model's batched later calls then disagreed with its first call)."""
    from tinylora_kernels.torch_path import folded_operand

    gen = torch.Generator().manual_seed(k)
    at, rt = torch.randn(5, k, 2, generator=gen), torch.randn(5, 2, 2, generator=gen)
    batched, shared_a = folded_operand(at, rt), folded_operand(at[0], rt)
    for i in range(5):
        assert torch.equal(folded_operand(at[i], rt[i]), batched[i])
        assert torch.equal(folded_operand(at[0], rt[i]), shared_a[i])
