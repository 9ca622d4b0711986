"""The drop-in modules: ``TinyLoRAGlobalParams``, ``TinyLoRALinear``, ``apply_tiny_lora``.

Same constructor signatures, buffer names, RNG use, SVD path, target names and replacement order
as the users' training program (TINYLORA_SPEC.md), so that its code and checkpoints work after
changing one import line. What differs is how the forward is computed: factorized (never the
N x K ΔW) and without the bitsandbytes CPU traps.
"""

from __future__ import annotations

import logging
import operator
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from . import adapter_state, backend, merge_state, router
from .bnb import (declare_adapter, decoded_budget_bytes, is_cpu_packed, is_linear4bit,
                  linear4bit_compute_dtype, linear4bit_forward, nf4_of,
                  restore_before_wrap, restore_canonical_layout, storage_identity)
from .factors import (SVD_METHODS, FactorCache, draw_projections, finite_weight_fp32,
                      global_rng_is_fresh, top_r_svd)
from .grouping import grouped_forward, link_groups
from .half_path import half_adapter, half_layer_adapter
from .params import TinyLoRAGlobalParams
from .row_state import row_state
from .saving import enable_save_pretrained
from .validation import as_int
from .torch_path import (PROJECTIONS, AdapterFactors, add_adapter, add_adapter_inference,
                         add_adapter_rows, LayerConstants, acc_dtype, layer_adapter, r_from)

log = logging.getLogger(__name__)

__all__ = ["TARGET_SUFFIXES", "TinyLoRAGlobalParams", "TinyLoRALinear", "apply_tiny_lora",
           "find_targets", "tiny_lora_layers", "set_backend"]

#: Child names (suffixes) that ``apply_tiny_lora`` replaces, as in the users' program.
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Every buffer of a TinyLoRA layer is stored in bf16: the function the users trained is fixed by
#: these bf16 values, so dtype conversions of the model (``.half()``, ``.float()``) leave them be.
BUFFER_DTYPE = torch.bfloat16


