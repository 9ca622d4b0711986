"""What the kernels compile to for Hopper, read statically and projected against the roofline.

EVERY FIGURE HERE IS PROJECTED, NOT MEASURED: no kernel runs, no GPU is used. For each scenario
(a decoder layer of Qwen2.5-Coder-3B in NF4 with double quantization, bf16 activations, its 7
linears called as the layer calls them), the launches the dispatch table plans are captured with
the JIT's own specialization (:mod:`tinylora_kernels.compile_check`), compiled for sm_90, and read:

* from ``cuobjdump -res-usage``: registers per thread, local memory (spills), shared memory;
* from the SASS (``nvdisasm``): the **K loop** — of the loops closed by a backward branch, the one
  with the most global loads — and in it ``I_it``, the instructions per iteration (each static
  instruction once: predicated-off ones still issue; a nested runtime loop would count once, so
  I_it is then a lower bound), the global loads by width (``LDG.E.U8`` ... ``LDG.E.128``), async
  copies (``LDGSTS``), TMA (``UTMALDG``), MMA (``HMMA``/``HGMMA``), shuffles, barriers,
  shared-memory accesses, and the loads whose address comes from a value loaded in the loop
  (``dependent_loads``: table lookups, each waiting for the load before it; registers followed
  through the loop's data flow);
* ``W_it``, the weights one CTA consumes per iteration, from the constexprs (GEMV: BN x 2 BKH;
  fused and grad_x: BN x BK; the decode kernel has no loop: its whole program);
* warp-instructions per weight = I_it x num_warps / W_it.

Projection per launch (H200: 132 SMs, 4 schedulers each issuing at most one warp-instruction per
clock at 1.755 GHz; 4.8 TB/s; 790 TFLOP/s bf16 as measured on the project's H200):

* issue bound = weights x warp-instr/weight / (min(132, CTAs) x 4 x 1.755 GHz) — K loop only;
* bytes bound = bytes this implementation moves (packed NF4, block scales, x, output, split-K
  fp32 partials written and read, adapter factors, bias) / 4.8 TB/s;
* FLOP bound = 2 M N K / 790 TFLOP/s;
* projected time = the largest of the three. The **byte floor** of a linear is its packed NF4,
  scales, x and output only (the data any implementation must move); a layer's ratio is Σ
  projected / Σ byte floor over its 7 linears (training: forward + backward for x).

Launch latency (a few µs per launch, which dominates k/v at decode) is not included; the number
of launches per scenario is listed beside each ratio.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["QWEN3B", "SCENARIOS", "TARGETS_X_FLOOR", "H200", "sass_stats", "static_report",
           "static_report_markdown"]

#: Qwen2.5-Coder-3B linears: name -> (N, K, bias)
QWEN3B = {"q_proj": (2048, 2048, True), "k_proj": (256, 2048, True),
          "v_proj": (256, 2048, True), "o_proj": (2048, 2048, False),
          "gate_proj": (11008, 2048, False), "up_proj": (11008, 2048, False),
          "down_proj": (2048, 11008, False)}
SCENARIOS = ("decode:1", "decode:4", "prefill:16", "train:16")
#: the budgets, Σ projected / Σ byte floor over a 3B decoder layer
TARGETS_X_FLOOR = {"decode:1": 1.3, "decode:4": 1.5, "prefill:16": 2.0, "train:16": 2.5}
H200 = {"sms": 132, "schedulers": 4, "clock_ghz": 1.755, "bytes_per_s": 4.8e12,
        "flops_per_s": 790e12}
RANK = 2


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# -- SASS ---------------------------------------------------------------------------------------
_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _parse_sass(text: str):
    """[(address, opcode, operands)] and {label: address} of one function's SASS."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            instrs.append((addr, m.group(3), m.group(4)))
    return instrs, labels


def _loops(instrs, labels) -> List[Tuple[int, int]]:
    """(first, last) instruction indices of every loop closed by a backward branch."""
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    loops = []
    for i, (addr, op, rest) in enumerate(instrs):
        if op.startswith("BRA"):
            t = _BRANCH_TARGET.search(rest)
            if t and t.group(1) in labels and labels[t.group(1)] <= addr:
                loops.append((index[labels[t.group(1)]], i))
    return loops


_REG = re.compile(r"\b(U?[RP]\d+)(\.64)?\b")
_NO_DESTINATION = ("ST", "BRA", "BAR", "EXIT", "RET", "LDGSTS", "LDGDEPBAR", "DEPBAR",
                   "WARPSYNC", "RED", "ATOM", "NOP")


