"""Compile every Triton kernel specialization the package can launch, for real GPUs, without one.

Triton compiles for NVIDIA targets on any machine: its wheel bundles ``ptxas``, ``nvdisasm`` and
``cuobjdump``. What it cannot do without a GPU is *choose* the specialization, so the launches are
captured instead of run: :class:`capture` replaces ``JITFunction.run`` for the duration with a
function that binds the real arguments exactly as the JIT does (Triton's own binder for the CUDA
backend of the target: pointer dtypes, constexprs, ints equal to 1, ``tt.divisibility`` of sizes
and of 16-byte aligned pointers) and records the launch; nothing is launched, outputs stay unwritten.
The package's launchers are then called with CPU tensors of the shapes, dtypes and strides of real
calls (:func:`planned_calls`), their shape checks' "CPU tensor" refusal lifted, and every distinct
specialization is compiled with ``triton.compile`` (:func:`compile_all`) down to a cubin.

The interpreter (``TRITON_INTERPRET=1``) runs kernels as Python and never type-checks them as the
compiler does: an error there shows only here, or on a GPU. ``python -m
tinylora_kernels.compile_check`` exits non-zero when any specialization fails to compile; it must
run without ``TRITON_INTERPRET`` (it removes it from its own environment before importing
Triton; from Python, call :func:`main` in a fresh process).

What is captured (the router's dispatch table, :mod:`tinylora_kernels.ops.configs`):

* NF4 (double quantization or not; packed storage as uint8, or as bf16/fp16/fp32 reinterpreted,
  as ``bnb_4bit_quant_storage`` does) and dense (bf16, fp16, fp32) weights;
* activations bf16, fp16, fp32; bias and no bias; adapter and no adapter;
* the GEMV at M = 1, 2, 3, 4 (split over K, and not; with the register prefetch; its grouped
  form, as q/k/v), the fused kernel and its grouped form at the
  M classes of the config table, decode + cuBLAS at large M (the decode kernel), the backward
  kernel at each M class;
* shapes of each divisibility class: N and K multiples of 16 (the real layers), N odd, K not a
  multiple of 128.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

import torch

__all__ = ["TARGETS", "Launch", "capture", "planned_calls", "compile_all", "main"]

#: name -> (backend, compute capability, warp size)
TARGETS = {"sm_90": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32), "sm_100": ("cuda", 100, 32)}


@dataclass
class Launch:
    """One captured kernel launch, as the JIT would have specialized it."""

    kernel: str                 # the kernel function's name
    module: str                 # where it is defined (workers import it from there)
    signature: Dict[str, str]
    constexprs: Dict[tuple, object]
    attrs: Dict[tuple, object]
    options: Dict[str, object]
    grid: Tuple[int, ...]
    labels: List[str] = field(default_factory=list)    # the calls that launched it

    def key(self) -> tuple:
        return (self.module, self.kernel, tuple(self.signature.items()),
                tuple(sorted(self.constexprs.items(), key=repr)),
                tuple(sorted(((k, repr(v)) for k, v in self.attrs.items()), key=repr)),
                tuple(sorted((k, repr(v)) for k, v in self.options.items())))

    def constexpr_values(self) -> Dict[str, object]:
        """Constexprs by parameter name (paths of one element)."""
        names = list(self.signature)
        return {names[path[0]]: v for path, v in self.constexprs.items() if len(path) == 1}


def _target(name: str):
    from triton.backends.compiler import GPUTarget

    backend, arch, warp = TARGETS[name]
    return GPUTarget(backend, arch, warp)


def bind_launch(fn, backend, binders: dict, args, kwargs):
    """(bound arguments, options, signature, constexprs, attrs) of ``fn[grid](*args, **kwargs)``
    as the JIT would specialize it for ``backend`` (Triton's own binder, kept per kernel in
    ``binders``)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = binders.get(id(fn))
    if binder is None:
        binder = binders[id(fn)] = create_function_from_signature(fn.signature, fn.params,
                                                                  backend)
    bound, spec, opts = binder(*args, **kwargs)
    return (bound, *fn._pack_args(backend, kwargs, bound, spec, opts))


