"""Set-up time: ``apply_tiny_lora`` (SVD of every weight, P drawn) on decoder layers of a model's
shapes in 4-bit NF4 with double quantization, three ways on identical copies:

* ``no_cache``: no factor cache (the users' path: the SVD of every weight);
* ``cold_cache``: an empty :class:`~tinylora_kernels.FactorCache` (SVD + store);
* ``warm_cache``: the filled cache (every factor read back, no SVD).

One timed run each (set-up is a one-off; the ``wall`` clock, one round of one call).
"""

from __future__ import annotations

import tempfile
import time

import torch

from .cases import MODELS, nf4_linear
from .report import result
from .timing import environment, timing_method

__all__ = ["setup_cost"]


def _build(model: str, n_layers: int, device: str) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList()
    for _ in range(n_layers):
        block = torch.nn.Module()
        for name, (n, k) in MODELS[model]["shapes"].items():
            w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
            setattr(block, name, nf4_linear(w, device, torch.float16,
                                            bias=name in ("q_proj", "k_proj", "v_proj")))
        root.layers.append(block)
    return root


def _timed_apply(model: str, n_layers: int, device: str, cache) -> float:
    from .. import TinyLoRAGlobalParams, apply_tiny_lora

    root = _build(model, n_layers, device)
    gp = TinyLoRAGlobalParams(u_dim=32, device=device)
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    apply_tiny_lora(root, gp, projection="diagonal", factor_cache=cache, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6


def setup_cost(model: str = "qwen2.5-coder-3b", n_layers: int = 1, device: str = "cpu",
               progress=None) -> dict:
    """The three set-up times above for ``n_layers`` decoder layers of ``model``."""
    from .. import FactorCache

    say = progress or (lambda msg: None)
    linears = n_layers * len(MODELS[model]["shapes"])
    providers = {}
    with tempfile.TemporaryDirectory() as d:
        cache = FactorCache(d)
        for name, c in (("no_cache", None), ("cold_cache", cache), ("warm_cache", cache)):
            say(name)
            us = _timed_apply(model, n_layers, device, c)
            providers[name] = {"median_us": us, "p20_us": us, "p80_us": us, "min_us": us,
                               "per_linear_s": us / 1e6 / linears}
        hits = cache.hits
    if hits != linears:
        raise RuntimeError(f"the warm cache served {hits} of {linears} linears")
    return result(
        "setup", f"apply_tiny_lora on {linears} NF4 linears ({n_layers} decoder layer(s) of "
        f"{model}), {device}", device, timing_method(device, "wall", rounds=1, reps=1),
        [{"case": {"model": model, "decoder_layers": n_layers, "linears": linears},
          "floor_us": None, "providers": providers}],
        env=environment(device), baseline="no_cache",
        legend={"no_cache": "no factor cache: the SVD of every weight (the users' path)",
                "cold_cache": "an empty FactorCache: SVD + store",
                "warm_cache": "the filled FactorCache: every factor read back"},
        summary=[f"{p}: {s['median_us'] / 1e6:.2f} s, {s['per_linear_s']:.3f} s per linear"
                 for p, s in providers.items()])
