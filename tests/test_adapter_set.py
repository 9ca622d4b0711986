"""Many adapters in one batch: each sequence with its own v equals running it alone with that v."""

import copy

import pytest
import torch

from conftest import KERNEL_DEVICE, KERNELS_RUN, needs_bnb
from tinylora_kernels import (AdapterSet, CheckpointError, TinyLoRAGlobalParams, apply_tiny_lora,
                              merge_tiny_lora, save_tiny_lora, use_backend)
from tinylora_kernels.adapter_set import BASE, MODEL
from tinylora_kernels.testing import tiny_qwen2


def _model(quantized, seed=7, u=6, layers=2, device="cpu"):
    model = tiny_qwen2(quantized=quantized, compute_dtype=torch.float32, dtype=torch.float32,
                       num_hidden_layers=layers, device=device)
    if quantized:
        model.train()        # bitsandbytes' eval-mode CPU forward would repack the base
    gp = TinyLoRAGlobalParams(u_dim=u, dtype=torch.float32, device=device)
    torch.manual_seed(seed)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(u, generator=torch.Generator().manual_seed(99)) * 0.5)
    return model, gp


def _vs(n, u, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"a{i}": torch.randn(u, generator=g) * (0.3 + 0.2 * i) for i in range(n)}


def _alone(model, gp, v, ids, mask=None):
    """One sequence with its own v, the plain way (a copy of the model with v set)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        if v is None:                                   # no adapter
            clone.tiny_lora_params.global_v.zero_()
        elif not isinstance(v, str):
            clone.tiny_lora_params.global_v.copy_(v)
        return clone(ids, attention_mask=mask).logits


def _f64_close(got, want):
    # the batched rows and the separate runs round differently only in the adapter's fp32
    # products; both are within fp32 rounding of each other
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=needs_bnb)],
                         ids=["dense", "4bit"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_each_sequence_equals_running_it_alone(quantized, batch):
    model, gp = _model(quantized)
    vs = _vs(5, 6)
    adapters = AdapterSet(model, vs)
    names = [(["a0", "a1", "a2", "a3", "a4", BASE, MODEL])[i % 7] for i in range(batch)]
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 128, (batch, 5), generator=g)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[::2, :2] = 0                                   # left padding on every other sequence
    with torch.no_grad(), adapters.per_sequence(model, names):
        got = model(ids, attention_mask=mask).logits
    checked = range(batch) if batch <= 7 else [0, 1, 5, 6, 33, 63]
    for i in checked:
        v = None if names[i] == BASE else ("own" if names[i] == MODEL else vs[names[i]])
        want = _alone(model, gp, v, ids[i:i + 1], mask[i:i + 1])
        _f64_close(got[i:i + 1], want)


def test_decode_steps_follow_each_sequence():
    model, gp = _model(False)
    model.eval()
    vs = _vs(3, 6, seed=1)
    adapters = AdapterSet(model, vs)
    ids = torch.randint(0, 128, (3, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with adapters.per_sequence(model, ["a0", "a1", "a2"]):
            together = model.generate(ids, **kw)
        for i, name in enumerate(["a0", "a1", "a2"]):
            clone = copy.deepcopy(model)
            clone.tiny_lora_params.global_v.copy_(vs[name])
            alone = clone.generate(ids[i:i + 1], **kw)
            assert torch.equal(together[i:i + 1], alone), name


def test_generate_expands_the_assignment_with_num_return_sequences():
    model, gp = _model(False)
    model.eval()
    adapters = AdapterSet(model, _vs(2, 6, seed=3))
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2,
              pad_token_id=0)
    with torch.no_grad():
        with adapters.per_sequence(model, ["a0", "a1"]):
            together = model.generate(ids, **kw)
        for i, name in enumerate(["a0", "a1"]):
            clone = copy.deepcopy(model)
            clone.tiny_lora_params.global_v.copy_(adapters.v[i])
            alone = clone.generate(ids[i:i + 1], **kw)
            assert torch.equal(together[2 * i:2 * i + 2], alone), name


def test_assignment_errors_are_clear():
    model, gp = _model(False)
    adapters = AdapterSet(model, _vs(2, 6))
    ids = torch.randint(0, 128, (3, 4))
    with pytest.raises(ValueError, match=r"names 2 sequences.*batch of 3"):
        with adapters.per_sequence(model, ["a0", "a1"]):
            model(ids)
    with pytest.raises(ValueError, match=r"unknown adapter name.*'nope'"):
        with adapters.per_sequence(model, ["a0", "nope", "a1"]):
            pass
    with pytest.raises(TypeError, match="list of adapter names"):
        with adapters.per_sequence(model, "a0"):
            pass
    with torch.no_grad():                       # the model works normally after an error
        model(ids)


def test_set_errors_are_clear(tmp_path):
    model, gp = _model(False)
    with pytest.raises(ValueError, match="u = 6"):
        AdapterSet(model, {"x": torch.zeros(5)})
    with pytest.raises(TypeError, match="floating"):
        AdapterSet(model, {"x": torch.zeros(6, dtype=torch.long)})
    with pytest.raises(ValueError, match="reserved"):
        AdapterSet(model, {BASE: torch.zeros(6)})
    with pytest.raises(ValueError, match="non-finite"):
        AdapterSet(model, {"x": torch.full((6,), float("nan"))})
    other, _ = _model(False, seed=8)
    save_tiny_lora(other, tmp_path / "other.pt", seed=8, model_id="x")
    save_tiny_lora(model, tmp_path / "mine.pt", seed=7, model_id="x")
    with pytest.raises(CheckpointError, match=r"other\.pt.*seed 8"):
        AdapterSet.from_checkpoints(model, [tmp_path / "mine.pt", tmp_path / "other.pt"])
    wider, _ = _model(False, u=7)
    save_tiny_lora(wider, tmp_path / "wide.pt", seed=7, model_id="x")
    with pytest.raises(CheckpointError, match=r"wide\.pt.*u 7"):
        AdapterSet.from_checkpoints(model, {"w": tmp_path / "wide.pt"})
    s = AdapterSet.from_checkpoints(model, {"m": tmp_path / "mine.pt"})
    assert s.names == ["m"] and torch.equal(s.v[0], gp.global_v.detach())


def test_merged_layers_refuse_per_sequence_adapters():
    model, gp = _model(False)
    adapters = AdapterSet(model, _vs(1, 6))
    merge_tiny_lora(model)
    with pytest.raises(ValueError, match="unmerge_tiny_lora"):
        with adapters.per_sequence(model, ["a0"]):
            pass


def test_gradients_reach_each_sequences_v():
    model, gp = _model(False)
    adapters = AdapterSet(model, _vs(2, 6), requires_grad=True)
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(5))
    with adapters.per_sequence(model, ["a0", "a1"]):
        model(ids).logits[1].float().square().sum().backward()
    grad = adapters.v.grad
    assert grad is not None and grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0
    # the same gradient as sequence 1 alone with v = a1
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.tiny_lora_params.global_v.copy_(adapters.v[1])
    clone(ids[1:2]).logits[0].float().square().sum().backward()
    torch.testing.assert_close(grad[1], clone.tiny_lora_params.global_v.grad, rtol=1e-4,
                               atol=1e-5)


@needs_bnb
@pytest.mark.skipif(not KERNELS_RUN, reason="needs the kernels (GPU or interpreter)")
@pytest.mark.parametrize("batch,steps", [(3, 1), (2, 3)], ids=["decode-gemv", "prefill-fused"])
def test_the_kernels_read_each_rows_adapter(batch, steps, monkeypatch):
    from tinylora_kernels.ops import custom_ops

    launched = []
    real = custom_ops.kernel_forward_rows
    monkeypatch.setattr(custom_ops, "kernel_forward_rows",
                        lambda plan, *a: launched.append(plan.path) or real(plan, *a))
    model = tiny_qwen2(quantized=True, compute_dtype=torch.float16, dtype=torch.float16,
                       num_hidden_layers=1, device=KERNEL_DEVICE)
    gp = TinyLoRAGlobalParams(u_dim=6, dtype=torch.float32, device=KERNEL_DEVICE)
    torch.manual_seed(7)
    apply_tiny_lora(model, gp, progress=False)
    vs = _vs(batch, 6)
    adapters = AdapterSet(model, vs)
    names = list(vs)
    ids = torch.randint(0, 128, (batch, steps), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with adapters.per_sequence(model, names):
            with use_backend("triton"):
                got = model(ids.to(KERNEL_DEVICE)).logits.float()
            want_rows = model(ids.to(KERNEL_DEVICE)).logits.float()     # the torch path
    assert set(launched) == {"gemv" if batch * steps <= 4 else "fused"}
    torch.testing.assert_close(got, want_rows, rtol=2e-2, atol=2e-2)
    for i, name in enumerate(names):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            clone.tiny_lora_params.global_v.copy_(vs[name])
            with use_backend("triton"):
                alone = clone(ids[i:i + 1].to(KERNEL_DEVICE)).logits.float()
        torch.testing.assert_close(got[i:i + 1], alone, rtol=2e-2, atol=2e-2)


@needs_bnb
def test_a_16bit_4bit_batch_gives_exactly_the_tokens_of_separate_generates():
    # the users' setting: NF4, fp16 compute, bf16 model; every sequence its own v
    model = tiny_qwen2(quantized=True, num_hidden_layers=2).eval()
    gp = TinyLoRAGlobalParams(u_dim=16, dtype=torch.float32)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    vs = _vs(6, 16, seed=4)
    adapters = AdapterSet(model, vs)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with adapters.per_sequence(model, adapters.names):
            together = model.generate(prompt.expand(6, -1), **kw)
        for i, name in enumerate(adapters.names):
            gp.global_v.copy_(vs[name])
            assert torch.equal(together[i:i + 1], model.generate(prompt, **kw)), name


@pytest.mark.parametrize("change", ["set v in place", "model v", "assignment"])
def test_repeated_calls_follow_every_change_of_the_rows_adapters(change):
    # calls with the same v's and assignment may reuse the last call's per-row values; any
    # change must be seen by the next call
    model, gp = _model(False)
    adapters = AdapterSet(model, _vs(3, 6))
    ids = torch.randint(0, 128, (3, 4), generator=torch.Generator().manual_seed(5))
    names = ["a0", MODEL, "a2"]
    after = ["a2", "a0", MODEL] if change == "assignment" else names
    with torch.no_grad():
        with adapters.per_sequence(model, names):
            model(ids)
            first = model(ids).logits
            if change == "set v in place":
                adapters.v.data[0] *= 3
            elif change == "model v":
                gp.global_v.data.mul_(-2)
        with adapters.per_sequence(model, after):
            got = model(ids).logits
    for i, name in enumerate(after):
        v = "own" if name == MODEL else adapters.v[adapters.names.index(name)].clone()
        _f64_close(got[i:i + 1], _alone(model, gp, v, ids[i:i + 1]))
    assert not torch.allclose(got, first)


def test_a_block_entered_again_gets_the_codes_of_its_names_each_time():
    """The codes of an assignment are kept for the next block with the same names: a changed
    assignment, bad names and the public codes() (a fresh tensor every time) stay as they were."""
    import torch.nn as nn

    from tinylora_kernels import AdapterSet, TinyLoRAGlobalParams, TinyLoRALinear
    from tinylora_kernels.adapter_state import assignment

    gp = TinyLoRAGlobalParams(u_dim=4)
    model = nn.Sequential(TinyLoRALinear(nn.Linear(8, 6), rank=2, global_params_ref=gp))
    s = AdapterSet(model, {"a": torch.ones(4), "b": -torch.ones(4)})
    for names, want in ((["a", "b"], [0, 1]), (["b", "a"], [1, 0]), (["a", "b"], [0, 1]),
                        (["__base__", "a"], [2, 0])):
        with s.per_sequence(model, names):
            assert assignment(gp)[1].tolist() == want
    with pytest.raises(ValueError, match="unknown adapter"):
        with s.per_sequence(model, ["a", "zz"]):
            pass
    c = s.codes(["a", "b"])
    c[0] = 1                                        # the caller's own tensor
    with s.per_sequence(model, ["a", "b"]):
        assert assignment(gp)[1].tolist() == [0, 1]
