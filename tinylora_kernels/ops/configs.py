"""The kernels' dispatch table in one place: tile configs, size thresholds and what they accept.

Importable without Triton: the router (:mod:`tinylora_kernels.router`) reads it to plan a call
before anything is compiled. Every threshold says where its value was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..nf4 import NF4Weight
from . import interpreting

__all__ = ["KernelConfig", "CONFIG_TABLE", "INTERPRETER_CONFIG", "pick_config",
           "check_supported", "CUBLAS_MIN_M", "EXT_ALIGN", "DECODE_TILE", "MAX_RANK",
           "GEMV_MAX_M", "GemvConfig", "gemv_config"]

DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest rank the kernel takes (the adapter is padded to a 16-wide tile for tl.dot).
MAX_RANK = 16

#: From this many rows up, an NF4 forward (and its backward) decodes the weight once into a
#: scratch matrix and lets cuBLAS do the product (the adapter rides in the same GEMM as extra K
#: columns); below, the fused kernel streams the packed weight. Measured on an H200
#: (benchmarks/results/h200/gpu_forward_v2.md, Qwen2.5-Coder-3B shapes): at M = 64 the fused
#: kernel was ahead on 3 of 4 shapes, at M = 256 decode + cuBLAS was ahead or level on all 4;
#: M = 128 was not measured.
CUBLAS_MIN_M = 128

#: The adapter's extra GEMM columns (3 r) are zero-padded to a multiple of this, so the GEMM's
#: contraction length stays a multiple of cuBLAS' K tile (64) when the layer's own K is.
EXT_ALIGN = 64

#: (rows, packed bytes per row) of one NF4 decode program: 16 KB of output, 16 bytes in per
#: thread.
DECODE_TILE = (16, 256)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of the fused kernel (see :func:`pick_config`)."""

    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8
    #: A x on the tensor cores (16-bit inputs only) instead of r CUDA-core reductions per step
    ax_dot: bool = False
    #: NF4 levels gathered from the 16-entry table (L1) instead of the register select tree
    table_lookup: bool = False
    #: A x after the K loop (products kept per element, reduced once: tiles.rows_ax) instead of
    #: r block-wide reductions inside it (16-row tiles: the loop then holds nothing of the
    #: adapter; larger tiles share one reduction among more rows and keep it in the loop)
    ax_after: bool = False


#: The fused kernel's configs by problem size: the first row with M <= m_max and N <= n_max wins.
#: Decode rows use one 16-row tile with N tiles narrow enough that N / BN programs cover the 132
#: SMs of an H100/H200; the sweep behind them is benchmarks/results/h200/gpu_forward_v3.*.
CONFIG_TABLE = (
    (16, 4096, KernelConfig(BM=16, BN=32, BK=64, num_warps=4, num_stages=4, ax_after=True)),
    (16, math.inf, KernelConfig(BM=16, BN=64, BK=64, num_warps=4, num_stages=4, ax_after=True)),
    (64, math.inf, KernelConfig(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)),
    (math.inf, math.inf, KernelConfig(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)),
)
#: Under the interpreter one small tile keeps CPU runs short.
INTERPRETER_CONFIG = KernelConfig(BM=16, BN=32, BK=64, num_warps=1, num_stages=1, ax_after=True)


def pick_config(M: int, N: int, K: int) -> KernelConfig:
    """The tile shape of the fused kernel for a problem: its one dispatch table.

    BK is 64 (the NF4 block: one scale per row per step, 32 bytes per row). By M:

    * M <= 16 (decode): one 16-row tile, N tiles narrow enough that N / BN programs cover the
      132 SMs of an H100/H200 (BN 32 for N <= 4096, 64 above);
    * M <= 64: 64-row tiles;
    * larger M: 128 x 128 tiles grouped along M for L2 reuse (the forward sends M above
      :data:`CUBLAS_MIN_M` to dequantize + cuBLAS instead, see the router).
    Under the interpreter one small tile keeps CPU runs short.
    """
    if interpreting():
        return INTERPRETER_CONFIG
    for m_max, n_max, cfg in CONFIG_TABLE:
        if M <= m_max and N <= n_max:
            return cfg
    raise AssertionError("CONFIG_TABLE ends with an unbounded row")


#: Rows of x the GEMV takes; larger M goes to the tensor-core kernels.
GEMV_MAX_M = 4


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the NF4 GEMV: BN rows x BKH packed bytes per step, K in ``split`` slices;
    ``prefetch``: each step first loads the next step's bytes and scales (two stages in
    registers: their memory latency overlaps the step's work, for ~20 % more instructions per
    step on sm_90). Off by default until a GPU measures it (``bench --gemv-sweep`` times both)."""

    BN: int
    BKH: int
    split: int
    num_warps: int = 4
    prefetch: bool = False


def gemv_config(n: int, k: int, sms: int = 132) -> GemvConfig:
    """The GEMV's launch shape for an (N, K) weight. NOT YET MEASURED on a GPU; chosen from the
    compiled SASS (``tinylora-kernels bench --compiled``, sm_90): BN = 32 rows of 128 bytes
    (4 KB of NF4 per program and step) issues 0.22 warp-instructions per weight with 124
    registers (4 programs of 4 warps per SM), against 0.24 at 16 x 256 (159 registers) and
    0.20 at 64 x 256 with 8 warps (236 registers, 1 program per SM); enough K slices that ~2
    programs per SM (132 on an H100/H200) are in flight, each slice at least 1024 weights long."""
    if interpreting():
        return GemvConfig(BN=16, BKH=32, split=1, num_warps=1)
    bn, bkh = 32, 128
    row_tiles = -(-n // bn)
    split = max(1, min(-(-2 * sms // row_tiles), k // 1024))
    return GemvConfig(BN=bn, BKH=bkh, split=split)


def check_supported(x: torch.Tensor, weight: Union[NF4Weight, torch.Tensor],
                    compute_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the kernel takes (x, weight), else the reason it does not.

    ``compute_dtype``: the dtype x will be cast to before the launch (default: x's own).
    """
    dtype = x.dtype if compute_dtype is None else compute_dtype
    if not (x.is_cuda or (interpreting() and x.device.type == "cpu")):
        return (f"x is on {x.device}; the Triton kernels run on CUDA devices, or on the CPU under "
                "TRITON_INTERPRET=1")
    wdev = weight.device
    if wdev != x.device:
        return f"x is on {x.device} but the weight is on {wdev}"
    if dtype not in DOT_DTYPES:
        return f"unsupported activation dtype {dtype}"
    if interpreting() and torch.bfloat16 in (dtype, x.dtype):
        # it truncates instead of rounding to bf16, and its bf16 dots are wrong
        return "Triton's interpreter mishandles bf16; bf16 runs on a GPU"
    if isinstance(weight, NF4Weight):
        if weight.shape[1] % weight.blocksize != 0:
            return (f"K={weight.shape[1]} is not a multiple of the NF4 block size "
                    f"{weight.blocksize}, so rows do not start on a block")
        if weight.blocksize != 64:
            return f"NF4 block size {weight.blocksize} is not supported by the kernel (64 is)"
        if weight.double_quant and weight.offset.device != x.device:
            return "the double-quant offset is not on the weight's device"
    elif weight.dtype not in DOT_DTYPES:
        return f"unsupported weight dtype {weight.dtype}"
    elif weight.shape[1] % 2:
        return f"K={weight.shape[1]} is odd; the kernel reads columns in pairs"
    return None
