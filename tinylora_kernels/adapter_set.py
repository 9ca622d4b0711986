"""Many TinyLoRA adapters in one batch: a v per sequence, at the cost of one.

Every adapter trained on one base with the same u, rank, seed, projection and RNG scheme shares
U, S, Vh and P: adapters differ only in v. A batch whose sequences use different adapters then
needs, per row, only its own r x r matrix R_b = Σ v_b,i P_i between the shared A x and B — no
gathered A and B per adapter as multi-LoRA systems need.

    adapters = AdapterSet.from_checkpoints(model, {"math": "math/tiny_lora_v.pt",
                                                   "code": "code/tiny_lora_v.pt"})
    with adapters.per_sequence(model, ["math", "code", "__base__", "__model__"]):
        out = model.generate(input_ids, max_new_tokens=64)      # 4 sequences, 4 adapters

Names in an assignment: an adapter of the set, :data:`BASE` (``"__base__"``: no adapter, the base
model alone, as PEFT spells it) or :data:`MODEL` (``"__model__"``: the model's own v). The
assignment is per sequence of the batch given to the model; when ``generate`` expands the batch
(``num_return_sequences``, ``num_beams``: each sequence repeated k times in place), each
sequence's copies keep its adapter. A batch of another size is an error naming both sizes.

Within the block every call of the model computes, for every layer, R for each adapter of the
set from one product of the stacked P's with the set's v's, and each row of the batch reads its
own (:mod:`tinylora_kernels.adapter_state`). The torch path does this with batched products (no
per-row loop); the NF4 GEMV and the fused kernel read each row's R (B R for the GEMV) by the
row's adapter index. Gradients flow to the set's v's (``requires_grad``) on the torch path.
Merged layers hold one adapter in their weight: a per-sequence call is refused.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from .layers import tiny_lora_layers

__all__ = ["AdapterSet", "BASE", "MODEL"]

#: The name of "no adapter" in an assignment (the base model alone).
BASE = "__base__"
#: The name of "the model's own v" in an assignment.
MODEL = "__model__"
#: Row codes: the set's adapters are 0..n-1, then these two (see :meth:`AdapterSet.codes`).
_RESERVED = (BASE, MODEL)


def _layers_of(model):
    layers = [m for _, m in tiny_lora_layers(model)]
    if not layers:
        raise ValueError("the model has no TinyLoRA layers: apply_tiny_lora (or load_tiny_lora) "
                         "first")
    return layers


class AdapterSet:
    """Named v's for one adapted model (all sharing its U, S, Vh, P).

    Args:
        model: the adapted model the v's belong to.
        vs: name -> v (a 1-D floating tensor of the model's u entries, finite).
        dtype: the dtype the v's are kept in (default: the model's v dtype, or fp32 for
            ``requires_grad``).
        requires_grad: make the stacked v's a leaf that receives gradients.
    """

    def __init__(self, model, vs: Mapping[str, torch.Tensor], *,
                 dtype: Optional[torch.dtype] = None, requires_grad: bool = False):
        layers = _layers_of(model)
        gp = layers[0].global_params_ref
        u = gp.global_v.shape[0]
        if not isinstance(vs, Mapping) or not vs:
            raise ValueError("vs must be a non-empty mapping of adapter name -> v")
        names = list(vs)
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"adapter names must be non-empty strings, got {name!r}")
            if name in _RESERVED:
                raise ValueError(f"{name!r} is reserved (no adapter / the model's own v); "
                                 "choose another adapter name")
        rows = []
        for name in names:
            v = vs[name]
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 1:
                raise TypeError(f"adapter {name!r}: v must be a 1-D floating tensor, got "
                                f"{getattr(v, 'dtype', type(v).__name__)} of shape "
                                f"{tuple(getattr(v, 'shape', ()))}")
            if v.numel() != u:
                raise ValueError(f"adapter {name!r}: v has {v.numel()} entries, this model's "
                                 f"TinyLoRA layers take u = {u}")
            if not torch.isfinite(v).all():
                raise ValueError(f"adapter {name!r}: v has non-finite entries")
            rows.append(v.detach())
        if dtype is None:
            dtype = torch.float32 if requires_grad else gp.global_v.dtype
        self.names: List[str] = names
        self.model_ref = gp
        self.v = torch.stack([r.to(gp.global_v.device, dtype) for r in rows])
        if requires_grad:
            self.v.requires_grad_(True)

    @classmethod
    def from_checkpoints(cls, model, paths: Union[Mapping[str, Union[str, os.PathLike]],
                                                  Sequence[Union[str, os.PathLike]]], *,
                         dtype: Optional[torch.dtype] = None) -> "AdapterSet":
        """The v's of several ``tiny_lora_v.pt`` files (name -> path, or a list: named by
        path). Each must have been trained on this adapter's base: same u, rank, projection,
        RNG scheme, number of layers, and a seed that redraws exactly the P the model holds;
        otherwise :class:`~tinylora_kernels.checkpoint.CheckpointError` names the file and what
        differs."""
        from .checkpoint import CheckpointError, _draws_match, read_checkpoint

        if not isinstance(paths, Mapping):
            paths = {os.fspath(p): p for p in paths}
        layers = _layers_of(model)
        first = layers[0]
        vs: Dict[str, torch.Tensor] = {}
        checked_seeds: Dict[int, Optional[bool]] = {}
        for name, path in paths.items():
            ck = read_checkpoint(path)
            differ = []
            if ck.u_value != first.u:
                differ.append(f"u {ck.u_value} vs the model's {first.u}")
            if ck.rank != first.rank:
                differ.append(f"rank {ck.rank} vs {first.rank}")
            if ck.total_replaced_layers != len(layers):
                differ.append(f"{ck.total_replaced_layers} adapted layers vs {len(layers)}")
            if ck.projection is not None and ck.projection != first.projection:
                differ.append(f"projection {ck.projection!r} vs {first.projection!r}")
            if ck.rng_scheme != first.rng_scheme:
                differ.append(f"RNG scheme {ck.rng_scheme!r} vs {first.rng_scheme!r}")
            if not differ:
                if ck.seed not in checked_seeds:
                    checked_seeds[ck.seed] = _draws_match(layers, ck.seed)
                if checked_seeds[ck.seed] is False:
                    differ.append(f"seed {ck.seed} draws other projections P than the model "
                                  "holds")
            if differ:
                raise CheckpointError(f"{ck.path}: trained on another adapter base than this "
                                      f"model ({'; '.join(differ)})")
            vs[name] = ck.global_v
        return cls(model, vs, dtype=dtype)

    def __len__(self) -> int:
        return len(self.names)

    def codes(self, assignment: Sequence[str]) -> torch.Tensor:
        """The row codes of an assignment: the set's adapters 0..n-1, ``__base__`` n, and
        ``__model__`` n+1 (int64, on the model's device)."""
        if isinstance(assignment, str) or not isinstance(assignment, Sequence):
            raise TypeError("the assignment must be a list of adapter names, one per sequence")
        index = {name: i for i, name in enumerate(self.names)}
        index[BASE], index[MODEL] = len(self.names), len(self.names) + 1
        unknown = [a for a in assignment if a not in index]
        if unknown:
            raise ValueError(f"unknown adapter name(s) {sorted(set(map(str, unknown)))}; this set "
                             f"holds {self.names} (and {BASE!r}, {MODEL!r})")
        if not len(assignment):
            raise ValueError("the assignment is empty: give one adapter name per sequence")
        return torch.tensor([index[a] for a in assignment], dtype=torch.int64,
                            device=self.v.device)

    def _kept_codes(self, assignment: Sequence[str]) -> torch.Tensor:
        """:meth:`codes`, kept per assignment for the blocks that follow (a block is often entered
        once per model call with the same names); never handed out, so never changed."""
        kept = self.__dict__.setdefault("_kept_codes_", {})
        try:
            key = None if isinstance(assignment, str) else (tuple(self.names), tuple(assignment))
            got = kept.get(key)
        except TypeError:                                    # unhashable entries: no keeping
            key = got = None
        if got is not None and got.device == self.v.device:
            return got
        codes = self.codes(assignment)
        if key is not None:
            if len(kept) >= 16:
                kept.clear()
            kept[key] = codes
        return codes

    def all_v(self, model_v: torch.Tensor, device, dtype) -> torch.Tensor:
        """(n + 2, u): the set's v's, zeros (no adapter), the model's own v — in ``dtype``."""
        v = self.v.to(device=device, dtype=dtype)
        return torch.cat((v, v.new_zeros(1, v.shape[1]), model_v.to(device, dtype)[None]), 0)

    @contextlib.contextmanager
    def per_sequence(self, model, assignment: Sequence[str]):
        """Within the block, in this thread, sequence i of every batch given to ``model`` (or to
        any module holding its TinyLoRA layers: the assignment belongs to the model's v) uses the
        adapter ``assignment[i]`` (see the module docstring for names and batch expansion).

        Other threads keep using the model's own v. transformers' continuous batching
        (``generate_batch``, ``init_continuous_batching``) is refused within the block: its
        requests are packed into one row and run in another thread, where no assignment is
        seen."""
        from .adapter_state import assigned_rows, hooked_models, install_call_hooks

        layers = _layers_of(model)
        if layers[0].global_params_ref is not self.model_ref:
            raise ValueError("this AdapterSet was built for another model (another v)")
        merged = [m for m in layers if m.merged]
        if merged:
            raise ValueError(f"{merged[0]._label()} holds a merged ΔW (one adapter in its "
                             "weight): per-sequence adapters need unmerged layers; call "
                             "unmerge_tiny_lora(model) first")
        codes = self._kept_codes(assignment)
        install_call_hooks(model, self.model_ref)
        with assigned_rows(self.model_ref, self, codes), \
                _continuous_batching_refused(hooked_models(self.model_ref), self.model_ref):
            yield self


#: transformers' entry points to continuous batching (see :meth:`AdapterSet.per_sequence`)
_CONTINUOUS_BATCHING = ("generate_batch", "init_continuous_batching",
                        "continuous_batching_context_manager")


@contextlib.contextmanager
def _continuous_batching_refused(models, gp):
    """Within the block, the continuous-batching entry points of ``models`` raise in a thread
    with per-sequence adapters for ``gp`` (other threads get the originals)."""
    from .adapter_state import assignment

    shadowed = []
    for model in models:
        for name in _CONTINUOUS_BATCHING:
            original = getattr(model, name, None)
            if original is None or name in model.__dict__:
                continue
            model.__dict__[name] = _refusing(original, gp, name, assignment)
            shadowed.append((model, name))
    try:
        yield
    finally:
        for model, name in shadowed:
            model.__dict__.pop(name, None)


def _refusing(original, gp, name, assignment):
    def entry(*args, **kwargs):
        if assignment(gp) is not None:
            raise ValueError(
                f"{name}: transformers' continuous batching packs every request into one row "
                "and runs the model in another thread, so per-sequence adapters cannot follow "
                "each request; call generate() inside AdapterSet.per_sequence (one adapter name "
                f"per sequence), or {name} outside the block (the model's own v)")
        return original(*args, **kwargs)

    entry.__wrapped__ = original
    return entry
