"""Per-call host cost of a layer against bitsandbytes' ``Linear4bit`` alone."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional

import torch

from .cases import RANK, U, nf4_linear
from .report import result
from .timing import environment, measure, timing_method

# -- host cost per call ----------------------------------------------------------------------------
#: The host-cost targets: a TinyLoRALinear call over bitsandbytes' Linear4bit alone.
HOST_COST_TARGETS = {"no_grad": 1.15, "fwd+bwd": 1.15}
HOST_COST_LEGEND = {
    "bitsandbytes": "bitsandbytes' Linear4bit alone, called as a module",
    "tinylora": "TinyLoRALinear around the same Linear4bit, by the row's path (reference: the "
                "torch path; reference_no_decoded_copy: the same with TINYLORA_CPU_DECODED_MB=0, "
                "NF4 decoded at every call as bitsandbytes does here; triton: the kernels; <path>_in_model_call: "
                "the same layer called inside an open model call, as a model's layers are: the "
                "work done once per model call for all its layers — v's view, every layer's R "
                "and adapter operands — is then not in the per-layer figure)"}


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
    from .. import TinyLoRAGlobalParams, TinyLoRALinear

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    lin = nf4_linear(w, device, torch.bfloat16)
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
    calls: ``no_grad`` (generation) and ``fwd+bwd`` (x and v require grad; the bare layer
    differentiates x); one row per (call, path), the two contenders of a row timed together on
    the ``wall`` clock (``reps`` calls per round, ``rounds`` rounds). The target is held against
    the ratio of the minima over rounds (``ratio_min``: the least noisy estimate on a shared
    machine); the table shows medians. Also records the aten operations one call issues.
    """
    from .. import adapter_state, router
    from .. import backend as backend_mod

    lin, layer, gp = _host_layer(n, k, device)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(1, n, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)

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

    variants = [(b, b, None, False) for b in backends]
    variants.append(("reference_in_model_call", "reference", None, True))
    if device == "cpu":
        # the pure bookkeeping: the base product decoded per call, as bitsandbytes does
        variants.append(("reference_no_decoded_copy", "reference", "0", False))
    holder = torch.nn.Module()
    holder.layer = layer
    adapter_state.install_call_hooks(holder, gp)
    rows, summary = [], []
    for call, bare, ours in (("no_grad", bare_no_grad, ours_no_grad),
                             ("fwd+bwd", bare_fwd_bwd, ours_fwd_bwd)):
        for name, backend_name, decoded_mb, in_call in variants:
            if in_call:             # a first model call enrols the layer in the call's batch
                with adapter_state.model_call(holder), backend_mod.use_backend(backend_name):
                    ours()
            opened = adapter_state.model_call(holder) if in_call else contextlib.nullcontext()
            with env_var("TINYLORA_CPU_DECODED_MB", decoded_mb), \
                    backend_mod.use_backend(backend_name), opened:
                timed = measure({"bitsandbytes": bare, "tinylora": ours}, device,
                                clock="wall", rounds=rounds, reps=reps)
                ops = count_ops(ours)
                plan = str(router.explain(layer, x))
            timed["bitsandbytes"]["ops"] = len(count_ops(bare))
            timed["tinylora"].update(ops=len(ops), op_list=ops, plan=plan)
            ratio = timed["tinylora"]["min_us"] / timed["bitsandbytes"]["min_us"]
            rows.append({"case": {"call": call, "path": name, "N": n, "K": k, "M": 1},
                         "floor_us": None, "providers": timed, "ratio_min": ratio})
            summary.append(f"{call}, {name}: {ratio:.2f}x bitsandbytes' time per call (minima; "
                           f"target ≤ {HOST_COST_TARGETS[call]}); aten operations "
                           f"{timed['bitsandbytes']['ops']} / {len(ops)}")
    return result(
        "host-cost", f"per-call host cost, TinyLoRALinear vs bitsandbytes Linear4bit alone, "
        f"{n} x {k}, M = 1, bf16, {device}", device,
        timing_method(device, "wall", rounds=rounds, reps=reps), rows,
        env=environment(device), dtype="torch.bfloat16", baseline="bitsandbytes",
        legend=HOST_COST_LEGEND, summary=summary, targets=HOST_COST_TARGETS)


@contextlib.contextmanager
def env_var(name: str, value: Optional[str]):
    """The environment variable ``name`` set to ``value`` (None: removed) inside the block, as
    it was after it."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
