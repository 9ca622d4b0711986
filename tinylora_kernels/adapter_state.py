"""Where a TinyLoRA adapter's state lives: what is kept, and what is computed in every call.

Two kinds of state, and no third:

* **Kept across calls: what depends on the frozen buffers alone.** Per layer and accumulation
  dtype, :class:`~tinylora_kernels.torch_path.LayerConstants` (Aᵀ, B = U diag(S), Bᵀ, P reshaped),
  built by :func:`layer_constants`. They are rebuilt when a buffer is reassigned or written
  (``load_state_dict`` writes in place: the key holds each buffer's storage and version), and
  dropped when the layer moves or changes dtype. Per model, the same constants stacked by shape
  (:class:`_Roster`), so that every layer's R comes from one product.

* **Computed in every call: everything derived from v.** The fp32 view of v, each layer's
  R = Σ v_i P_i, Aᵀ Rᵀ (the torch path's folded operand) and R for the kernels (which form B R).
  Nothing decides by v's pointer, version counter or an optimizer-step count whether v changed:
  these values come from v's memory each time, so v may be written any way at all
  (``v.data.copy_``, ``v.data[0] += 1``, ``.data =``, ``set_``, a fused optimizer, a broadcast).
  On a CPU a model call whose v is bit for bit the v of the previous call (compared, every bit)
  reuses that call's values, which would come out the same: a decode step then reads v and
  compares 16 numbers instead of forming every layer's R and Aᵀ Rᵀ again.

A *model call* is one call of a model that ``apply_tiny_lora`` adapted: its forward pre-hook opens
an :class:`AdapterCall` on the model's :class:`~tinylora_kernels.layers.TinyLoRAGlobalParams` (per
thread) and its always-called forward hook closes it. Within the call every layer reads the same
state, computed once, at the first layer that needs it, for all layers at once (one matrix-vector
product of the stacked P's with v and one batched product per group of equal input width). A
layer called outside a model call computes its own. v must not be written *during* a model call
(no training loop does).

Under ``torch.compile`` nothing is kept: each layer reads v in the graph, so a compiled (or
CUDA-graph-captured) step replayed after an optimizer step uses the new v, with no host sync.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from . import call_scope
from .bnb import kept_copies
from .torch_path import LayerConstants, acc_dtype, folded_operand, no_autocast, r_from

__all__ = ["AdapterCall", "enter_call", "exit_call", "current_call", "v_view", "layer_constants",
           "layer_R", "inference_operands", "install_call_hooks", "model_call",
           "assigned_rows", "assignment", "expand_rows", "hooked_models", "half_operands"]


class _FreshOnCopy:
    """Per-process bookkeeping kept on a TinyLoRAGlobalParams: a copy (deepcopy, pickle) starts
    empty, as a new one would."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __reduce__(self):
        return (type(self), ())


class _Calls(_FreshOnCopy, threading.local):
    """The open model calls of one TinyLoRAGlobalParams, per thread (never copied or pickled:
    a copy of a model starts with none open)."""

    def __init__(self):
        self.depth = 0
        self.call: Optional[AdapterCall] = None


class AdapterCall:
    """The adapter state of one model call: v's views, every layer's R and Aᵀ Rᵀ, filled on first
    use in the call and dropped when it ends."""

    __slots__ = ("gp", "views", "batches", "merged_v_checked", "rows", "row_batches")

    def __init__(self, gp):
        self.gp = gp
        self.views: Dict[tuple, torch.Tensor] = {}
        self.batches: Dict[tuple, Dict[int, tuple]] = {}
        self.merged_v_checked = False
        #: per-sequence adapters (tinylora_kernels.adapter_set): (AdapterSet, codes per row)
        self.rows = None
        self.row_batches: Dict[tuple, Dict[int, torch.Tensor]] = {}


def _calls(gp) -> _Calls:
    calls = gp.__dict__.get("_calls_")
    if calls is None:
        calls = gp.__dict__["_calls_"] = _Calls()
    return calls


# -- per-sequence assignments (AdapterSet.per_sequence): this thread's, for one v ----------------
class _Assigned(threading.local):
    """This thread's open ``per_sequence`` assignments: id(TinyLoRAGlobalParams) -> (the
    AdapterSet, the row codes). Other threads never see them."""

    def __init__(self):
        self.by_gp: Dict[int, tuple] = {}


