"""apply_tiny_lora on a small random Qwen2, loaded in 4-bit as users load theirs."""

import pytest
import torch

from conftest import needs_bnb
from tinylora_kernels import (TinyLoRAGlobalParams, TinyLoRALinear, apply_tiny_lora,
                              tiny_lora_layers)
from tinylora_kernels.layers import TARGET_SUFFIXES
from tinylora_kernels.testing import tiny_qwen2

pytestmark = needs_bnb

ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def qwen4bit():
    return tiny_qwen2(quantized=True, double_quant=True, compute_dtype=torch.float16)


def test_replaces_every_target_in_order_and_draws_p_in_that_order(qwen4bit):
    model = qwen4bit
    gp = TinyLoRAGlobalParams(u_dim=13, device="cpu", dtype=torch.bfloat16)
    torch.manual_seed(1234)
    n = apply_tiny_lora(model, gp, progress=False)
    assert n == 14
    names = [name for name, _ in tiny_lora_layers(model)]
    assert names == [f"model.layers.{i}.{'self_attn' if p in ORDER[:4] else 'mlp'}.{p}"
                     for i in range(2) for p in ORDER]
    # P: one bf16 draw per layer from the global RNG, in replacement order, nothing else drawn
    torch.manual_seed(1234)
    for _, layer in tiny_lora_layers(model):
        assert torch.equal(layer.P, torch.randn(13, 2, 2, dtype=torch.bfloat16))
    after_expected = torch.randn(3)
    torch.manual_seed(1234)
    apply_tiny_lora(tiny_qwen2(), TinyLoRAGlobalParams(u_dim=13), progress=False)
    assert torch.equal(torch.randn(3), after_expected), "set-up consumed the global RNG"
    assert model.tiny_lora_params is gp
    assert not isinstance(model.lm_head, TinyLoRALinear)
    assert [p is gp.global_v for p in model.parameters()].count(True) == 1
    assert sum(1 for k in model.state_dict() if k.endswith("global_v")) == 1


def test_same_seed_same_p_other_seed_other_p():
    def ps(seed, **kw):
        m = tiny_qwen2()
        torch.manual_seed(seed)
        apply_tiny_lora(m, TinyLoRAGlobalParams(u_dim=5), progress=False, **kw)
        return [layer.P for _, layer in tiny_lora_layers(m)]

    a, b, c = ps(7), ps(7), ps(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    # the private per-layer scheme ignores the global RNG and differs per layer
    d, e = ps(1, rng_seed=99), ps(2, rng_seed=99)
    assert all(torch.equal(x, y) for x, y in zip(d, e))
    assert not torch.equal(d[0], d[1])


def test_diagonal_projection_shapes(qwen4bit):
    gp = TinyLoRAGlobalParams(u_dim=6)
    torch.manual_seed(0)
    apply_tiny_lora(qwen4bit, gp, projection="diagonal", progress=False)
    torch.manual_seed(0)
    for _, layer in tiny_lora_layers(qwen4bit):
        assert layer.P.shape == (6, 2) and layer.S.shape == (2,)
        assert torch.equal(layer.P, torch.randn(6, 2, dtype=torch.bfloat16) / 2 ** 0.5)


def test_lm_head_and_non_linear_children_untouched():
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(4, 4)
    model.block = torch.nn.Module()
    model.block.q_proj = torch.nn.Linear(4, 4)
    model.block.my_q_proj = torch.nn.Linear(4, 4)       # ends with q_proj: replaced
    model.block.q_proj_extra = torch.nn.Linear(4, 4)    # does not: kept
    model.block.v_proj = torch.nn.Embedding(4, 4)       # not a Linear: searched, kept
    n = apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=2), progress=False)
    assert n == 2
    assert isinstance(model.block.q_proj, TinyLoRALinear)
    assert isinstance(model.block.my_q_proj, TinyLoRALinear)
    assert isinstance(model.block.q_proj_extra, torch.nn.Linear)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert set(TARGET_SUFFIXES) == set(ORDER)


def test_failure_midway_leaves_model_unchanged():
    model = torch.nn.Module()
    model.q_proj = torch.nn.Linear(8, 8)
    model.k_proj = torch.nn.Linear(8, 1)      # rank 2 > min(1, 8): fails after q_proj was built
    before = dict(model.named_children())
    with pytest.raises(ValueError, match="rank"):
        apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=2), progress=False)
    assert dict(model.named_children()) == before
    assert not hasattr(model, "tiny_lora_params")