def _regs(text: str, width: int = 1) -> List[str]:
    """The registers an operand list names (a ``.64`` pair, or ``width`` consecutive ones from a
    load's destination, counted in full)."""
    out = []
    for name, wide in _REG.findall(text):
        prefix = name.rstrip("0123456789")
        n = max(width, 2 if wide else 1) if prefix in ("R", "UR") else 1
        out += [f"{prefix}{int(name[len(prefix):]) + j}" for j in range(n)]
    return out


def _dependent_loads(instrs, first: int, last: int) -> Tuple[int, int]:
    """(global, shared) loads of the loop ``instrs[first..last]`` whose address comes from a value
    loaded in the loop — table lookups by a loaded code, each waiting for the load before it.
    A register is marked when a load writes it or an instruction computes it from a marked one,
    and cleared when overwritten otherwise; the loop is walked twice (values carried around)."""
    marked, gathers = set(), {}
    for _ in range(2):
        for i in range(first, last + 1):
            _, op, rest = instrs[i]
            is_load = op.startswith(("LDG", "LDS")) and "[" in rest
            if is_load and marked.intersection(_regs(rest[rest.rfind("["):])):
                gathers[i] = "global" if op.startswith("LDG") else "shared"
            if op.startswith(_NO_DESTINATION):
                continue
            head, _, tail = rest.partition(",")
            width = 4 if ".128" in op else 2 if ".64" in op else 1
            dsts = _regs(head, width if is_load else 1)
            if is_load or marked.intersection(_regs(tail)):
                marked.update(dsts)
            else:
                marked.difference_update(dsts)
    kinds = list(gathers.values())
    return kinds.count("global"), kinds.count("shared")


def _is_global_load(op: str) -> bool:
    return op.startswith(("LDG", "LDGSTS", "UTMALDG", "UBLKCP"))


