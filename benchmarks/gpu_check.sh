#!/usr/bin/env bash
# The whole GPU job in one call: environment, the CUDA test tier, the forward benchmark.
# Raw results go to $OUT (default benchmarks/results); the short table is printed last.
# On the project's GPU machines bitsandbytes comes staged in .device-site (see README).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers, bitsandbytes as b; print('torch', torch.__version__, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| bitsandbytes', \
b.__version__, '|', torch.cuda.get_device_name())"

# CUDA tier: what the interpreter cannot check (bf16, compiled code paths, bitsandbytes' CUDA
# decode); the CPU tiers run in CI. GPU_TESTS=all runs every kernel case (slow: compiles),
# GPU_TESTS=none skips the tier (the benchmark still checks each case against float64).
# GPU_SWEEP=1 adds a sweep of the fused kernel's decode tile shapes.
sel=${GPU_TESTS:-"(bf16 and nf4) or layer or dequant or bit_exact"}
if [ "$sel" = all ]; then sel=""; fi
if [ "$sel" != none ]; then
    timeout 55 python3 -m pytest -q -p no:cacheprovider tests/test_fused_forward.py \
        tests/test_nf4.py -k "$sel" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 12
fi

timeout 125 python3 benchmarks/gpu_forward.py ${GPU_SWEEP:+--sweep} --out "$OUT/gpu_forward.json" 2>&1 \
    | tee "$OUT/gpu_forward.log" | tail -n 32

# GPU_BACKWARD=1: the backward pass and a 4-layer training step (PERF_TARGETS T7)
if [ -n "${GPU_BACKWARD:-}" ]; then
    timeout 240 python3 benchmarks/gpu_backward.py --out "$OUT/gpu_backward.json" 2>&1 \
        | tee "$OUT/gpu_backward.log" | tail -n 20
fi
