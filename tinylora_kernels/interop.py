"""TinyLoRA adapters in the formats other tools load: LoRA adapters, merged weights.

A rank-r TinyLoRA layer is exactly a LoRA layer with ``B = U diag(S) R`` (out x r) and
``A = Vh`` (r x in), scaling 1. :func:`export_lora` writes that as a PEFT LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
and LoRA-serving engines load. :func:`import_peft_tinylora` reads PEFT's own TinyLoRA adapters
(their convention, P and ``weight_tying`` groups) onto our layers, 4-bit bases included. :func:`merge_tiny_lora` / :func:`unmerge_tiny_lora` fold ΔW into a
float base weight and back; :func:`export_merged` writes merged weights of a 4-bit model (which
cannot be merged in place) as a safetensors state dict, and reports the rounding it introduces.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

import torch.nn as nn

from . import merge_state
from .checkpoint import CheckpointError
from .bnb import nf4_of
from .layers import TARGET_SUFFIXES, TinyLoRAGlobalParams, TinyLoRALinear, tiny_lora_layers
from .nf4 import dequantize_nf4
from .validation import as_int

log = logging.getLogger(__name__)

__all__ = ["export_lora", "import_peft_tinylora", "merge_tiny_lora", "unmerge_tiny_lora",
           "export_merged", "delta_weight"]


def _layers(model):
    layers = tiny_lora_layers(model)
    if not layers:
        raise ValueError("the model has no TinyLoRA layers: apply_tiny_lora first")
    return layers


def lora_factors(layer: TinyLoRALinear):
    """(A, B) in fp32 with ``B @ A == U diag(S) R Vh``: A = Vh (r x in), B = U diag(S) R."""
    with torch.no_grad():
        f = layer.adapter_factors()
        return f.A.float(), (f.B.float() @ f.R.float())


def delta_weight(layer: TinyLoRALinear) -> torch.Tensor:
    """ΔW = U diag(S) R Vh (out x in, fp32). Formed only for merging and export."""
    A, B = lora_factors(layer)
    return B @ A


def _check_target(path: Path, overwrite: bool, what: str) -> None:
    """Refuse to write ``path`` when it is a directory, or exists and ``overwrite`` is False."""
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {what} to {path}: it is a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does not "
                                "exist")


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)``, then move the file into place (no half-written file at ``path``)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_lora(model, out_dir: Union[str, os.PathLike], *, rank: Optional[int] = None,
                base_model_name_or_path: Optional[str] = None,
                dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write the adapter as a PEFT LoRA adapter directory; returns its path.

    Module names are the TinyLoRA layers' names in the model (what PEFT expects for the same
    base model), scaling is 1 (``lora_alpha == r``). ``rank`` pads A with zero rows and B with
    zero columns up to a size servers accept (e.g. 8); it must be >= the TinyLoRA rank. An
    adapter already in ``out_dir`` is replaced only with ``overwrite=True``.
    """
    from safetensors.torch import save_file

    layers = _layers(model)
    r = layers[0][1].rank
    rank = r if rank is None else rank
    rank = as_int(rank, "rank")
    if rank < r:
        raise ValueError(f"rank must be an int >= the adapter's rank {r}, got {rank!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"cannot export a LoRA adapter to {out}: it is a file (a PEFT "
                                 "adapter is a directory)")
    if not overwrite:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            if (out / name).exists():
                raise FileExistsError(f"{out / name} already exists; pass overwrite=True to "
                                      "replace the adapter in that directory")
    tensors: Dict[str, torch.Tensor] = {}
    for name, layer in layers:
        A, B = lora_factors(layer)
        A = torch.cat((A, A.new_zeros(rank - r, A.shape[1])), 0)
        B = torch.cat((B, B.new_zeros(B.shape[0], rank - r)), 1)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = A.to("cpu", dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.to("cpu", dtype).contiguous()
    targets = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    unknown = [t for t in targets if not t.endswith(TARGET_SUFFIXES)]
    if unknown:
        log.warning("exporting layers with non-standard names %s", unknown)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "adapter_model.safetensors",
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_atomic(out / "adapter_config.json",
                  lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out


def merge_tiny_lora(model) -> int:
    """Fold ΔW of the current v into every float base weight (fp32, then cast); returns the count.

    Each layer records the v it merged. While merged, the layers compute the base alone, and a
    call after v changed raises :class:`~tinylora_kernels.merge_state.MergeError` instead of
    answering with the old adapter; :func:`unmerge_tiny_lora` subtracts exactly what was added.
    The record travels in the state dict, so a merged state dict is never merged twice. 4-bit
    bases cannot hold ΔW: use :func:`export_merged`.
    """
    layers = _layers(model)
    quantized = [name for name, layer in layers if layer.is_quantized]
    if quantized:
        raise ValueError(f"cannot merge into 4-bit base weights ({quantized[0]} ...): use "
                         "export_merged(model, path) for a merged bf16 state dict")
    todo = [layer for _, layer in layers if not layer.merged]
    if not todo:
        return 0
    v = todo[0].global_params_ref.global_v.detach().clone()
    if not torch.isfinite(v).all():
        raise ValueError("global_v has non-finite entries; refusing to merge them")
    for layer in todo:
        merge_state.merge(layer, v)
    return len(todo)


def unmerge_tiny_lora(model) -> int:
    """Subtract the ΔW each layer merged (of the v recorded at merge time, whatever v is now):
    W is restored to within rounding; returns the count. A layer whose base weight was replaced
    or reloaded since the merge holds no ΔW: its weight is left as it is (and not counted)."""
    return sum(merge_state.unmerge(layer) for _, layer in _layers(model) if layer.merged)


def export_merged(model, path: Union[str, os.PathLike], *,
                  dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> Dict[str, float]:
    """Write merged weights W + ΔW of every TinyLoRA layer (and the model's other tensors).

    The state dict uses the base model's names (``...q_proj.weight``), so the plain model
    architecture — or a server — loads it. A 4-bit base is decoded to fp32 first. The mismatch
    this introduces (rounding the merged weight to ``dtype``, compared with decoded W + ΔW in
    fp32) is logged and returned per layer as the maximum relative error. An existing file at
    ``path`` is replaced only with ``overwrite=True`` (the write is atomic either way).
    """
    from safetensors.torch import save_file

    target = Path(path)
    _check_target(target, overwrite, "merged weights")
    layers = dict(_layers(model))
    state = {}
    mismatch = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.startswith(("tiny_lora_params.", "tiny_lora_groups.")):
                continue
            owner = next((n for n in layers if key.startswith(n + ".")), None)
            if owner is None:
                if torch.is_tensor(value) and value.is_floating_point():
                    state[key] = value.detach().to("cpu", dtype).contiguous()
                continue
            if key == f"{owner}.base_layer.bias":
                state[f"{owner}.bias"] = value.detach().to("cpu", dtype).contiguous()
        for name, layer in layers.items():
            base = layer.base_layer
            w = (dequantize_nf4(nf4_of(base), torch.float32) if layer.is_quantized
                 else base.weight.detach().float())
            if layer.merged:
                merge_state.check_current(layer)
                merged = w
            else:
                merged = w + delta_weight(layer).to(w.device)
            rounded = merged.to(dtype)
            err = ((rounded.float() - merged).abs().max() / merged.abs().max()).item()
            mismatch[name] = err
            state[f"{name}.weight"] = rounded.cpu().contiguous()
    _write_atomic(target, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    worst = max(mismatch.items(), key=lambda kv: kv[1])
    log.warning("export_merged: %d merged layers written to %s; rounding to %s changes weights "
                "by at most %.2e (relative, %s)", len(mismatch), os.fspath(path), dtype,
                worst[1], worst[0])
    return mismatch


# -- PEFT's TinyLoRA adapters ----------------------------------------------------------------------
_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PARTS = ("tinylora_A", "tinylora_B", "tinylora_P")
_PEFT_MODULE_PREFIX = "base_model.model."
_PEFT_V_PREFIX = "base_model.tinylora_v."


def peft_tinylora_groups(n_layers: int, weight_tying: float) -> list:
    """The v group of each of ``n_layers`` adapted modules (in module order), as PEFT assigns it.

    ``weight_tying`` 0 gives every module its own v, 1 one v for all; in between, contiguous
    groups of ``n_layers // groups`` modules, the last group taking the remainder.
    """
    num_groups = max(1, round(n_layers * (1.0 - weight_tying)))
    size = max(1, n_layers // num_groups)
    return [min(i // size, num_groups - 1) for i in range(n_layers)]


def _peft_projection(seed: int, u: int, r: int) -> torch.Tensor:
    """PEFT's P for one module when the adapter was saved without it: N(0, 1/r), (u, r, r),
    from a private CPU generator seeded with ``projection_seed + module index``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0 / (r ** 0.5), size=(u, r, r), generator=gen)


def _read_peft_tinylora(adapter_dir: Path):
    """(config dict, state dict) of a PEFT TinyLoRA adapter directory; CheckpointError if not."""
    def fail(msg):
        return CheckpointError(f"{adapter_dir}: {msg}")

    if not adapter_dir.is_dir():
        raise fail("not a directory (expected a PEFT adapter directory with adapter_config.json)")
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise fail("no adapter_config.json") from None
    except (OSError, ValueError) as e:
        raise fail(f"adapter_config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "TINYLORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise fail(f"not a PEFT TinyLoRA adapter (peft_type={kind!r}, expected 'TINYLORA')")
    for key, ok in (("r", lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0),
                    ("u", lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0),
                    ("weight_tying", lambda x: isinstance(x, (int, float))
                     and not isinstance(x, bool) and 0.0 <= x <= 1.0),
                    ("projection_seed", lambda x: isinstance(x, int) and not isinstance(x, bool))):
        if key not in config or not ok(config[key]):
            raise fail(f"adapter_config.json has an invalid {key!r}: {config.get(key)!r}")
    if config.get("fan_in_fan_out"):
        raise fail("fan_in_fan_out adapters (Conv1D bases) are not supported")
    if config.get("bias", "none") != "none":
        raise fail(f"bias={config['bias']!r}: adapters that train biases are not supported")
    if config.get("modules_to_save"):
        raise fail(f"modules_to_save={config['modules_to_save']!r} is not supported")

    weights = next((adapter_dir / f for f in _PEFT_WEIGHTS if (adapter_dir / f).is_file()), None)
    if weights is None:
        raise fail(f"no adapter weights ({' or '.join(_PEFT_WEIGHTS)})")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file: say which
        raise fail(f"{weights.name} could not be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(t) for t in state.values()):
        raise fail(f"{weights.name} does not hold a dict of tensors")
    return config, state


def import_peft_tinylora(model: nn.Module, adapter_dir: Union[str, os.PathLike]) -> nn.ModuleList:
    """Put a PEFT TinyLoRA adapter (``peft.TinyLoraConfig``, saved by ``save_pretrained``) on
    ``model`` as :class:`TinyLoRALinear` layers; returns the trainable v of each tying group.

    PEFT's convention is kept exactly: each layer holds PEFT's ``A = sqrt(S) Vh`` and
    ``B = U sqrt(S)`` as its ``Vh`` and ``U`` buffers with ``S = I``, PEFT's P (read from the file,
    or regenerated from ``projection_seed`` as PEFT does when it was saved without them), and
    computes ``B (Σ v_i P_i) A x`` in fp32, in the dtypes the file stores. Layers are matched by
    name (``base_model.model.<name>``): ``model`` must be the architecture the adapter was
    trained on, loaded plainly or in 4-bit NF4 (which PEFT itself cannot adapt).

    The v vectors (one per ``weight_tying`` group, in PEFT's group order and dtype) are attached
    as ``model.tiny_lora_groups`` (an ``nn.ModuleList`` of :class:`TinyLoRAGlobalParams`) and
    returned; they train like ``global_v``. Dropout (training only) is not applied. Any problem
    with the directory or a mismatch with the model raises :class:`CheckpointError` naming it,
    before the model is changed.
    """
    adapter_dir = Path(adapter_dir)
    config, state = _read_peft_tinylora(adapter_dir)

    def fail(msg):
        return CheckpointError(f"{adapter_dir}: {msg}")

    parts, v_by_group = _split_peft_state(state, fail)
    modules = dict(model.named_modules())
    _check_peft_targets(model, modules, parts, fail)
    order = {name: i for i, name in enumerate(modules)}
    names = sorted(parts, key=order.__getitem__)           # PEFT's module index order
    groups = _check_peft_groups(adapter_dir, config, parts, names, v_by_group, fail)
    group_params = _peft_group_params(config["u"], names, groups, modules, v_by_group)
    factors = [_peft_layer_factors(name, index, parts[name], modules[name], config, fail)
               for index, name in enumerate(names)]

    # everything is checked: only now are layers built (which freezes their bases) and swapped in
    built = []
    for name, g, (A, B, P) in zip(names, groups, factors):
        layer = TinyLoRALinear.from_factors(
            modules[name], U=B, S=torch.eye(B.shape[1], dtype=B.dtype), Vh=A, P=P,
            global_params_ref=group_params[g], projection="full", origin="peft")
        built.append((name, layer))
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)
    model.tiny_lora_groups = group_params
    return group_params


def _split_peft_state(state, fail):
    """PEFT's state dict -> ({layer name: {"A", "B", "P": tensor}}, {group: v})."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    v_by_group: Dict[int, torch.Tensor] = {}
    for key, t in state.items():
        if key.startswith(_PEFT_V_PREFIX):
            group = key[len(_PEFT_V_PREFIX):]
            if not group.isdigit():
                raise fail(f"unexpected v key {key!r}")
            v_by_group[int(group)] = t
            continue
        name, _, part = key.rpartition(".")
        if not key.startswith(_PEFT_MODULE_PREFIX) or part not in _PEFT_PARTS:
            raise fail(f"unexpected tensor {key!r} (only tinylora_A/B/P and tinylora_v are "
                       "supported)")
        parts.setdefault(name[len(_PEFT_MODULE_PREFIX):], {})[part[len("tinylora_"):]] = t
    if not parts:
        raise fail("the adapter holds no TinyLoRA layers")
    return parts, v_by_group


def _check_peft_targets(model, modules, parts, fail) -> None:
    """Every adapted layer exists in ``model``, is a plain linear without an adapter."""
    for name, p in parts.items():
        module = modules.get(name)
        if module is None:
            raise fail(f"layer {name!r} is not in this model (is it the architecture the "
                       "adapter was trained on?)")
        if any(isinstance(m, TinyLoRALinear) for m in module.modules()):   # itself included
            raise fail(f"{name!r} already carries a TinyLoRA adapter; import onto a model "
                       "without one")
        if not isinstance(module, nn.Linear):
            raise fail(f"{name!r} is a {type(module).__name__}; only linear layers (nn.Linear, "
                       "bitsandbytes Linear4bit) are supported")
        missing = [k for k in ("A", "B") if k not in p]
        if missing:
            raise fail(f"{name!r} lacks tinylora_{missing[0]}")
    if hasattr(model, "tiny_lora_groups"):
        raise fail("model.tiny_lora_groups exists already; import onto a model without an "
                   "imported adapter")


def _check_peft_groups(adapter_dir, config, parts, names, v_by_group, fail) -> List[int]:
    """Each layer's v group (PEFT's weight tying), the v's checked; warns when P must be
    regenerated."""
    have_p = [n for n in names if "P" in parts[n]]
    if have_p and len(have_p) != len(names):
        raise fail(f"tinylora_P is saved for some layers but not for {names[len(have_p)]!r}")
    u, seed = config["u"], config["projection_seed"]
    groups = peft_tinylora_groups(len(names), float(config["weight_tying"]))
    if sorted(v_by_group) != list(range(max(groups) + 1)):
        raise fail(f"weight_tying={config['weight_tying']} over {len(names)} layers gives "
                   f"{max(groups) + 1} v groups, the file holds {len(v_by_group)}")
    for g, v in v_by_group.items():
        if v.shape != (u,) or not v.is_floating_point() or not torch.isfinite(v).all():
            raise fail(f"tinylora_v.{g} must be {u} finite floats, got shape {tuple(v.shape)}")
    if not have_p:
        import warnings

        warnings.warn(f"{adapter_dir}: saved without tinylora_P (save_projection=False); "
                      f"regenerating P from projection_seed={seed} as PEFT does, which relies on "
                      "torch's CPU generator reproducing the same draws", stacklevel=3)
    if config.get("tinylora_dropout"):
        log.info("import_peft_tinylora: tinylora_dropout=%s is a training-time option and is "
                 "not applied", config["tinylora_dropout"])
    return groups


def _peft_group_params(u, names, groups, modules, v_by_group) -> nn.ModuleList:
    """One TinyLoRAGlobalParams per v group, on the device of its first layer, v copied in."""
    devices: Dict[int, torch.device] = {}
    for name, g in zip(names, groups):
        devices.setdefault(g, modules[name].weight.device)
    group_params = nn.ModuleList()
    for g in range(len(v_by_group)):
        v = v_by_group[g]
        gp = TinyLoRAGlobalParams(u_dim=u, device=devices[g], dtype=v.dtype)
        with torch.no_grad():
            gp.global_v.copy_(v)
        group_params.append(gp)
    return group_params


def _peft_layer_factors(name, index, p, base, config, fail):
    """(A, B, P) of one layer, checked against the layer's shape (P regenerated when absent)."""
    A, B = p["A"], p["B"]
    u = config["u"]
    r = A.shape[0] if A.dim() == 2 else -1
    if A.dim() != 2 or B.dim() != 2 or not 1 <= r <= config["r"] or B.shape[1] != r \
            or A.shape[1] != base.in_features or B.shape[0] != base.out_features:
        raise fail(f"{name!r}: tinylora_A {tuple(A.shape)} / tinylora_B {tuple(B.shape)} do "
                   f"not fit a {base.out_features} x {base.in_features} layer at rank "
                   f"<= {config['r']}")
    P = p["P"] if "P" in p else _peft_projection(config["projection_seed"] + index, u, r)
    if P.shape != (u, r, r):
        raise fail(f"{name!r}: tinylora_P has shape {tuple(P.shape)}, expected {(u, r, r)}")
    for part, t in (("A", A), ("B", B), ("P", P)):
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise fail(f"{name!r}: tinylora_{part} must hold finite floats")
    return A, B, P