class capture(contextlib.ContextDecorator):
    """Within the block, Triton kernel launches are recorded (for ``target``), not run."""

    def __init__(self, target: str = "sm_90"):
        self.target = target
        self.launches: List[Launch] = []
        self.label = ""

    def __enter__(self):
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction

        from .ops import configs, fused_linear, grad_x

        backend = make_backend(_target(self.target))
        binders: dict = {}
        recorder = self

        def record(fn, *args, grid, warmup, **kwargs):
            bound, options, signature, constexprs, attrs = bind_launch(fn, backend, binders,
                                                                       args, kwargs)
            grid = grid(bound) if callable(grid) else grid
            recorder.launches.append(Launch(
                kernel=fn.fn.__name__, module=fn.fn.__module__, signature=dict(signature),
                constexprs=dict(constexprs), attrs=dict(attrs), options=dict(options.__dict__),
                grid=tuple(int(g) for g in grid), labels=[recorder.label]))
            return None

        original = configs.check_supported

        @functools.wraps(original)
        def cpu_allowed(x, weight, compute_dtype=None):
            why = original(x, weight, compute_dtype)
            if why is not None and why.startswith(f"x is on {x.device};"):
                return None
            return why

        self._saved = [(JITFunction, "run", JITFunction.run)]
        self._saved += [(m, "check_supported", m.check_supported)
                        for m in (configs, fused_linear, grad_x)]
        JITFunction.run = record
        for m in (configs, fused_linear, grad_x):
            m.check_supported = cpu_allowed
        return self

    def __exit__(self, *exc):
        for obj, name, value in self._saved:
            setattr(obj, name, value)
        return False


