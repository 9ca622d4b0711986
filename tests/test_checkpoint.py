"""tiny_lora_v.pt: the users' files load, ours round-trip, bad files are refused cleanly."""

import glob
import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import needs_bnb
from tinylora_kernels import (CheckpointError, TinyLoRAGlobalParams, apply_tiny_lora,
                              load_tiny_lora, read_checkpoint, save_tiny_lora, tiny_lora_layers)
from tinylora_kernels.cli import main as cli_main
from tinylora_kernels.testing import tiny_qwen2

FIXTURES = sorted(glob.glob(str(Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
                                / "seed_checkpoints" / "*.pt")))
if not FIXTURES:   # CI lays shared/ beside the clone; a plain checkout may have it elsewhere
    FIXTURES = sorted(glob.glob(os.path.join(os.environ.get("TINYLORA_FIXTURES", "/nonexistent"),
                                             "*.pt")))
needs_fixtures = pytest.mark.skipif(not FIXTURES, reason="seed checkpoints not found")


def _adapted(seed=11, projection="full", u=9, rng_seed=None, **kw):
    model = tiny_qwen2(**kw)
    gp = TinyLoRAGlobalParams(u_dim=u, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    apply_tiny_lora(model, gp, projection=projection, rng_seed=rng_seed, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(u, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return model, gp


def _logits(model):
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def _same(model, snap):
    sd, mods = snap
    now = model.state_dict()
    return (mods == [(n, type(m)) for n, m in model.named_modules()] and sd.keys() == now.keys()
            and all(torch.equal(sd[k], now[k]) for k in sd))


# -- the users' files ----------------------------------------------------------------------------
@needs_fixtures
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: os.path.basename(p))
def test_seed_checkpoints_read(path):
    ck = read_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert ck.written_by_users_program and ck.projection is None
    assert torch.equal(ck.global_v, raw["global_v"]) and ck.u_value == raw["global_v"].numel()
    assert (ck.rank, ck.seed, ck.total_replaced_layers) == (2, raw["seed"], 252)
    assert ck.model_id == "qwen/Qwen2.5-Coder-3B-Instruct"


@needs_fixtures
@needs_bnb
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: os.path.basename(p))
def test_seed_checkpoints_restore_onto_a_252_layer_model(path):
    # same layer names and count as Qwen2.5-Coder-3B (36 decoder layers), tiny sizes
    model = tiny_qwen2(num_hidden_layers=36)
    ck = read_checkpoint(path)
    out = load_tiny_lora(model, path, projection="diagonal", progress=False)
    assert out is model
    layers = tiny_lora_layers(model)
    assert len(layers) == 252
    assert torch.equal(model.tiny_lora_params.global_v, ck.global_v)
    # P came from manual_seed(seed), in replacement order, diagonal convention
    torch.manual_seed(ck.seed)
    for _, layer in layers[:3]:
        assert torch.equal(layer.P, torch.randn(ck.u_value, 2, dtype=torch.bfloat16) / 2 ** 0.5)


@needs_fixtures
def test_seed_checkpoint_layer_count_mismatch_leaves_model_untouched():
    model = tiny_qwen2()   # 14 target layers, the file says 252
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match="252 layers.*14 target layers"):
        load_tiny_lora(model, FIXTURES[0], projection="diagonal", progress=False)
    assert _same(model, snap) and not hasattr(model, "tiny_lora_params")


@needs_fixtures
def test_cli_inspect(capsys):
    assert cli_main(["inspect", FIXTURES[0]]) == 0
    out = capsys.readouterr().out
    assert "252" in out and "not recorded" in out and "Qwen2.5-Coder-3B" in out