def sass_stats(cubin: bytes) -> dict:
    """Resource usage and K-loop statistics of one compiled kernel (see the module docstring)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    instrs, labels = _parse_sass(sass)
    loops = _loops(instrs, labels)
    out = {"registers": usage.get("reg", 0), "local_bytes": usage.get("local", 0),
           "stack_bytes": usage.get("stack", 0), "static_shared_bytes": usage.get("shared", 0),
           "sass_instructions": len(instrs), "k_loop": None}
    if loops:
        def loads(lp):
            return sum(_is_global_load(instrs[i][1]) for i in range(lp[0], lp[1] + 1))
        first, last = max(loops, key=lambda lp: (loads(lp), lp[1] - lp[0]))
        ops = Counter(instrs[i][1] for i in range(first, last + 1))
        nested = sum(1 for lp in loops if first <= lp[0] and lp[1] < last)
        ldg = {op: n for op, n in ops.items() if op.startswith("LDG")}
        out["k_loop"] = {
            "instructions": last - first + 1, "nested_loops": nested,
            "global_loads": ldg,
            "async_copies": sum(n for op, n in ops.items() if op.startswith("LDGSTS")),
            "tma": sum(n for op, n in ops.items() if op.startswith(("UTMALDG", "UBLKCP"))),
            "mma": sum(n for op, n in ops.items() if op.startswith(("HMMA", "HGMMA", "WGMMA",
                                                                       "IMMA"))),
            "shuffles": sum(n for op, n in ops.items() if op.startswith("SHFL")),
            "barriers": sum(n for op, n in ops.items() if op.startswith(("BAR", "WARPSYNC"))),
            "shared_accesses": sum(n for op, n in ops.items()
                                   if op.startswith(("LDS", "STS", "LDSM"))),
            "dependent_loads": dict(zip(("global", "shared"),
                                        _dependent_loads(instrs, first, last))),
            "top_opcodes": dict(ops.most_common(8)),
        }
    return out


# -- the launches of a scenario -------------------------------------------------------------------
@dataclass
class _Call:
    layer: str            # the linear(s) this launch serves
    weights: int          # N*K summed over them
    n: int
    k: int
    m: int
    members: int          # linears in the launch
    direction: str        # "forward" or "grad_x"
    launch: object = None


def _scenario_calls(scenario: str, double_quant: bool = True) -> List[Tuple[_Call, callable]]:
    """(what, call) of every launch one decoder layer makes, as the dispatch table plans it."""
    from functools import partial

    from .compile_check import _factors, random_nf4
    from .ops.configs import CUBLAS_MIN_M, GEMV_MAX_M, gemv_config, pick_config
    from .ops.custom_ops import kernel_forward, kernel_grad_x
    from .ops.fused_linear import fused_linear_group
    from .ops.nf4_gemv import nf4_gemv_group

    kind, m = scenario.split(":")
    m = int(m)
    train = kind == "train"
    path = "gemv" if m <= GEMV_MAX_M else ("fused" if m < CUBLAS_MIN_M else "large_m")
    act = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    made = {name: (random_nf4(n, k, double_quant, gen=gen), _factors(n, k, RANK, gen),
                   torch.randn(n).to(act) if bias else None, n, k)
            for name, (n, k, bias) in QWEN3B.items()}
    calls = []
    groups = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    # as a model call launches them (tinylora_kernels.grouping): q/k/v and gate/up grouped on
    # the gemv and fused paths, without autograd
    grouped = set() if (train or path == "large_m") else {n for g in groups for n in g}
    for g in groups:
        if g[0] in grouped:
            k = made[g[0]][4]
            x = torch.randn(m, k).to(act)
            n_total = sum(made[name][3] for name in g)
            members = [(made[name][0], made[name][2], made[name][1]) for name in g]
            launch = (partial(nf4_gemv_group, x, members, out_dtype=act) if path == "gemv" else
                      partial(fused_linear_group, x, members, out_dtype=act,
                              config=pick_config(m, made[g[0]][3], k)))
            calls.append((_Call("+".join(g), n_total * k, n_total, k, m, len(g), "forward"),
                          launch))
    for name, (w, f, bias, n, k) in made.items():
        if name in grouped:
            continue
        x = torch.randn(m, k).to(act)
        cfg = gemv_config(n, k) if path == "gemv" else pick_config(m, n, k)
        calls.append((_Call(name, n * k, n, k, m, 1, "forward"),
                      partial(kernel_forward, path, x, w, bias, f, out_dtype=act,
                              store_ax=train, config=cfg)))
        if train:
            g = torch.randn(m, n).to(act)
            calls.append((_Call(name, n * k, n, k, m, 1, "grad_x"),
                          partial(kernel_grad_x, "fused" if path == "gemv" else path, g, w, f,
                                  x_dtype=act)))
    return calls


def _weights_per_iteration(kernel: str, cx: dict) -> Optional[int]:
    if kernel in ("_nf4_gemv_kernel", "_nf4_gemv_group_kernel"):
        return cx["BN"] * 2 * cx["BKH"]
    if kernel in ("_fused_linear_kernel", "_fused_group_kernel", "_grad_x_kernel"):
        return cx["BN"] * cx["BK"]
    if kernel == "_nf4_decode_kernel":
        return cx["BN"] * 2 * cx["BJ"]
    return None


def _nf4_bytes(n: int, k: int, double_quant: bool) -> float:
    weights = n * k
    scales = weights / 64 * (1 if double_quant else 4)
    if double_quant:
        scales += weights / 64 / 256 * 4 + 256 * 4 + 4
    return weights / 2 + scales + 64


def _launch_bytes(call: _Call, launch, double_quant: bool) -> Tuple[float, float]:
    """(bytes this launch moves, the byte floor's share) for the call it serves."""
    cx = launch.constexpr_values()
    m, n, k = call.m, call.n, call.k
    nf4 = _nf4_bytes(n, k, double_quant)
    if launch.kernel == "_nf4_decode_kernel":
        return nf4 + n * k * 2, 0.0              # writes the decoded (N, K) workspace
    if call.direction == "grad_x":
        floor = nf4 + m * n * 2 + m * k * 2
        return floor + call.members * RANK * (n * 4 + k * 2) + m * RANK * 4, floor
    floor = nf4 + m * k * 2 + m * n * 2
    moved = floor + call.members * RANK * (n * 4 + k * 2)
    if launch.kernel.startswith("_nf4_gemv") and not cx.get("DIRECT", True):
        moved += 2 * launch.grid[1] * m * n * 4     # fp32 partials written, read by the last
    return moved, floor


def static_report(scenarios=SCENARIOS, double_quant: bool = True, jobs: int = 2,
                  progress=None) -> dict:
    """Compile what each scenario launches for sm_90 and project it (see the module docstring).
    Must run without ``TRITON_INTERPRET``."""
    from .compile_check import capture, compile_all

    say = progress or (lambda msg: None)
    hw = H200
    issue_per_us = hw["schedulers"] * hw["clock_ghz"] * 1e3
    per_scenario = {}
    stats_cache: Dict[tuple, dict] = {}
    for scen in scenarios:
        say(f"{scen}: capturing")
        rows = []
        with capture("sm_90") as cap:
            for call, fn in _scenario_calls(scen, double_quant):
                before = len(cap.launches)
                fn()
                for launch in cap.launches[before:]:
                    rows.append((call, launch))
        todo = [launch for _, launch in rows if launch.key() not in stats_cache]
        unique = {launch.key(): launch for launch in todo}
        say(f"{scen}: compiling {len(unique)} kernels")
        for res in compile_all(list(unique.values()), "sm_90", jobs):
            if not res.ok:
                stats_cache[res.launch.key()] = {"error": res.error}
                continue
            st = sass_stats(res.cubin)
            st["shared_bytes"] = res.shared
            stats_cache[res.launch.key()] = st
        launches, total_proj, total_floor = [], 0.0, 0.0
        for call, launch in rows:
            st = stats_cache[launch.key()]
            cx = launch.constexpr_values()
            warps = launch.options.get("num_warps", 4)
            ctas = 1
            for g in launch.grid:
                ctas *= g
            moved, floor = _launch_bytes(call, launch, double_quant)
            w_it = _weights_per_iteration(launch.kernel, cx)
            loop = st.get("k_loop")
            wipw = None
            issue_us = 0.0
            if "error" not in st and w_it and loop is not None:
                wipw = loop["instructions"] * warps / w_it
            elif "error" not in st and w_it and launch.kernel == "_nf4_decode_kernel":
                wipw = st["sass_instructions"] * warps / w_it
            if wipw is not None:
                issue_us = call.weights * wipw / (min(hw["sms"], ctas) * issue_per_us)
            byte_us = moved / hw["bytes_per_s"] * 1e6
            flop_us = 2 * call.m * call.weights / hw["flops_per_s"] * 1e6 \
                if launch.kernel != "_nf4_decode_kernel" else 0.0
            proj = max(issue_us, byte_us, flop_us)
            bound = {issue_us: "issue", byte_us: "bytes", flop_us: "flops"}[proj]
            floor_us = floor / hw["bytes_per_s"] * 1e6
            total_proj += proj
            total_floor += floor_us
            launches.append({
                "layer": call.layer, "direction": call.direction, "kernel": launch.kernel,
                "M": call.m, "N": call.n, "K": call.k, "grid": list(launch.grid), "ctas": ctas,
                "num_warps": warps, "num_stages": launch.options.get("num_stages"),
                "constexprs": {k: v for k, v in cx.items() if isinstance(v, (int, bool))},
                "weights_per_iteration": w_it, "warp_instr_per_weight": wipw,
                "issue_us": issue_us, "bytes_moved": moved, "bytes_us": byte_us,
                "flops_us": flop_us, "projected_us": proj, "binds": bound,
                "byte_floor_us": floor_us, "sass": st})
        per_scenario[scen] = {
            "launches": launches, "projected_us": total_proj, "byte_floor_us": total_floor,
            "x_floor": total_proj / total_floor if total_floor else None,
            "target_x_floor": TARGETS_X_FLOOR.get(scen)}
    import triton

    from .bench.report import compiled_result

    what = ("PROJECTED, NOT MEASURED: static SASS of the kernels the dispatch table launches "
            "for one Qwen2.5-Coder-3B decoder layer (NF4 "
            f"{'double quant' if double_quant else 'plain'}, bf16), sm_90, against the H200 "
            "roofline")
    data = compiled_result(what, hw, per_scenario, triton.__version__, torch.__version__)
    data["checks"] = measured_checks()
    data["validated"] = False
    return data


#: (date, the projection of that day's kernels, the H200 suite run that measured them), in the
#: repository (benchmarks/results/); each gives measured / projected per scenario
CHECKS = (("2026-12-04", "compiled/sm90-2026-12-04.json", "h200-2026-12-04/bench-gpu.json"),)
_CHECKED_M = {"decode:1": 1, "decode:4": 4, "prefill:16": 16}


def measured_checks(results_dir: Optional[str] = None) -> List[dict]:
    """Every committed check of this projection against the H200: per scenario, the projection
    of the kernels that were measured, the measured CUDA-graph replay of one decoder layer
    (fused kernels, ``fused`` provider; the layer also runs attention and norms, which the
    projection leaves out) and their ratio. Empty outside a checkout holding the files."""
    import json

    root = results_dir or os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "benchmarks", "results")
    out = []
    for date, projected_file, measured_file in CHECKS:
        try:
            with open(os.path.join(root, projected_file)) as f:
                projected = json.load(f)["scenarios"]
            with open(os.path.join(root, measured_file)) as f:
                rows = json.load(f)["rows"]
        except (OSError, KeyError, ValueError):
            continue
        for scen, m in _CHECKED_M.items():
            cell = next((r["providers"].get("fused", {}).get("graph") for r in rows
                         if r["case"].get("layer") == "decoder_layer" and r["case"]["M"] == m
                         and r["case"].get("mode") == "fwd"), None)
            if cell and scen in projected:
                p = projected[scen]["projected_us"]
                out.append({"date": date, "scenario": scen, "projected_us": p,
                            "measured_us": cell["median_us"],
                            "measured_over_projected": cell["median_us"] / p})
    return out


