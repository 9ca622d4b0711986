"""The benchmark suite: every path side by side, against the floor, on real model shapes.

``tinylora-kernels bench`` runs the default set and writes, under ``benchmarks/results/`` (or
``--out``), raw JSON with the environment, a Markdown table and (with matplotlib) a PNG of
time / floor by M, all generated from the JSON. ``tinylora-kernels bench --compare A.json B.json``
shows what got faster or slower beyond the noise.

Cases: one linear layer of a model (``q_proj`` ... ``down_proj``), ``decoder_layer`` (its 7
linears in a row) or ``stack<N>`` (N decoder layers), at M rows, in a mode: ``fwd``, ``bwd``
(grad x and grad v, the forward graph given) or ``fwd+bwd``. Providers, on identical inputs:

* ``materialized``: bitsandbytes 4-bit matmul + ΔW = U S R Vh rebuilt on every call (the users'
  layer);
* ``peft_style``: bitsandbytes 4-bit matmul + the factorized adapter in plain torch;
* ``bnb_base``: bitsandbytes 4-bit matmul alone, no adapter;
* ``dense_bf16``: ``F.linear`` on the unquantized weight + the factorized adapter;
* ``reference``: this package's TinyLoRALinear, reference path;
* ``fused``: this package's TinyLoRALinear through the Triton kernels (GPU, or the interpreter).

Timing: on a GPU, ``triton.testing.do_bench`` medians and 20/80 % quantiles (it flushes the L2
before every repetition), decode cases (M <= 16, fwd) also under a CUDA graph, and peak memory;
on a CPU, medians of wall-clock repetitions, reduced shapes, and a line saying that GPU figures need
a GPU. The floor: max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the run.
"""

from __future__ import annotations

import json
import os
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .backend import use_backend as _backend

__all__ = ["MODELS", "PROVIDERS", "MODES", "Case", "default_cases", "make_workload", "host_cost",
           "host_cost_markdown", "write_host_cost", "count_ops",
           "provider_missing", "run_suite", "markdown", "write_report", "compare"]

#: (N, K) of every adapted linear, and the decoder-layer count, per model.
MODELS: Dict[str, dict] = {
    "qwen2.5-coder-3b": {"layers": 36, "shapes": {
        "q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048),
        "o_proj": (2048, 2048), "gate_proj": (11008, 2048), "up_proj": (11008, 2048),
        "down_proj": (2048, 11008)}},
    "qwen2.5-7b": {"layers": 28, "shapes": {
        "q_proj": (3584, 3584), "k_proj": (512, 3584), "v_proj": (512, 3584),
        "o_proj": (3584, 3584), "gate_proj": (18944, 3584), "up_proj": (18944, 3584),
        "down_proj": (3584, 18944)}},
    # the same structure at a size a 2-core CPU runs in seconds
    "cpu-reduced": {"layers": 2, "shapes": {
        "q_proj": (256, 256), "k_proj": (64, 256), "v_proj": (64, 256), "o_proj": (256, 256),
        "gate_proj": (704, 256), "up_proj": (704, 256), "down_proj": (256, 704)}},
}
PROVIDERS = ("materialized", "peft_style", "bnb_base", "dense_bf16", "reference", "fused")
#: what each provider runs (the bench Markdown's legend)
PROVIDER_DESCRIPTIONS = {
    "materialized": "the users' reference program: bitsandbytes Linear4bit + ΔW rebuilt (out x "
                    "in) at every call + a second full matmul",
    "peft_style": "bitsandbytes Linear4bit + the factorized adapter as separate torch ops "
                  "(x Aᵀ, · Rᵀ, · Bᵀ, add)",
    "bnb_base": "bitsandbytes Linear4bit alone, no adapter",
    "dense_bf16": "torch linear on the unquantized weight (bf16 on a GPU, fp32 on a CPU), no "
                  "adapter",
    "reference": "this package's torch path: TinyLoRALinear with the reference backend",
    "fused": "this package's Triton kernels: TinyLoRALinear with the triton backend",
}
MODES = ("fwd", "bwd", "fwd+bwd")
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
RANK, U = 2, 13


@dataclass(frozen=True)
class Case:
    model: str
    layer: str       # a linear's name, "decoder_layer", or "stack<N>"
    M: int
    mode: str

    def linears(self) -> List[tuple]:
        shapes = MODELS[self.model]["shapes"]
        if self.layer in shapes:
            return [(self.layer, *shapes[self.layer])]
        repeat = int(self.layer[5:]) if self.layer.startswith("stack") else 1
        return [(name, n, k) for _ in range(repeat) for name, (n, k) in shapes.items()]


