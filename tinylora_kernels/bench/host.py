"""Per-call host cost of a layer against bitsandbytes' ``Linear4bit`` alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, List

import torch

from .cases import RANK, U
from .timing import _environment, interleaved

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

    from .. import TinyLoRAGlobalParams, TinyLoRALinear

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
    from .. import backend as backend_mod
    from .. import router

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
                    timed = interleaved({"bitsandbytes": bare, name: ours}, rounds, reps, sync)
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
