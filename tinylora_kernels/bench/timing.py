"""How the suite times: medians, CUDA graphs, the measured ceilings and the floor, the
environment each result records."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, Optional

import torch

from .cases import NF4_BYTES_PER_WEIGHT, Case

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


def interleaved(fns: Dict[str, Callable], rounds: int, reps: int, sync=None,
                warmup: Optional[int] = None) -> Dict[str, dict]:
    """Per-call µs of each function, timed in interleaved rounds (a drifting machine then skews
    every contender alike): minimum and median over rounds of the mean over ``reps`` calls, and
    every round. ``warmup`` calls each first (default max(10, reps / 10))."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(max(10, reps // 10) if warmup is None else warmup):
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