# -- the calls ----------------------------------------------------------------------------------
def random_nf4(n: int, k: int, double_quant: bool, storage: torch.dtype = torch.uint8,
               gen: Optional[torch.Generator] = None):
    """An :class:`~tinylora_kernels.nf4.NF4Weight` of random bytes, laid out as bitsandbytes
    lays out an (n, k) weight (``storage``: the dtype the packed bytes are held in)."""
    from .nf4 import NF4_CODE, NF4Weight

    gen = gen or torch.Generator().manual_seed(0)
    nbytes = (n * k + 1) // 2
    held = torch.randint(0, 256, (nbytes + (-nbytes % 4),), dtype=torch.uint8, generator=gen)
    if storage != torch.uint8:
        held = held.view(storage)
    packed = held.view(torch.uint8)[:nbytes]
    nblocks = -(-n * k // 64)
    code = torch.tensor(NF4_CODE)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=torch.rand(nblocks, generator=gen), code=code,
                         shape=(n, k), dtype=torch.bfloat16)
    return NF4Weight(packed=packed,
                     absmax=torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=gen),
                     code=code, shape=(n, k), dtype=torch.bfloat16,
                     absmax2=torch.rand(-(-nblocks // 256), generator=gen),
                     code2=torch.rand(256, generator=gen), offset=torch.tensor(0.01))


def _factors(n: int, k: int, rank: int = 2, gen=None):
    from .torch_path import AdapterFactors

    gen = gen or torch.Generator().manual_seed(1)
    return AdapterFactors(A=torch.randn(rank, k, generator=gen).bfloat16(),
                          B=torch.randn(n, rank, generator=gen).float(),
                          R=torch.randn(rank, rank, generator=gen).float())


#: (N, K) per divisibility class: the real layers' (multiples of 16) and odd ones
SHAPES_NF4 = {"aligned": (256, 2048), "n_odd": (200, 192)}
SHAPES_DENSE = {"aligned": (256, 2048), "odd": (200, 198)}
ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _m_classes():
    from .ops.configs import CONFIG_TABLE, CUBLAS_MIN_M, GEMV_MAX_M

    gemv = list(range(1, GEMV_MAX_M + 1))
    fused = sorted({GEMV_MAX_M + 1} | {int(m) for m, _, _ in CONFIG_TABLE if m != float("inf")}
                   | {CUBLAS_MIN_M - 1})
    return gemv, fused, CUBLAS_MIN_M


def _gemv_calls(w, bias, f, act, tag, dq, storage, ms, group_m, quick):
    """The GEMV's planned shape, one K slice (full matrix), and the planned shape with the
    register prefetch, at each M; at ``group_m`` q/k/v as a model call launches them (three
    projections, one launch)."""
    from .ops.configs import gemv_config
    from .ops.custom_ops import kernel_forward
    from .ops.nf4_gemv import nf4_gemv_group

    n, k = w.shape
    for m in ms:
        x = torch.randn(m, k).to(act)
        for variant in ("planned", "split1", "prefetch") if not quick else ("planned", "prefetch"):
            cfg = gemv_config(n, k)
            if variant != "planned":
                cfg = dataclasses.replace(cfg, **({"split": 1} if variant == "split1" else
                                                  {"prefetch": True}))
            yield (f"gemv {tag} M={m} split={cfg.split} prefetch={cfg.prefetch}",
                   functools.partial(kernel_forward, "gemv", x, w, bias, f, out_dtype=act,
                                     config=cfg))
        if m == group_m:
            n3 = max(16, n // 8)
            kv = (random_nf4(n3, k, dq, storage),
                  None if bias is None else torch.randn(n3).to(act),
                  None if f is None else _factors(n3, k))
            yield (f"gemv group {tag} M={m}", functools.partial(
                nf4_gemv_group, x, [(w, bias, f), kv, kv], out_dtype=act))


def planned_calls(matrix: str = "full") -> Iterator[Tuple[str, callable]]:
    """(label, call) for every specialization class the router can plan; ``matrix="quick"``:
    one call per kernel family and storage kind (the other targets' subset)."""
    from .ops.configs import pick_config
    from .ops.custom_ops import kernel_forward, kernel_grad_x
    from .ops.fused_linear import fused_linear_group
    from .ops.nf4_dequant import dequantize_nf4_triton

    gemv_ms, fused_ms, large_m = _m_classes()
    quick = matrix == "quick"
    storages = [("nf4-dq", True, torch.uint8), ("nf4", False, torch.uint8)]
    if not quick:
        storages += [("nf4-dq-" + str(s)[6:], True, s) for s in
                     (torch.bfloat16, torch.float16, torch.float32)]
    acts = ACT_DTYPES if not quick else (torch.bfloat16,)
    flags = list(itertools.product((True, False), (True, False))) if not quick else [(True, True)]
    for (sname, dq, storage), shape_name, act, (bias_on, adapter_on) in itertools.product(
            storages, SHAPES_NF4 if not quick else ["aligned"], acts, flags):
        n, k = SHAPES_NF4[shape_name]
        w = random_nf4(n, k, dq, storage)
        bias = torch.randn(n).to(act) if bias_on else None
        f = _factors(n, k) if adapter_on else None
        tag = f"{sname} {shape_name} {str(act)[6:]} bias={bias_on} adapter={adapter_on}"
        yield from _gemv_calls(w, bias, f, act, tag, dq, storage,
                               gemv_ms if not quick else [1, 4], max(gemv_ms), quick)
        for m in (fused_ms if not quick else [16]):
            x = torch.randn(m, k).to(act)
            g = torch.randn(m, n).to(act)
            yield (f"fused {tag} M={m}", functools.partial(
                kernel_forward, "fused", x, w, bias, f, out_dtype=act, store_ax=f is not None,
                config=pick_config(m, n, k)))
            yield (f"grad_x {tag} M={m}", functools.partial(kernel_grad_x, "fused", g, w, f,
                                                            x_dtype=act))
            if f is not None:
                w2 = random_nf4(n, k, dq, storage)
                yield (f"group {tag} M={m}", functools.partial(
                    fused_linear_group, x, [(w, bias, f), (w2, bias, f)], out_dtype=act,
                    config=pick_config(m, n, k)))
        if act != torch.float32:
            yield (f"decode {tag} M={large_m}",
                   functools.partial(dequantize_nf4_triton, w, act))
    # per-sequence adapters (adapter_set.py): each row reads its own R (B R for the GEMV)
    from .ops.fused_linear import launch_fused_linear
    from .ops.nf4_gemv import nf4_gemv
    from .torch_path import AdapterFactors

    for (sname, dq, storage), act in itertools.product(storages[:2], acts):
        n, k = SHAPES_NF4["aligned"]
        w = random_nf4(n, k, dq, storage)
        f = _factors(n, k)
        rows_f = AdapterFactors(A=f.A, B=f.B, R=torch.randn(5, 2, 2))
        tag = f"{sname} aligned {str(act)[6:]} per-row adapters"
        for m in (gemv_ms if not quick else [4]):
            x = torch.randn(m, k).to(act)
            codes = torch.arange(m, dtype=torch.int32) % 5
            yield (f"gemv {tag} M={m}", functools.partial(
                nf4_gemv, x, w, None, rows_f, out_dtype=act, row_codes=codes))
        for m in (fused_ms if not quick else [16]):
            x = torch.randn(m, k).to(act)
            codes = torch.arange(m, dtype=torch.int32) % 5
            yield (f"fused {tag} M={m}", functools.partial(
                launch_fused_linear, x, w, None, rows_f, out_dtype=act,
                config=pick_config(m, n, k), row_codes=codes))
    dense = [torch.bfloat16, torch.float16, torch.float32] if not quick else [torch.bfloat16]
    for wdt, shape_name, (bias_on, adapter_on) in itertools.product(
            dense, SHAPES_DENSE if not quick else ["aligned"], flags):
        n, k = SHAPES_DENSE[shape_name]
        w = torch.randn(n, k).to(wdt)
        bias = torch.randn(n).to(wdt) if bias_on else None
        f = _factors(n, k) if adapter_on else None
        tag = f"dense-{str(wdt)[6:]} {shape_name} bias={bias_on} adapter={adapter_on}"
        for m in ([1] + fused_ms if not quick else [16]):
            x = torch.randn(m, k).to(wdt)
            g = torch.randn(m, n).to(wdt)
            yield (f"fused {tag} M={m}", functools.partial(
                kernel_forward, "fused", x, w, bias, f, out_dtype=wdt, store_ax=f is not None,
                config=pick_config(m, n, k)))
            yield (f"grad_x {tag} M={m}", functools.partial(kernel_grad_x, "fused", g, w, f,
                                                            x_dtype=wdt))


def capture_all(target: str, matrix: str = "full") -> List[Launch]:
    """Every distinct launch of :func:`planned_calls` for ``target`` (labels merged)."""
    unique: Dict[tuple, Launch] = {}
    with capture(target) as cap:
        for label, call in planned_calls(matrix):
            cap.label = label
            before = len(cap.launches)
            call()
            if len(cap.launches) == before:
                raise AssertionError(f"{label}: launched no Triton kernel")
    for launch in cap.launches:
        key = launch.key()
        if key in unique:
            unique[key].labels.extend(launch.labels)
        else:
            unique[key] = launch
    return list(unique.values())


# -- compiling ------------------------------------------------------------------------------------
@dataclass
class Compiled:
    """The result of compiling one captured launch for one target (the cubin when it worked,
    the compiler's error when not)."""

    launch: Launch
    target: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    cubin: bytes = b""
    shared: int = 0


def _compile_one(launch: Launch, target: str) -> Compiled:
    import triton
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(launch.module), launch.kernel)
        src = ASTSource(fn, launch.signature, launch.constexprs, launch.attrs)
        kernel = triton.compile(src, target=_target(target), options=launch.options)
        return Compiled(launch, target, True, seconds=time.perf_counter() - t0,
                        cubin=kernel.asm.get("cubin", b""),
                        shared=int(getattr(kernel.metadata, "shared", 0)))
    except Exception as exc:                               # reported, not raised
        text = f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__ or exc.__context__
        while cause is not None:            # (Triton's message names the line; the cause, why)
            text += f"\n  caused by {type(cause).__name__}: {cause}"
            cause = cause.__cause__ or cause.__context__
        return Compiled(launch, target, False, error=text, seconds=time.perf_counter() - t0)


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(launches: List[Launch], target: str, jobs: int = 2,
                progress=None) -> List[Compiled]:
    """Compile each launch for ``target`` (``jobs`` processes); failures are returned, not
    raised."""
    results: List[Compiled] = []
    if jobs <= 1:
        for i, launch in enumerate(launches):
            results.append(_compile_one(launch, target))
            if progress:
                progress(i + 1, len(launches), results[-1])
        return results
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(_compile_one, launch, target) for launch in launches]
        for i, fut in enumerate(futures):
            results.append(fut.result())
            if progress:
                progress(i + 1, len(launches), results[-1])
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: capture and compile every specialization for the targets asked for;
    the exit code is 1 when any failed, 2 for bad arguments or TRITON_INTERPRET set."""
    parser = argparse.ArgumentParser(
        prog="python -m tinylora_kernels.compile_check",
        description="Compile every Triton kernel specialization the package can launch for real "
                    "GPU targets, on this machine, without a GPU. Exits with 1 when any fails.")
    parser.add_argument("--targets", default="sm_90",
                        help="comma-separated, from " + ", ".join(TARGETS) + " (default: sm_90)")
    parser.add_argument("--matrix", choices=("full", "quick"), default="full",
                        help="full: every specialization class (default); quick: one per "
                             "kernel family and storage kind")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="compiler processes (default: up to 4, one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; "
              "run this without it", file=sys.stderr)
        return 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"error: unknown target {bad[0]!r}; choose from {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    failed = 0
    for target in targets:
        t0 = time.perf_counter()
        launches = capture_all(target, args.matrix)
        print(f"{target}: {len(launches)} distinct specializations captured "
              f"({args.matrix} matrix); compiling with {args.jobs} processes", flush=True)

        def progress(i, total, res):
            if not res.ok or i == total or i % 25 == 0:
                print(f"  [{i}/{total}] {'ok  ' if res.ok else 'FAIL'} {res.launch.kernel} "
                      f"({res.launch.labels[0]}){'' if res.ok else ': ' + res.error[:400]}",
                      flush=True)

        results = compile_all(launches, target, args.jobs, progress)
        bad_ones = [r for r in results if not r.ok]
        failed += len(bad_ones)
        print(f"{target}: {len(results) - len(bad_ones)} compiled, {len(bad_ones)} failed "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