def default_cases(device: str, models=None, ms=None, modes=("fwd",), layers=None) -> List[Case]:
    """The default set: every linear, plus the decoder layer, for each model, M and mode."""
    if models is None:
        models = ["qwen2.5-coder-3b"] if device == "cuda" else ["cpu-reduced"]
    if ms is None:
        ms = [1, 16, 128, 4096] if device == "cuda" else [1, 16, 128]
    cases = []
    for model in models:
        names = layers or (list(MODELS[model]["shapes"]) + ["decoder_layer"])
        cases += [Case(model, name, m, mode) for mode in modes for m in ms for name in names]
    return cases


# -- the layers each provider runs ------------------------------------------------------------
class _Linear:
    """One adapted linear in every form the providers need, built from one random weight."""

    def __init__(self, n: int, k: int, device: str, dtype: torch.dtype, gen: torch.Generator):
        import bitsandbytes as bnb

        from . import TinyLoRAGlobalParams, TinyLoRALinear

        w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        self.dense = w.to(device)
        lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True,
                                quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False,
                                       quant_type="nf4").to(device)
        self.gp = TinyLoRAGlobalParams(u_dim=U, device=device, dtype=torch.float32)
        self.layer = TinyLoRALinear(lin, RANK, None, self.gp, projection="diagonal",
                                    svd="device" if device == "cuda" else "cpu",
                                    generator=torch.Generator().manual_seed(n * 7 + k))
        with torch.no_grad():
            self.gp.global_v.copy_(torch.randn(U, generator=gen) * 0.1)
        self.lin4 = lin

    def base(self, x):
        import bitsandbytes as bnb

        # called directly: Linear4bit.forward would repack the weight in place on some CPUs
        return bnb.matmul_4bit(x, self.lin4.weight.t(), quant_state=self.lin4.weight.quant_state)

    def factors(self, dtype):
        f = self.layer.adapter_factors()
        return f.A.to(dtype), f.B.to(dtype), f.R.to(dtype)

    def run(self, provider: str, x):
        if provider == "bnb_base":
            return self.base(x)
        if provider in ("peft_style", "dense_bf16"):
            A, B, R = self.factors(x.dtype)
            base = self.base(x) if provider == "peft_style" else F.linear(x, self.dense)
            return base + ((x @ A.t()) @ R.t()) @ B.t()
        if provider == "materialized":
            lay = self.layer
            v = self.gp.global_v.to(torch.bfloat16)
            R = torch.diag(v @ lay.P)
            delta = (lay.U * lay.S) @ R @ lay.Vh               # out x in, every call
            return self.base(x) + x @ delta.to(x.dtype).t()
        with _backend("triton" if provider == "fused" else "reference"):
            return self.layer(x)


def provider_missing(provider: str, device: str) -> Optional[str]:
    """None when the provider can run on ``device``, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return "bitsandbytes is not installed"
    if provider == "fused":
        from .ops import triton_missing

        why = triton_missing()
        if why is None and device == "cpu":
            why = "the Triton kernels are timed on a GPU (their CPU interpreter is for tests)"
        return why
    return None


# -- timing ---------------------------------------------------------------------------------------
def _time(fn: Callable, device: str, budget_s: float) -> dict:
    if device == "cuda":
        from triton.testing import do_bench

        lo, med, hi = do_bench(fn, warmup=10, rep=max(10, min(100, int(budget_s * 1e3))),
                               quantiles=[0.2, 0.5, 0.8])
        return {"median_us": med * 1e3, "p20_us": lo * 1e3, "p80_us": hi * 1e3}
    fn()                                                       # warm-up outside the timing
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]   # noqa: E731
    return {"median_us": statistics.median(times) * 1e6, "p20_us": q(0.2) * 1e6,
            "p80_us": q(0.8) * 1e6}


def capture_cuda_graph(fn: Callable) -> "torch.cuda.CUDAGraph":
    """``fn`` run once eagerly (compiles, allocates), then captured; replay the returned graph
    to time GPU work without the host's launch cost."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _graph_time(fn: Callable) -> dict:
    try:
        return _time(capture_cuda_graph(fn).replay, "cuda", 0.1)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def measure_ceilings(device: str) -> dict:
    """Copy bandwidth (read + write bytes) and matmul rate, measured now on ``device``."""
    if device == "cuda":
        src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
        dtype, size = torch.bfloat16, 8192
    else:
        src = torch.empty(1 << 27, dtype=torch.uint8)
        dtype, size = torch.float32, 1024
    dst = torch.empty_like(src)
    copy_us = _time(lambda: dst.copy_(src), device, 0.5)["median_us"]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_us = _time(lambda: a @ b, device, 0.5)["median_us"]
    return {"copy_GBps": 2 * src.numel() / copy_us / 1e3,
            "matmul_TFLOPs": 2 * size ** 3 / mm_us / 1e6, "matmul_dtype": str(dtype)}


