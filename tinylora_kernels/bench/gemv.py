"""The NF4 GEMV's launch shapes against the byte floor (GPU)."""

from __future__ import annotations


import torch

from .cases import MODELS, NF4_BYTES_PER_WEIGHT, _Linear
from .timing import _environment, _graph_time, _time, measure_ceilings

# -- NF4 GEMV launch shapes (GPU) ----------------------------------------------------------------
def gemv_sweep(model: str = "qwen2.5-coder-3b", ms=(1, 4), bns=(16, 32), bkhs=(128, 256),
               splits=(1, 2, 4, 8), warps=(4,), layers=None, device: str = "cuda") -> dict:
    """Time every GEMV launch shape on the linears of ``model`` (CUDA graphs, adapter on) against
    the byte floor, to fill :func:`~tinylora_kernels.ops.configs.gemv_config` from measurement.
    The default config's row is marked; each (layer, M) names its fastest shape. (On a CPU, under
    the interpreter, it runs with plain timers: a check of the machinery, not a measurement.)"""
    from ..nf4 import NF4Weight
    from ..ops.configs import GemvConfig, gemv_config
    from ..ops.nf4_gemv import nf4_gemv

    ceilings = measure_ceilings(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer = _graph_time if device == "cuda" else (lambda fn: _time(fn, device, 0.01))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in MODELS[model]["shapes"].items():
        if layers is not None and name not in layers:
            continue
        lin = _Linear(n, k, device, dtype, gen)
        w = NF4Weight.from_bnb(lin.lin4.weight)
        f = lin.layer.adapter_factors()
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            floor = (n * k * NF4_BYTES_PER_WEIGHT + 2 * m * (n + k)) / (ceilings["copy_GBps"] * 1e3)
            default = gemv_config(n, k)
            for bn in bns:
                for bkh in bkhs:
                    for split in splits:
                        for nw in warps:
                            cfg = GemvConfig(BN=bn, BKH=bkh, split=split, num_warps=nw)
                            out = torch.empty(m, n, dtype=dtype, device=device)
                            stats = timer(lambda: nf4_gemv(x, w, None, f, config=cfg,
                                                           out_dtype=dtype, out=out))
                            rows.append({"layer": name, "N": n, "K": k, "M": m, **vars(cfg),
                                         "default": cfg == default, "floor_us": floor, **stats})
    best = {}
    for r in rows:
        key = (r["layer"], r["M"])
        if "median_us" in r and (key not in best or r["median_us"] < best[key]["median_us"]):
            best[key] = r
    return {"env": _environment(device), "ceilings": ceilings, "rows": rows,
            "best": [dict(v, time_over_floor=v["median_us"] / v["floor_us"])
                     for v in best.values()]}
