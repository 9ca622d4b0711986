"""The benchmark suite: every path side by side, against the floor, on real model shapes.

``tinylora-kernels bench`` runs the default set and writes, under ``benchmarks/results/`` (or
``--out``), raw JSON with the environment, a Markdown table and (with matplotlib) a PNG of
time / floor by M, all generated from the JSON. ``tinylora-kernels bench --compare A.json B.json``
shows what got faster or slower beyond the noise.

Cases: one linear layer of a model (``q_proj`` ... ``down_proj``), ``decoder_layer`` (its 7
linears in a row) or ``stack<N>`` (N decoder layers), at M rows, in a mode: ``fwd``, ``bwd``
(grad x and grad v, the forward graph given) or ``fwd+bwd``. Providers, on identical inputs:

* ``materialized``: bitsandbytes 4-bit matmul + ΔW = U S R Vh rebuilt on every call (the users'
  layer);
* ``peft_style``: bitsandbytes 4-bit matmul + the factorized adapter in plain torch;
* ``bnb_base``: bitsandbytes 4-bit matmul alone, no adapter;
* ``dense_bf16``: ``F.linear`` on the unquantized weight + the factorized adapter;
* ``reference``: this package's TinyLoRALinear, reference path;
* ``fused``: this package's TinyLoRALinear through the Triton kernels (GPU, or the interpreter).

Timing: on a GPU, ``triton.testing.do_bench`` medians and 20/80 % quantiles (it flushes the L2
before every repetition), decode cases (M <= 16, fwd) also under a CUDA graph, and peak memory;
on a CPU, medians of wall-clock repetitions, reduced shapes, and a line saying that GPU figures need
a GPU. The floor: max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the run.

One harness, several modes, each a module of this package: :mod:`.suite` (the suite: fwd, bwd,
fwd+bwd, per linear, decoder layer or stack; reports and ``--compare``), :mod:`.host` (per-call
host cost), :mod:`.generate` (eager ``generate`` tokens/s), :mod:`.adapters` (a v per row
against one shared v), :mod:`.gemv` (GEMV launch shapes, GPU); the static projection of the
compiled kernels is :mod:`tinylora_kernels.static_report`. Cases and providers live in
:mod:`.cases`, the timing method and the environment record in :mod:`.timing`.
"""

from .cases import (MODELS, MODES, NF4_BYTES_PER_WEIGHT, PROVIDER_DESCRIPTIONS, PROVIDERS, RANK,
                    U, Case, _Linear, default_cases, provider_missing)
from .gemv import gemv_sweep
from .host import (HOST_COST_TARGETS, _host_layer, _OpCounter, count_ops, host_cost,
                   host_cost_markdown, write_host_cost)
from .suite import (_workload, compare, make_workload, markdown, plot, run_suite,
                    write_report)
from .timing import (_environment, _graph_time, _time, capture_cuda_graph, floor_us,
                     interleaved, measure_ceilings)

__all__ = ["MODELS", "PROVIDERS", "MODES", "Case", "default_cases", "make_workload", "host_cost",
           "host_cost_markdown", "write_host_cost", "count_ops", "gemv_sweep",
           "provider_missing", "run_suite", "markdown", "write_report", "compare",
           "capture_cuda_graph", "measure_ceilings", "floor_us"]