def floor_us(case: Case, ceilings: dict) -> float:
    """max(bytes / bandwidth, FLOPs / matmul rate) for the NF4 problem of a case."""
    nbytes = flops = 0.0
    passes = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[case.mode]
    for _, n, k in case.linears():
        nbytes += passes * (n * k * NF4_BYTES_PER_WEIGHT + 2 * case.M * (n + k))
        flops += passes * 2 * case.M * n * k
    return max(nbytes / (ceilings["copy_GBps"] * 1e3),
               flops / (ceilings["matmul_TFLOPs"] * 1e6))


# -- the run --------------------------------------------------------------------------------------
def make_workload(case: Case, provider: str, device: str, built: Optional[dict] = None,
                  gen: Optional[torch.Generator] = None) -> Callable:
    """A no-argument callable doing ``case``'s work with ``provider`` (layers cached in ``built``).

    Every linear of the case gets its own random input of its K (the linears of a decoder layer
    are timed in a row, not chained through attention and activations).
    """
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    built = {} if built is None else built
    gen = gen or torch.Generator().manual_seed(0)
    for _, n, k in case.linears():
        if (n, k) not in built:
            built[(n, k)] = _Linear(n, k, device, dtype, gen)
    return _workload(case, provider, built, device, dtype, gen)


def _workload(case: Case, provider: str, built: dict, device: str, dtype, gen):
    chain = [built[(n, k)] for _, n, k in case.linears()]
    xs = {k: torch.randn(case.M, k, generator=gen).to(device, dtype) for _, _, k in
          case.linears()}
    if case.mode == "fwd":
        def fwd():
            with torch.no_grad():
                for lin, (_, n, k) in zip(chain, case.linears()):
                    lin.run(provider, xs[k])
        return fwd
    xs = {k: x.requires_grad_(True) for k, x in xs.items()}
    params = [lin.gp.global_v for lin in chain]

    # a fixed random upstream gradient per output, as a loss downstream would send (not the
    # stride-0 ones of ``.sum()``, which take other, unrepresentative paths)
    grads = [torch.randn(case.M, n, generator=gen).to(device, dtype) for _, n, _ in case.linears()]

    def forward():
        return [lin.run(provider, xs[k]) for lin, (_, _, k) in zip(chain, case.linears())]

    inputs = list(xs.values()) + ([p for p in params if p.requires_grad]
                                  if provider != "bnb_base" else [])
    if case.mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), inputs, grads, allow_unused=True)
    out = forward()
    return lambda: torch.autograd.grad(out, inputs, grads, retain_graph=True, allow_unused=True)


def run_suite(cases: List[Case], providers=PROVIDERS, device: Optional[str] = None,
              budget_s: float = 600.0, progress: bool = True) -> dict:
    """Time every (case, provider); returns the JSON-ready result."""
    from tqdm.auto import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    bar = tqdm(total=len(cases) * len(providers) + 1, desc="tinylora bench", unit="run",
               disable=not progress)
    bar.set_postfix_str("measuring copy bandwidth and matmul rate")
    ceilings = measure_ceilings(device)
    bar.update()
    gen = torch.Generator().manual_seed(0)
    built: Dict[tuple, _Linear] = {}
    rows = []
    per_case = budget_s / max(1, len(cases) * len(providers)) / 4
    for case in cases:
        row = {**asdict(case), "floor_us": floor_us(case, ceilings), "providers": {}}
        rows.append(row)
        if time.perf_counter() - start > budget_s:
            row["skipped"] = "time budget spent"
            bar.update(len(providers))
            continue
        for provider in providers:
            bar.set_postfix_str(f"{case.layer} M={case.M} {case.mode} {provider}")
            bar.update()
            if time.perf_counter() - start > budget_s:
                row["providers"][provider] = {"not_run": "time budget spent"}
                continue
            why = provider_missing(provider, device)
            if why is not None:
                row["providers"][provider] = {"not_run": why}
                continue
            try:
                fn = make_workload(case, provider, device, built, gen)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                stats = _time(fn, device, per_case)
                if device == "cuda":
                    stats["peak_MB"] = torch.cuda.max_memory_allocated() / 2 ** 20
                    if case.mode == "fwd" and case.M <= 16:
                        stats["graph"] = _graph_time(fn)
                stats["time_over_floor"] = stats["median_us"] / row["floor_us"]
                row["providers"][provider] = stats
            except Exception as exc:                     # say it, keep going
                row["providers"][provider] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    bar.close()
    return {"env": _environment(device), "device": device, "dtype": str(dtype),
            "ceilings": ceilings, "rows": rows,
            "note": None if device == "cuda" else
            "CPU run: reduced shapes and CPU timings; GPU figures need a GPU"}


