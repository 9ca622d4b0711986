"""Bad input gets a clear error naming the problem and leaves models and files as they were."""

import numpy as np
import pytest
import torch

from conftest import HAS_TRITON, make_linear, make_linear4bit, needs_bnb
from tinylora_kernels import (CheckpointError, TinyLoRAGlobalParams, TinyLoRALinear,
                              apply_tiny_lora, export_lora, export_merged, load_tiny_lora,
                              read_checkpoint, save_tiny_lora, set_backend, use_backend)
from tinylora_kernels.testing import tiny_qwen2


def _adapted(seed=0, dtype=torch.float32, v_dtype=torch.float32):
    model = tiny_qwen2(quantized=False, dtype=dtype)
    gp = TinyLoRAGlobalParams(u_dim=4, dtype=v_dtype)
    torch.manual_seed(seed)
    apply_tiny_lora(model, gp, progress=False)
    return model, gp


@pytest.mark.parametrize("shape", [(), (0,)], ids=["0-d", "empty-1d"])
def test_a_shapeless_input_names_the_shape(shape):
    layer = TinyLoRALinear(make_linear(6, 8), 2, global_params_ref=TinyLoRAGlobalParams(3))
    with pytest.raises(ValueError, match=r"in_features=8.*shape \(" + ("" if not shape else "0")):
        layer(torch.zeros(shape))


def test_saving_to_a_directory_is_refused(tmp_path):
    model, _ = _adapted()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_tiny_lora(model, tmp_path, seed=0, model_id="x")
    assert list(tmp_path.iterdir()) == []


def test_exports_do_not_replace_files_unless_asked(tmp_path):
    model, _ = _adapted()
    path = tmp_path / "merged.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged(model, path)
    assert path.read_bytes() == b"keep me"
    export_merged(model, path, overwrite=True)
    assert path.read_bytes() != b"keep me"
    with pytest.raises(IsADirectoryError):
        export_merged(model, tmp_path)
    out = export_lora(model, tmp_path / "lora")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_lora(model, out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    export_lora(model, out, overwrite=True)
    with pytest.raises(NotADirectoryError):
        export_lora(model, path)


def _ckpt(tmp_path, **override):
    sd = {"global_v": torch.zeros(4), "u_value": 4, "rank": 2, "seed": 0, "model_id": "x",
          "total_replaced_layers": 14}
    sd.update(override)
    path = tmp_path / "v.pt"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("seed", [-1, 2 ** 64])
def test_a_checkpoint_seed_out_of_range_is_named(tmp_path, seed):
    path = _ckpt(tmp_path, seed=seed)
    with pytest.raises(CheckpointError, match=r"v\.pt.*'seed'"):
        read_checkpoint(path)


def test_a_zero_length_v_is_named(tmp_path):
    path = _ckpt(tmp_path, global_v=torch.zeros(0), u_value=0)
    with pytest.raises(CheckpointError, match=r"v\.pt.*'global_v' is empty"):
        read_checkpoint(path)


def test_a_truncated_checkpoint_says_truncated(tmp_path):
    path = _ckpt(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert "truncated" in str(info.value) and "not a torch checkpoint" not in str(info.value)


def test_numpy_integers_are_accepted_where_ints_are(tmp_path):
    gp = TinyLoRAGlobalParams(u_dim=np.int64(4), dtype=torch.float32)
    model = tiny_qwen2(quantized=False)
    n = apply_tiny_lora(model, gp, rank=np.int32(2), rng_seed=np.int64(5), progress=False)
    assert n == 14 and gp.global_v.shape == (4,)
    save_tiny_lora(model, tmp_path / "v.pt", seed=np.uint16(5), model_id="x")
    assert read_checkpoint(tmp_path / "v.pt").seed == 5
    layer = TinyLoRALinear(make_linear(6, 8), np.int64(2), global_params_ref=gp)
    assert layer.rank == 2 and type(layer.rank) is int
    with pytest.raises(TypeError, match="u_dim"):
        TinyLoRAGlobalParams(u_dim=np.bool_(True))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_an_integer_dtype_for_v_is_refused(dtype):
    with pytest.raises(TypeError, match="floating"):
        TinyLoRAGlobalParams(u_dim=4, dtype=dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_a_refusal_names_the_scope_the_user_set():
    model, _ = _adapted()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64).bfloat16()           # the interpreter refuses bf16; a GPU: CPU tensors
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"use_backend\('triton'\)"):
        layer(x)
    set_backend(model, "triton")
    with pytest.raises(RuntimeError, match=r"set_backend\(model, 'triton'\)") as info:
        layer(x)
    assert "TINYLORA_BACKEND" not in str(info.value)


def test_a_training_step_after_half_keeps_v_and_its_grad_in_v_dtype():
    model, gp = _adapted()
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([gp.global_v], lr=0.1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.half()
    assert gp.global_v.dtype == torch.float32 and gp.global_v.grad.dtype == torch.float32
    model(ids, labels=ids).loss.backward()
    opt.step()                                  # mixed dtypes would raise here
    assert torch.isfinite(gp.global_v).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_base_weight_is_refused_naming_the_layer(bad):
    model = tiny_qwen2(quantized=False, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    flags = [p.requires_grad for p in model.parameters()]
    gp = TinyLoRAGlobalParams(u_dim=4)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN/Inf"):
        apply_tiny_lora(model, gp, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not hasattr(model, "tiny_lora_params")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


@needs_bnb
def test_a_non_finite_4bit_base_is_refused():
    base, _ = make_linear4bit(64, 128, double_quant=False)
    base.weight.quant_state.absmax[0] = float("inf")          # one block's scale
    with pytest.raises(ValueError, match="NaN/Inf"):
        TinyLoRALinear(base, 2, global_params_ref=TinyLoRAGlobalParams(4))


def test_apply_without_targets_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    gp = TinyLoRAGlobalParams(u_dim=3)
    with pytest.raises(ValueError, match="no layer to replace"):
        apply_tiny_lora(model, gp, progress=False)
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "tiny_lora_params")
    assert not model._forward_pre_hooks


def test_load_with_another_v_dtype_into_an_adapted_model_is_refused(tmp_path):
    model, gp = _adapted(seed=3, v_dtype=torch.bfloat16)
    save_tiny_lora(model, tmp_path / "v.pt", seed=3, model_id="x")
    with torch.no_grad():
        gp.global_v.fill_(0.5)
    with pytest.raises(CheckpointError, match="v_dtype"):
        load_tiny_lora(model, tmp_path / "v.pt", v_dtype=torch.float32)
    assert (gp.global_v == 0.5).all() and gp.global_v.dtype == torch.bfloat16
    load_tiny_lora(model, tmp_path / "v.pt", v_dtype=torch.bfloat16)     # the same: honoured
    assert (gp.global_v == 0).all()
    with pytest.raises(ValueError, match="v_dtype"):
        load_tiny_lora(model, tmp_path / "v.pt", v_dtype=torch.int32)
