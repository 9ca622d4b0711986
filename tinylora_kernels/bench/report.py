"""One result format for every bench mode, and the reports generated from it.

A result (``SCHEMA``)::

    {"schema": "tinylora-bench/2", "mode": "suite" | "parts" | "host-cost" | ...,
     "what": one line, "device": "cpu" | "cuda", "dtype": ..., "env": versions and machine,
     "timing": how it was timed (clock, L2 flushed or not, CUDA graphs or not, statistic),
     "ceilings": measured copy bandwidth and matmul rate (or null),
     "baseline": the contender the ratio columns divide by (or null),
     "rows": [{"case": {what was run}, "floor_us": float or null,
               "providers": {name: {"median_us", "p20_us", "p80_us", "min_us", ...}
                                  or {"not_run": why} or {"error": what}}}],
     "legend": {name: what it runs}, "summary": [lines], "note": null or a line}

Every mode writes this; :func:`markdown` renders any of them, :func:`compare` compares any two
with the same case keys, :func:`consistency` checks a suite run's fwd + bwd against fwd+bwd.
Files of the first format (the suite's, before modes existed) are read through :func:`upgrade`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["SCHEMA", "result", "compiled_result", "markdown", "compare", "upgrade",
           "consistency", "write", "CONSISTENCY_TOLERANCE"]

SCHEMA = "tinylora-bench/2"
#: fwd + bwd measured apart vs fwd+bwd measured together, at most this far apart
CONSISTENCY_TOLERANCE = 0.15


def result(mode: str, what: str, device: str, timing: dict, rows: List[dict], *, env: dict,
           dtype: Optional[str] = None, ceilings: Optional[dict] = None,
           baseline: Optional[str] = None, legend: Optional[dict] = None,
           summary: Optional[List[str]] = None, note: Optional[str] = None, **extra) -> dict:
    """A result in the one format (see the module docstring); ``extra`` keys are the mode's."""
    return {"schema": SCHEMA, "mode": mode, "what": what, "device": device, "dtype": dtype,
            "env": env, "timing": timing, "ceilings": ceilings, "baseline": baseline,
            "rows": rows, "legend": legend or {}, "summary": summary or [], "note": note,
            **extra}


def compiled_result(what: str, hardware_model: dict, scenarios: dict, triton_version: str,
                    torch_version: str) -> dict:
    """The ``--compiled`` projection in the one format: a row per scenario whose one provider,
    ``projected_sm90``, holds the projected time (projected, not measured: no spread), the
    per-launch detail kept under ``scenarios``."""
    rows = [{"case": {"scenario": scen}, "floor_us": s["byte_floor_us"],
             "providers": {"projected_sm90": {k: s["projected_us"] for k in
                                              ("median_us", "p20_us", "p80_us", "min_us")}}}
            for scen, s in scenarios.items()]
    return result("compiled", what, "none (compiled for sm_90 on this machine)",
                  {"clock": "none: projected from the compiled SASS, not measured"}, rows,
                  env={"triton": triton_version, "torch": torch_version},
                  legend={"projected_sm90": "the sum over the scenario's launches of max(issue "
                          "bound, bytes / 4.8 TB/s, FLOPs / 790 TFLOP/s), H200 model"},
                  hardware_model=hardware_model, triton=triton_version, torch=torch_version,
                  scenarios=scenarios)


def upgrade(data: dict) -> dict:
    """A result of any version in the current format (the first format: suite rows with the
    case's keys at the top level of each row; the first compiled report: scenarios without
    rows)."""
    if isinstance(data, dict) and data.get("schema") == SCHEMA:
        return data
    if (isinstance(data, dict) and "rows" not in data and isinstance(data.get("scenarios"), dict)
            and "hardware_model" in data):
        return compiled_result(data.get("what", "compiled report (first format)"),
                               data["hardware_model"], data["scenarios"],
                               data.get("triton", "?"), data.get("torch", "?"))
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError("not a result file of tinylora-kernels bench (no 'rows' list)")
    rows = []
    for r in data["rows"]:
        if not isinstance(r, dict) or "providers" not in r:
            raise ValueError("not a result file of tinylora-kernels bench (a row without "
                             "'providers')")
        case = {k: r[k] for k in ("model", "layer", "M", "mode") if k in r}
        rows.append({"case": case, "floor_us": r.get("floor_us"), "providers": r["providers"],
                     **({"skipped": r["skipped"]} if "skipped" in r else {})})
    env = data.get("env", {})
    return result("suite", data.get("what", "benchmark suite (first result format)"),
                  data.get("device", "?"), data.get("timing", {"clock": "not recorded"}), rows,
                  env=env, dtype=data.get("dtype"), ceilings=data.get("ceilings"),
                  note=data.get("note"))


