"""What a new user meets first: training set-up, bad input, clear errors, nothing silently wrong."""

import copy
import logging
import pickle

import pytest
import torch

from conftest import make_linear, make_linear4bit, needs_bnb
from tinylora_kernels import (CheckpointError, TinyLoRAGlobalParams, TinyLoRALinear,
                              apply_tiny_lora, load_tiny_lora, read_checkpoint, save_tiny_lora)
from tinylora_kernels.testing import tiny_qwen2


def _snapshot(model):
    """Everything a failed call must leave as it was: values, requires_grad, the module tree."""
    return ({n: t.detach().clone() for n, t in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m).__name__) for n, m in model.named_modules()])


def _same(model, snap):
    values, grads, tree = snap
    now = _snapshot(model)
    assert now[2] == tree
    assert now[1] == grads
    assert now[0].keys() == values.keys()
    for name, t in values.items():
        assert torch.equal(now[0][name], t), name


# -- training set-up -------------------------------------------------------------------------------
@needs_bnb
def test_apply_leaves_exactly_v_trainable():
    model = tiny_qwen2(quantized=True)
    assert any(p.requires_grad for p in model.parameters())     # embeddings, norms, lm_head
    gp = TinyLoRAGlobalParams(u_dim=13, dtype=torch.float32)
    apply_tiny_lora(model, gp, progress=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 13
    assert len(trainable) == 1 and trainable[0] is gp.global_v


@needs_bnb
def test_apply_can_leave_the_rest_as_it_was():
    model = tiny_qwen2(quantized=True)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    gp = TinyLoRAGlobalParams(u_dim=5, dtype=torch.float32)
    apply_tiny_lora(model, gp, progress=False, freeze=False)
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    assert after["model.embed_tokens.weight"] and after["lm_head.weight"]
    assert after["tiny_lora_params.global_v"]
    kept = {n for n in before if n in after}
    assert all(after[n] == before[n] for n in kept if "base_layer" not in n)


def test_apply_on_an_adapted_model_says_so():
    model = torch.nn.Module()
    model.q_proj = make_linear(8, 8)
    gp = TinyLoRAGlobalParams(u_dim=3)
    apply_tiny_lora(model, gp, progress=False)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already adapted: it holds 1 TinyLoRALinear"):
        apply_tiny_lora(model, gp, progress=False)
    _same(model, snap)


# -- silent wrong answers -------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("k", [96, 200])
def test_4bit_layer_with_k_not_a_multiple_of_64_is_right_on_the_cpu(k):
    n = 96
    base, w = make_linear4bit(n, k, bias=False, compute_dtype=torch.float32)
    gp = TinyLoRAGlobalParams(u_dim=4, dtype=torch.float32)
    layer = TinyLoRALinear(base, global_params_ref=gp)        # v = 0: the base product alone
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = layer(x)
    exact = x @ w.T                                          # the unquantized weight

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # NF4's own rounding puts products ~9 % (Frobenius) from the unquantized ones here;
    # bitsandbytes 0.50's CPU decode gave 48 % at 96 x 96
    assert rel(y, exact) <= 0.15
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert rel(xg.grad, w.sum(0).expand_as(xg)) <= 0.15


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_an_integer_input_is_refused(dtype):
    layer = TinyLoRALinear(make_linear(6, 4), global_params_ref=TinyLoRAGlobalParams(u_dim=2))
    x = torch.ones(2, 4, dtype=dtype)
    with pytest.raises(TypeError, match=f"inputs must be floating point, got {dtype}"):
        layer(x)


# -- bitsandbytes' in-place CPU repacking -------------------------------------------------------------
def _repack(base, k):
    """bitsandbytes' eval-mode CPU forward, which repacks on CPUs with AVX512-BF16."""
    base.eval()
    with torch.no_grad():
        base(torch.randn(2, k, dtype=torch.bfloat16))
    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes does not repack on this CPU")


@needs_bnb
def test_a_base_repacked_after_apply_is_restored_with_one_warning(caplog):
    model = torch.nn.Module()
    model.q_proj, _ = make_linear4bit(32, 128, compute_dtype=torch.bfloat16, seed=1)
    model.k_proj, _ = make_linear4bit(32, 128, compute_dtype=torch.bfloat16, seed=2)
    gp = TinyLoRAGlobalParams(u_dim=3, dtype=torch.float32)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.tensor([0.3, -0.2, 0.5]))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        before = [model.q_proj(x), model.k_proj(x)]
    for layer in (model.q_proj, model.k_proj):
        _repack(layer.base_layer, 128)
    with caplog.at_level(logging.WARNING, logger="tinylora_kernels"), torch.no_grad():
        after = [model.q_proj(x), model.k_proj(x)]
    warnings = [r for r in caplog.records if "repacked" in r.getMessage()]
    assert len(warnings) == 1
    assert not model.q_proj.base_layer.weight.quant_state.packing_format_for_cpu
    for a, b in zip(before, after):
        # the repacking rounded the block scales to bf16: a small, bounded change
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@needs_bnb
def test_a_checkpoint_records_block_scales_rounded_by_bitsandbytes(tmp_path):
    model = tiny_qwen2(quantized=True, compute_dtype=torch.bfloat16)
    _repack(model.model.layers[0].self_attn.q_proj, 64)      # the base model run before apply
    gp = TinyLoRAGlobalParams(u_dim=4, dtype=torch.float32)
    torch.manual_seed(7)
    apply_tiny_lora(model, gp, progress=False)
    save_tiny_lora(model, tmp_path / "v.pt", seed=7, model_id="tiny")
    assert read_checkpoint(tmp_path / "v.pt").extra["base_block_scales"] == "rounded_to_bf16"
    with pytest.warns(UserWarning, match="rounded to bf16"):
        load_tiny_lora(tiny_qwen2(quantized=True, compute_dtype=torch.bfloat16), tmp_path / "v.pt")

    fresh = tiny_qwen2(quantized=True, compute_dtype=torch.bfloat16)
    gp = TinyLoRAGlobalParams(u_dim=4, dtype=torch.float32)
    torch.manual_seed(7)
    apply_tiny_lora(fresh, gp, progress=False)
    save_tiny_lora(fresh, tmp_path / "w.pt", seed=7, model_id="tiny")
    assert read_checkpoint(tmp_path / "w.pt").extra["base_block_scales"] == "as_stored"