# -- our files -----------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("projection", ["full", "diagonal"])
@pytest.mark.parametrize("rng_seed", [None, 5], ids=["global-rng", "per-layer-rng"])
def test_round_trip(tmp_path, projection, rng_seed):
    seed = 21 if rng_seed is None else rng_seed
    model, gp = _adapted(seed=seed, projection=projection, rng_seed=rng_seed)
    expected = _logits(model)
    path = tmp_path / "tiny_lora_v.pt"
    save_tiny_lora(model, path, seed=seed, model_id="tiny/qwen2")
    raw = torch.load(path, weights_only=True)
    assert raw["projection"] == projection and raw["total_replaced_layers"] == 14
    assert raw["rng_scheme"] == ("global" if rng_seed is None else "per_layer")
    torch.manual_seed(999)
    state = torch.get_rng_state()
    restored = load_tiny_lora(tiny_qwen2(), path, progress=False)
    assert torch.equal(torch.get_rng_state(), state), "load_tiny_lora changed the caller's RNG"
    torch.testing.assert_close(_logits(restored), expected, rtol=0, atol=0)
    assert restored.tiny_lora_params.global_v.dtype == torch.bfloat16


@needs_bnb
@pytest.mark.skipif(torch.cuda.is_available(), reason="device_map='auto' would put the restored "
                    "model on the GPU, where the global RNG draws other P than the CPU-trained "
                    "model's")
def test_users_restore_snippet_runs_with_only_the_import_changed(tmp_path):
    model_dir = str(tmp_path / "model")
    # loaded as the snippet loads it (no dtype given: the checkpoint's own, fp32 here)
    trained, _ = _adapted(seed=42, directory=model_dir, dtype=torch.float32)
    expected = _logits(trained)
    path = str(tmp_path / "tiny_lora_v.pt")
    save_tiny_lora(trained, path, seed=42, model_id=model_dir)
    model_id = model_dir

    # ---- the snippet from the users' checkpoint documentation, verbatim but for the import ----
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    sd = torch.load(path, map_location="cpu")
    u, seed, v = sd["u_value"], sd["seed"], sd["global_v"]
    model = AutoModelForCausalLM.from_pretrained(model_id, device_map="auto", quantization_config=
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16))
    from tinylora_kernels import TinyLoRAGlobalParams, apply_tiny_lora     # was: from train_rl import ...
    device = model.model.layers[0].self_attn.q_proj.weight.device
    global_params = TinyLoRAGlobalParams(u_dim=u, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        global_params.global_v.copy_(v.to(global_params.global_v.dtype).to(device))
    torch.manual_seed(seed)
    apply_tiny_lora(model, global_params)
    # ------------------------------------------------------------------------------------------
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)


def test_users_format_file_loads_with_callers_convention(tmp_path):
    model, gp = _adapted(seed=3, projection="diagonal", quantized=False)
    expected = _logits(model)
    path = tmp_path / "users.pt"
    torch.save({"global_v": gp.global_v.detach(), "u_value": 9, "rank": 2, "seed": 3,
                "model_id": "x", "total_replaced_layers": 14}, path)
    with pytest.warns(UserWarning, match="does not record its projection"):
        wrong = load_tiny_lora(tiny_qwen2(quantized=False), path, progress=False)
    assert wrong.model.layers[0].self_attn.q_proj.projection == "full"
    right = load_tiny_lora(tiny_qwen2(quantized=False), path, projection="diagonal",
                           progress=False)
    torch.testing.assert_close(_logits(right), expected, rtol=0, atol=0)


def test_loading_again_into_the_same_adapted_model_swaps_v(tmp_path):
    model, gp = _adapted(seed=4, quantized=False)
    save_tiny_lora(model, tmp_path / "a.pt", seed=4, model_id="x")
    with torch.no_grad():
        gp.global_v.mul_(3)
    save_tiny_lora(model, tmp_path / "b.pt", seed=4, model_id="x")
    target = load_tiny_lora(tiny_qwen2(quantized=False), tmp_path / "a.pt", progress=False)
    a = _logits(target)
    load_tiny_lora(target, tmp_path / "b.pt")
    torch.testing.assert_close(_logits(target), _logits(model), rtol=0, atol=0)
    assert not torch.equal(a, _logits(target))
    other, _ = _adapted(seed=5, quantized=False)
    save_tiny_lora(other, tmp_path / "c.pt", seed=5, model_id="x")
    with pytest.raises(CheckpointError, match="already adapted differently"):
        load_tiny_lora(target, tmp_path / "c.pt")