def _stat_cell(stats: dict, why: Optional[str]) -> str:
    if "median_us" not in stats:
        why = stats.get("not_run") or stats.get("error") or why or "not run"
        return f"n/a: {why[:80]}"
    return f"{stats['median_us']:.1f} ({stats['p20_us']:.1f}–{stats['p80_us']:.1f})"


def _providers(data: dict) -> List[str]:
    seen: Dict[str, None] = {}
    for r in data["rows"]:
        seen.update(dict.fromkeys(r["providers"]))
    return list(seen)


def _env_line(data: dict) -> str:
    env, t = data["env"], data.get("timing", {})
    where = env.get("gpu") or f"{env.get('cpu', env.get('machine', '?'))}, " \
                               f"{env.get('threads', '?')} threads"
    line = (f"Device: {data['device']} ({where}); torch {env.get('torch')}, triton "
            f"{env.get('triton')}, bitsandbytes {env.get('bitsandbytes')}")
    if data.get("dtype"):
        line += f"; {data['dtype']}"
    if data.get("ceilings"):
        c = data["ceilings"]
        line += (f"; copy {c['copy_GBps']:.0f} GB/s, matmul {c['matmul_TFLOPs']:.1f} TFLOP/s "
                 f"({c['matmul_dtype']})")
    line += f". Timing: {t.get('clock', '?')} clock"
    if t.get("clock") == "wall":
        line += f", {t.get('rounds')} interleaved rounds"
    if "l2_flushed" in t:
        line += f", L2 {'flushed' if t['l2_flushed'] else 'not flushed'}"
    if t.get("cuda_graphs") not in (None, "no"):
        line += f", CUDA graphs: {t['cuda_graphs']}"
    return line + f"; cells: {t.get('statistic', 'median')} (µs)."


