"""The benchmark harness: every measurement of the package, one case model, one timer, one
result format, one report.

``tinylora-kernels bench`` runs the suite; each other measurement is a mode of the same command.
Every mode returns a result in the one format of :mod:`.report` (raw JSON with the environment
and the timing method, a Markdown table generated from it; ``--compare`` compares any two).

* the suite (:mod:`.suite`): one linear of a model (``q_proj`` ... ``down_proj``),
  ``decoder_layer`` (its 7 linears in a row) or ``stack<N>`` (N decoder layers), at M rows, in
  a mode: ``fwd`` (forward, no grad), ``bwd`` (grad x and grad v, the forward's graph given) or
  ``fwd+bwd``; against the floor, with a plot; fwd + bwd is checked against fwd+bwd
  (:func:`.report.consistency`). Providers, on identical inputs (:mod:`.cases`):
  ``materialized`` (the users' layer: bitsandbytes + ΔW rebuilt per call), ``peft_style``
  (bitsandbytes + the factorized adapter in torch), ``bnb_base`` (bitsandbytes alone),
  ``dense_bf16`` (torch linear on the unquantized weight + the adapter), ``reference`` (this
  package's torch path), ``fused`` (its Triton kernels), ``fused_no_adapter`` (the same kernels,
  adapter compiled out);
* ``--parts`` (:mod:`.parts`): the prefill forward piece by piece;
* ``--host-cost`` (:mod:`.host`): per-call host cost of a layer against ``Linear4bit``;
* ``--setup`` (:mod:`.setup_cost`): ``apply_tiny_lora``'s SVD set-up, with and without cache;
* ``--gemv-sweep`` (:mod:`.gemv`): the NF4 GEMV's launch shapes (GPU);
* ``--generate`` (:mod:`.generate`): eager ``generate`` tokens/s, adapter on and off;
* ``--adapters`` (:mod:`.adapters`): a v per row against one shared v;
* ``--compiled`` (:mod:`tinylora_kernels.static_report`): the kernels' SASS projected against
  the roofline (no timing).

Timing (:mod:`.timing`): on a GPU ``triton.testing.do_bench`` (CUDA events, L2 flushed; decode
cases also under a CUDA graph); on a CPU (and for host cost) wall-clock rounds with the
contenders interleaved. The floor: max(bytes / copy bandwidth, FLOPs / matmul rate), both
measured in the run.
"""

from .adapters import adapter_batch_cost
from .cases import (MODELS, MODES, NF4_BYTES_PER_WEIGHT, PROVIDER_DESCRIPTIONS, PROVIDERS, RANK,
                    U, Case, default_cases, provider_missing)
from .gemv import gemv_sweep
from .generate import generate_cost
from .host import HOST_COST_TARGETS, count_ops, host_cost
from .parts import prefill_parts
from .report import SCHEMA, compare, consistency, markdown, result, upgrade, write
from .setup_cost import setup_cost
from .suite import DTYPES, make_workload, plot, run_suite
from .timing import (capture_cuda_graph, environment, floor_us, graph_time, measure,
                     measure_ceilings, timing_method)

__all__ = ["MODELS", "PROVIDERS", "MODES", "Case", "default_cases", "make_workload", "run_suite",
           "provider_missing", "markdown", "write", "compare", "consistency", "upgrade",
           "result", "SCHEMA", "host_cost", "count_ops", "gemv_sweep", "prefill_parts",
           "setup_cost", "generate_cost", "adapter_batch_cost", "measure", "timing_method",
           "capture_cuda_graph", "graph_time", "measure_ceilings", "floor_us", "environment",
           "DTYPES", "plot", "HOST_COST_TARGETS", "NF4_BYTES_PER_WEIGHT",
           "PROVIDER_DESCRIPTIONS", "RANK", "U"]
