"""What a layer's merge added, and what travels with its state dict.

``merge_tiny_lora`` folds ΔW(v) = U diag(S) R(v) Vh into a float base weight and records the v it
merged (:func:`merge`); ``unmerge_tiny_lora`` subtracts ΔW of exactly that recorded v
(:func:`unmerge`), so the base weight comes back to within one rounding of the original whatever
happened to v meanwhile. While merged, a call whose v differs from the merged one is refused
(:func:`check_current`): the merged weight holds the old adapter, and no answer is better than a
silently wrong one.

The record also marks the weight it was folded into (:func:`weight_mark`: which tensor, its
version counter, and a sample of its values). A base weight replaced or reloaded since the merge
(``load_state_dict`` of the base layer, ``weight.data.copy_(...)``, ``weight.data = ...``) no
longer holds ΔW: the layer then counts as not merged (with a warning naming it), adds the adapter
at every call again, and ``unmerge_tiny_lora`` leaves that weight as it is.

The layer's *extra state* (``<prefix>._extra_state`` in its state dict, one float64 tensor so that
safetensors can hold it) carries the merged flag, the merged v, and which seed and RNG scheme drew
P. A merged state dict loaded into a fresh adapted model therefore arrives merged (ΔW is not added
a second time), and a layer that receives another model's P also receives that model's seed.
State dicts written before this field existed load as "not merged, seed unknown".
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .adapter_state import current_call, layer_constants
from .torch_path import no_autocast, r_from

__all__ = ["delta_for", "merge", "unmerge", "check_current", "still_merged", "weight_mark",
           "WeightMark", "extra_state", "set_extra_state", "MergeError"]

log = logging.getLogger(__name__)

_FORMAT = 1.0
_SCHEMES = ("global", "per_layer")


class MergeError(RuntimeError):
    """A merged layer asked to compute with another v than the one merged into its weight."""


def delta_for(layer, v: torch.Tensor) -> torch.Tensor:
    """ΔW = U diag(S) R(v) Vh (out x in, fp32) for the given v; the same operations for the same
    v give the same bits, so an unmerge subtracts exactly what the merge added."""
    c = layer_constants(layer, torch.float32)
    with torch.no_grad(), no_autocast(c.b.device.type):
        R = r_from(v.detach().to(c.pt.device, torch.float32), c.pt, layer.projection)
        return (c.b @ R) @ c.a


#: values of the base weight sampled into a merge record (evenly spaced over the whole tensor)
_SAMPLE = 512


def _sample(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    return flat[::max(1, flat.numel() // _SAMPLE)]


class WeightMark:
    """What identifies a base weight's current values cheaply: its storage address, its version
    counter and an evenly spaced sample of its values (a reload changes the sample even where it
    leaves the address and the version counter as they were, e.g. ``weight.data.copy_``).

    A copy of the model (``deepcopy``, pickling) or a conversion (``.to``, ``.half()``) carries ΔW
    along in its own tensors: the mark then becomes None, "mark again on next use"."""

    __slots__ = ("ptr", "version", "sample")

    def __init__(self, weight: torch.Tensor):
        self.ptr, self.version = weight.data_ptr(), weight._version
        self.sample = _sample(weight).clone()

    def holds(self, weight: torch.Tensor, values: bool) -> bool:
        """Whether ``weight`` is still the marked one (``values``: compare the sample too)."""
        if (self.ptr, self.version) != (weight.data_ptr(), weight._version):
            return False
        if not values:
            return True
        sample = _sample(weight)
        return sample.shape == self.sample.shape and torch.equal(sample, self.sample)

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (type(None), ())


def weight_mark(weight: torch.Tensor) -> WeightMark:
    """The :class:`WeightMark` of a base weight now."""
    with torch.no_grad():
        return WeightMark(weight)


def merge(layer, v: torch.Tensor) -> None:
    """Add ΔW(v) to the layer's float base weight and record ``v`` (a copy, kept by the caller
    for all layers merged together) and the weight it went into."""
    w = layer.base_layer.weight
    with torch.no_grad():
        w.copy_((w.float() + delta_for(layer, v).to(w.device)).to(w.dtype))
    layer.merged_mark = weight_mark(w)
    layer.merged = True
    layer.merged_v = v


def unmerge(layer) -> bool:
    """Subtract ΔW of the recorded v (base weight back to within rounding of the original);
    False (and nothing subtracted) when the weight was replaced since the merge."""
    if not still_merged(layer, full=True):
        return False
    w = layer.base_layer.weight
    with torch.no_grad():
        w.copy_((w.float() - delta_for(layer, layer.merged_v).to(w.device)).to(w.dtype))
    _forget(layer)
    return True


def _forget(layer) -> None:
    layer.merged = False
    layer.merged_v = None
    layer.merged_mark = None


def still_merged(layer, full: bool = False) -> bool:
    """Whether the layer's base weight is still the one ΔW was folded into; when it is not,
    the merge record is dropped (with a warning naming the layer).

    Compared every time: the tensor and its version counter; the value sample on a CPU, and on
    a GPU only when ``full`` (a comparison there waits for the device). A record loaded from a
    state dict marks the weight the first time it is checked."""
    if not layer.merged:
        return False
    w = layer.base_layer.weight
    mark = layer.merged_mark
    if mark is None:
        layer.merged_mark = weight_mark(w)
        return True
    same = mark.holds(w, values=full or not w.is_cuda)
    if not same:
        _forget(layer)
        log.warning("%s: its base weight was replaced or reloaded since merge_tiny_lora folded "
                    "ΔW into it; the new weight is taken as the base weight (not merged): the "
                    "adapter is added at every call again, and unmerge_tiny_lora leaves it as "
                    "it is", layer._label())
    return same


def check_current(layer) -> None:
    """Raise :class:`MergeError` when v differs from what is merged into the layer's weight.

    Once per model call for layers merged together; on every call of a layer used on its own.
    """
    merged_v = layer.merged_v
    if merged_v is None:
        return
    if torch.compiler.is_compiling():
        return          # a compiled graph holds no host-side checks; eager calls are checked
    if not still_merged(layer):
        return
    gp = layer.global_params_ref
    call = current_call(gp)
    if call is not None and call.merged_v_checked is merged_v:
        return
    v = gp.global_v.detach()
    same = v.shape == merged_v.shape and torch.equal(v, merged_v.to(v.device, v.dtype))
    if not same:
        raise MergeError(
            f"{layer._label()}: v changed after merge_tiny_lora folded ΔW into the base weight, "
            "which still holds the adapter of the old v. Call unmerge_tiny_lora(model) first "
            "(it restores the base weight), then change v, then merge again if wanted.")
    if call is not None:
        call.merged_v_checked = merged_v


# -- extra state ---------------------------------------------------------------------------------
def extra_state(layer) -> torch.Tensor:
    """[format, merged, seed known, seed >> 32, seed & 0xffffffff, scheme, merged v...] (float64:
    every field is exact)."""
    seed = layer.p_seed
    scheme = _SCHEMES.index(layer.rng_scheme) if layer.rng_scheme in _SCHEMES else 2
    head = [_FORMAT, float(bool(layer.merged)), float(seed is not None),
            float((seed or 0) >> 32), float((seed or 0) & 0xFFFFFFFF), float(scheme)]
    tail = [] if not layer.merged else layer.merged_v.detach().double().cpu().tolist()
    return torch.tensor(head + tail, dtype=torch.float64)


def set_extra_state(layer, state: Optional[torch.Tensor]) -> None:
    """Take the merged flag, merged v, seed and scheme from a state dict's extra state (None:
    a state dict written before this field: not merged, seed unknown)."""
    if state is None:
        layer.merged, layer.merged_v, layer.merged_mark = False, None, None
        layer.p_seed = None
        return
    if not isinstance(state, torch.Tensor) or state.dim() != 1 or state.numel() < 6 \
            or state[0].item() != _FORMAT:
        raise ValueError(f"{layer._label()}: unrecognised extra state in the state dict "
                         f"({type(state).__name__} {getattr(state, 'shape', '')})")
    vals = state.tolist()
    merged = bool(vals[1])
    if merged and len(vals) != 6 + layer.u:
        raise ValueError(f"{layer._label()}: the state dict's merged v has {len(vals) - 6} "
                         f"entries, this layer's v has {layer.u}")
    gv = layer.global_params_ref.global_v
    layer.merged = merged
    layer.merged_mark = None            # the base weight loaded with this record: marked on use
    layer.merged_v = torch.tensor(vals[6:], dtype=torch.float64).to(gv.device, gv.dtype) \
        if merged else None
    layer.p_seed = (int(vals[3]) << 32 | int(vals[4])) if vals[2] else None
    scheme = int(vals[5])
    if scheme < len(_SCHEMES):
        layer.rng_scheme = _SCHEMES[scheme]
    elif layer.rng_scheme in _SCHEMES:
        layer.rng_scheme = "loaded"           # P from elsewhere: no seed reproduces it
