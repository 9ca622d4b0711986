"""Where the time of a layer call goes: every operation one decoder-layer call runs, profiled."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .cases import Case
from .report import result
from .timing import environment

#: the contenders profiled: the package's torch path (the default) and bitsandbytes alone
PROFILED = ("reference", "bnb_base")
PROFILE_LEGEND = {
    "reference": "this package's torch path (the default on a GPU): TinyLoRALinear, reference "
                 "backend, inside a model call",
    "bnb_base": "bitsandbytes' 4-bit matmul alone, no adapter",
    "host_us": "host (CPU) time per call spent in the operation itself, outside its children",
    "device_us": "device time per call of the kernels it launched (CPU: its own time)"}


def _ops(fn: Callable, device: str, calls: int) -> List[dict]:
    """Per aten operation over ``calls`` calls of ``fn``: count, host µs, device µs per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if not e.key.startswith("aten::") and "gemm_4bit" not in e.key and \
                "tinylora" not in e.key:
            continue
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = getattr(e, "self_cuda_time_total", 0.0)
        rows.append({"op": e.key, "per_call": e.count / calls,
                     "host_us": e.self_cpu_time_total / calls,
                     "device_us": (dev if device == "cuda" else e.self_cpu_time_total) / calls})
    rows.sort(key=lambda r: -(r["device_us"] + r["host_us"]))
    return rows


def profile_layer(device: str = "cpu", model: Optional[str] = None, ms=(1, 4096),
                  calls: int = 20, progress=print) -> dict:
    """Profile one decoder layer's 7 linears (``model``'s shapes) at each M, forward without
    grad and fwd+bwd, for the package's torch path and bitsandbytes alone."""
    from .suite import default_dtype, make_workload

    model = model or ("qwen2.5-coder-3b" if device == "cuda" else "cpu-reduced")
    dtype = default_dtype(device)
    built: Dict = {}
    rows = []
    for m in ms:
        for mode in ("fwd", "fwd+bwd"):
            case = Case(model, "decoder_layer", m, mode)
            for provider in PROFILED:
                fn = make_workload(case, provider, device, built, dtype=dtype)
                ops = _ops(fn, device, calls if m <= 64 else max(3, calls // 4))
                total = {k: sum(o[k] for o in ops) for k in ("host_us", "device_us")}
                progress(f"- M = {m} {mode} {provider}: {sum(o['per_call'] for o in ops):.0f} "
                         f"ops, host {total['host_us']:.0f} µs, device {total['device_us']:.0f} "
                         f"µs per call")
                rows.append({"case": {"model": model, "layer": "decoder_layer", "M": m,
                                      "mode": mode, "provider": provider},
                             "floor_us": None, "providers": {}, "ops": ops, "total": total})
    return result("profile", f"every operation of one {model} decoder layer call (7 linears), "
                  f"per call, {str(dtype)[6:]}, {device}", device,
                  {"clock": "torch.profiler (self times per operation; host and device)"},
                  rows, env=environment(device), dtype=str(dtype), legend=PROFILE_LEGEND,
                  summary=[])


def profile_markdown(data: dict, top: int = 8) -> str:
    """Per profiled call: its totals, then its ``top`` operations by host + device time."""
    lines = [f"**{data['what']}**", "", f"Timing: {data['timing']['clock']}. Per call (µs).", ""]
    for row in data["rows"]:
        c, t = row["case"], row["total"]
        lines += [f"*M = {c['M']}, {c['mode']}, {c['provider']}*: "
                  f"{sum(o['per_call'] for o in row['ops']):.0f} operations, host "
                  f"{t['host_us']:.0f} µs, device {t['device_us']:.0f} µs", "",
                  "| operation | per call | host µs | device µs |", "|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['per_call']:g} | {o['host_us']:.1f} | "
                  f"{o['device_us']:.1f} |" for o in row["ops"][:top]]
        lines.append("")
    lines += ["Legend:"] + [f"- {k}: {v}" for k, v in data["legend"].items()]
    return "\n".join(lines) + "\n"