def _environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine()}
    try:
        import bitsandbytes
        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        env["bitsandbytes"] = None
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device == "cuda":
        import subprocess

        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
        env["bnb_dispatch"] = "gemm_4bit: fused kernel for small M, dequantize + cuBLAS above"
    return env


# -- reports ---------------------------------------------------------------------------------------
def markdown(data: dict) -> str:
    """The result table, generated from the JSON."""
    provs = [p for p in PROVIDERS if any(p in r["providers"] for r in data["rows"])]
    ours = "fused" if "fused" in provs and any(
        "median_us" in r["providers"].get("fused", {}) for r in data["rows"]) else "reference"
    peers = [p for p in ("materialized", "peft_style", "bnb_base", "dense_bf16") if p in provs]
    head = ("| model | layer | M | mode | floor µs | " + " | ".join(f"{p} µs" for p in provs)
            + f" | {ours}/floor | " + " | ".join(f"{p}/{ours}" for p in peers) + " |")
    lines = [f"Device: {data['device']} ({data['env'].get('gpu', data['env']['machine'])}), "
             f"torch {data['env']['torch']}, triton {data['env']['triton']}, bitsandbytes "
             f"{data['env']['bitsandbytes']}; copy {data['ceilings']['copy_GBps']:.0f} GB/s, "
             f"matmul {data['ceilings']['matmul_TFLOPs']:.1f} TFLOP/s "
             f"({data['ceilings']['matmul_dtype']}); medians (20–80 % range).", ""]
    if data.get("note"):
        lines += [f"**{data['note']}.**", ""]
    lines += [head, "|" + "---|" * (5 + len(provs) + 1 + len(peers))]

    def med(r, p):
        return r["providers"].get(p, {}).get("median_us", math.nan)

    def cell(r, p):
        stats = r["providers"].get(p, {})
        if "median_us" not in stats:
            why = stats.get("not_run") or stats.get("error") or r.get("skipped") or "not run"
            return f"n/a: {why[:80]}"
        return f"{stats['median_us']:.1f} ({stats['p20_us']:.1f}–{stats['p80_us']:.1f})"

    for r in data["rows"]:
        cells = [cell(r, p) for p in provs]
        ratios = [f"{med(r, p) / med(r, ours):.2f}" for p in peers]
        lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['mode']} | "
                     f"{r['floor_us']:.1f} | " + " | ".join(cells)
                     + f" | {med(r, ours) / r['floor_us']:.1f} | " + " | ".join(ratios) + " |")
    lines += ["", "Legend: floor = the least time the bytes and FLOPs of the call allow on this "
              "device (bytes / measured copy bandwidth, FLOPs / measured matmul rate, the larger); "
              "each provider column = median µs (20th–80th percentile) of:"]
    lines += [f"- {p}: {PROVIDER_DESCRIPTIONS.get(p, p)}" for p in provs]
    lines += [f"- {ours}/floor: our time over the floor; <peer>/{ours}: the peer's time over "
              "ours (above 1: ours is faster); nan where either was not measured.",
              "- n/a: not measured, with the reason (provider not available on this device, "
              "an error, or the time budget spent)."]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Optional[str]:
    """time / floor by M, one line per provider, one panel per layer; None when drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "matplotlib is not installed: no plot"
    layers = sorted({(r["model"], r["layer"], r["mode"]) for r in data["rows"]})
    cols = min(4, len(layers))
    fig, axes = plt.subplots(math.ceil(len(layers) / cols), cols, squeeze=False,
                             figsize=(4 * cols, 3 * math.ceil(len(layers) / cols)))
    for ax, key in zip(axes.flat, layers):
        rows = sorted((r for r in data["rows"] if (r["model"], r["layer"], r["mode"]) == key),
                      key=lambda r: r["M"])
        for p in PROVIDERS:
            pts = [(r["M"], r["providers"][p]["time_over_floor"]) for r in rows
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


def write_report(data: dict, out_dir: Path, stem: str) -> List[Path]:
    """JSON, Markdown and PNG under ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(data, indent=1))
    paths[1].write_text(markdown(data))
    why = plot(data, out_dir / f"{stem}.png")
    if why is None:
        paths.append(out_dir / f"{stem}.png")
    else:
        data["plot"] = why
    return paths


