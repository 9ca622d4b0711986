#!/usr/bin/env bash
# The whole GPU job in one call, at most 8 minutes by default (GPU_TOTAL_S): environment, the CUDA tests of the
# default path, then the benchmark harness (`python3 -m tinylora_kernels bench`, nothing else):
# one Qwen2.5-Coder-3B decoder layer at M = 1, 16, 512, 4096, forward (eager, and replayed from
# a CUDA graph for M <= 16) and fwd+bwd, against bitsandbytes alone and bitsandbytes + the
# factorized adapter; where the time of a decoder-layer call goes (every operation, host and
# device); the per-call host cost; eager and static-cache (compiled) generate on two 3B-shaped
# 4-bit decoder layers.
# Raw results (one JSON format) go to $OUT (default benchmarks/results); a short table last.
# On the project's GPU machines bitsandbytes comes staged in .device-site (see README).
#
#   GPU_TESTS=all|none|<pytest -k expr>   which CUDA tests (default: the default path's: the
#                                         half form, bf16, no host sync; GPU_TESTS=kernels: what
#                                         the interpreter cannot check of the kernels)
#   GPU_BENCH_S=100                       time budget of the suite (0: skip it)
#   GPU_PROVIDERS=reference,bnb_base,peft_style   the suite's contenders (add fused: the kernels)
#   GPU_PROFILE=0                         skip the per-operation profile
#   GPU_HOST=0                            skip the per-call host cost (reference and kernels)
#   GPU_GENERATE=0                        skip generate on 3B-shaped layers
#   GPU_GEMV=1                            also the NF4 GEMV launch-shape sweep (M = 1, 4)
#   GPU_TRAIN=1                           also the 4-decoder-layer training step
#   GPU_PARTS=1                           also the prefill forward's part by part timing
#   GPU_TOTAL_S=470                       the whole script's time; each step gets at most what is
#                                         left of it (a step with under 10 s left is skipped)
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
TOTAL_S=${GPU_TOTAL_S:-470}
# seconds a step that wants $1 may take: at most what is left of TOTAL_S (0: skip the step)
cap() {
    local left=$(( TOTAL_S - ($(date +%s) - T0) ))
    if (( left > $1 )); then left=$1; fi
    if (( left < 10 )); then left=0; fi
    echo "$left"
}
skipped() { echo "   skipped: no time left of GPU_TOTAL_S=$TOTAL_S"; }
BENCH=(python3 -m tinylora_kernels bench --out "$OUT")    # every measurement below is a mode

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, transformers, bitsandbytes as b; print('torch', torch.__version__, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| bitsandbytes', \
b.__version__, '|', torch.cuda.get_device_name())"

sel=${GPU_TESTS:-"cuda"}
files=(tests/test_half_form.py)
if [ "$sel" = kernels ]; then
    # (each kernel variant compiles on first use: the whole tier takes several minutes)
    sel="(bf16 and (nf4 or dequant or decode or bit_exact)) or compile or import_onto or gemv"
    files=(tests/test_fused_forward.py tests/test_nf4.py tests/test_backward.py
           tests/test_interop.py tests/test_peft_import.py tests/test_router.py tests/test_ops.py
           tests/test_nf4_gemv.py)
fi
if [ "$sel" = all ]; then sel=""; files=(tests); fi
if [ "$sel" != none ]; then
    stamp "CUDA tests"
    timeout "$(cap 120)" python3 -m pytest -q -p no:cacheprovider "${files[@]}" -k "$sel" \
        > "$OUT/gpu_tests.log" 2>&1
    echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 12
fi

BENCH_S=${GPU_BENCH_S:-100}
S=$(cap $(( BENCH_S + 60 )))
if [ "$BENCH_S" != 0 ] && [ "$S" = 0 ]; then skipped; fi
if [ "$BENCH_S" != 0 ] && [ "$S" != 0 ]; then
    stamp "suite: one decoder layer, forward, backward, fwd+bwd"
    BENCH_S=$(( S - 60 < BENCH_S ? (S - 60 > 10 ? S - 60 : 10) : BENCH_S ))
    timeout "$S" "${BENCH[@]}" --layers decoder_layer --m 1,16,512,4096 \
        --modes fwd,bwd,fwd+bwd --providers "${GPU_PROVIDERS:-reference,bnb_base,peft_style}" \
        --budget-s "$BENCH_S" --name bench-gpu > /tmp/bench-gpu.log 2>&1
    tail -n 1 /tmp/bench-gpu.log
fi
if [ "${GPU_PROFILE:-1}" != 0 ]; then
    stamp "where a decoder-layer call's time goes"
    S=$(cap 75); if [ "$S" = 0 ]; then skipped; else timeout "$S" "${BENCH[@]}" --profile --m 1,4096 --name profile-gpu 2>&1 | grep -- "^- "; fi
fi
if [ "${GPU_GEMV:-0}" != 0 ]; then
    stamp "NF4 GEMV launch shapes"
    S=$(cap 150); if [ "$S" = 0 ]; then skipped; else
    timeout "$S" "${BENCH[@]}" --gemv-sweep --name gemv-sweep 2>&1 | grep -v Warning | tail -n 16; fi
fi
if [ "${GPU_HOST:-1}" != 0 ]; then
    stamp "host cost per layer call"
    S=$(cap 75); if [ "$S" = 0 ]; then skipped; else
    timeout "$S" "${BENCH[@]}" --host-cost --name host-cost-gpu 2>&1 | grep -- "^- " | tail -n 6; fi
fi
if [ "${GPU_GENERATE:-1}" != 0 ]; then
    stamp "generate, two 3B-shaped decoder layers"
    S=$(cap 120); if [ "$S" = 0 ]; then skipped; else
    timeout "$S" "${BENCH[@]}" --generate --models qwen2.5-coder-3b --decoder-layers 2 \
        --name generate-gpu 2>&1 | grep -- "^- " | tail -n 4; fi
fi
if [ "${GPU_TRAIN:-0}" != 0 ]; then
    stamp "training step, 4 decoder layers"
    S=$(cap 100); if [ "$S" = 0 ]; then skipped; else timeout "$S" "${BENCH[@]}" --layers stack4 --m 4096 --modes fwd+bwd --budget-s 60 \
        --name bench-gpu-train > /tmp/bench-gpu-train.log 2>&1; tail -n 1 /tmp/bench-gpu-train.log; fi
fi
if [ "${GPU_PARTS:-0}" != 0 ]; then
    stamp "prefill forward, part by part"
    S=$(cap 90); if [ "$S" = 0 ]; then skipped; else
    timeout "$S" "${BENCH[@]}" --parts --budget-s 40 --name parts-gpu 2>&1 | tail -n 1; fi
fi
stamp "done"
# the short table: the suite's decoder-layer rows, and its consistency check
if [ -f "$OUT/bench-gpu.md" ]; then
    grep -E "^\| (model|---)|decoder_layer" "$OUT/bench-gpu.md" | head -n 16
    sed -n '/^Consistency/,$p' "$OUT/bench-gpu.md" | grep decoder_layer | head -n 8
fi
if [ -n "${GPU_JSON_ONLY:-}" ]; then rm -f "$OUT"/*.md "$OUT"/*.png; fi