class TinyLoRALinear(nn.Module):
    """A frozen linear layer plus ``U diag(S) R Vh``, R from the shared v and this layer's P.

    Args:
        original_layer: an ``nn.Linear`` or a bitsandbytes ``Linear4bit`` (NF4); kept as
            ``self.base_layer``, frozen.
        rank: r, the number of singular directions kept (2 in TinyLoRA).
        u: length of v; defaults to ``len(global_params_ref.global_v)`` and must equal it.
        global_params_ref: the :class:`TinyLoRAGlobalParams` holding v (required). It is
            referenced, not registered as a child, so the model lists ``global_v`` once and its
            ``state_dict`` holds it once.
        projection: ``"full"`` (P: (u, r, r), R = Σ v_i P_i; S stored as diag(S) r x r, as in the
            first users' program) or ``"diagonal"`` (P: (u, r) / sqrt(r), R = diag(v P); S stored
            as a vector, as in the later program).
        svd: ``"cpu"`` (default, reproduces users' checkpoints) or ``"device"`` (opt-in).
        factor_cache: a :class:`~tinylora_kernels.factors.FactorCache` (or directory) for the SVD.
        generator: a private generator for P (the ``per_layer`` RNG scheme); default: the global
            RNG on the layer's device, as the users' program does.

    Buffers (bf16, on the base layer's device): U (N x r), S (r x r or r), Vh (r x K), P.
    """

    def __init__(self, original_layer: nn.Module, rank: int = 2, u: Optional[int] = None,
                 global_params_ref: Optional[TinyLoRAGlobalParams] = None, *,
                 projection: str = "full", svd: str = "cpu", factor_cache=None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        u = self._check_args(original_layer, rank, u, global_params_ref, projection, svd)
        rank = operator.index(rank)
        rounded = restore_before_wrap(original_layer)
        device = original_layer.weight.device
        if factor_cache is not None and not isinstance(factor_cache, FactorCache):
            factor_cache = FactorCache(factor_cache)
        if factor_cache is not None:
            U, S, Vh = factor_cache.factors(original_layer, rank, svd)
            if not all(torch.isfinite(t).all() for t in (U, S, Vh)):
                finite_weight_fp32(original_layer)          # names the cause
                raise ValueError("the cached SVD factors hold NaN/Inf values")
        else:
            U, S, Vh = top_r_svd(finite_weight_fp32(original_layer), rank, svd)
        # only now, with nothing left that can fail, does the base layer change hands
        self._wrap(original_layer, rank, u, global_params_ref, projection, svd)
        self.scales_rounded_bf16 = rounded
        self.register_buffer("U", U.to(device=device, dtype=BUFFER_DTYPE))
        S = torch.diag(S) if projection == "full" else S
        self.register_buffer("S", S.to(device=device, dtype=BUFFER_DTYPE))
        self.register_buffer("Vh", Vh.to(device=device, dtype=BUFFER_DTYPE))
        self.register_buffer("P", draw_projections(self.u, rank, projection, device, generator))
        self.rng_scheme = "global" if generator is None else "per_layer"   # how P was drawn
        self.p_device_type = device.type

    @classmethod
    def from_factors(cls, original_layer: nn.Module, *, U: torch.Tensor, S: torch.Tensor,
                     Vh: torch.Tensor, P: torch.Tensor,
                     global_params_ref: TinyLoRAGlobalParams, projection: str = "full",
                     origin: str = "given") -> "TinyLoRALinear":
        """A layer with the given factors instead of an SVD of the base weight.

        ``U`` (N x r), ``S`` (r x r for ``full``, r for ``diagonal``), ``Vh`` (r x K) and ``P``
        are kept in the dtypes given (imported adapters keep their exact values); the layer
        computes ``U S R Vh x`` like any other. ``origin`` is recorded as ``rng_scheme`` and
        ``svd`` (checkpoints of this package refuse layers whose P no seed reproduces).
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if not isinstance(global_params_ref, TinyLoRAGlobalParams):
            raise TypeError("global_params_ref must be a TinyLoRAGlobalParams, got "
                            f"{type(global_params_ref).__name__}")
        if U.dim() != 2 or Vh.dim() != 2:
            raise ValueError(f"U and Vh must be matrices, got shapes {tuple(U.shape)} and "
                             f"{tuple(Vh.shape)}")
        rank = U.shape[1]
        u = cls._check_args(original_layer, rank, None, global_params_ref, projection, "cpu")
        n, k = original_layer.out_features, original_layer.in_features
        s_shape = (rank, rank) if projection == "full" else (rank,)
        p_shape = (u, rank, rank) if projection == "full" else (u, rank)
        for name, t, shape in (("U", U, (n, rank)), ("S", S, s_shape), ("Vh", Vh, (rank, k)),
                               ("P", P, p_shape)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for this {n} x {k} layer "
                                 f"(rank {rank}, u {u}), got {tuple(t.shape)}")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"{name} must hold finite floating-point values")
        # checked first: _wrap freezes the base layer, which must not happen for bad factors
        self._wrap(original_layer, rank, u, global_params_ref, projection, "cpu")
        device = original_layer.weight.device
        for name, t in (("U", U), ("S", S), ("Vh", Vh), ("P", P)):
            self.register_buffer(name, t.detach().to(device).clone().contiguous())
        self.svd = self.rng_scheme = origin
        self.p_device_type = device.type
        return self

    @staticmethod
    def _check_args(original_layer, rank, u, global_params_ref, projection, svd) -> int:
        """Raise on bad constructor arguments (changing nothing); returns u."""
        if global_params_ref is None:
            raise ValueError("TinyLoRALinear needs global_params_ref, the TinyLoRAGlobalParams "
                             "holding the shared vector v")
        if not isinstance(original_layer, nn.Linear):
            raise TypeError(f"TinyLoRALinear wraps nn.Linear or bitsandbytes Linear4bit layers, "
                            f"got {type(original_layer).__name__}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        v_len = global_params_ref.global_v.shape[0]
        u = v_len if u is None else as_int(u, "u")
        if u != v_len:
            raise ValueError(f"u={u} but global_params_ref.global_v has {v_len} entries")
        n, k = original_layer.out_features, original_layer.in_features
        if isinstance(rank, bool) or not hasattr(rank, "__index__") \
                or not 1 <= operator.index(rank) <= min(n, k):
            raise ValueError(f"rank must be an int in [1, min(out, in)] = [1, {min(n, k)}] for "
                             f"this {n} x {k} layer, got {rank!r}")
        return u

    def _wrap(self, original_layer, rank, u, global_params_ref, projection, svd):
        """Take ownership of the (frozen) base layer; the arguments passed ``_check_args``."""
        self.base_layer = original_layer
        self.rank, self.u, self.projection, self.svd = rank, u, projection, svd
        object.__setattr__(self, "global_params_ref", global_params_ref)   # not a submodule
        self.is_quantized = is_linear4bit(original_layer)
        #: bitsandbytes had rounded the NF4 block scales to bf16 (checkpoints record it)
        self.scales_rounded_bf16 = restore_before_wrap(original_layer)
        for p in original_layer.parameters():
            p.requires_grad_(False)
        self.p_seed: Optional[int] = None   # set by apply_tiny_lora when it knows the seed
        self.merged = False                 # ΔW folded into the base weight (merge_state.py)
        self.merged_v: Optional[torch.Tensor] = None    # the v whose ΔW was folded in
        self.merged_mark = None             # the weight it was folded into (merge_state)
        self.backend: Optional[str] = None  # per-model backend (set_backend)
        self.layer_name: Optional[str] = None   # qualified name, set by apply_tiny_lora

    # -- the factors (kept: the frozen buffers' constants; per call: R; adapter_state.py) -----
    def adapter_factors(self) -> AdapterFactors:
        """A = Vh, B = U diag(S), and R from v's values now (fp32; float64 for float64 v)."""
        acc = acc_dtype(self.global_params_ref.global_v.dtype)
        return AdapterFactors(A=self.Vh, B=self._constants(acc).b,
                              R=adapter_state.layer_R(self, acc))

    def _constants(self, acc: torch.dtype) -> LayerConstants:
        """What the torch path needs besides x and v, kept until a buffer changes."""
        return adapter_state.layer_constants(self, acc)

    def kernel_weight(self):
        """The base weight as the kernels read it: an NF4Weight view (kept while the storage is
        the same), or the dense tensor."""
        if not self.is_quantized:
            return self.base_layer.weight
        if torch.compiler.is_compiling():
            return nf4_of(self.base_layer)
        weight = self.base_layer.weight
        # the view holds the storage's tensors themselves: kept while the layer holds the same
        # ones (in-place writes show through a view; a replaced tensor changes the key)
        key = storage_identity(weight)
        cached = self.__dict__.get("_nf4_view_")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_nf4_view_"] = (key, nf4_of(self.base_layer))
        return cached[1]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + U diag(S) R Vh x`` by the path the router plans for this call."""
        compute_dtype, out_dtype = self._dtypes(x)
        in_features = self._modules["base_layer"].in_features
        if x.dim() == 0 or x.shape[-1] != in_features:
            raise ValueError(f"{self._label()}: expects inputs with in_features={in_features} "
                             f"in the last dimension, got an input of shape {tuple(x.shape)}")
        if self.merged:
            merge_state.check_current(self)     # a reloaded base weight is no longer merged
        plan = router.plan(self, x, compute_dtype, out_dtype)
        rows = row_state(self, acc_dtype(x.dtype), x)
        if rows is not None:
            return self._forward_rows(x, plan, rows, compute_dtype, out_dtype)
        if plan.path == "torch":
            return self._torch_forward(x, plan, compute_dtype, out_dtype)
        if plan.path == "merged":
            return self._base_forward(x, compute_dtype).to(out_dtype)
        self._check_storage()
        if plan.path in ("gemv", "fused") and "_group_" in self.__dict__ and not (
                torch.is_grad_enabled() or torch.compiler.is_compiling()):
            out = grouped_forward(self, x, plan)
            if out is not None:
                return out
        from .ops.custom_ops import fused_tinylora_linear

        return fused_tinylora_linear(x.to(compute_dtype), self.kernel_weight(),
                                     self.base_layer.bias, self.adapter_factors(), out_dtype,
                                     plan.path, plan.config)

    def _torch_forward(self, x, plan, compute_dtype, out_dtype):
        """The torch path: the base layer's product + the factorized adapter."""
        base = self._base_forward(x, compute_dtype)
        acc = acc_dtype(x.dtype)
        gp = self.global_params_ref
        grad = torch.is_grad_enabled() and (gp.global_v.requires_grad or x.requires_grad
                                            or base.requires_grad)
        if plan.half and not torch.compiler.is_compiling():
            w, bt = adapter_state.half_operands(self, x.dtype)
            return half_layer_adapter(base, x, gp.compute_view(w.device), w, bt, self._constants(
                acc).p, self.projection) if grad else half_adapter(base, x, w, bt)
        if plan.split16 or torch.compiler.is_compiling():
            # the registered op (one graph node), with the same operands as the eager path
            c = self._constants(acc)
            v = gp.compute_view(self._buffers["P"].device).to(acc)
            f = AdapterFactors(A=c.a, B=c.b, R=r_from(v, c.pt, self.projection, c.pt64))
            return add_adapter(base, x, f, out_dtype, split16=plan.split16)
        if grad:
            return layer_adapter(base, x, gp.compute_view(self._buffers["P"].device),
                                 self._constants(acc), self.projection, out_dtype)
        rat, bt = adapter_state.inference_operands(self, acc)
        return add_adapter_inference(base, x, rat, bt, out_dtype)

    def _forward_rows(self, x, plan, rows, compute_dtype, out_dtype):
        """The call with per-sequence adapters (:mod:`tinylora_kernels.adapter_set`)."""
        Rt_rows, codes, rat_rows = rows
        if plan.path == "merged":
            raise ValueError(f"{self._label()} holds a merged ΔW (one adapter in its weight): "
                             "per-sequence adapters need unmerged layers")
        if plan.path in ("gemv", "fused") and not torch.is_grad_enabled():
            from .ops.custom_ops import kernel_forward_rows

            self._check_storage()
            out = kernel_forward_rows(plan, x.to(compute_dtype), self.kernel_weight(),
                                      self.base_layer.bias, self, Rt_rows, out_dtype)
            if out is not None:
                return out
        base = self._base_forward(x, compute_dtype)
        return add_adapter_rows(base, x, self._constants(acc_dtype(x.dtype)), Rt_rows,
                                out_dtype, rat_rows)

    def _label(self) -> str:
        name = getattr(self, "layer_name", None)
        return f"TinyLoRALinear {name!r}" if name else "TinyLoRALinear"

    def _dtypes(self, x: torch.Tensor):
        """(dtype the base product is computed in, dtype of the output) for input x."""
        if not x.is_floating_point():
            raise TypeError(f"{self._label()}: inputs must be floating point, got {x.dtype} "
                            f"(token ids go through the embedding first)")
        layer = self._modules["base_layer"]
        if self.is_quantized:
            return linear4bit_compute_dtype(layer, x), x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return dtype, dtype
        dtype = layer.weight.dtype
        return dtype, (dtype if x.dtype == dtype else x.dtype)

    def _base_forward(self, x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        """The base layer's product, left in its compute dtype (the output is rounded once,
        after the adapter is added). A dense base given another dtype than its weight computes
        in the weight's dtype, where ``nn.Linear`` itself would raise."""
        base_layer = self._modules["base_layer"]
        if self.is_quantized:
            return linear4bit_forward(base_layer, x, compute_dtype, self._restore_repacked)
        return base_layer(x.to(compute_dtype))

    def _check_storage(self):
        """Restore the NF4 layout when bitsandbytes repacked the base weight in place since the
        last call (an eval-mode CPU forward of the base layer itself); one warning per model."""
        if self.is_quantized and is_cpu_packed(self.base_layer):
            self._restore_repacked()

    def _restore_repacked(self):
        if restore_canonical_layout(self.base_layer):
            self.scales_rounded_bf16 = True
            gp = self.global_params_ref
            if not getattr(gp, "_warned_repacked", False):
                object.__setattr__(gp, "_warned_repacked", True)
                log.warning("bitsandbytes had repacked the 4-bit weight of %s (and maybe of other "
                            "layers of this model) in place, by an eval-mode CPU forward of the "
                            "base layer; restored the NF4 layout (the block scales stay rounded "
                            "to bf16, as that forward left them)", self._label())

    # -- state dict: the merge record and P's origin travel as extra state (merge_state.py) ----
    def get_extra_state(self) -> torch.Tensor:
        return merge_state.extra_state(self)

    def set_extra_state(self, state) -> None:
        merge_state.set_extra_state(self, state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        before = (self.merged, self.merged_v, self.p_seed, self.rng_scheme, self.merged_mark)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key, weight_key = prefix + "_extra_state", prefix + "base_layer.weight"
        if key in missing_keys:         # written before the field existed: not merged
            missing_keys.remove(key)
            if weight_key in state_dict:
                merge_state.set_extra_state(self, None)
        if weight_key not in state_dict and self.merged != before[0]:
            # the merge record would no longer describe the weight this layer keeps
            self.merged, self.merged_v, self.p_seed, self.rng_scheme, self.merged_mark = before
            error_msgs.append(f"{self._label()}: the state dict says merged={not before[0]} "
                              f"but holds no base weight, while this layer's weight is "
                              f"{'merged' if before[0] else 'not merged'}")
        self._drop_kept()

    # -- dtype and device conversions keep the bf16 buffers ----------------------------------
    def _apply(self, fn, recurse=True):
        own = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in own.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                # a dtype cast (.half(), .float(), .to(dtype)): keep the values, follow the device
                self._buffers[name] = old.to(new.device)
        self.merged_mark = None             # a merged weight converted: marked again on use
        self._drop_kept()
        return self

    def _drop_kept(self):
        """Forget everything kept across calls (all of it depends on buffers and storage)."""
        for kept in ("_plans_", "_m_edges_", "_nf4_view_", "_stash_", "_consts_", "_half_b_",
                     "_lone_"):
            self.__dict__.pop(kept, None)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, u={self.u}, projection={self.projection!r}, "
                f"quantized={self.is_quantized}")


# -- apply ---------------------------------------------------------------------------------------
def find_targets(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Module]]:
    """(parent, child name, child) for every layer ``apply_tiny_lora`` would replace, in order.

    Depth-first over ``named_children`` in registration order; a child whose name ends with one of
    :data:`TARGET_SUFFIXES` and that is an ``nn.Linear`` (``Linear4bit`` included) is a target and
    is not searched further; ``lm_head`` never is; anything else is searched.
    """
    found = []

    def walk(module):
        for name, child in module.named_children():
            if (name != "lm_head" and isinstance(child, nn.Linear)
                    and not isinstance(child, TinyLoRALinear) and name.endswith(TARGET_SUFFIXES)):
                found.append((module, name, child))
            elif not isinstance(child, TinyLoRALinear):
                walk(child)

    walk(model)
    return found


def set_backend(model: nn.Module, name: Optional[str]) -> int:
    """Set the backend of every TinyLoRA layer in ``model`` (``None``: follow the environment).

    Returns the number of layers set. A ``with use_backend(...)`` block still takes precedence.
    """
    value = None if name is None else backend.validate(name)
    count = 0
    for module in model.modules():
        if isinstance(module, TinyLoRALinear):
            module.backend = value
            count += 1
    return count


def tiny_lora_layers(model: nn.Module) -> List[Tuple[str, TinyLoRALinear]]:
    """(qualified name, layer) of every TinyLoRALinear in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TinyLoRALinear)]


def apply_tiny_lora(model: nn.Module, global_params_ref: TinyLoRAGlobalParams, rank: int = 2, *,
                    projection: str = "full", svd: str = "cpu", rng_seed: Optional[int] = None,
                    factor_cache=None, progress: bool = True, freeze: bool = True) -> int:
    """Replace every target linear of ``model`` by a :class:`TinyLoRALinear`; return how many.

    With ``freeze`` (default) the model is frozen afterwards except v: an optimizer over the
    parameters that require grad trains exactly ``global_params_ref.global_v`` (as the users'
    program and PEFT's ``get_peft_model`` leave it). ``freeze=False`` leaves the other parameters'
    ``requires_grad`` as they were (the adapted layers' bases are frozen either way).

    ``global_params_ref`` is attached as ``model.tiny_lora_params`` first. P is drawn per layer in
    replacement order from the global RNG (call ``torch.manual_seed(seed)`` right before, as the
    users' program does), or, with ``rng_seed``, from a private CPU generator seeded with
    ``rng_seed + layer index`` (device independent). The SVDs (minutes on a CPU for a 3B model)
    show a progress bar unless ``progress=False``; ``factor_cache`` (a directory) keeps them for
    the next run. All layers are built before any is swapped in, so an error leaves the model as
    it was.
    """
    if not isinstance(global_params_ref, TinyLoRAGlobalParams):
        raise TypeError("global_params_ref must be a TinyLoRAGlobalParams, got "
                        f"{type(global_params_ref).__name__}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    rank = as_int(rank, "rank")
    if rng_seed is not None:
        rng_seed = as_int(rng_seed, "rng_seed")
        if not 0 <= rng_seed < 2 ** 63:
            raise ValueError(f"rng_seed must be in [0, 2**63), got {rng_seed}")
    # a bad TINYLORA_BACKEND or TINYLORA_CPU_DECODED_MB is reported here, not later
    backend.from_environment(), decoded_budget_bytes()
    attached = getattr(model, "tiny_lora_params", None)
    if attached is not None and attached is not global_params_ref:
        raise ValueError("model.tiny_lora_params already holds another TinyLoRAGlobalParams; "
                         "one model shares one v")
    targets = find_targets(model)
    if not targets:
        adapted = tiny_lora_layers(model)
        if adapted:
            raise ValueError(f"this model is already adapted: it holds {len(adapted)} "
                             f"TinyLoRALinear layers (e.g. {adapted[0][0]!r}); apply_tiny_lora "
                             "adapts a model once (load a fresh model to start over)")
        raise ValueError(f"apply_tiny_lora found no layer to replace: no nn.Linear or "
                         f"bitsandbytes Linear4bit child named *{'/'.join(TARGET_SUFFIXES)} "
                         f"(lm_head excluded) in this {type(model).__name__}; the model is "
                         "left as it was")
    if factor_cache is not None and not isinstance(factor_cache, FactorCache):
        factor_cache = FactorCache(factor_cache)
    seed = torch.initial_seed() if rng_seed is None else rng_seed
    fresh = rng_seed is not None or global_rng_is_fresh(targets, seed)
    names = {id(m): n for n, m in model.named_modules()}

    from tqdm.auto import tqdm
    # building a layer freezes its base; a failure part-way must leave the model as it was
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    built = []
    try:
        for index, (parent, name, child) in enumerate(
                tqdm(targets, desc="TinyLoRA: SVD of base weights", unit="layer",
                     disable=not progress or not targets)):
            gen = None
            if rng_seed is not None:
                gen = torch.Generator(device="cpu").manual_seed(rng_seed + index)
            try:
                layer = TinyLoRALinear(child, rank, None, global_params_ref,
                                       projection=projection, svd=svd,
                                       factor_cache=factor_cache, generator=gen)
            except ValueError as exc:
                raise ValueError(f"layer {names.get(id(child), name)!r}: {exc}; the model is "
                                 "left as it was") from exc
            layer.p_seed = seed if fresh else None
            layer.layer_name = names.get(id(child))
            built.append((parent, name, layer))
    except BaseException:
        for p, flag in trainable:
            p.requires_grad_(flag)
        raise

    if attached is None:
        model.tiny_lora_params = global_params_ref
    adapter_state.install_call_hooks(model, global_params_ref)
    for parent, name, layer in built:
        setattr(parent, name, layer)
    link_groups(*zip(*[(layer, id(parent), name) for parent, name, layer in built]))
    if any(layer.is_quantized for _, _, layer in built):
        declare_adapter(model)          # transformers' Trainer then accepts the 4-bit model
    enable_save_pretrained(model, TinyLoRALinear)   # base weights by their names, adapter beside
    if freeze:
        model.requires_grad_(False)
        global_params_ref.global_v.requires_grad_(True)
    return len(built)