def static_report_markdown(data: dict) -> str:
    """The report's tables (per scenario, then per launch, with a legend), from its JSON."""
    lines = [f"**{data['what']}** (triton {data['triton']}). Definitions: "
             "`tinylora_kernels/static_report.py`.", "",
             "| scenario | launches | projected µs | byte floor µs | projected / floor | "
             "target | met |", "|---|---|---|---|---|---|---|"]
    for scen, s in data["scenarios"].items():
        met = "yes" if s["x_floor"] is not None and s["x_floor"] <= s["target_x_floor"] else "no"
        lines.append(f"| {scen} | {len(s['launches'])} | {s['projected_us']:.1f} | "
                     f"{s['byte_floor_us']:.1f} | {s['x_floor']:.2f} | ≤ {s['target_x_floor']} "
                     f"| {met} |")
    checks = data.get("checks") or []
    if checks:
        ratios = [c["measured_over_projected"] for c in checks]
        lines += ["", f"**Not validated.** The only checks against a GPU (H200, the kernels of "
                  f"the date below, a decoder layer replayed from a CUDA graph, attention and "
                  f"norms included) measured {min(ratios):.1f}x–{max(ratios):.1f}x what this "
                  "model projected for them; no figure above is a prediction.", "",
                  "| checked | scenario | projected µs | measured µs | measured / projected |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['date']} | {c['scenario']} | {c['projected_us']:.1f} | "
                  f"{c['measured_us']:.1f} | {c['measured_over_projected']:.1f}x |"
                  for c in checks]
    lines += ["", "Per launch (projected):", "",
              "| scenario | linear | kernel | grid | warps | regs | local B | I_it | W_it | "
              "warp-instr/weight | LDG widths | async | MMA | SHFL | BAR | binds | "
              "projected µs | floor µs |", "|" + "---|" * 18]
    for scen, s in data["scenarios"].items():
        for r in s["launches"]:
            st = r["sass"]
            loop = st.get("k_loop") or {}
            if "error" in st:
                lines.append(f"| {scen} | {r['layer']} | {r['kernel']} | COMPILE ERROR: "
                             f"{st['error'][:120]} |" + " |" * 14)
                continue
            ldg = ", ".join(f"{k[4:] or '32'}×{v}" for k, v in sorted(
                (loop.get("global_loads") or {}).items())
                if k == "LDG" or k.startswith("LDG."))   # (LDGSTS: async; LDGDEPBAR: a wait)
            wipw = "—" if r["warp_instr_per_weight"] is None else \
                f"{r['warp_instr_per_weight']:.3f}"
            lines.append(
                f"| {scen} | {r['layer']}{' (dx)' if r['direction'] == 'grad_x' else ''} | "
                f"{r['kernel'].strip('_')} | {'x'.join(map(str, r['grid']))} | {r['num_warps']} "
                f"| {st['registers']} | {st['local_bytes']} | {loop.get('instructions', '—')} | "
                f"{r['weights_per_iteration'] or '—'} | {wipw} | {ldg or '—'} | "
                f"{loop.get('async_copies', 0) + loop.get('tma', 0)} | {loop.get('mma', 0)} | "
                f"{loop.get('shuffles', 0)} | {loop.get('barriers', 0)} | {r['binds']} | "
                f"{r['projected_us']:.2f} | {r['byte_floor_us']:.2f} |")
    lines += ["", "Legend: I_it = SASS instructions per K-loop iteration; W_it = weights per "
              "iteration per CTA; LDG widths = global loads in the K loop by width (U8 = one "
              "byte, 32 = 4 bytes, 64/128 = 8/16 bytes) × count; async = LDGSTS/TMA copies; "
              "binds = which bound is the largest (issue, bytes, flops); floor = the byte floor "
              "of the linear(s) this launch serves (0 for helper launches)."]
    return "\n".join(lines) + "\n"