_ASSIGNED = _Assigned()
#: open per_sequence blocks in all threads; compiled code reads it (a guard: a compiled model
#: recompiles once when the first block opens, and reads the assignment eagerly while any is open)
OPEN_BLOCKS = 0
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def assigned_rows(gp, adapters, codes: torch.Tensor):
    """Within the block, in this thread, every call of a layer sharing ``gp`` uses per-sequence
    adapters: sequence i of a batch the adapter coded ``codes[i]``."""
    global OPEN_BLOCKS
    previous = _ASSIGNED.by_gp.get(id(gp))
    _ASSIGNED.by_gp[id(gp)] = (adapters, codes)
    with _OPEN_LOCK:
        OPEN_BLOCKS += 1
    try:
        yield
    finally:
        with _OPEN_LOCK:
            OPEN_BLOCKS -= 1
        if previous is None:
            _ASSIGNED.by_gp.pop(id(gp), None)
        else:
            _ASSIGNED.by_gp[id(gp)] = previous


def assignment(gp) -> Optional[tuple]:
    """(AdapterSet, codes) of this thread's open ``per_sequence`` block for ``gp``, or None."""
    return _ASSIGNED.by_gp.get(id(gp)) if OPEN_BLOCKS else None


def enter_call(model, args=None, kwargs=None) -> None:
    """Forward pre-hook of an adapted model: open its adapter state (nested calls share one),
    with the per-sequence adapters of this thread's open ``AdapterSet.per_sequence`` block."""
    gp = model.__dict__.get("_tinylora_gp_")
    if gp is None or torch.compiler.is_compiling():
        return
    calls = _calls(gp)
    if calls.depth == 0:
        calls.call = AdapterCall(gp)
    calls.depth += 1            # first: the always-called exit hook closes it even if we raise
    call_scope.open_call(kept_copies())
    assigned = assignment(gp)
    if assigned is not None and calls.depth == 1:
        calls.call.rows = (assigned[0], expand_rows(assigned[1], _batch_size(args, kwargs)))


def _batch_size(args, kwargs) -> Optional[int]:
    """The batch size of a model call: the first dimension of its first tensor input."""
    for value in (*(args or ()), *((kwargs or {}).get(k) for k in ("input_ids",
                                                                    "inputs_embeds"))):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _in_generate() -> bool:
    """Whether this call comes from transformers' ``generate`` (which expands a batch for
    ``num_return_sequences`` / ``num_beams``, each sequence repeated in place)."""
    return call_scope.generate_frame(3) is not None


