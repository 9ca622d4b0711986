"""TinyLoRA adapters in the formats other tools load: LoRA adapters, merged weights.

A rank-r TinyLoRA layer is exactly a LoRA layer with ``B = U diag(S) R`` (out x r) and
``A = Vh`` (r x in), scaling 1. :func:`export_lora` writes that as a PEFT LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
and LoRA-serving engines load. :func:`merge_tiny_lora` / :func:`unmerge_tiny_lora` fold ΔW into a
float base weight and back; :func:`export_merged` writes merged weights of a 4-bit model (which
cannot be merged in place) as a safetensors state dict, and reports the rounding it introduces.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .factors import nf4_of
from .layers import TARGET_SUFFIXES, TinyLoRALinear, tiny_lora_layers
from .nf4 import dequantize_nf4

log = logging.getLogger(__name__)

__all__ = ["export_lora", "merge_tiny_lora", "unmerge_tiny_lora", "export_merged", "delta_weight"]


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


def export_lora(model, out_dir: Union[str, os.PathLike], *, rank: Optional[int] = None,
                base_model_name_or_path: Optional[str] = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the adapter as a PEFT LoRA adapter directory; returns its path.

    Module names are the TinyLoRA layers' names in the model (what PEFT expects for the same
    base model), scaling is 1 (``lora_alpha == r``). ``rank`` pads A with zero rows and B with
    zero columns up to a size servers accept (e.g. 8); it must be >= the TinyLoRA rank.
    """
    from safetensors.torch import save_file

    layers = _layers(model)
    r = layers[0][1].rank
    rank = r if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < r:
        raise ValueError(f"rank must be an int >= the adapter's rank {r}, got {rank!r}")
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def merge_tiny_lora(model) -> int:
    """Fold ΔW into every float base weight (computed in fp32, then cast); returns the count.

    After merging, the layers compute the base alone (changing v has no effect until
    :func:`unmerge_tiny_lora`). 4-bit bases cannot hold ΔW: use :func:`export_merged`.
    """
    layers = _layers(model)
    quantized = [name for name, layer in layers if layer.is_quantized]
    if quantized:
        raise ValueError(f"cannot merge into 4-bit base weights ({quantized[0]} ...): use "
                         "export_merged(model, path) for a merged bf16 state dict")
    count = 0
    with torch.no_grad():
        for _, layer in layers:
            if getattr(layer, "merged", False):
                continue
            w = layer.base_layer.weight
            w.copy_((w.float() + delta_weight(layer).to(w.device)).to(w.dtype))
            layer.merged = True
            count += 1
    return count


def unmerge_tiny_lora(model) -> int:
    """Subtract ΔW again (fp32, then cast): W is restored to within rounding; returns the count."""
    count = 0
    with torch.no_grad():
        for _, layer in _layers(model):
            if not getattr(layer, "merged", False):
                continue
            w = layer.base_layer.weight
            w.copy_((w.float() - delta_weight(layer).to(w.device)).to(w.dtype))
            layer.merged = False
            count += 1
    return count


def export_merged(model, path: Union[str, os.PathLike], *,
                  dtype: torch.dtype = torch.bfloat16) -> Dict[str, float]:
    """Write merged weights W + ΔW of every TinyLoRA layer (and the model's other tensors).

    The state dict uses the base model's names (``...q_proj.weight``), so the plain model
    architecture — or a server — loads it. A 4-bit base is decoded to fp32 first. The mismatch
    this introduces (rounding the merged weight to ``dtype``, compared with decoded W + ΔW in
    fp32) is logged and returned per layer as the maximum relative error.
    """
    from safetensors.torch import save_file

    layers = dict(_layers(model))
    state = {}
    mismatch = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.startswith("tiny_lora_params."):
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
            if getattr(layer, "merged", False):
                merged = w
            else:
                merged = w + delta_weight(layer).to(w.device)
            rounded = merged.to(dtype)
            err = ((rounded.float() - merged).abs().max() / merged.abs().max()).item()
            mismatch[name] = err
            state[f"{name}.weight"] = rounded.cpu().contiguous()
    save_file(state, os.fspath(path), metadata={"format": "pt"})
    worst = max(mismatch.items(), key=lambda kv: kv[1])
    log.warning("export_merged: %d merged layers written to %s; rounding to %s changes weights "
                "by at most %.2e (relative, %s)", len(mismatch), os.fspath(path), dtype,
                worst[1], worst[0])
    return mismatch
