"""The router: for a TinyLoRA layer and an input, the plan of the call — decided here, and only here.

A :class:`Plan` names the path, the kernel config where there is one, and why:

============  ===============================================================================
``torch``     the base layer's own product (bitsandbytes' ``matmul_4bit`` for a 4-bit base,
              ``F.linear`` for a dense one) + the factorized adapter: ``half`` in the call's
              16-bit dtype (:mod:`tinylora_kernels.half_path`; 16-bit calls on a GPU), else in
              fp32 (:mod:`tinylora_kernels.torch_path`; ``split16`` for its one-16-bit-GEMM form)
``gemv``      NF4 at M <= 4: a split-K GEMV with the adapter folded in
              (:mod:`tinylora_kernels.ops.nf4_gemv`; backward :mod:`~.ops.grad_x`)
``fused``     one Triton kernel streaming the packed (or dense) weight with the adapter folded in
              (:mod:`tinylora_kernels.ops.fused_linear`; backward :mod:`~.ops.grad_x`)
``large_m``   decode NF4 into a workspace + one cuBLAS GEMM carrying the adapter
              (:mod:`tinylora_kernels.ops.large_m`)
``merged``    ΔW already folded into a float base weight: the base layer alone
============  ===============================================================================

The decision uses the backend asked for (:mod:`tinylora_kernels.backend`), the device, the dtypes,
the number of rows M, the layer's shape and storage, and the dispatch table below, which holds
only what committed measurements show. A plan depends on M only through the M classes the
table distinguishes, so each layer keeps its few plans and a call costs one dict lookup.

``TINYLORA_DEBUG_PLAN=1`` logs every new plan (logger ``tinylora_kernels.router``);
``tinylora-kernels check`` prints the plans of its models.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import backend
from .half_path import use_half
from .torch_path import SPLIT16_MIN_ELEMENTS, use_split16

log = logging.getLogger(__name__)

__all__ = ["Plan", "plan", "explain", "AUTO_KERNEL_ROWS", "PATHS"]

PATHS = ("torch", "gemv", "fused", "large_m", "merged")

#: Where ``auto`` sends CUDA calls to the kernels: rows ``(first M, last M)``, each backed
#: by a committed measurement. None is: on an H200 (torch 2.11, triton 3.6, bitsandbytes 0.50.2;
#: benchmarks/results/h200/bench-gpu.json, TUNING.md v4) the kernels are correct but slower than
#: bitsandbytes' own 4-bit matmul plus the factorized adapter at Qwen2.5-Coder-3B sizes, e.g.
#: gate/up at M = 1 under CUDA graphs 108.8 vs 33.1 µs, at M = 4096 478.5 vs 444.5 µs, a
#: 4-decoder-layer training step 68.4 vs 26.1 ms. Until a measurement says otherwise ``auto``
#: plans the torch path; ``TINYLORA_BACKEND=triton`` (or :func:`~.backend.use_backend`) selects
#: the kernels.
AUTO_KERNEL_ROWS: Tuple[Tuple[int, float], ...] = ()

_DEBUG = os.environ.get("TINYLORA_DEBUG_PLAN", "0") not in ("", "0")


@dataclass(frozen=True)
class Plan:
    """How one call of a TinyLoRA layer is computed."""

    path: str                          # one of PATHS
    compute_dtype: torch.dtype         # the dtype the base product is computed in
    out_dtype: torch.dtype             # the dtype of the output
    backend: str                       # the backend asked for
    reason: str                        # why this path
    split16: bool = False              # torch path: the adapter by one 16-bit GEMM
    half: bool = False                 # torch path: the adapter in the call's 16-bit dtype
    config: object = None              # gemv / fused path: the kernel's launch config

    def __str__(self) -> str:
        extra = " split16" if self.split16 else " half" if self.half else ""
        if self.config is not None:
            extra += " " + " ".join(f"{k}={v}" for k, v in vars(self.config).items())
        return (f"{self.path}{extra} ({str(self.compute_dtype)[6:]} -> "
                f"{str(self.out_dtype)[6:]}; backend {self.backend}): {self.reason}")


def _m_edges(layer) -> Tuple[int, ...]:
    """The row counts at which some decision changes for this layer (sorted)."""
    from .ops.configs import CONFIG_TABLE, CUBLAS_MIN_M, GEMV_MAX_M

    n = layer.base_layer.out_features
    edges = {CUBLAS_MIN_M, GEMV_MAX_M + 1, -(-SPLIT16_MIN_ELEMENTS // max(n, 1))}
    edges.update(int(m_max) + 1 for m_max, _, _ in CONFIG_TABLE if m_max != math.inf)
    for first, last in AUTO_KERNEL_ROWS:
        edges.update((first, first if last == math.inf else int(last) + 1))
    return tuple(sorted(edges))


def plan(layer, x: torch.Tensor, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> Plan:
    """The plan for ``layer(x)`` (``compute_dtype``/``out_dtype`` from the layer's dtype rule).

    Cached per layer by (backend, device, dtypes, M class, merged); a layer's caches are cleared
    when it moves or changes dtype.
    """
    asked = backend.requested(layer)
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if torch.compiler.is_compiling():           # traced once per graph: no cache to consult
        return _decide(layer, x, m, asked, compute_dtype, out_dtype)
    edges = layer.__dict__.get("_m_edges_")
    if edges is None:
        edges = layer.__dict__["_m_edges_"] = _m_edges(layer)
    key = (asked, x.device, x.dtype, compute_dtype, out_dtype, bisect.bisect_right(edges, m),
           layer.merged)
    plans = layer.__dict__.setdefault("_plans_", {})
    found = plans.get(key)
    if found is None:
        found = plans[key] = _decide(layer, x, m, asked, compute_dtype, out_dtype)
        if _DEBUG:
            log.info("%s: M=%d %s", type(layer).__name__, m, found)
    return found


def explain(layer, x: torch.Tensor) -> Plan:
    """The plan ``layer(x)`` would run, without running it (for ``check`` and debugging)."""
    compute_dtype, out_dtype = layer._dtypes(x)
    return plan(layer, x, compute_dtype, out_dtype)


def _kernel_refusal(layer, x, compute_dtype) -> Optional[str]:
    """None when the Triton kernels can compute this call, else why not."""
    from .ops import triton_missing

    why = triton_missing()
    if why is not None:
        return why
    from .ops.configs import check_supported

    return check_supported(x, layer.kernel_weight(), compute_dtype)


def _decide(layer, x, m, asked, compute_dtype, out_dtype) -> Plan:
    def torch_plan(reason):
        if use_half(x.device, x.dtype, compute_dtype, out_dtype):
            return Plan("torch", compute_dtype, out_dtype, asked, reason, half=True)
        split = use_split16(x.device, x.dtype, compute_dtype, out_dtype,
                            m * layer.base_layer.out_features)
        return Plan("torch", compute_dtype, out_dtype, asked, reason, split16=split)

    if layer.merged:
        return Plan("merged", compute_dtype, out_dtype, asked,
                    "ΔW is merged into the base weight")
    if asked == "reference":
        return torch_plan("the reference backend was asked for")
    if asked == "auto" and not (x.is_cuda and any(a <= m <= b for a, b in AUTO_KERNEL_ROWS)):
        return torch_plan("auto: no committed measurement shows the kernels faster here"
                          if x.is_cuda else f"auto: {x.device.type} tensors")
    why = _kernel_refusal(layer, x, compute_dtype)
    if why is not None:
        if asked == "triton":
            raise RuntimeError(f"{backend.describe(layer)} asks for the Triton kernels, but they "
                               f"cannot compute this call of {layer._label()}: {why}")
        return torch_plan(f"auto: the kernels cannot take this call ({why})")
    return _kernel_plan(layer, m, asked, compute_dtype, out_dtype)


def _kernel_plan(layer, m, asked, compute_dtype, out_dtype) -> Plan:
    from .ops import interpreting
    from .ops.configs import CUBLAS_MIN_M, GEMV_MAX_M, gemv_config, pick_config

    n, k = layer.base_layer.out_features, layer.base_layer.in_features
    if layer.is_quantized and 0 < m <= GEMV_MAX_M:
        return Plan("gemv", compute_dtype, out_dtype, asked,
                    f"NF4 at M <= {GEMV_MAX_M}: the split-K GEMV (launch shape not yet measured "
                    "on a GPU)", config=gemv_config(n, k))
    if layer.is_quantized and m >= CUBLAS_MIN_M and not interpreting():
        return Plan("large_m", compute_dtype, out_dtype, asked,
                    f"M >= {CUBLAS_MIN_M}: decode once + cuBLAS beats streaming NF4 per tile")
    reason = ("the fused kernel" + ("" if m < CUBLAS_MIN_M or not layer.is_quantized
                                    else " (the interpreter runs no cuBLAS path)"))
    return Plan("fused", compute_dtype, out_dtype, asked, reason,
                config=pick_config(max(m, 1), n, k))
