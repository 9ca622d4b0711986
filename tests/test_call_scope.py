"""What a model call and a ``generate`` call read once (tinylora_kernels.call_scope): environment
variables per model call, the content check of a kept CPU copy of a 4-bit weight once per
``generate`` — and every write between two calls still seen."""

import pytest
import torch

from conftest import needs_bnb
from tinylora_kernels import TinyLoRAGlobalParams, adapter_state, apply_tiny_lora
from tinylora_kernels import bnb as glue
from tinylora_kernels.testing import tiny_qwen2


def _model(seed=0):
    model = tiny_qwen2(True, num_hidden_layers=1, seed=seed, compute_dtype=torch.bfloat16).eval()
    gp = TinyLoRAGlobalParams(u_dim=6)
    torch.manual_seed(seed)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(6, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return model


def _count_checks(monkeypatch):
    seen = []
    real = glue.storage_fingerprint
    monkeypatch.setattr(glue, "storage_fingerprint", lambda layer: seen.append(layer) or real(layer))
    return seen


def _generate(model, ids, new=5, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                             **kw)
    return out.sequences, torch.stack(out.logits)


def _bases(model):
    return [m.base_layer for m in model.modules() if hasattr(m, "global_params_ref")]


@needs_bnb
@pytest.mark.parametrize("new_tokens", [3, 9])
def test_generate_checks_each_kept_copy_once_however_many_steps(monkeypatch, new_tokens):
    model = _model()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    _generate(model, ids)                                  # the kept copies exist now
    seen = _count_checks(monkeypatch)
    _generate(model, ids, new_tokens)
    bases = _bases(model)
    assert sorted(map(id, seen)) == sorted(map(id, bases))  # each once, not once per step


@needs_bnb
def test_plain_model_calls_check_at_every_call(monkeypatch):
    model = _model()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        seen = _count_checks(monkeypatch)
        model(ids)
        model(ids)
    assert len(seen) == 2 * len(_bases(model))


WRITES = {
    "data.copy_": lambda base, other: base.weight.data.copy_(other.weight.data),
    "one byte": lambda base, other: base.weight.data.view(-1).__setitem__(
        5, base.weight.data.view(-1)[5] ^ 0x37),
    "absmax in place": lambda base, other: base.weight.quant_state.absmax.data.copy_(
        other.weight.quant_state.absmax),
}


@needs_bnb
@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("same_config", [False, True], ids=["own-config", "user-config"])
def test_a_weight_written_between_two_generates_is_seen(write, same_config):
    from transformers import GenerationConfig

    model, other = _model(0), _model(1)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = {"generation_config": GenerationConfig(do_sample=False)} if same_config else {}
    _, before = _generate(model, ids, **kw)
    _generate(model, ids, **kw)                           # copies checked and trusted in it
    for mine, theirs in zip(_bases(model), _bases(other)):
        WRITES[write](mine, theirs)
    _, after = _generate(model, ids, **kw)
    for base in _bases(model):                            # what fresh copies give
        glue._DECODED.pop(base, None)
        glue._PACKED.pop(base, None)
    _, fresh = _generate(model, ids, **kw)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)


@needs_bnb
def test_a_weight_written_between_generate_and_a_plain_call_is_seen():
    model, other = _model(0), _model(1)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    _generate(model, ids)
    _generate(model, ids)
    for mine, theirs in zip(_bases(model), _bases(other)):
        WRITES["data.copy_"](mine, theirs)
    with torch.no_grad():
        after = model(ids).logits
        for base in _bases(model):
            glue._DECODED.pop(base, None)
            glue._PACKED.pop(base, None)
        fresh = model(ids).logits
    assert torch.equal(after, fresh)


def test_environment_is_read_once_per_model_call(monkeypatch):
    from conftest import make_linear
    from tinylora_kernels import TinyLoRALinear

    gp = TinyLoRAGlobalParams(u_dim=3, dtype=torch.float32)
    torch.manual_seed(0)
    layer = TinyLoRALinear(make_linear(8, 16), 2, None, gp)
    model = torch.nn.Sequential(layer)
    adapter_state.install_call_hooks(model, gp)
    x = torch.randn(2, 16)
    monkeypatch.delenv("TINYLORA_BACKEND", raising=False)
    with adapter_state.model_call(model):
        layer(x)
        monkeypatch.setenv("TINYLORA_BACKEND", "no-such-backend")
        layer(x)                                # the value this call began with
    with pytest.raises(ValueError, match="TINYLORA_BACKEND"):
        layer(x)                                # a lone call reads it now
    with pytest.raises(ValueError, match="TINYLORA_BACKEND"):
        model(x)
