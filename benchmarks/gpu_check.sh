#!/usr/bin/env bash
# The whole GPU job in one call: environment, the CUDA test tier, the benchmark suite (forward
# and training at the 3B shapes, the 4-layer training step), the backward per layer.
# Raw results go to $OUT (default benchmarks/results); short tables are printed last.
# On the project's GPU machines bitsandbytes comes staged in .device-site (see README).
#
#   GPU_TESTS=all|none|<pytest -k expr>   which CUDA tests (default: what the interpreter cannot
#                                         check: bf16, compiled paths, bitsandbytes' CUDA decode)
#   GPU_BENCH_S=170                       time budget of the benchmark suite (0: skip it)
#   GPU_GEMV=0                            skip the NF4 GEMV launch-shape sweep (decode, M = 1, 4)
#   GPU_HOST=0                            skip the per-call host cost (reference and kernels)
#   GPU_TRAIN=0                           skip the 4-layer training step
#   GPU_BACKWARD=0                        skip the per-layer backward benchmark
#   GPU_PARTS=0                           skip the prefill forward's part-by-part timing
#   GPU_FORWARD=1                         also run gpu_forward.py (GPU_SWEEP=1: decode tile sweep)
#   GPU_JSON_ONLY=1                       leave only JSON and the test log in $OUT (the tables
#                                         and plots are regenerated from the JSON afterwards)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
T0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - T0 )) s)"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers, bitsandbytes as b; print('torch', torch.__version__, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| bitsandbytes', \
b.__version__, '|', torch.cuda.get_device_name())"

# (each kernel variant compiles on first use: the whole tier takes several minutes; the default
# keeps what only a GPU can check and fits ~2 minutes)
sel=${GPU_TESTS:-"(bf16 and (nf4 or dequant or decode or bit_exact)) or compile or import_onto or gemv"}
if [ "$sel" = all ]; then sel=""; fi
if [ "$sel" != none ]; then
    stamp "CUDA tests"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_forward.py \
        tests/test_nf4.py tests/test_backward.py tests/test_interop.py tests/test_peft_import.py \
        tests/test_router.py tests/test_ops.py tests/test_nf4_gemv.py \
        -k "$sel" > "$OUT/gpu_tests.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 12
fi

BENCH_S=${GPU_BENCH_S:-170}
if [ "$BENCH_S" != 0 ]; then
    stamp "benchmark suite"
    timeout $(( BENCH_S + 60 )) python3 -m tinylora_kernels bench --m 1,16,4096 \
        --modes fwd,fwd+bwd --budget-s "$BENCH_S" --out "$OUT" --name bench-gpu \
        > /tmp/bench-gpu.log 2>&1; tail -n 1 /tmp/bench-gpu.log
fi
if [ "${GPU_GEMV:-1}" != 0 ]; then
    stamp "NF4 GEMV launch shapes"
    timeout 150 python3 -m tinylora_kernels bench --gemv-sweep --out "$OUT" --name gemv-sweep \
        2>&1 | grep -v Warning | tail -n 16
fi
if [ "${GPU_HOST:-1}" != 0 ]; then
    stamp "host cost per layer call"
    timeout 90 python3 -m tinylora_kernels bench --host-cost --out "$OUT" --name host-cost-gpu \
        2>&1 | tail -n 4
fi
if [ "${GPU_TRAIN:-1}" != 0 ]; then
    stamp "training step, 4 decoder layers"
    timeout 100 python3 -m tinylora_kernels bench --layers stack4 --m 4096 --modes fwd+bwd \
        --budget-s 60 --out "$OUT" --name bench-gpu-train \
        > /tmp/bench-gpu-train.log 2>&1; tail -n 1 /tmp/bench-gpu-train.log
fi
if [ "${GPU_BACKWARD:-1}" != 0 ]; then
    stamp "backward per layer"
    timeout 150 python3 benchmarks/gpu_backward.py --out "$OUT/gpu_backward.json" 2>&1 \
        | grep -v Warning | tail -n 12
fi
if [ "${GPU_PARTS:-1}" != 0 ]; then
    stamp "prefill forward, part by part"
    timeout 60 python3 benchmarks/gpu_prefill_parts.py --out "$OUT/gpu_prefill_parts.json" 2>&1 \
        | tail -n 6
fi
if [ -n "${GPU_FORWARD:-}" ]; then
    stamp "forward detail"
    timeout 125 python3 benchmarks/gpu_forward.py ${GPU_SWEEP:+--sweep} \
        --out "$OUT/gpu_forward.json" 2>&1 | tail -n 32
fi
if [ -n "${GPU_JSON_ONLY:-}" ]; then rm -f "$OUT"/*.md "$OUT"/*.png; fi
stamp "done"