def compare(a: dict, b: dict) -> str:
    """Rows of two runs side by side: B/A per provider, flagged beyond the noise.

    A change counts when the two runs' 20–80 % ranges do not overlap; else it is noise.
    """
    index = {(r["model"], r["layer"], r["M"], r["mode"]): r for r in a["rows"]}
    lines = ["| model | layer | M | mode | provider | A µs | B µs | B/A | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rb in b["rows"]:
        ra = index.get((rb["model"], rb["layer"], rb["M"], rb["mode"]))
        if ra is None:
            continue
        for p, sb in rb["providers"].items():
            sa = ra["providers"].get(p, {})
            if "median_us" not in sa or "median_us" not in sb:
                continue
            ratio = sb["median_us"] / sa["median_us"]
            if sb["p80_us"] < sa["p20_us"]:
                verdict = "faster"
            elif sb["p20_us"] > sa["p80_us"]:
                verdict = "slower"
            else:
                verdict = "noise"
            lines.append(f"| {rb['model']} | {rb['layer']} | {rb['M']} | {rb['mode']} | {p} | "
                         f"{sa['median_us']:.1f} | {sb['median_us']:.1f} | {ratio:.2f} | "
                         f"{verdict} |")
    return "\n".join(lines) + "\n"


# -- host cost per call ----------------------------------------------------------------------------
#: The host-cost targets: a TinyLoRALinear call over bitsandbytes' Linear4bit alone.
HOST_COST_TARGETS = {"no_grad": 1.2, "fwd+bwd": 1.5}


class _OpCounter:
    """Counts the aten operations dispatched inside the block (``with _OpCounter() as c``)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops.append(str(func.overloadpacket.__name__))
                return func(*args, **(kwargs or {}))

        self.ops = []
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def count_ops(fn: Callable) -> List[str]:
    """The aten operations one call of ``fn`` dispatches, in order."""
    with _OpCounter() as counter:
        fn()
    return counter.ops


def _host_layer(n: int, k: int, device: str):
    import bitsandbytes as bnb

    from . import TinyLoRAGlobalParams, TinyLoRALinear

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False,
                                   quant_type="nf4").to(device)
    lin.train()               # bitsandbytes' eval-mode CPU forward repacks the weight in place
    gp = TinyLoRAGlobalParams(u_dim=U, device=device, dtype=torch.float32)
    layer = TinyLoRALinear(lin, RANK, None, gp, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(U, generator=gen) * 0.1)
    return lin, layer, gp


def _interleaved(fns: Dict[str, Callable], rounds: int, reps: int, sync) -> Dict[str, dict]:
    """Per-call µs of each function, timed in interleaved rounds (a drifting machine then skews
    every contender alike): minimum and median over rounds of the mean over ``reps`` calls."""
    for fn in fns.values():
        for _ in range(max(10, reps // 10)):
            fn()
    sync()
    per_call = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            per_call[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {name: {"min_us": min(v), "median_us": statistics.median(v), "rounds_us": v}
            for name, v in per_call.items()}


def host_cost(device: str = "cpu", n: int = 128, k: int = 128, rounds: int = 15,
              reps: int = 200, backends=("reference",)) -> dict:
    """Per-call cost of a TinyLoRALinear against bitsandbytes' ``Linear4bit`` alone, on a layer
    small enough that the arithmetic is negligible: what remains is Python and dispatch.

    M = 1, bf16, bitsandbytes in train mode (its eval-mode CPU forward repacks the weight). Two
    cases: ``no_grad`` (generation) and ``fwd+bwd`` (x and v require grad; the bare layer
    differentiates x). Per-call times are the mean over ``reps`` calls; the ratio uses the
    minimum over ``rounds`` (the least noisy estimate on a shared machine), the median is kept
    too. Also records the aten operations one call issues.
    """
    from . import backend as backend_mod
    from . import router

    lin, layer, gp = _host_layer(n, k, device)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(1, n, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def bare_no_grad():
        with torch.no_grad():
            lin(x)

    def bare_fwd_bwd():
        torch.autograd.grad(lin(xg), [xg], gy)

    def ours_no_grad():
        with torch.no_grad():
            layer(x)

    def ours_fwd_bwd():
        torch.autograd.grad(layer(xg), [xg, gp.global_v], gy)

    results = {}
    for case, bare, ours in (("no_grad", bare_no_grad, ours_no_grad),
                             ("fwd+bwd", bare_fwd_bwd, ours_fwd_bwd)):
        row = {"bitsandbytes_ops": len(count_ops(bare))}
        variants = [(b, b, None) for b in backends]
        if device == "cpu":
            # the pure bookkeeping: the base product decoded per call, as bitsandbytes does
            variants.append(("reference_no_decoded_copy", "reference", "0"))
        for name, backend_name, decoded_mb in variants:
            old = os.environ.get("TINYLORA_CPU_DECODED_MB")
            if decoded_mb is not None:
                os.environ["TINYLORA_CPU_DECODED_MB"] = decoded_mb
            try:
                with backend_mod.use_backend(backend_name):
                    timed = _interleaved({"bitsandbytes": bare, name: ours}, rounds, reps, sync)
                    ops = count_ops(ours)
                    row[f"{name}_plan"] = str(router.explain(layer, x))
            finally:
                if decoded_mb is not None and old is None:
                    os.environ.pop("TINYLORA_CPU_DECODED_MB")
                elif decoded_mb is not None:
                    os.environ["TINYLORA_CPU_DECODED_MB"] = old
            row.setdefault("bitsandbytes", timed["bitsandbytes"])
            row[name] = timed[name]
            row[f"{name}_ops"] = len(ops)
            row[f"{name}_op_list"] = ops
            row[f"{name}_ratio"] = timed[name]["min_us"] / timed["bitsandbytes"]["min_us"]
        results[case] = row
    return {"what": f"per-call host cost, TinyLoRALinear vs bitsandbytes Linear4bit alone, "
                    f"{n} x {k}, M = 1, bf16, {device}",
            "env": _environment(device), "threads": torch.get_num_threads(),
            "rounds": rounds, "reps": reps, "targets": HOST_COST_TARGETS,
            "results": results}


def host_cost_markdown(data: dict) -> str:
    """The host-cost table, generated from its JSON."""
    lines = [f"{data['what']}; torch {data['env']['torch']}, bitsandbytes "
             f"{data['env']['bitsandbytes']}, {data['threads']} threads; µs per call, minimum "
             f"(median) of {data['rounds']} rounds x {data['reps']} calls.", "",
             "| case | path | bitsandbytes µs | ours µs | ratio (min) | target | ops: bnb / ours |",
             "|---|---|---|---|---|---|---|"]
    for case, row in data["results"].items():
        bare = row["bitsandbytes"]
        for name in [k for k in row if k.endswith("_ratio")]:
            b = name[:-6]
            ours = row[b]
            lines.append(
                f"| {case} | {b} | {bare['min_us']:.1f} ({bare['median_us']:.1f}) | "
                f"{ours['min_us']:.1f} ({ours['median_us']:.1f}) | {row[name]:.2f} | "
                f"≤ {data['targets'][case]} | {row['bitsandbytes_ops']} / {row[b + '_ops']} |")
    return "\n".join(lines) + "\n"


def write_host_cost(data: dict, out_dir: Path, stem: str) -> List[Path]:
    """JSON and Markdown of :func:`host_cost` under ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(data, indent=1))
    paths[1].write_text(host_cost_markdown(data))
    return paths


# -- NF4 GEMV launch shapes (GPU) ----------------------------------------------------------------
def gemv_sweep(model: str = "qwen2.5-coder-3b", ms=(1, 4), bns=(16, 32), bkhs=(128, 256),
               splits=(1, 2, 4, 8), warps=(4,), layers=None, device: str = "cuda") -> dict:
    """Time every GEMV launch shape on the linears of ``model`` (CUDA graphs, adapter on) against
    the byte floor, to fill :func:`~tinylora_kernels.ops.configs.gemv_config` from measurement.
    The default config's row is marked; each (layer, M) names its fastest shape. (On a CPU, under
    the interpreter, it runs with plain timers: a check of the machinery, not a measurement.)"""
    from .nf4 import NF4Weight
    from .ops.configs import GemvConfig, gemv_config
    from .ops.nf4_gemv import nf4_gemv

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