def test_progress_bar_shown_and_switchable(capsys):
    apply_tiny_lora(tiny_qwen2(), TinyLoRAGlobalParams(u_dim=2), progress=True)
    assert "TinyLoRA" in capsys.readouterr().err
    apply_tiny_lora(tiny_qwen2(), TinyLoRAGlobalParams(u_dim=2), progress=False)
    assert "TinyLoRA" not in capsys.readouterr().err


def test_forward_and_generate_on_adapted_4bit_model(qwen4bit):
    gp = TinyLoRAGlobalParams(u_dim=8)
    torch.manual_seed(0)
    apply_tiny_lora(qwen4bit, gp, progress=False)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    qwen4bit.eval()
    with torch.no_grad():
        base_logits = qwen4bit(ids).logits
        gp.global_v.fill_(0.5)
        logits = qwen4bit(ids).logits
        out = qwen4bit.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all() and not torch.equal(base_logits, logits)
    assert out.shape == (2, 13)


@pytest.mark.parametrize("order", ["prepare-then-apply", "apply-then-prepare"])
def test_prepare_model_for_kbit_training_with_gradient_checkpointing(order):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))

    def grads(checkpointing):
        model = tiny_qwen2(quantized=True, double_quant=True, compute_dtype=torch.float16)
        gp = TinyLoRAGlobalParams(u_dim=8, dtype=torch.bfloat16)
        if order == "prepare-then-apply":
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        apply_tiny_lora(model, gp, progress=False)
        if order == "apply-then-prepare":
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing)
            # PEFT freezes every parameter (and upcasts v to fp32): v must be unfrozen again
            assert not gp.global_v.requires_grad and gp.global_v.dtype == torch.float32
            gp.global_v.requires_grad_(True)
        model.config.use_cache = False
        with torch.no_grad():
            gp.global_v.copy_(torch.linspace(-0.5, 0.5, 8))
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        trainable = [n for n, p in model.named_parameters() if p.grad is not None]
        assert trainable == ["tiny_lora_params.global_v"], trainable
        return loss.detach(), gp.global_v.grad.float().clone()

    loss_ckpt, g_ckpt = grads(True)
    loss_plain, g_plain = grads(False)
    assert g_ckpt.abs().sum() > 0
    torch.testing.assert_close(loss_ckpt, loss_plain)
    torch.testing.assert_close(g_ckpt, g_plain, rtol=2e-2, atol=1e-3)


def test_model_state_dict_round_trip_4bit():
    def adapted(seed):
        model = tiny_qwen2(quantized=True)
        gp = TinyLoRAGlobalParams(u_dim=6)
        torch.manual_seed(seed)
        apply_tiny_lora(model, gp, progress=False)
        with torch.no_grad():
            gp.global_v.copy_(torch.randn(6, generator=torch.Generator().manual_seed(seed)))
        return model

    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    a, b = adapted(1), adapted(2)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert not torch.equal(la, lb)
    # bitsandbytes' Linear4bit does not take its own quant-state keys back through
    # load_state_dict (a plain 4-bit model fails the same way); the adapter adds no such key
    plain = tiny_qwen2(quantized=True)
    plain_unexpected = set(plain.load_state_dict(plain.state_dict(), strict=False)
                           .unexpected_keys)
    result = b.load_state_dict(a.state_dict(), strict=False)
    assert not result.missing_keys
    assert {k.replace(".base_layer", "") for k in result.unexpected_keys} == plain_unexpected
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, la, rtol=0, atol=0)


def test_model_dtype_round_trip_keeps_v_and_buffers():
    model = tiny_qwen2(quantized=False, dtype=torch.float32)
    gp = TinyLoRAGlobalParams(u_dim=6, dtype=torch.bfloat16)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.tensor([3e-5, -2e-6, 1e-7, 0.5, -0.25, 1e-3]))
    v = gp.global_v.detach().clone()
    buffers = {n: b.clone() for n, b in model.named_buffers() if n.endswith((".U", ".S", ".Vh",
                                                                            ".P"))}
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    model.half()
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.float16
    model.float()
    assert model.tiny_lora_params.global_v is gp.global_v
    assert torch.equal(gp.global_v.detach(), v) and gp.global_v.dtype == torch.bfloat16
    for n, b in model.named_buffers():
        if n in buffers:
            assert torch.equal(b, buffers[n]), n
    model.to("cpu")
    assert gp.global_v.device.type == "cpu"
