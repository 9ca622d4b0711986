"""Projections that read the same input (q/k/v; gate/up) computed by one kernel launch
(the decode GEMV's at M <= 4, the fused kernel's above).

At decode the k and v projections alone cost far less than a launch; launched with q they ride
along. Grouping is decided once, when ``apply_tiny_lora`` adapts sibling layers of one parent;
at call time it is used only where the router planned the GEMV or the fused kernel for every
member, without autograd, within one model call (:mod:`~tinylora_kernels.adapter_state`).
The first member launches for the whole group and leaves each sibling its output, tagged with
the input tensor itself (identity and version) and the model call; a sibling called in that
same call with that same, unchanged input takes it, anything else computes afresh. Holding the
input keeps its memory from being reused by another tensor meanwhile.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import router
from .adapter_state import current_call

__all__ = ["SHARED_INPUT_GROUPS", "link_groups", "grouped_forward"]

#: Projections that read the same input, launched together on the gemv and fused paths.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def link_groups(layers, parents, names) -> None:
    """Mark sibling TinyLoRA layers (same parent id, names of one :data:`SHARED_INPUT_GROUPS`
    entry) whose weights one grouped launch can read together."""
    by_parent = {}
    for layer, parent, name in zip(layers, parents, names):
        by_parent.setdefault(parent, {})[name] = layer
    for siblings in by_parent.values():
        for group in SHARED_INPUT_GROUPS:
            members = [siblings.get(n) for n in group]
            if all(m is not None for m in members) and _groupable(members):
                for m in members:
                    m.__dict__["_group_"] = tuple(members)


def _groupable(members) -> bool:
    """Same storage kind (NF4 with one double-quant setting, or dense of one dtype), same K,
    bias on all or none, same rank."""
    def kind(m):
        w = m.base_layer.weight
        return (m.is_quantized, getattr(getattr(w, "quant_state", None), "nested", None),
                None if m.is_quantized else w.dtype, m.base_layer.in_features,
                m.base_layer.bias is None, m.rank)
    return len({kind(m) for m in members}) == 1


def _same_launch(member_plan, plan) -> bool:
    """Whether a member's own plan can share the first member's launch: the same plan (fused);
    at decode the same path and dtypes (each GEMV's split depends on its own N; the group's
    launch takes one shape for all)."""
    if plan.path == "gemv":
        return (member_plan.path, member_plan.compute_dtype, member_plan.out_dtype) == (
            plan.path, plan.compute_dtype, plan.out_dtype)
    return member_plan == plan


def grouped_forward(layer, x: torch.Tensor, plan) -> Optional[torch.Tensor]:
    """``layer(x)`` through its group's launch; None when the group cannot serve this call."""
    call = current_call(layer.global_params_ref)
    if call is None:
        return None                 # outside a model call v may change between the siblings
    group = layer.__dict__["_group_"]
    stash = layer.__dict__.pop("_stash_", None)
    if stash is not None:
        x_ref, version, call_ref, out = stash
        if x_ref is x and version == x._version and call_ref is call:
            return out
    if group[0] is not layer:
        return None
    for m in group:
        if not _same_launch(router.plan(m, x, *m._dtypes(x)), plan):
            return None
        m._check_storage()
    members = [(m.kernel_weight(), m.base_layer.bias, m.adapter_factors()) for m in group]
    if plan.path == "gemv":
        from .ops.nf4_gemv import nf4_gemv_group

        # (one launch shape for the group's rows together: gemv_config of their sum)
        outs = nf4_gemv_group(x.to(plan.compute_dtype), members, out_dtype=plan.out_dtype)
    else:
        from .ops.fused_linear import fused_linear_group

        outs = fused_linear_group(x.to(plan.compute_dtype), members, out_dtype=plan.out_dtype,
                                  config=plan.config)
    for m, out in zip(group[1:], outs[1:]):
        m.__dict__["_stash_"] = (x, x._version, call, out)
    return outs[0]
