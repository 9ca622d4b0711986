"""The suite: every (case, provider) on identical inputs, against the floor; and its plot.

Cases that differ only in mode (fwd, bwd, fwd+bwd) are one group: the group's contenders are
timed together by :func:`~.timing.measure` (on a CPU interleaved in rounds), so that fwd + bwd
measured apart can be held against fwd+bwd measured together (:func:`~.report.consistency`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .cases import (PROVIDER_DESCRIPTIONS, PROVIDERS, Case, SharedModel, _Linear, cpu_note,
                    provider_missing)
from .report import result
from .timing import environment, floor_us, graph_time, measure, measure_ceilings, timing_method

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU (the users' compute dtype), fp32 on a CPU (its fastest matmul)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_workload(case: Case, provider: str, device: str, built: Optional[dict] = None,
                  gen: Optional[torch.Generator] = None, dtype: Optional[torch.dtype] = None,
                  grad_enabled: bool = False) -> Callable:
    """A no-argument callable doing ``case``'s work with ``provider`` (layers cached in ``built``).

    Every linear of the case gets its own random input of its K (the linears of a decoder layer
    are timed in a row, not chained through attention and activations). ``fwd`` runs without
    grad (generation); ``bwd`` is the gradients of x and v given the forward's graph;
    ``fwd+bwd`` is both (a training step's share). ``grad_enabled`` makes ``fwd`` the forward
    as ``fwd+bwd`` runs it (x and v requiring grad, the graph built, then dropped).
    """
    dtype = dtype or default_dtype(device)
    built = {} if built is None else built
    gen = gen or torch.Generator().manual_seed(0)
    shared = built.get("model")
    if shared is None:
        shared = built["model"] = SharedModel(device, gen)
    for _, n, k in case.linears():
        if (n, k, dtype) not in built:
            built[(n, k, dtype)] = _Linear(n, k, device, dtype, gen, shared)
    chain = [built[(n, k, dtype)] for _, n, k in case.linears()]
    # the package's layers run inside a model call, as a model's layers do
    call = shared.call if provider in ("reference", "fused") else contextlib.nullcontext
    xs = {k: torch.randn(case.M, k, generator=gen).to(device, dtype) for _, _, k in
          case.linears()}
    if case.mode == "fwd" and not grad_enabled:
        def fwd():
            with torch.no_grad(), call():
                for lin, (_, n, k) in zip(chain, case.linears()):
                    lin.run(provider, xs[k])
        return fwd
    xs = {k: x.requires_grad_(True) for k, x in xs.items()}
    params = [shared.gp.global_v]

    # a fixed random upstream gradient per output, as a loss downstream would send (not the
    # stride-0 ones of ``.sum()``, which take other, unrepresentative paths)
    grads = [torch.randn(case.M, n, generator=gen).to(device, dtype) for _, n, _ in case.linears()]

    def forward():
        with call():
            return [lin.run(provider, xs[k]) for lin, (_, _, k) in zip(chain, case.linears())]

    inputs = list(xs.values()) + ([p for p in params if p.requires_grad]
                                  if provider != "bnb_base" else [])
    if case.mode == "fwd":
        return forward
    if case.mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), inputs, grads, allow_unused=True)
    out = forward()
    return lambda: torch.autograd.grad(out, inputs, grads, retain_graph=True, allow_unused=True)


def _groups(cases: List[Case]) -> Dict[tuple, List[Case]]:
    groups: Dict[tuple, List[Case]] = {}
    for case in cases:
        groups.setdefault((case.model, case.layer, case.M), []).append(case)
    return groups


def _build(group, providers, device, dtype, built, gen, rows, out_of_time):
    """The group's workloads, each called once (a failure is recorded, not raised). A group with
    all three modes also gets each provider's forward with grad enabled (key + ("grad",)): the
    forward that fwd+bwd runs, for :func:`~.report.consistency`."""
    fns = {}
    every_mode = {c.mode for c in group} >= {"fwd", "bwd", "fwd+bwd"}
    for case in group:
        for provider in providers:
            slot = rows[case]["providers"]
            if out_of_time():
                slot[provider] = {"not_run": "time budget spent"}
                continue
            why = provider_missing(provider, device, case.mode)
            if why is not None:
                slot[provider] = {"not_run": why}
                continue
            try:
                fn = make_workload(case, provider, device, built, gen, dtype)
                fn()
                fns[(case, provider)] = fn
                if every_mode and case.mode == "fwd" and provider != "fused_no_adapter":
                    fns[(case, provider, "grad")] = make_workload(case, provider, device, built,
                                                                  gen, dtype, grad_enabled=True)
            except Exception as exc:                     # say it, keep going
                slot[provider] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return fns


def _time_group(fns, device, budget_s, rounds) -> dict:
    if device != "cuda":
        return measure(fns, device, budget_s, rounds=rounds)
    out = {}
    for key, fn in fns.items():        # one at a time: each contender's own peak memory
        torch.cuda.reset_peak_memory_stats()
        out[key] = measure({key: fn}, device, budget_s / len(fns))[key]
        out[key]["peak_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
        case = key[0]
        if case.mode == "fwd" and case.M <= 16 and len(key) == 2:
            out[key]["graph"] = graph_time(fn)
    return out


def run_suite(cases: List[Case], providers=PROVIDERS, device: Optional[str] = None,
              budget_s: float = 600.0, progress: bool = True, dtype: Optional[torch.dtype] = None,
              rounds: int = 7) -> dict:
    """Time every (case, provider); returns the result (see :mod:`.report`)."""
    from tqdm.auto import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    start = time.perf_counter()
    groups = _groups(cases)
    bar = tqdm(total=len(groups) + 1, desc="tinylora bench", unit="group", disable=not progress)
    bar.set_postfix_str("measuring copy bandwidth and matmul rate")
    ceilings = measure_ceilings(device)
    bar.update()
    gen = torch.Generator().manual_seed(0)
    built: Dict[tuple, _Linear] = {}
    rows = {case: {"case": asdict(case), "floor_us": floor_us(case, ceilings), "providers": {}}
            for case in cases}
    per_group = budget_s / max(1, len(groups)) / 3      # the rest: building, warm-up, graphs

    def out_of_time():
        return time.perf_counter() - start > budget_s

    for (model, layer, m), group in groups.items():
        bar.set_postfix_str(f"{layer} M={m}")
        fns = _build(group, providers, device, dtype, built, gen, rows, out_of_time)
        if fns:
            timed = _time_group(fns, device, per_group, rounds)
            for key, stats in timed.items():
                if len(key) == 2:
                    stats["time_over_floor"] = stats["median_us"] / rows[key[0]]["floor_us"]
                    rows[key[0]]["providers"][key[1]] = stats
            for key, stats in timed.items():
                if len(key) == 3:
                    rows[key[0]]["providers"][key[1]]["grad_enabled"] = stats
        bar.update()
    bar.close()
    ours = "fused" if "fused" in providers and provider_missing("fused", device) is None \
        else "reference"
    graphs = "fwd cases with M ≤ 16 also replayed from a CUDA graph ('graph')"
    return result(
        "suite", "the benchmark suite: each case's contenders on identical inputs", device,
        timing_method(device, rounds=rounds, graphs=graphs if device == "cuda" else None),
        [{**rows[c], "providers": {p: rows[c]["providers"][p] for p in providers
                                   if p in rows[c]["providers"]}} for c in cases],
        env=environment(device), dtype=str(dtype), ceilings=ceilings, baseline=ours,
        legend={p: PROVIDER_DESCRIPTIONS[p] for p in providers},
        note=None if device == "cuda" else cpu_note(c.model for c in cases))


def plot(data: dict, path: Path) -> Optional[str]:
    """time / floor by M, one line per provider, one panel per layer; None when drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib is not installed: no plot"
    key_of = lambda r: (r["case"]["model"], r["case"]["layer"], r["case"]["mode"])  # noqa: E731
    layers = sorted({key_of(r) for r in data["rows"]})
    cols = min(4, len(layers))
    fig, axes = plt.subplots(math.ceil(len(layers) / cols), cols, squeeze=False,
                             figsize=(4 * cols, 3 * math.ceil(len(layers) / cols)))
    for ax, key in zip(axes.flat, layers):
        rows = sorted((r for r in data["rows"] if key_of(r) == key), key=lambda r: r["case"]["M"])
        for p in PROVIDERS:
            pts = [(r["case"]["M"], r["providers"][p]["time_over_floor"]) for r in rows
                   if "time_over_floor" in r["providers"].get(p, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{key[1]} ({key[2]})", fontsize=9)
        ax.set_xlabel("M")
        ax.set_ylabel("time / floor")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
