"""NF4 storage as bitsandbytes writes it, and its decode, in plain torch.

This module is the executable specification of the format (see NF4_FORMAT.md in the project's
docs): every kernel that reads NF4 is tested against :func:`dequantize_nf4`, which is itself tested
bit for bit against ``bitsandbytes.functional.dequantize_4bit``.

Layout of a logical (N, K) weight, element e = n*K + k of the flattened tensor:

* ``packed``: uint8, ``(N*K + 1) // 2`` bytes; byte e // 2 holds element e in its HIGH nibble when
  e is even and in its LOW nibble when e is odd.
* ``absmax``: one scale per ``blocksize`` consecutive elements of the flattened tensor (so blocks
  may straddle rows when K is not a multiple of the block size). Either fp32, or, with double
  quantization, uint8 indices into ``code2`` rescaled per group of ``blocksize2`` (256) blocks:
  ``scale[b] = code2[absmax[b]] * absmax2[b // 256] + offset`` (two separately rounded fp32 ops).
* ``w[e] = code[nibble(e)] * scale[e // blocksize]`` in fp32, then cast to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["NF4_CODE", "NF4Weight", "dequantize_nf4", "nf4_block_scales", "is_cpu_packed",
           "restore_canonical_layout"]

# The 16 NF4 levels (bitsandbytes' table, index = 4-bit code). Used when a quant state carries
# no table of its own; a quant state's own ``code`` always wins.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class NF4Weight:
    """One NF4-quantized (N, K) weight, exactly as bitsandbytes stores it.

    The tensors are the bitsandbytes tensors themselves (views, never copies), so building one of
    these per call costs no memory traffic.
    """

    packed: torch.Tensor            # uint8, flat, (N*K + 1) // 2 bytes
    absmax: torch.Tensor            # fp32 (nblocks,) or, with double quant, uint8 (nblocks,)
    code: torch.Tensor              # fp32 (16,): the NF4 levels
    shape: Tuple[int, int]          # (N, K) = (out_features, in_features)
    dtype: torch.dtype              # the dtype bitsandbytes decodes to (quant_state.dtype)
    blocksize: int = 64
    absmax2: Optional[torch.Tensor] = None   # fp32 (ceil(nblocks / blocksize2),), double quant only
    code2: Optional[torch.Tensor] = None     # fp32 (256,), double quant only
    offset: Optional[torch.Tensor] = None    # 0-dim fp32 on the device, double quant only
    blocksize2: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_bnb(cls, weight) -> "NF4Weight":
        """Wrap a bitsandbytes ``Params4bit`` (``Linear4bit.weight``) without copying.

        Raises ``ValueError`` naming the problem when the storage is not plain NF4 in the layout
        above (FP4, or bitsandbytes' CPU-specific packed layout).
        """
        qs = getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("this 4-bit weight has no quant_state: it was never quantized "
                             "(move the layer to a device, or load the model with a "
                             "BitsAndBytesConfig, before using it)")
        return cls.from_quant_state(weight.data, qs)

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, qs) -> "NF4Weight":
        """Wrap packed bytes and a bitsandbytes ``QuantState``."""
        if qs.quant_type != "nf4":
            raise ValueError(f"only NF4 storage is supported, this weight is {qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(
                "this weight is in bitsandbytes' CPU-specific packed layout "
                "(quant_state.packing_format_for_cpu=True), written in place by an eval-mode CPU "
                "forward of Linear4bit; it is not the NF4 layout. Undo it with "
                "tinylora_kernels.bnb.restore_canonical_layout(layer) first.")
        if len(qs.shape) != 2:
            raise ValueError(f"expected a 2-D quantized weight, quant_state.shape={tuple(qs.shape)}")
        n, k = (int(s) for s in qs.shape)
        # quant_storage may be bf16/fp16/fp32 (FSDP): the bytes are the same, reinterpret them.
        flat = packed.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        nbytes = (n * k + 1) // 2
        if flat.numel() < nbytes:
            raise ValueError(f"packed storage holds {flat.numel()} bytes, an ({n}, {k}) NF4 weight "
                             f"needs {nbytes}")
        code = qs.code if qs.code is not None else torch.tensor(NF4_CODE, device=flat.device)
        if qs.nested:
            return cls(packed=flat[:nbytes], absmax=qs.absmax, code=code, shape=(n, k),
                       dtype=qs.dtype, blocksize=int(qs.blocksize), absmax2=qs.state2.absmax,
                       code2=qs.state2.code, offset=qs.offset,
                       blocksize2=int(qs.state2.blocksize))
        return cls(packed=flat[:nbytes], absmax=qs.absmax, code=code, shape=(n, k),
                   dtype=qs.dtype, blocksize=int(qs.blocksize))


def nf4_block_scales(w: NF4Weight) -> torch.Tensor:
    """The fp32 scale of every block, double quantization decoded (nblocks,)."""
    if not w.double_quant:
        return w.absmax.float()
    group = torch.arange(w.absmax.numel(), device=w.absmax.device) // w.blocksize2
    # Multiply, then add, as two rounded fp32 ops: that is what bitsandbytes computes.
    scaled = w.code2.float()[w.absmax.long()] * w.absmax2.float()[group]
    return scaled + w.offset.float()


def dequantize_nf4(w: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Decode an NF4 weight to a dense (N, K) tensor in ``dtype`` (default: ``w.dtype``).

    Bit-identical to ``bitsandbytes.functional.dequantize_4bit`` for fp32, fp16 and bf16.
    """
    dtype = w.dtype if dtype is None else dtype
    n, k = w.shape
    numel = n * k
    if numel == 0:
        return torch.empty(n, k, dtype=dtype, device=w.device)
    # Both nibbles of every byte through one 256-entry table: row b = (code[b >> 4], code[b & 15]).
    byte = torch.arange(256, device=w.device)
    pair_table = torch.stack((w.code.float()[byte >> 4], w.code.float()[byte & 15]), dim=1)
    levels = pair_table[w.packed.long()].reshape(-1)          # 2 * nbytes >= numel
    nblocks = w.nblocks
    padded = nblocks * w.blocksize
    if levels.numel() < padded:
        levels = torch.nn.functional.pad(levels, (0, padded - levels.numel()))
    else:
        levels = levels[:padded]
    scales = nf4_block_scales(w)[:nblocks]
    values = levels.view(nblocks, w.blocksize) * scales[:, None]
    return values.reshape(-1)[:numel].view(n, k).to(dtype)


# bitsandbytes' CPU-only layout: recognised and undone here, with the format it departs from (the
# rest of the bitsandbytes glue is tinylora_kernels.bnb, above this module)
def is_cpu_packed(layer) -> bool:
    """Whether bitsandbytes repacked this layer's weight into its CPU-only layout."""
    qs = getattr(layer.weight, "quant_state", None)
    return qs is not None and bool(getattr(qs, "packing_format_for_cpu", False))


def restore_canonical_layout(layer) -> bool:
    """Undo bitsandbytes' in-place CPU repacking of a ``Linear4bit``, if it happened.

    bitsandbytes (0.50, CPUs with AVX512-BF16) rewrites ``weight.data`` into a CPU-specific layout
    at the first eval-mode forward. It undoes this itself before moving a layer to a GPU or saving
    it; this does the same so that the NF4 layout holds again. The block scales stay rounded to
    bf16 (that rounding is what the layer computes with from then on). Returns True when the
    layout was restored.
    """
    if not is_cpu_packed(layer):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
        weight.data, weight.quant_state)
    return True
