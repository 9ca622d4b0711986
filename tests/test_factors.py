"""The SVD factor cache: hits when nothing changed, never when the weight did."""

import pytest
import torch

from tinylora_kernels import FactorCache, TinyLoRAGlobalParams, apply_tiny_lora, tiny_lora_layers
from tinylora_kernels.testing import tiny_qwen2


def _apply(model, cache, **kw):
    gp = TinyLoRAGlobalParams(u_dim=4)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, factor_cache=cache, progress=False, **kw)
    return [(layer.U.clone(), layer.S.clone(), layer.Vh.clone()) for _, layer in
            tiny_lora_layers(model)]


@pytest.mark.parametrize("quantized", [True, False], ids=["4bit", "dense"])
def test_cache_hits_give_identical_factors(tmp_path, quantized):
    if quantized:
        pytest.importorskip("bitsandbytes")
    fresh = _apply(tiny_qwen2(quantized=quantized), None)
    cache = FactorCache(tmp_path)
    first = _apply(tiny_qwen2(quantized=quantized), cache)
    assert (cache.hits, cache.misses) == (0, 14)
    second = _apply(tiny_qwen2(quantized=quantized), cache)
    assert (cache.hits, cache.misses) == (14, 14)
    for a, b, c in zip(fresh, first, second):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x, y) and torch.equal(x, z)


def test_changed_weight_never_hits_a_stale_entry(tmp_path):
    cache = FactorCache(tmp_path)
    _apply(tiny_qwen2(quantized=False), cache)
    model = tiny_qwen2(quantized=False)
    with torch.no_grad():
        w = model.model.layers[1].mlp.up_proj.weight
        w.view(-1)[7] += 1e-3     # one element of one layer
    _apply(model, cache)
    assert (cache.hits, cache.misses) == (13, 15)


def test_rank_and_svd_path_are_part_of_the_key(tmp_path):
    cache = FactorCache(tmp_path)
    _apply(tiny_qwen2(quantized=False), cache)
    _apply(tiny_qwen2(quantized=False), cache, rank=3)
    _apply(tiny_qwen2(quantized=False), cache, svd="device")
    assert cache.hits == 0 and cache.misses == 42


def test_corrupt_entry_is_recomputed(tmp_path):
    cache = FactorCache(tmp_path)
    expected = _apply(tiny_qwen2(quantized=False), cache)
    for f in tmp_path.glob("svd-*.pt"):
        f.write_bytes(b"torn write")
    got = _apply(tiny_qwen2(quantized=False), cache)
    assert cache.misses == 28
    for a, b in zip(expected, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_cache_directory_given_as_a_path(tmp_path):
    _apply(tiny_qwen2(quantized=False), str(tmp_path / "svd"))
    assert len(list((tmp_path / "svd").glob("svd-*.pt"))) == 14
