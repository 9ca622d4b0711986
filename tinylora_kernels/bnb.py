"""Everything that touches bitsandbytes' ``Linear4bit``: recognise it, read its storage, run it.

bitsandbytes (0.50) has three CPU pitfalls this module steps around, so that no other module needs
to know them:

* an eval-mode forward on CPUs with AVX512-BF16 repacks the weight IN PLACE into a CPU-only layout
  (and rounds the block scales to bf16); :func:`restore_canonical_layout` undoes the layout;
* its CPU decode is wrong when K is not a multiple of the NF4 block size (64): the base product
  then uses this package's own decode (:func:`tinylora_kernels.nf4.dequantize_nf4`), which is
  bit-identical to bitsandbytes' where bitsandbytes is right;
* 0-row inputs crash its CPU kernel (SIGFPE): they are answered without calling it.

On a CPU, bitsandbytes decodes the whole weight at every call (its fast path exists only for CPUs
with AVX512-BF16, and repacks the weight in place). Here the base product on a CPU uses a decoded
copy of the weight in the compute dtype, kept per layer while a process-wide budget allows
(:func:`cpu_decoded_weight`; ``TINYLORA_CPU_DECODED_MB``, default 1024 MiB, 0 turns it off, read
once per model call: lowering it frees kept copies): the same bits as bitsandbytes' decode-then-
``linear``, without decoding again at every call. The NF4 storage stays as it is (the kernels, the
SVD and the checkpoints read it); layers beyond the budget decode per call, as bitsandbytes does.
On a CPU with AVX512-BF16, a bf16 call without grad may instead run bitsandbytes' own packed
kernel on a packed copy (:func:`cpu_packed_weight`), for the shapes where one timing at first use
found it faster than the decoded copy.

A kept copy can never go stale: it is tied to the CONTENT of the storage it was made from, not
to pointers, version counters or object identities (which ``weight.data.copy_(...)`` or an
in-place edit of ``quant_state.absmax`` leave unchanged). A check recomputes a fingerprint of
the packed bytes and of every quant-state tensor (:func:`storage_fingerprint`: small tensors
byte for byte, larger ones by the 64-bit word sum of every 512-byte block, one vectorized pass
over the packed bytes: ~5 % of a decoded bf16 M = 1 product, ~20–80 % of bitsandbytes' packed
one) and decodes again when it differs. Every call checks, except within one transformers
``generate`` call, where each copy is checked at the first decode step that uses it and trusted
for the rest of that ``generate`` (:mod:`tinylora_kernels.call_scope` says why and how).

``import bitsandbytes`` happens only inside the functions that need it.
"""

from __future__ import annotations

import logging
import math
import weakref
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import call_scope
from .fingerprint import storage_fingerprint
from .nf4 import NF4Weight, dequantize_nf4, is_cpu_packed, restore_canonical_layout

log = logging.getLogger(__name__)

__all__ = ["is_linear4bit", "nf4_of", "storage_identity", "storage_fingerprint",
           "restore_before_wrap",
           "linear4bit_compute_dtype", "linear4bit_forward",
           "restore_canonical_layout", "is_cpu_packed", "declare_adapter"]


def is_linear4bit(layer) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked without importing bitsandbytes)."""
    return hasattr(getattr(layer, "weight", None), "quant_state") or any(
        c.__name__ == "Linear4bit" for c in type(layer).__mro__)


def nf4_of(layer) -> NF4Weight:
    """The :class:`NF4Weight` view of a ``Linear4bit``'s storage (views, no copy)."""
    return NF4Weight.from_bnb(layer.weight)


def linear4bit_compute_dtype(layer, x: torch.Tensor) -> torch.dtype:
    """The dtype a ``Linear4bit`` computes in for x, with bitsandbytes' own (stateful) rule.

    A layer built without a compute dtype adopts the first input's dtype (fp32/bf16) for good.
    """
    if not getattr(layer, "compute_type_is_set", True):
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    return layer.compute_dtype or x.dtype


def storage_identity(weight) -> tuple:
    """Which tensors a 4-bit weight's NF4 view is made of (ids are unique while the kept view
    holds the old tensors alive)."""
    qs = weight.quant_state
    key = (id(weight), weight.data_ptr(), id(qs), id(qs.absmax), id(qs.code))
    if qs.nested:
        s2 = qs.state2
        key += (id(s2), id(s2.absmax), id(s2.code), id(qs.offset))
    return key