def expand_rows(codes: torch.Tensor, batch: Optional[int]) -> torch.Tensor:
    """The per-sequence codes for a batch of ``batch`` rows: as assigned; inside ``generate``,
    each repeated in place k times when it expanded the batch k-fold. Any other size is an
    error naming both."""
    n = codes.shape[0]
    if batch is None or batch == n:
        return codes
    if batch % n == 0 and _in_generate():
        return codes.repeat_interleave(batch // n)
    raise ValueError(f"per-sequence adapters: the assignment names {n} sequences, but the model "
                     f"was called with a batch of {batch}; give one adapter name per sequence "
                     "(only generate's num_return_sequences / num_beams repeat each in place)")


def exit_call(model, args=None, output=None) -> None:
    """Forward hook (always called, errors included): close the state opened by :func:`enter_call`."""
    gp = model.__dict__.get("_tinylora_gp_")
    if gp is None or torch.compiler.is_compiling():
        return
    calls = _calls(gp)
    if calls.depth > 0:
        call_scope.close_call()
        calls.depth -= 1
        if calls.depth == 0:
            calls.call = None


@contextlib.contextmanager
def model_call(model):
    """One model call's adapter state around the block, for code that calls an adapted model's
    layers one by one instead of calling the model."""
    enter_call(model)
    try:
        yield
    finally:
        exit_call(model)


def install_call_hooks(model, gp) -> None:
    """Open and close ``gp``'s adapter state around every call of ``model`` (hooks once per
    model; ``gp`` kept as a plain attribute, so copies of the model follow their own copy)."""
    model.__dict__["_tinylora_gp_"] = gp
    hooked = gp.__dict__.get("_hooked_")
    if hooked is None:
        hooked = gp.__dict__["_hooked_"] = _Hooked()
    hooked.models.add(model)
    for hook in model._forward_pre_hooks.values():
        if hook is enter_call:
            return
    model.register_forward_pre_hook(enter_call, with_kwargs=True)
    model.register_forward_hook(exit_call, always_call=True)


class _Hooked(_FreshOnCopy):
    """The models whose calls open ``gp``'s adapter state (weakly held; a copy of ``gp``
    starts with none: a copied model's hooks are its own)."""

    def __init__(self):
        self.models = weakref.WeakSet()


def hooked_models(gp) -> list:
    """The modules whose calls open ``gp``'s adapter state."""
    hooked = gp.__dict__.get("_hooked_")
    return [] if hooked is None else list(hooked.models)


def current_call(gp) -> Optional[AdapterCall]:
    """The open model call of ``gp`` in this thread, if any (never while compiling)."""
    if torch.compiler.is_compiling():
        return None
    calls = gp.__dict__.get("_calls_")
    return None if calls is None else calls.call


def v_view(gp, device) -> torch.Tensor:
    """v in its accumulation dtype (fp32, float64 for float64 v) on ``device``, from v's values now.

    Within a model call every layer gets the same tensor (autograd then sums the layers'
    gradients of v in fp32 and rounds once); outside one, a fresh one per call.
    """
    v = gp.global_v
    acc = acc_dtype(v.dtype)
    call = current_call(gp)
    if call is None:
        return v.to(device=device, dtype=acc)
    key = (device, torch.is_grad_enabled())
    view = call.views.get(key)
    if view is None:
        # a copy even when v is already fp32 here: the call must not see later writes to v
        view = call.views[key] = v.to(device=device, dtype=acc, copy=True)
    return view


# -- kept: constants of the frozen buffers ----------------------------------------------------------
def _buffers_key(layer) -> tuple:
    b = layer._buffers
    U, S, Vh, P = b["U"], b["S"], b["Vh"], b["P"]
    return (id(U), U.data_ptr(), U._version, id(S), S.data_ptr(), S._version,
            id(Vh), Vh.data_ptr(), Vh._version, id(P), P.data_ptr(), P._version)


def layer_constants(layer, acc: torch.dtype) -> LayerConstants:
    """The layer's :class:`LayerConstants` in ``acc``, kept until a buffer is reassigned, written
    or moved (never inference tensors: autograd may save them in a later training step)."""
    if torch.compiler.is_compiling():
        return _build_constants(layer, acc)
    key = (acc, *_buffers_key(layer))
    kept = layer.__dict__.get("_consts_")
    if kept is None or kept[0] != key:
        # inference_mode(False) and no_grad: leaving inference mode turns autograd back on
        with torch.inference_mode(False), torch.no_grad():
            kept = layer.__dict__["_consts_"] = (key, _build_constants(layer, acc))
    return kept[1]


def _build_constants(layer, acc: torch.dtype) -> LayerConstants:
    b = layer._buffers
    with no_autocast(b["U"].device.type):
        s = b["S"].to(acc)
        B = b["U"].to(acc) @ s if s.dim() == 2 else b["U"].to(acc) * s
    a = b["Vh"].to(acc)
    p = b["P"].to(acc).reshape(b["P"].shape[0], -1)
    pt = p.t().contiguous()
    return LayerConstants(a=a, at=a.t(), b=B, bt=B.t(), p=pt.t(), pt=pt, pt64=pt.double())


# -- per call: R and Aᵀ Rᵀ --------------------------------------------------------------------------
def layer_R(layer, acc: torch.dtype) -> torch.Tensor:
    """This layer's R (r x r, in ``acc``) from v's values now (differentiable in v)."""
    call = current_call(layer.global_params_ref)
    if call is not None and not torch.is_grad_enabled():
        got = _from_batch(layer, call, acc)
        if got is not None:
            return got[0]
    c = layer_constants(layer, acc)
    v = v_view(layer.global_params_ref, c.pt.device).to(acc)
    with no_autocast(c.pt.device.type):
        return r_from(v, c.pt, layer.projection, c.pt64)


def inference_operands(layer, acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Aᵀ Rᵀ, Bᵀ) in ``acc`` for the no-grad torch path, R from v's values now."""
    call = current_call(layer.global_params_ref)
    if call is not None:
        got = _from_batch(layer, call, acc)
        if got is not None:
            return got[1], got[2]
    c = layer_constants(layer, acc)
    v = v_view(layer.global_params_ref, c.pt.device).to(acc)
    bits = _bits(v) if v.device.type == "cpu" else None
    kept = layer.__dict__.get("_lone_")
    if bits is not None and kept is not None and kept[0] is c and torch.equal(kept[1], bits):
        return kept[2], c.bt                      # v bit for bit as at the last call
    with no_autocast(c.pt.device.type):
        rat = folded_operand(c.at, r_from(v, c.pt, layer.projection, c.pt64).t())
    if bits is not None:                          # (CPU: the next call compares v's bits)
        layer.__dict__["_lone_"] = (c, bits.clone(), rat)
    return rat, c.bt


def _bits(v: torch.Tensor) -> torch.Tensor:
    """v's values as integers of its width: equal exactly when every bit is (-0.0 is not 0.0)."""
    return v.view(torch.int64 if v.element_size() == 8 else torch.int32)


def half_operands(layer, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w = [Aᵀ Rᵀ | Aᵀ] (K, 2r), Bᵀ (r, N)) in the 16-bit ``dtype`` for the half form
    (:mod:`tinylora_kernels.half_path`), R from v's values now; no autograd (that form takes
    v's gradient itself). Within a model call, w of every layer comes from one batch."""
    acc = torch.float32
    with torch.no_grad():
        call = current_call(layer.global_params_ref)
        if call is not None:
            got = _from_batch(layer, call, acc, dtype)
            if got is not None:
                return got[4], got[5]
        c = layer_constants(layer, acc)
        v = v_view(layer.global_params_ref, c.pt.device).to(acc)
        with no_autocast(c.pt.device.type):
            rat = folded_operand(c.at, r_from(v, c.pt, layer.projection, c.pt64).t())
            return torch.cat((rat, c.at), 1).to(dtype), _half_b(layer, c, dtype)


def _half_b(layer, c: LayerConstants, dtype: torch.dtype) -> torch.Tensor:
    """Bᵀ in ``dtype`` (a view of B (N, r)), kept with the constants it was rounded from."""
    kept = layer.__dict__.get("_half_b_")
    if kept is None or kept[0] is not c or kept[1] != dtype:
        with torch.inference_mode(False), torch.no_grad():
            kept = layer.__dict__["_half_b_"] = (c, dtype, c.b.to(dtype).contiguous().t())
    return kept[2]


class _Roster(_FreshOnCopy):
    """The adapted layers of one TinyLoRAGlobalParams seen in model calls, with their constants
    stacked by (device, rank, K): what one product per group needs. Kept across calls (frozen
    buffers only); rebuilt when a layer joins or a member's constants were rebuilt."""

    def __init__(self):
        self.layers: List[weakref.ref] = []
        self.known: set = set()
        self.groups: Optional[list] = None
        self.validated = None       # the generate call (call_scope.generation) groups were checked in
        self.last = None            # (key, the v bits it came from, the batch): the last CPU batch
        self.last_rows = None       # the same for per-sequence adapters (tinylora_kernels.row_state)

    def add(self, layer) -> None:
        if id(layer) not in self.known:
            self.known.add(id(layer))
            self.layers.append(weakref.ref(layer))
            self.groups = None


def _roster(gp) -> _Roster:
    roster = gp.__dict__.get("_roster_")
    if roster is None:
        roster = gp.__dict__["_roster_"] = _Roster()
    return roster


def _full_pt(layer, c: LayerConstants) -> torch.Tensor:
    """P as (r*r, u) in float64 whatever the projection: ``diagonal`` P becomes diag-embedded
    (the zeros add exactly nothing), so one stacked product serves both."""
    if layer.projection == "full":
        return c.pt64
    r = layer.rank
    return torch.diag_embed(c.pt64.t()).reshape(c.pt64.shape[1], r * r).t()


def _build_groups(roster: _Roster, acc: torch.dtype):
    layers = [ref() for ref in roster.layers]
    layers = [m for m in layers if m is not None]
    by_key: Dict[tuple, list] = {}
    for m in layers:
        c = layer_constants(m, acc)
        by_key.setdefault((c.at.device, m.rank, c.at.shape[0]), []).append((m, c))
    groups = []
    with torch.inference_mode(False), torch.no_grad():
        for (device, r, _), members in by_key.items():
            pt = torch.cat([_full_pt(m, c) for m, c in members], 0)          # (G r r, u) f64
            at = torch.stack([c.at for _, c in members], 0)                 # (G, K, r)
            groups.append((device, r, members, pt, at))
    return groups


def _from_batch(layer, call: AdapterCall, acc: torch.dtype, half: Optional[torch.dtype] = None):
    """(R, Aᵀ Rᵀ, Bᵀ, constants[, w, B in ``half``]) of ``layer`` from this call's batch
    (computed for all known layers at the first request); None when the layer is not in it (it
    then joins for the next call)."""
    batch = call.batches.get((acc, half))
    if batch is None:
        batch = call.batches[(acc, half)] = _compute_batch(call.gp, acc, half)
    got = batch.get(id(layer))
    if got is None:
        _roster(call.gp).add(layer)
    return got


def _compute_batch(gp, acc: torch.dtype, half: Optional[torch.dtype] = None) -> Dict[int, tuple]:
    roster = _roster(gp)
    if not roster.layers:
        return {}
    generation = call_scope.generation()
    if roster.groups is None or roster.groups[0] != acc or (
            generation is None or roster.validated != generation) and any(
            layer_constants(m, acc) is not c for g in roster.groups[1] for m, c in g[2]):
        # (a member's constants were rebuilt, a buffer written: checked once per model call, or
        # once per generate call, as the kept copies of 4-bit weights are: see call_scope)
        roster.groups = (acc, _build_groups(roster, acc))
        roster.last = None
    roster.validated = generation
    reuse = _reusable(gp, roster, (acc, half))
    if reuse is not None:
        return reuse
    out = _batch_values(gp, roster, acc, half)
    _remember(gp, roster, (acc, half), out)
    return out


def _v_bits(gp) -> Optional[torch.Tensor]:
    """v's values now, as integers (every bit compared: -0.0 is not 0.0), when every group is on
    the CPU (elsewhere comparing would wait for the device); else None."""
    if any(g[0].type != "cpu" for g in _roster(gp).groups[1]):
        return None
    return _bits(v_view(gp, torch.device("cpu")))


def _reusable(gp, roster: _Roster, key: tuple) -> Optional[Dict[int, tuple]]:
    """The last call's batch when it was formed from the same groups and from v's very bits (all
    derived values would come out bit for bit the same): a decode step reads v and compares it,
    instead of forming every layer's R and Aᵀ Rᵀ again."""
    last = roster.last
    if last is None or last[0] != key or last[3] is not roster.groups:
        return None
    bits = _v_bits(gp)
    return last[2] if bits is not None and torch.equal(bits, last[1]) else None


def _remember(gp, roster: _Roster, key: tuple, out: Dict[int, tuple]) -> None:
    bits = _v_bits(gp)
    roster.last = None if bits is None else (key, bits.clone(), out, roster.groups)


def _batch_values(gp, roster: _Roster, acc: torch.dtype, half) -> Dict[int, tuple]:
    """Every layer's (R, Aᵀ Rᵀ, Bᵀ, constants[, w, B in ``half``]) from v's values now."""
    out: Dict[int, tuple] = {}
    for device, r, members, pt, at in roster.groups[1]:     # (this call's values only)
        with no_autocast(device.type):
            v = v_view(gp, device).to(acc)
            # every R at once, then every Aᵀ Rᵀ: the same bits as r_from / folded_operand
            R = torch.mv(pt, v.to(torch.float64)).to(acc).view(len(members), r, r)
            rat = folded_operand(at, R.transpose(1, 2))
        if half is None:
            for (m, c), Ri, rati in zip(members, R.unbind(0), rat.unbind(0)):
                out[id(m)] = (Ri, rati, c.bt, c)
            continue
        w = torch.cat((rat, at), 2).to(half)                 # every [Aᵀ Rᵀ | Aᵀ], (G, K, 2r)
        for (m, c), Ri, rati, wi in zip(members, R.unbind(0), rat.unbind(0), w.unbind(0)):
            out[id(m)] = (Ri, rati, c.bt, c, wi, _half_b(m, c, half))
    return out
