"""The NF4 GEMV's launch shapes against the byte floor (GPU)."""

from __future__ import annotations

import dataclasses
import itertools

import torch

from .cases import MODELS, NF4_BYTES_PER_WEIGHT, _Linear
from .report import result
from .timing import environment, graph_time, measure, measure_ceilings, timing_method


def gemv_sweep(model: str = "qwen2.5-coder-3b", ms=(1, 4), bns=(16, 32), bkhs=(128, 256),
               splits=(1, 2, 4, 8), warps=(4,), layers=None, device: str = "cuda",
               prefetches=(False, True)) -> dict:
    """Time every GEMV launch shape on the linears of ``model`` (CUDA graphs, adapter on) against
    the byte floor, to fill :func:`~tinylora_kernels.ops.configs.gemv_config` from measurement.
    ``prefetches``: the GEMV with and without its two-stage register prefetch
    (:class:`~tinylora_kernels.ops.configs.GemvConfig`; with it at the default shape only, to
    keep the sweep within its time on the GPU job). The default config's row is marked;
    each (layer, M) names its fastest shape (``best`` and the
    summary). (On a CPU, under the interpreter, it runs on the wall clock: a check of the
    machinery, not a measurement.)"""
    from ..nf4 import NF4Weight
    from ..ops.configs import GemvConfig, gemv_config
    from ..ops.nf4_gemv import nf4_gemv

    ceilings = measure_ceilings(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
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
            for bn, bkh, split, nw, pf in itertools.product(bns, bkhs, splits, warps,
                                                             prefetches):
                cfg = GemvConfig(BN=bn, BKH=bkh, split=split, num_warps=nw, prefetch=pf)
                if pf and dataclasses.replace(cfg, prefetch=default.prefetch) != default:
                    continue        # the prefetch is timed at the default shape only
                out = torch.empty(m, n, dtype=dtype, device=device)

                def fn(cfg=cfg, out=out, x=x):
                    nf4_gemv(x, w, None, f, config=cfg, out_dtype=dtype, out=out)

                stats = graph_time(fn) if device == "cuda" else \
                    measure({"gemv": fn}, device, 0.01, rounds=3)["gemv"]
                if "median_us" in stats:
                    stats["time_over_floor"] = stats["median_us"] / floor
                rows.append({"case": {"layer": name, "N": n, "K": k, "M": m, **vars(cfg),
                                      "default": cfg == default},
                             "floor_us": floor, "providers": {"nf4_gemv": stats}})
    best = {}
    for r in rows:
        key, stats = (r["case"]["layer"], r["case"]["M"]), r["providers"]["nf4_gemv"]
        if "median_us" in stats and (key not in best or stats["median_us"] <
                                     best[key]["providers"]["nf4_gemv"]["median_us"]):
            best[key] = r
    best_rows = [{**r["case"], "median_us": r["providers"]["nf4_gemv"]["median_us"],
                  "time_over_floor": r["providers"]["nf4_gemv"]["median_us"] / r["floor_us"]}
                 for r in best.values()]
    summary = [f"{b['layer']} M={b['M']}: fastest BN={b['BN']} BKH={b['BKH']} split={b['split']} "
               f"warps={b['num_warps']} prefetch={b['prefetch']}, {b['median_us']:.1f} µs = {b['time_over_floor']:.2f}x "
               "the floor" for b in best_rows]
    return result(
        "gemv-sweep", f"NF4 GEMV launch shapes on {model}'s linears (adapter on)", device,
        timing_method(device, rounds=3, graphs="every shape replayed from a CUDA graph")
        if device == "cuda" else timing_method(device, rounds=3),
        rows, env=environment(device), dtype=str(dtype), ceilings=ceilings,
        legend={"nf4_gemv": "the NF4 GEMV kernel with the case's launch shape"},
        summary=summary, best=best_rows,
        note=None if device == "cuda" else "interpreter run: a check of the machinery, not a "
        "measurement")