def restore_before_wrap(layer) -> bool:
    """Undo bitsandbytes' in-place CPU repacking of a 4-bit base about to be wrapped; True when
    it had happened."""
    if is_linear4bit(layer) and restore_canonical_layout(layer):
        log.warning("the 4-bit weight had been repacked in place by bitsandbytes' CPU "
                    "inference path; restored the NF4 layout (its block scales stay rounded "
                    "to bf16, as that path left them; checkpoints record it)")
        return True
    return False


class _NF4Linear(torch.autograd.Function):
    """``x @ dequant(W).T + bias`` with this package's decode, decoded again in backward.

    Used where bitsandbytes' own decode is wrong (CPU, K not a multiple of the block size).
    Saving the decoded W (N x K) would cost more memory than the quantized model; decoding twice
    is what bitsandbytes does too. Only x (and a trainable bias) get gradients: W is frozen.
    """

    @staticmethod
    def forward(ctx, x, w: NF4Weight, bias):
        ctx.w = w
        return F.linear(x, dequantize_nf4(w, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.w, grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def linear4bit_forward(layer, x: torch.Tensor, compute_dtype: torch.dtype,
                       repacked=None) -> torch.Tensor:
    """What ``Linear4bit.forward`` computes, minus its CPU traps; the result in ``compute_dtype``.

    The same arithmetic as bitsandbytes' own forward on the canonical NF4 layout: x cast to the
    compute dtype, ``bnb.matmul_4bit`` (decode + matmul, the decode repeated in backward rather
    than kept). The result stays in the compute dtype: the caller adds the adapter and rounds once.
    ``repacked``: called (no arguments) when the weight is found in bitsandbytes' CPU-only layout,
    to restore it; without it that layout raises.
    """
    if call_scope.trusting() and not torch.is_grad_enabled() and x.device.type == "cpu":
        out = _trusted_product(layer, x, compute_dtype)
        if out is not None:
            return out
    bias = None if layer.bias is None else layer.bias.to(compute_dtype)
    xc = x.to(compute_dtype)
    weight = layer.weight
    qs = weight.quant_state
    if qs is None or qs.quant_type != "nf4" or getattr(qs, "packing_format_for_cpu", False):
        if repacked is not None and qs is not None and qs.packing_format_for_cpu:
            repacked()
            weight = layer.weight
            qs = weight.quant_state
        else:
            nf4_of(layer)        # raises, naming what is wrong with the storage
    if xc.shape[:-1].numel() == 0:
        out = xc.new_zeros((*xc.shape[:-1], layer.out_features))
        return out if bias is None else out + bias
    if xc.device.type == "cpu" and not torch.compiler.is_compiling():
        if not (torch.is_grad_enabled() and xc.requires_grad):
            packed = cpu_packed_weight(layer, compute_dtype)
            if packed is not None:
                call_scope.mark_checked(layer, "route", (compute_dtype, True, packed))
                return _packed_product(xc, packed, bias)
        decoded = cpu_decoded_weight(layer, compute_dtype)
        if decoded is not None:
            if not torch.is_grad_enabled():
                call_scope.mark_checked(layer, "route", (compute_dtype, False, decoded))
            return F.linear(xc, decoded, bias)
        if layer.in_features % qs.blocksize:
            return _NF4Linear.apply(xc, nf4_of(layer), bias)
    import bitsandbytes as bnb

    # bitsandbytes >= 0.50 takes the packed weight as stored (its own layer passes it so);
    # earlier versions expect it transposed
    return bnb.matmul_4bit(xc, weight if _AS_STORED else weight.t(), bias=bias, quant_state=qs)


def _trusted_product(layer, x, compute_dtype):
    """The product by the route a call without grad took earlier in this ``generate`` call, from
    the kept copy checked then (the checks it passed left out), or None."""
    route = call_scope.checked(layer, "route")
    if route is None or route[0] != compute_dtype or decoded_budget_bytes() != _FITTED[0] or \
            x.shape[:-1].numel() == 0:
        return None
    bias = None if layer.bias is None else layer.bias.to(compute_dtype)
    xc = x.to(compute_dtype)
    return _packed_product(xc, route[2], bias) if route[1] else F.linear(xc, route[2], bias)


#: layer -> (storage fingerprint, decoded weight): the kept CPU copies (see the module docstring)
_DECODED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: layer -> (storage fingerprint, budget, number of kept copies) when its copy did not fit
_NOT_KEPT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

_BUDGET_VARIABLE = "TINYLORA_CPU_DECODED_MB"


@lru_cache(maxsize=8)
def _parse_budget(raw: str) -> int:
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not math.isfinite(mb) or mb < 0:
        raise ValueError(f"{_BUDGET_VARIABLE} must be a finite number of MiB >= 0 (0 turns the "
                         f"kept decoded CPU weights off), got {raw!r}")
    return int(mb * (1 << 20))


def decoded_budget_bytes() -> int:
    """The process-wide budget for decoded CPU weights (``TINYLORA_CPU_DECODED_MB``, MiB; a
    ValueError naming the variable for anything but a finite number >= 0)."""
    return _parse_budget(call_scope.env(_BUDGET_VARIABLE, "1024"))


def kept_copies() -> bool:
    """Whether any CPU copy of a 4-bit weight is kept now (decoded or packed)."""
    return bool(_DECODED) or bool(_PACKED)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return _nbytes(value[0]) + value[1].absmax.numel() * value[1].absmax.element_size()


def _kept_bytes() -> int:
    return sum(_nbytes(v) for store in (_DECODED, _PACKED) for _, v in store.values())


def _fit_budget(budget: int) -> None:
    """Drop kept copies, oldest first, until they fit in ``budget`` bytes."""
    for store in (_PACKED, _DECODED):
        while store and _kept_bytes() > budget:
            del store[next(iter(store.keys()))]


#: the budget the kept copies were last fitted to
_FITTED: list = [None]


def _budget() -> int:
    """The budget now, the kept copies fitted to it when it changed (a lowered budget frees
    them, oldest first)."""
    budget = decoded_budget_bytes()
    if budget != _FITTED[0]:
        _fit_budget(budget)
        _FITTED[0] = budget
    return budget


def cpu_decoded_weight(layer, dtype: torch.dtype):
    """The decoded (N, K) weight of a CPU ``Linear4bit`` in ``dtype``, kept while the storage's
    content is unchanged (checked at every call); None when it would not fit in the budget (or
    the budget is 0). A lowered budget frees kept copies, oldest first."""
    budget = _budget()
    if budget <= 0:
        return None
    trusted = call_scope.checked(layer, "decoded")
    if trusted is not None and trusted[0] == dtype:
        return trusted[1]
    kept = _DECODED.get(layer)
    key = (dtype, storage_fingerprint(layer))
    if kept is not None:
        if kept[0] == key:
            call_scope.mark_checked(layer, "decoded", (dtype, kept[1]))
            return kept[1]
        del _DECODED[layer]
    # a layer found not to fit is not re-checked until the budget or the kept set changes
    if _NOT_KEPT.get(layer) == (key, budget, len(_DECODED)):
        return None
    size = layer.out_features * layer.in_features * dtype.itemsize
    if _kept_bytes() + size > budget:
        _NOT_KEPT[layer] = (key, budget, len(_DECODED))
        return None
    _NOT_KEPT.pop(layer, None)
    with torch.inference_mode(False), torch.no_grad():
        decoded = dequantize_nf4(nf4_of(layer), dtype)
    _DECODED[layer] = (key, decoded)
    call_scope.mark_checked(layer, "decoded", (dtype, decoded))
    return decoded


# -- CPUs with AVX512-BF16: bitsandbytes' own packed kernel, where it is faster ------------------
#: layer -> (storage fingerprint, (packed weight, its quant state)): kept packed copies
_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: (N, K) -> "packed" or "decoded": the CPU base product measured faster for that shape
BASE_PRODUCT_CHOICE: dict = {}
#: weights below which the decoded copy is used without measuring (a call's host cost dominates)
PACKED_MIN_WEIGHTS = 1 << 16


def _packed_applies(layer, dtype) -> bool:
    qs = layer.weight.quant_state
    n, k = layer.out_features, layer.in_features
    return (dtype == torch.bfloat16 and n * k >= PACKED_MIN_WEIGHTS and n % 32 == 0
            and k % int(qs.blocksize) == 0 and _cpu_has_avx512bf16())


@lru_cache(maxsize=1)
def _cpu_has_avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu  # noqa: F401
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def cpu_packed_weight(layer, dtype: torch.dtype):
    """On a CPU with AVX512-BF16, for bf16 calls of a layer of at least
    :data:`PACKED_MIN_WEIGHTS` weights: (packed weight, quant state) in bitsandbytes' CPU layout
    — the layout its own eval-mode layer repacks into, made here from a copy, the layer's NF4
    storage untouched — when that kernel was measured faster than the decoded copy for this
    shape (:data:`BASE_PRODUCT_CHOICE`, measured once per shape and process); else None. Like
    bitsandbytes' own layer there, it computes with the block scales rounded to bf16. Kept within
    the same budget as the decoded copies, tied to the storage's content the same way."""
    if not _packed_applies(layer, dtype):
        return None
    shape = (layer.out_features, layer.in_features)
    if BASE_PRODUCT_CHOICE.get(shape) == "decoded":
        return None
    budget = _budget()
    trusted = call_scope.checked(layer, "packed")
    if trusted is not None:
        return trusted
    kept = _PACKED.get(layer)
    key = storage_fingerprint(layer)
    if kept is None or kept[0] != key:
        _PACKED.pop(layer, None)
        if _kept_bytes() + shape[0] * shape[1] // 2 > budget:
            return None
        kept = _PACKED[layer] = (key, _pack(layer))
    if shape not in BASE_PRODUCT_CHOICE:
        BASE_PRODUCT_CHOICE[shape] = _measure_choice(layer, kept[1], dtype)
        if BASE_PRODUCT_CHOICE[shape] == "decoded":
            del _PACKED[layer]
            return None
        _DECODED.pop(layer, None)       # made for the measurement; a grad call makes it again
    call_scope.mark_checked(layer, "packed", kept[1])
    return kept[1]


def _pack(layer):
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    with torch.inference_mode(False), torch.no_grad():
        packed, qs = _convert_weight_packed_for_cpu(
            layer.weight.data.view(torch.uint8).clone(), copy.deepcopy(layer.weight.quant_state))
    return packed, qs


def _packed_product(x, packed, bias):
    from bitsandbytes.functional import gemv_4bit

    out = gemv_4bit(x, packed[0], state=packed[1])
    return out if bias is None else out + bias


def _measure_choice(layer, packed, dtype) -> str:
    """Time one M = 1 product each way (best of 5, after one untimed call) and name the faster;
    the decoded copy wins ties."""
    import time

    decoded = cpu_decoded_weight(layer, dtype)
    if decoded is None:
        return "packed"                 # the alternative would decode at every call
    x = torch.zeros(1, layer.in_features, dtype=dtype)
    runs = {"decoded": lambda: F.linear(x, decoded), "packed": lambda: _packed_product(x, packed,
                                                                                      None)}
    best = {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            best[name] = min(times)
    return "packed" if best["packed"] < 0.9 * best["decoded"] else "decoded"


def _takes_weight_as_stored() -> bool:
    """Whether this bitsandbytes' ``matmul_4bit`` takes the packed weight as stored (>= 0.50;
    earlier versions expect it transposed). Read from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(p) for p in version("bitsandbytes").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return True
    return (major, minor) >= (0, 50)


#: (a constant when this module is imported, so compiled code reads it without a guard)
_AS_STORED = _takes_weight_as_stored()


_QUANTIZER_CLASSES: dict = {}


def _with_adapter(cls):
    """``cls`` (a transformers ``HfQuantizer`` class) whose models may be trained: a subclass
    saying ``is_qat_trainable``, the flag transformers' ``Trainer`` reads to accept a quantized
    model that is not a PEFT model."""
    sub = _QUANTIZER_CLASSES.get(cls)
    if sub is None:
        sub = type(f"{cls.__name__}WithTinyLoRA", (cls,), {
            "is_qat_trainable": property(lambda self: True),
            # generate compiles its decode step (static cache) when every 4-bit layer computes
            # inside a TinyLoRA layer, whose base product compiles (declare_adapter checks it)
            "is_compileable": property(
                lambda self: self.__dict__.get("_tinylora_compileable", False)),
            "__doc__": f"{cls.__name__} of a model that carries a trainable TinyLoRA adapter.",
            "__module__": __name__,
        })
        _QUANTIZER_CLASSES[cls] = sub
        globals()[sub.__name__] = sub          # picklable by name within this process
    return sub


def declare_adapter(model) -> bool:
    """Tell transformers that a quantized ``model`` carries a trainable adapter (TinyLoRA's v).

    Its ``Trainer`` refuses "purely quantized" models: those that are neither PEFT models nor
    marked by transformers' own adapter integration nor quantized QAT-trainably. The users'
    program set a private flag of that integration, which also changes how ``save_pretrained``
    works; here the model's quantizer gets a subclass that reports the model trainable, and
    compileable when every 4-bit layer of the model is the base of a TinyLoRA layer (``generate``
    with a static cache then compiles its decode step, as it does for unquantized models; a bare
    ``Linear4bit`` would not compile). Returns True when the quantizer was changed (models
    without one are left alone).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return False
    if type(quantizer) not in _QUANTIZER_CLASSES.values():
        if getattr(quantizer, "is_qat_trainable", True):
            return False
        quantizer.__class__ = _with_adapter(type(quantizer))
    wrapped = {id(m.base_layer) for m in model.modules()
               if hasattr(m, "global_params_ref") and isinstance(m.base_layer, torch.nn.Module)}
    quantizer._tinylora_compileable = all(id(m) in wrapped for m in model.modules()
                                          if is_linear4bit(m))
    return True
