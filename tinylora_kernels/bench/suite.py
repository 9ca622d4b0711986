"""The suite itself: run every (case, provider), and its reports (Markdown, plot, compare)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .cases import PROVIDER_DESCRIPTIONS, PROVIDERS, Case, _Linear, provider_missing
from .timing import _environment, _graph_time, _time, floor_us, measure_ceilings

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
