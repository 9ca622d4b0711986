"""Interop with the real peft / safetensors installs: LoRA export, merge, merged export."""

import json

import pytest
import torch

from conftest import KERNELS_MISSING, KERNELS_RUN, needs_bnb
from tinylora_kernels import (TinyLoRAGlobalParams, apply_tiny_lora, export_lora, export_merged,
                              merge_tiny_lora, tiny_lora_layers, unmerge_tiny_lora)
from tinylora_kernels.testing import tiny_qwen2

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))


def _adapted(projection="full", quantized=False, dtype=torch.float32):
    model = tiny_qwen2(quantized=quantized, dtype=dtype)
    gp = TinyLoRAGlobalParams(u_dim=7, dtype=torch.float32)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, projection=projection, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(7, generator=torch.Generator().manual_seed(1)) * 0.5)
    return model, gp


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.double()


@pytest.mark.parametrize("projection", ["full", "diagonal"])
@pytest.mark.parametrize("rank", [None, 8], ids=["r2", "padded-r8"])
def test_export_lora_loads_in_peft_and_matches(tmp_path, projection, rank):
    peft = pytest.importorskip("peft")
    model, _ = _adapted(projection)
    out = export_lora(model, tmp_path / "adapter", rank=rank)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == (rank or 2)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"}
    base = tiny_qwen2(quantized=False, dtype=torch.float32)
    plain = _logits(base)
    lora = peft.PeftModel.from_pretrained(base, str(out))
    got, expected = _logits(lora), _logits(model)
    assert not torch.allclose(plain, expected)
    # both are fp32 computations of the same function: agree to fp32 rounding
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_export_lora_rejects_a_smaller_rank(tmp_path):
    model, _ = _adapted()
    with pytest.raises(ValueError, match="rank must be"):
        export_lora(model, tmp_path, rank=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_then_unmerge(dtype):
    model, gp = _adapted(dtype=dtype)
    before = {n: l.base_layer.weight.detach().clone() for n, l in tiny_lora_layers(model)}
    adapted = _logits(model)
    assert merge_tiny_lora(model) == 14
    merged = _logits(model)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged, adapted, rtol=tol, atol=tol)
    assert merge_tiny_lora(model) == 0                  # idempotent
    assert unmerge_tiny_lora(model) == 14
    for n, layer in tiny_lora_layers(model):
        w0, w1 = before[n].float(), layer.base_layer.weight.float()
        ulp = 2 ** -23 if dtype == torch.float32 else 2 ** -7
        assert (w1 - w0).abs().max() <= 4 * ulp * w0.abs().max(), n
    torch.testing.assert_close(_logits(model), adapted, rtol=tol, atol=tol)


@needs_bnb
def test_merge_refuses_4bit_and_export_merged_serves_it(tmp_path):
    from safetensors.torch import load_file

    model, _ = _adapted(quantized=True)
    with pytest.raises(ValueError, match="export_merged"):
        merge_tiny_lora(model)
    path = tmp_path / "merged.safetensors"
    mismatch = export_merged(model, path, dtype=torch.float32)
    assert len(mismatch) == 14 and max(mismatch.values()) < 1e-6
    state = load_file(str(path))
    assert "model.layers.0.self_attn.q_proj.weight" in state
    assert not any("base_layer" in k or "tiny_lora" in k for k in state)
    # the plain architecture with the merged weights computes the adapted model's function
    plain = tiny_qwen2(quantized=False, dtype=torch.float32)
    missing = plain.load_state_dict(state, strict=False)
    assert not [k for k in missing.missing_keys if "rotary" not in k]
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=5e-2, atol=5e-2)
    bf16 = export_merged(model, tmp_path / "bf16.safetensors")
    assert 0 < max(bf16.values()) < 2 ** -7


@needs_bnb
def test_generate_same_greedy_tokens_through_both_paths(monkeypatch):
    if not KERNELS_RUN:
        pytest.skip(KERNELS_MISSING)
    model = tiny_qwen2(quantized=True, compute_dtype=torch.float16, dtype=torch.float32)
    gp = TinyLoRAGlobalParams(u_dim=7, dtype=torch.float32)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(7, generator=torch.Generator().manual_seed(1)))
    model.eval()
    tokens = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("TINYLORA_BACKEND", backend)
        with torch.no_grad():
            tokens[backend] = model.generate(IDS, max_new_tokens=6, do_sample=False,
                                             use_cache=True)
    assert tokens["reference"].shape == (2, 14)
    assert torch.equal(tokens["reference"], tokens["triton"])


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4bit"])
def test_torch_compile_fullgraph_matches_eager(quantized):
    if quantized:
        pytest.importorskip("bitsandbytes")
    model, gp = _adapted(quantized=quantized)
    eager = model(IDS).logits
    eager.float().sum().backward()
    grad = gp.global_v.grad.clone()
    gp.global_v.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(IDS).logits
    got.float().sum().backward()
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp.global_v.grad, grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, eager.detach(), rtol=1e-6, atol=1e-6)


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward
    return backend


def test_compiled_graph_holds_the_adapter_op():
    """Dynamo sees ``tinylora::add_adapter`` as one node (registered op), not its internals."""
    model, gp = _adapted()
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(graphs))
    compiled(IDS).logits.sum().backward()
    assert len(graphs) == 1
    assert graphs[0].count("tinylora.add_adapter") == 14
    assert gp.global_v.grad is not None


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "4bit"])
def test_kernel_path_compiles_fullgraph(monkeypatch, quantized):
    """With the kernels selected, the fused ops compile with fullgraph and give eager's outputs
    and v-gradients (interpreter on a CPU)."""
    if not KERNELS_RUN:
        pytest.skip(KERNELS_MISSING)
    if quantized:
        pytest.importorskip("bitsandbytes")
    model, gp = _adapted(quantized=quantized, dtype=torch.float32)
    monkeypatch.setenv("TINYLORA_BACKEND", "triton")
    eager = model(IDS).logits
    eager.float().sum().backward()
    grad = gp.global_v.grad.clone()
    gp.global_v.grad = None
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(graphs))
    got = compiled(IDS).logits
    got.float().sum().backward()
    assert graphs[0].count("tinylora.fused_linear") == 14
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch.testing.assert_close(gp.global_v.grad, grad, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()
    aot = torch.compile(model, fullgraph=True, backend="aot_eager")
    gp.global_v.grad = None
    aot(IDS).logits.float().sum().backward()
    # AOT autograd sums the 14 layers' fp32 contributions to v in another order
    torch.testing.assert_close(gp.global_v.grad, grad, rtol=1e-5, atol=1e-7)