# -- clear errors --------------------------------------------------------------------------------------
def test_a_wrong_input_width_names_the_layer_and_the_shapes():
    model = torch.nn.Module()
    model.block = torch.nn.Module()
    model.block.up_proj = make_linear(6, 10)
    apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=2), progress=False)
    with pytest.raises(ValueError, match=r"TinyLoRALinear 'block.up_proj': expects inputs with "
                                         r"in_features=10 .* got an input of shape \(3, 7\)"):
        model.block.up_proj(torch.randn(3, 7))


@needs_bnb
def test_saving_into_a_missing_directory_names_it(tmp_path):
    model = tiny_qwen2(quantized=False, dtype=torch.float32)
    torch.manual_seed(1)
    apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=3), progress=False)
    target = tmp_path / "nowhere" / "tiny_lora_v.pt"
    with pytest.raises(FileNotFoundError, match=f"the directory {tmp_path / 'nowhere'} does not "
                                                "exist") as exc:
        save_tiny_lora(model, target, seed=1, model_id="tiny")
    assert ".tmp-tiny-lora" not in str(exc.value)
    assert not (tmp_path / "nowhere").exists()


def test_a_factor_cache_that_is_a_file_changes_nothing(tmp_path):
    model = torch.nn.Module()
    model.q_proj = make_linear(8, 12)
    model.v_proj = make_linear(8, 12, seed=1)
    (tmp_path / "cache").write_text("not a directory")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="factor_cache must be a directory; .*cache' is a file"):
        apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=3), factor_cache=tmp_path / "cache",
                        progress=False)
    _same(model, snap)
    assert (tmp_path / "cache").read_text() == "not a directory"


def test_a_failure_half_way_through_apply_leaves_every_bias_trainable(tmp_path, monkeypatch):
    from tinylora_kernels import factors

    model = torch.nn.Module()
    model.q_proj = make_linear(8, 12)
    model.v_proj = make_linear(8, 12, seed=1)
    calls = []
    real = factors.top_r_svd

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr("tinylora_kernels.layers.top_r_svd", fail_second)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="disk full"):
        apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=3), progress=False)
    _same(model, snap)


def test_a_text_file_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("epoch 3: reward 0.61\n")
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as exc:
        read_checkpoint(path)
    assert "KeyError" not in str(exc.value)


class _Payload:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


def test_a_refused_pickle_names_the_global_and_gives_no_unsafe_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"global_v": torch.zeros(2), "x": _Payload()}, path)
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(path)
    msg = str(exc.value)
    assert "was refused" in msg and "getcwd" in msg
    assert "weights_only=False" not in msg and "weights_only" not in msg


def test_a_plain_pickle_of_a_dict_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"global_v": [0.0, 1.0]}))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_deepcopy_of_an_adapted_layer_computes_the_same(rng):
    model = torch.nn.Module()
    model.q_proj = make_linear(8, 12)
    gp = TinyLoRAGlobalParams(u_dim=3, dtype=torch.float32)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.fill_(0.3)
    x = torch.randn(2, 12, generator=rng)
    with torch.no_grad():
        y = model.q_proj(x)                 # fills the layer's kept operands
        clone = copy.deepcopy(model)
        clone.tiny_lora_params.global_v.fill_(-0.3)
        assert torch.equal(model.q_proj(x), y)
        assert not torch.equal(clone.q_proj(x), y)