# -- refusing bad files --------------------------------------------------------------------------
GOOD = {"global_v": torch.zeros(9, dtype=torch.bfloat16), "u_value": 9, "rank": 2, "seed": 3,
        "model_id": "x", "total_replaced_layers": 14}

BAD = {
    "missing-key": ({k: v for k, v in GOOD.items() if k != "seed"}, "missing key.*seed"),
    "u-str": ({**GOOD, "u_value": "9"}, "'u_value' should be int, found str"),
    "rank-bool": ({**GOOD, "rank": True}, "'rank' should be int"),
    "v-list": ({**GOOD, "global_v": [0.0] * 9}, "'global_v' should be Tensor"),
    "v-2d": ({**GOOD, "global_v": torch.zeros(3, 3)}, "1-D floating"),
    "u-mismatch": ({**GOOD, "u_value": 8}, "u_value=8 but global_v has 9"),
    "rank-zero": ({**GOOD, "rank": 0}, "rank must be >= 1"),
    "nan-v": ({**GOOD, "global_v": torch.tensor([0.0] * 8 + [float("nan")])},
              r"non-finite entries at \[8\]"),
    "inf-v": ({**GOOD, "global_v": torch.tensor([float("inf")] + [0.0] * 8)}, "non-finite"),
    "bad-projection": ({**GOOD, "projection": "sideways"}, "'projection' must be one of"),
    "future-format": ({**GOOD, "format_version": 99}, "newer than this"),
    "bad-p-scale": ({**GOOD, "projection": "diagonal", "p_scale": 1.0}, "p_scale"),
    "not-a-dict": ([1, 2, 3], "expected a dict"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_refused_and_model_untouched(tmp_path, case):
    content, message = BAD[case]
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    model = tiny_qwen2(quantized=False)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        load_tiny_lora(model, path, projection="full", progress=False)
    assert _same(model, snap)


def test_rank_larger_than_a_layer_is_refused(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({**GOOD, "rank": 40}, path)
    model = tiny_qwen2(quantized=False)
    snap = _snapshot(model)
    with pytest.raises(CheckpointError, match="rank 40 exceeds"):
        load_tiny_lora(model, path, projection="full", progress=False)
    assert _same(model, snap)


def test_conflicting_projection_refused(tmp_path):
    path = tmp_path / "ours.pt"
    torch.save({**GOOD, "format_version": 1, "projection": "diagonal"}, path)
    with pytest.raises(CheckpointError, match="written with projection='diagonal'"):
        load_tiny_lora(tiny_qwen2(quantized=False), path, projection="full")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_pickle_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({**GOOD, "model_id": _Evil()}, f)
    with pytest.raises(CheckpointError, match="not a loadable tensors-only"):
        read_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TinyLoRA checkpoint"):
        read_checkpoint(tmp_path / "nope.pt")


def test_save_refuses_wrong_seed_and_leaves_file(tmp_path):
    model, _ = _adapted(seed=11, quantized=False)
    path = tmp_path / "tiny_lora_v.pt"
    path.write_bytes(b"previous contents")
    with pytest.raises(ValueError, match=r"seed=12.*manual_seed\(11\)"):
        save_tiny_lora(model, path, seed=12, model_id="x")
    assert path.read_bytes() == b"previous contents"
    with pytest.raises(ValueError, match="no TinyLoRA layers"):
        save_tiny_lora(tiny_qwen2(quantized=False), path, seed=1, model_id="x")
    assert path.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_lora_v.pt"]


def test_save_refuses_a_seed_that_does_not_redraw_p(tmp_path):
    model = tiny_qwen2(quantized=False)
    torch.manual_seed(3)
    torch.randn(1)   # the RNG moved on since the seed: P is not reproducible from it
    apply_tiny_lora(model, TinyLoRAGlobalParams(u_dim=4), progress=False)
    with pytest.raises(ValueError, match="not freshly seeded"):
        save_tiny_lora(model, tmp_path / "x.pt", seed=3, model_id="x")
    assert not list(tmp_path.iterdir())
