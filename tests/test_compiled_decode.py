"""A graph-captured decode in one line: generate with a static cache compiles the decode step of an
adapted model (4-bit included: every 4-bit layer computes inside a TinyLoRA layer), gives the
eager tokens, and honours per-sequence adapters. On a GPU transformers does this by itself
(CUDA graphs); here the CPU is asked to as well."""

import pytest
import torch

from conftest import needs_bnb
from tinylora_kernels import AdapterSet, TinyLoRAGlobalParams, apply_tiny_lora
from tinylora_kernels.testing import tiny_qwen2

KW = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _model(quantized):
    model = tiny_qwen2(quantized=quantized, dtype=torch.float32, compute_dtype=torch.float32,
                       num_hidden_layers=2).eval()
    gp = TinyLoRAGlobalParams(u_dim=4)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)))
    return model


def _compile_config(backend):
    from transformers import CompileConfig

    config = CompileConfig(backend=backend, mode="default" if backend == "inductor" else None)
    config._compile_all_devices = True          # transformers compiles on GPUs only by default
    return config


def _static(model, ids, backend):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = model.generate(ids, cache_implementation="static",
                         compile_config=_compile_config(backend), **KW)
    return out, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("quantized, backend", [
    (False, "eager"), pytest.param(True, "eager", marks=needs_bnb),
    pytest.param(True, "inductor", marks=needs_bnb)], ids=["dense", "4bit", "4bit-inductor"])
def test_static_cache_decode_is_compiled_and_gives_the_eager_tokens(quantized, backend):
    model = _model(quantized)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    eager = model.generate(ids, **KW)
    compiled, graphs = _static(model, ids, backend)
    assert graphs >= 1                           # the decode step went through torch.compile
    assert torch.equal(compiled, eager)
    with torch.no_grad():                        # and a new v is read by the compiled step
        model.tiny_lora_params.global_v.mul_(-2)
    assert torch.equal(_static(model, ids, backend)[0], model.generate(ids, **KW))


@needs_bnb
def test_compiled_decode_honours_per_sequence_adapters():
    model = _model(True)
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    adapters = AdapterSet(model, {name: torch.randn(4, generator=g) for name in ("a", "b")})
    names = ["a", "__base__", "b"]
    with adapters.per_sequence(model, names):
        eager = model.generate(ids, **KW)
        compiled, _ = _static(model, ids, "eager")
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager, model.generate(ids, **KW))   # the adapters made a difference


@needs_bnb
def test_a_bare_4bit_layer_keeps_the_model_uncompiled():
    from tinylora_kernels.bnb import declare_adapter

    model = tiny_qwen2(quantized=True, dtype=torch.float32, compute_dtype=torch.float32)
    gp = TinyLoRAGlobalParams(u_dim=4)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    assert model.hf_quantizer.is_compileable
    layer = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = layer.base_layer     # a 4-bit layer not adapted
    declare_adapter(model)
    assert not model.hf_quantizer.is_compileable