def markdown(data: dict) -> str:
    """The table of any result, generated from its JSON: one row per case, one column per
    contender (median and 20–80 % range), time over the floor, and each contender's time over
    the baseline's."""
    data = upgrade(data)
    provs = _providers(data)
    keys = list(dict.fromkeys(k for r in data["rows"] for k in r["case"]))
    has_floor = any(r.get("floor_us") for r in data["rows"])
    base = data.get("baseline") if data.get("baseline") in provs else None
    others = [p for p in provs if p != base] if base else []
    head = keys + (["floor µs"] if has_floor else []) + [f"{p} µs" for p in provs]
    head += ([f"{base}/floor"] if has_floor and base else []) + [f"{p}/{base}" for p in others]
    lines = [f"**{data['what']}**", "", _env_line(data), ""]
    if data.get("note"):
        lines += [f"**{data['note']}.**", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def med(r, p):
        return r["providers"].get(p, {}).get("median_us", math.nan)

    for r in data["rows"]:
        cells = [str(r["case"].get(k, "")) for k in keys]
        if has_floor:
            cells.append(f"{r['floor_us']:.1f}" if r.get("floor_us") else "")
        cells += [_stat_cell(r["providers"].get(p, {}), r.get("skipped")) for p in provs]
        if has_floor and base:
            cells.append(f"{med(r, base) / r['floor_us']:.2f}" if r.get("floor_us") else "")
        cells += [f"{med(r, p) / med(r, base):.2f}" for p in others]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Legend:"]
    if has_floor:
        lines.append("- floor: the least time the call's bytes and FLOPs allow on this device "
                     "(bytes / measured copy bandwidth, FLOPs / measured matmul rate, the "
                     "larger).")
    lines += [f"- {p}: {data['legend'].get(p, p)}" for p in provs]
    if base:
        lines.append(f"- <contender>/{base}: that contender's median time over {base}'s (below "
                     f"1: faster than {base}); nan where either was not measured.")
    lines.append("- n/a: not measured, with the reason.")
    checks = consistency(data)
    if checks:
        lines += ["", "Consistency (the same harness, the same group of timings): fwd + bwd "
                  "measured apart against fwd+bwd measured together (expected within "
                  f"{CONSISTENCY_TOLERANCE:.0%}); the forward in the sum is the one fwd+bwd "
                  "runs (grad enabled), the no-grad forward beside it:", "",
                  "| case | provider | fwd no grad µs | fwd µs | bwd µs | fwd + bwd | "
                  "fwd+bwd together | ratio |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {c['provider']} | {c['fwd_no_grad_us']:.1f} | "
                  f"{c['fwd_us']:.1f} | {c['bwd_us']:.1f} | {c['sum_us']:.1f} | "
                  f"{c['together_us']:.1f} | {c['ratio']:.2f}"
                  + ("" if abs(c["ratio"] - 1) <= CONSISTENCY_TOLERANCE else " (outside)")
                  + " |" for c in checks]
    if data.get("summary"):
        lines += [""] + [f"- {s}" for s in data["summary"]]
    return "\n".join(lines) + "\n"


def consistency(data: dict) -> List[dict]:
    """For each case measured in all of fwd, bwd and fwd+bwd, and each contender: fwd + bwd
    (measured apart) over fwd+bwd (measured together). The forward in the sum is the one
    fwd+bwd runs, with grad enabled (``grad_enabled`` of the fwd row, timed in the same group);
    the no-grad forward (generation's) is reported beside it."""
    data = upgrade(data)
    index = {}
    for r in data["rows"]:
        case = dict(r["case"])
        mode = case.pop("mode", None)
        key = tuple(sorted(case.items()))
        for p, stats in r["providers"].items():
            if "median_us" in stats:
                index.setdefault((key, p), {})[mode] = stats
    out = []
    for (key, p), t in index.items():
        if {"fwd", "bwd", "fwd+bwd"} <= set(t):
            fwd = t["fwd"].get("grad_enabled", t["fwd"])
            if "median_us" not in fwd:
                continue
            s = fwd["median_us"] + t["bwd"]["median_us"]
            together = t["fwd+bwd"]["median_us"]
            out.append({"case": " ".join(f"{k}={v}" for k, v in key), "provider": p,
                        "fwd_no_grad_us": t["fwd"]["median_us"], "fwd_us": fwd["median_us"],
                        "fwd_grad_enabled": "grad_enabled" in t["fwd"],
                        "bwd_us": t["bwd"]["median_us"], "sum_us": s, "together_us": together,
                        "ratio": s / together})
    return out


def _no_spread(stats: dict) -> bool:
    return stats.get("p20_us", stats["median_us"]) == stats.get("p80_us", stats["median_us"])


def compare(a: dict, b: dict) -> str:
    """Rows of two results side by side: B/A per contender, flagged beyond the noise.

    A change counts when the two runs' 20–80 % ranges do not overlap; else it is noise.
    Projections have no range: within 1 % of each other they are the same.
    """
    a, b = upgrade(a), upgrade(b)
    index = {tuple(sorted(r["case"].items())): r for r in a["rows"]}
    keys = list(dict.fromkeys(k for r in b["rows"] for k in r["case"]))
    lines = ["| " + " | ".join(keys) + " | provider | A µs | B µs | B/A | verdict |",
             "|" + "---|" * (len(keys) + 5)]
    for rb in b["rows"]:
        ra = index.get(tuple(sorted(rb["case"].items())))
        if ra is None:
            continue
        for p, sb in rb["providers"].items():
            sa = ra["providers"].get(p, {})
            if "median_us" not in sa or "median_us" not in sb:
                continue
            ratio = sb["median_us"] / sa["median_us"]
            if _no_spread(sa) and _no_spread(sb) and abs(ratio - 1) < 0.01:
                verdict = "same"
            elif sb.get("p80_us", sb["median_us"]) < sa.get("p20_us", sa["median_us"]):
                verdict = "faster"
            elif sb.get("p20_us", sb["median_us"]) > sa.get("p80_us", sa["median_us"]):
                verdict = "slower"
            else:
                verdict = "noise"
            lines.append("| " + " | ".join(str(rb["case"].get(k, "")) for k in keys)
                         + f" | {p} | {sa['median_us']:.1f} | {sb['median_us']:.1f} | "
                           f"{ratio:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def _free_stem(out_dir: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... : the first with no file of that name yet."""
    candidate, i = stem, 1
    while any(out_dir.glob(f"{candidate}.*")):
        i += 1
        candidate = f"{stem}-{i}"
    return candidate


def write(data: dict, out_dir, stem: str, table: Optional[str] = None,
          figure=None) -> List[Path]:
    """``data`` as ``<stem>.json`` and its table as ``<stem>.md`` in ``out_dir`` under names no
    file has yet (``stem-2``, ...), and with ``figure`` (``figure(data, path)``: None when drawn,
    else why not, as :func:`.suite.plot`) a plot ``<stem>.png``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(out_dir, stem)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    if figure is not None:
        why = figure(data, out_dir / f"{stem}.png")
        if why is None:
            paths.append(out_dir / f"{stem}.png")
        else:
            data["plot"] = why
    paths[0].write_text(json.dumps(data, indent=1))
    paths[1].write_text(table if table is not None else markdown(data))
    return paths
