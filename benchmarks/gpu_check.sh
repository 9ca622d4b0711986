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

# CUDA tier: the kernel tests run on the GPU (bf16 included), the rest of the suite as on CI
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fused_forward.py 2>&1 \
    | tee "$OUT/gpu_tests_fused.log" | tail -n 15
timeout 120 python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_fused_forward.py \
    2>&1 | tee "$OUT/gpu_tests_rest.log" | tail -n 5

timeout 240 python3 benchmarks/gpu_forward.py --out "$OUT/gpu_forward.json" 2>&1 \
    | tee "$OUT/gpu_forward.log" | tail -n 30
