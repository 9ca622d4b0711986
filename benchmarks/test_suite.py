"""The benchmark suite under pytest-benchmark.

``pytest benchmarks --benchmark-json=out.json`` times every (case, provider) of a small default
set; ``--benchmark-disable`` runs each once as a smoke test (what CI does). The full suite with
the floor, tables and plots is ``tinylora-kernels bench``.
"""

import pytest
import torch

from tinylora_kernels import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench.default_cases(DEVICE, ms=[1, 16] if DEVICE == "cpu" else [1, 16, 4096],
                            modes=("fwd", "fwd+bwd"),
                            layers=["gate_proj", "k_proj", "decoder_layer"])
_BUILT = {}


@pytest.mark.parametrize("provider", bench.PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.layer}-M{c.M}-{c.mode}")
def test_provider(benchmark, case, provider):
    why = bench.provider_missing(provider, DEVICE, case.mode)
    if why is not None:
        pytest.skip(why)
    fn = bench.make_workload(case, provider, DEVICE, _BUILT)
    if DEVICE == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)
