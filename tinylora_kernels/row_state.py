"""Per-sequence adapters inside a call: every sequence's R for a layer
(:meth:`tinylora_kernels.adapter_set.AdapterSet.per_sequence`).

Within a model call the Rᵀ of every adapter of the block, for every layer, comes from one product
per group of layers (the groups of :mod:`tinylora_kernels.adapter_state`); a layer called outside
one computes its own for the batch it is given.
"""

from __future__ import annotations

from typing import Dict

import torch

from . import adapter_state
from .adapter_state import (_full_pt, _roster, _build_groups, assignment, current_call,
                            expand_rows, layer_constants, v_view)
from .torch_path import no_autocast

__all__ = ["row_state"]


def row_state(layer, acc: torch.dtype, x: torch.Tensor):
    """(Rᵀ of each sequence's adapter (B, r, r) in ``acc``, the code of each sequence, each
    sequence's Aᵀ Rᵀ (B, K, r) where the model call formed them for every layer, else None) when
    this thread has per-sequence adapters for the layer's v, else None. Differentiable in the set's
    v's and the model's v under autograd. Under ``torch.compile`` a guard on
    :data:`~tinylora_kernels.adapter_state.OPEN_BLOCKS` keeps the graph free of this while no
    block is open."""
    if not adapter_state.OPEN_BLOCKS:
        return None
    return _row_state(layer, acc, x)


@torch.compiler.disable
def _row_state(layer, acc, x):
    gp = layer.global_params_ref
    assigned = assignment(gp)
    if assigned is None:
        return None
    adapters, codes = assigned
    call = current_call(gp)
    c = layer_constants(layer, acc)
    if call is None or call.rows is None:
        # not inside a call of a hooked model (a submodule or the layer called directly, or a
        # compiled model): this layer's own, for the batch it is given
        codes = expand_rows(codes, x.shape[0] if x.dim() >= 2 else 1)
        all_v = adapters.all_v(v_view(gp, c.pt.device), c.pt.device, acc)
        R = _rows_R(layer, c, all_v)
        return R.transpose(1, 2)[codes.to(R.device)], codes, None
    adapters, codes = call.rows
    key = (acc, torch.is_grad_enabled())
    batch = call.row_batches.get(key)
    if batch is None:
        batch = call.row_batches[key] = _compute_row_batch(call, adapters, acc)
    got = batch.get(id(layer))
    if got is None or got[1] is not c:
        _roster(call.gp).add(layer)
        R = _rows_R(layer, c, _all_v(call, adapters, c.pt.device, acc))    # (n + 2, r, r)
        got = (R.transpose(1, 2)[codes.to(R.device)], c, None)
        batch[id(layer)] = got
    return got[0], codes, got[2]


def _all_v(call, adapters, device, acc):
    key = ("all_v", device, acc, torch.is_grad_enabled())
    got = call.views.get(key)
    if got is None:
        got = call.views[key] = adapters.all_v(v_view(call.gp, device), device, acc)
    return got


def _rows_R(layer, c: LayerConstants, all_v: torch.Tensor) -> torch.Tensor:
    r = layer.rank
    with no_autocast(all_v.device.type):
        R = (_full_pt(layer, c) @ all_v.t().to(torch.float64)).to(all_v.dtype)   # (r r, n + 2)
    return R.t().reshape(all_v.shape[0], r, r)


def _compute_row_batch(call, adapters, acc) -> Dict[int, tuple]:
    roster = _roster(call.gp)
    if not roster.layers:
        return {}
    if roster.groups is None or roster.groups[0] != acc:
        roster.groups = (acc, _build_groups(roster, acc))
    grad = torch.is_grad_enabled()
    codes = call.rows[1]
    key = _reuse_key(call, adapters, roster, acc, codes, grad)
    if key is not None and roster.last_rows is not None and roster.last_rows[0] is key[0] and \
            all(torch.equal(a, b) for a, b in zip(key[1:], roster.last_rows[1:-1])):
        return roster.last_rows[-1]
    out: Dict[int, tuple] = {}
    for device, r, members, pt, at in roster.groups[1]:
        all_v = _all_v(call, adapters, device, acc)
        with no_autocast(device.type):
            R = (pt @ all_v.t().to(torch.float64)).to(acc)                  # every layer, v
            R = R.view(len(members), r, r, all_v.shape[0])
            # each sequence's Rᵀ, for every layer at once: (G, B, r, r)
            Rt = R.permute(0, 3, 2, 1)[:, codes.to(device)]
            # without grad also each sequence's Aᵀ Rᵀ, every layer in one product: (G, B, K, r)
            # (the entries of the batched product round as add_adapter_rows' own fold)
            rat = None if grad else torch.matmul(at.unsqueeze(1), Rt)
        for i, (m, c) in enumerate(members):
            out[id(m)] = (Rt[i], c, None if rat is None else rat[i])
    roster.last_rows = None if key is None else (*key, out)
    return out


def _reuse_key(call, adapters, roster, acc, codes, grad):
    """What the last no-grad CPU batch must share with this call to be reused — the groups, the
    rows' codes and every v's bits (the values would come out bit for bit the same) — or None
    where it may not be (grad, or a group off the CPU, where comparing would wait for it)."""
    if grad or any(g[0].type != "cpu" for g in roster.groups[1]):
        return None
    all_v = _all_v(call, adapters, torch.device("cpu"), acc)
    bits = all_v.view(torch.int64 if all_v.element_size() == 8 else torch.int32)
    return (roster.groups, bits.clone(), codes.cpu().clone())
