"""save_pretrained of an adapted model writes a model that loads back: the base weights under
their usual names, the adapter beside them in this package's format (or the merged weights);
what cannot be written so is refused before any file is written."""

import copy
import os
import pickle

import pytest
import torch

from conftest import needs_bnb
from tinylora_kernels import (TinyLoRAGlobalParams, apply_tiny_lora, load_tiny_lora,
                              merge_tiny_lora)
from tinylora_kernels.saving import ADAPTER_FILE
from tinylora_kernels.testing import tiny_qwen2


def _adapted(quantized, seed=3):
    model = tiny_qwen2(quantized=quantized, compute_dtype=torch.float32, dtype=torch.float32)
    model.train()                       # bitsandbytes' eval-mode CPU forward would repack it
    gp = TinyLoRAGlobalParams(u_dim=4)
    torch.manual_seed(seed)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(4, generator=torch.Generator().manual_seed(seed)))
    return model


def _reload(directory, quantized):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if quantized:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kw)
    model.train()
    return model


def _keys(directory):
    from safetensors import safe_open

    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return set(f.keys())


IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=needs_bnb)],
                         ids=["dense", "4bit"])
def test_round_trip_through_save_pretrained(quantized, tmp_path):
    model = _adapted(quantized)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    keys = _keys(tmp_path)
    assert not any("base_layer" in k or k.endswith((".U", ".S", ".Vh", ".P")) for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    reloaded = _reload(tmp_path, quantized)
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    load_tiny_lora(reloaded, tmp_path / ADAPTER_FILE, progress=False)
    assert torch.equal(_logits(reloaded), want)
    assert torch.equal(_logits(model), want)           # the saved model is as it was


def test_a_given_state_dict_is_written_under_the_base_names(tmp_path):
    model = _adapted(False)
    want = _logits(model)
    model.save_pretrained(tmp_path, state_dict=model.state_dict())    # as Trainer calls it
    reloaded = _reload(tmp_path, False)
    load_tiny_lora(reloaded, tmp_path / ADAPTER_FILE, progress=False)
    assert torch.equal(_logits(reloaded), want)


def test_a_merged_model_is_written_merged_without_an_adapter_file(tmp_path):
    model = _adapted(False)
    merge_tiny_lora(model)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / ADAPTER_FILE).exists()
    torch.testing.assert_close(_logits(_reload(tmp_path, False)), want, rtol=0, atol=0)


def test_what_cannot_be_written_is_refused_before_any_file(tmp_path):
    model = _adapted(False)
    layers = [m for m in model.modules() if hasattr(m, "merged")]
    layers[0].merged = True                 # merged in part
    with pytest.raises(ValueError, match="merged"):
        model.save_pretrained(tmp_path / "a")
    layers[0].merged = False
    for m in layers:
        m.p_seed = None                     # the seed is not known
    with pytest.raises(ValueError, match="save_tiny_lora"):
        model.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert torch.equal(_logits(model), _logits(model))
    assert type(model).__name__.endswith("WithTinyLoRA")
    assert any("base_layer" in k for k in model.state_dict())


def test_an_adapted_model_copies_and_pickles():
    model = _adapted(False)
    want = _logits(model)
    assert torch.equal(_logits(copy.deepcopy(model)), want)
    assert torch.equal(_logits(pickle.loads(pickle.dumps(model))), want)
