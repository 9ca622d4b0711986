"""How every bench mode times: one function, :func:`measure`, with the method it used written
into each result (``timing`` in the JSON), plus the measured ceilings, the floor and the
environment record.

Two clocks, one per question:

* ``cuda-events`` (GPU time of the kernels): ``triton.testing.do_bench`` per contender: CUDA
  events around each repetition, the L2 cache flushed before every one; minimum, 20/50/80 %
  quantiles over repetitions. The suite's decode cases are also replayed from a CUDA graph.
* ``wall`` (CPU, and host cost or whole ``generate`` calls on a GPU): ``time.perf_counter``
  around ``reps`` calls (the device synchronized at the end), the contenders interleaved in
  ``rounds`` rounds so that a drifting machine skews all alike; per call: median, 20/80 %
  quantiles and minimum over rounds of the round's mean.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, Optional

import torch

from .cases import NF4_BYTES_PER_WEIGHT, Case

__all__ = ["measure", "timing_method", "interleaved", "capture_cuda_graph", "graph_time",
           "measure_ceilings", "floor_us", "environment"]


def timing_method(device: str, clock: Optional[str] = None, rounds: Optional[int] = None,
                  reps: Optional[int] = None, graphs: Optional[str] = None) -> dict:
    """The ``timing`` record of a result: how :func:`measure` timed on ``device``."""
    clock = clock or ("cuda-events" if device == "cuda" else "wall")
    if clock == "cuda-events":
        return {"clock": "cuda-events", "how": "triton.testing.do_bench per contender",
                "l2_flushed": True, "interleaved": False, "cuda_graphs": graphs or "no",
                "statistic": "median; p20-p80 and min over repetitions"}
    return {"clock": "wall", "how": "time.perf_counter around reps calls, device synchronized",
            "l2_flushed": False, "interleaved": True, "rounds": rounds,
            "reps": reps if reps is not None else "chosen per contender: ~equal time per round",
            "cuda_graphs": "no",
            "statistic": "median over rounds of the mean per call; p20-p80 and min over rounds"}


def _quantiles(values) -> dict:
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]   # noqa: E731
    return {"median_us": statistics.median(v), "p20_us": q(0.2), "p80_us": q(0.8),
            "min_us": v[0]}


def interleaved(fns: Dict[str, Callable], rounds: int, reps, sync=None,
                warmup: Optional[int] = None) -> Dict[str, dict]:
    """The ``wall`` clock: per-call µs of each function in interleaved rounds. ``reps`` is the
    calls per round (an int, or a dict per name); ``warmup`` calls each first (default: one
    untimed round, so the first timed round does not carry the allocator's and caches' first
    growth)."""
    sync = sync or (lambda: None)
    reps = reps if isinstance(reps, dict) else {name: reps for name in fns}
    for name, fn in fns.items():
        for _ in range(reps[name] if warmup is None else warmup):
            fn()
        sync()
    per_call = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            per_call[name].append((time.perf_counter() - t0) / reps[name] * 1e6)
    return {name: {**_quantiles(v), "rounds_us": v, "reps": reps[name]}
            for name, v in per_call.items()}


def measure(fns: Dict[str, Callable], device: str, budget_s: float = 1.0,
            clock: Optional[str] = None, rounds: int = 7, reps=None) -> Dict[str, dict]:
    """Time every contender of ``fns`` (name -> no-argument callable) the same way; returns
    name -> {median_us, p20_us, p80_us, min_us, ...}. See the module docstring for the clocks.

    ``budget_s`` is the time to spend on all of them together (roughly). On the ``wall`` clock,
    ``reps`` (calls per round) defaults to what gives every contender about the same share of
    each round, and when even one call each overruns the budget, fewer rounds are timed (at
    least 3; each result's ``rounds_us`` lists them)."""
    if not fns:
        return {}
    clock = clock or ("cuda-events" if device == "cuda" else "wall")
    if clock == "cuda-events":
        from triton.testing import do_bench

        rep_ms = max(10, min(200, int(budget_s * 1e3 / len(fns))))
        out = {}
        for name, fn in fns.items():
            lo, p20, med, p80 = do_bench(fn, warmup=10, rep=rep_ms,
                                         quantiles=[0.0, 0.2, 0.5, 0.8])
            out[name] = {"median_us": med * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3,
                         "min_us": lo * 1e3}
        return out
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if reps is None:
        share = budget_s / len(fns) / rounds
        reps, round_s = {}, 0.0
        for name, fn in fns.items():                   # one call each: warm-up and estimate
            t0 = time.perf_counter()
            fn()
            sync()
            call_s = max(time.perf_counter() - t0, 1e-6)
            reps[name] = max(1, min(1000, int(share / call_s)))
            round_s += reps[name] * call_s
        # calls slower than the budget allows: fewer rounds (at least 3), not a blown budget
        rounds = max(3, min(rounds, int(budget_s / round_s) - 1))
    return interleaved(fns, rounds, reps, sync)


def capture_cuda_graph(fn: Callable) -> "torch.cuda.CUDAGraph":
    """``fn`` run once eagerly (compiles, allocates), then captured; replay the returned graph
    to time GPU work without the host's launch cost."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_time(fn: Callable, budget_s: float = 0.1) -> dict:
    """``fn`` captured in a CUDA graph and its replay timed on the ``cuda-events`` clock."""
    try:
        return measure({"graph": capture_cuda_graph(fn).replay}, "cuda", budget_s)["graph"]
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
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = measure({"copy": lambda: dst.copy_(src), "mm": lambda: a @ b}, device, 1.0, rounds=5)
    return {"copy_GBps": 2 * src.numel() / t["copy"]["median_us"] / 1e3,
            "matmul_TFLOPs": 2 * size ** 3 / t["mm"]["median_us"] / 1e6,
            "matmul_dtype": str(dtype)}


def floor_us(case: Case, ceilings: dict) -> float:
    """max(bytes / bandwidth, FLOPs / matmul rate) for the NF4 problem of a case."""
    nbytes = flops = 0.0
    passes = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[case.mode]
    for _, n, k in case.linears():
        nbytes += passes * (n * k * NF4_BYTES_PER_WEIGHT + 2 * case.M * (n + k))
        flops += passes * 2 * case.M * n * k
    return max(nbytes / (ceilings["copy_GBps"] * 1e3),
               flops / (ceilings["matmul_TFLOPs"] * 1e6))


def environment(device: str) -> dict:
    """Versions, machine and (on a GPU) card and driver, recorded with every result."""
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    for name in ("bitsandbytes", "triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:
            env[name] = None
    env.update(_cpu_model())
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


def _cpu_model() -> dict:
    """The CPU's model name and whether it has AVX512-BF16 (bitsandbytes' packed CPU kernel,
    which this package's CPU base product may use), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), None)
    return {"cpu_model": model, "cpu_avx512_bf16": "avx512_bf16" in text}
