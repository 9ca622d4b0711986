"""``save_pretrained`` of an adapted transformers model: a model that loads back.

An adapted model's ``state_dict`` names its base weights ``...q_proj.base_layer.weight`` and holds
the adapter's buffers beside them; written as they are, ``from_pretrained`` finds none of the
weights it expects (a dense model silently gets random linears, a 4-bit one fails). So
:func:`apply_tiny_lora <tinylora_kernels.layers.apply_tiny_lora>` gives the model's class a
``save_pretrained`` (:func:`_save_pretrained`, through a subclass named ``<Class>WithTinyLoRA``)
that writes:

* the base model, exactly as transformers writes the model without the adapter (the usual names,
  4-bit storage as bitsandbytes keeps it), and
* the adapter beside it, as ``tiny_lora_v.pt`` (:data:`ADAPTER_FILE`, the users' checkpoint
  format), unless every layer is merged: then the weights written are the merged ones and no
  adapter file is written (it would add ΔW twice).

Loading back: ``model = AutoModelForCausalLM.from_pretrained(dir, ...)`` then
``load_tiny_lora(model, os.path.join(dir, "tiny_lora_v.pt"))``. Everything is checked before a file
is written (a seed no layer recorded, layers merged in part); then the adapter goes to a temporary
file, the base model is written, and the adapter file is moved into place.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch.nn as nn

__all__ = ["ADAPTER_FILE", "enable_save_pretrained", "register_adapter_writer", "base_state_dict"]

#: the adapter's file name in a ``save_pretrained`` directory
ADAPTER_FILE = "tiny_lora_v.pt"
_SUFFIX = "WithTinyLoRA"
_CLASSES: dict = {}


#: writes the adapter file: ``writer(model, path, seed=..., model_id=...)``; the checkpoint module
#: (above this one) registers ``save_tiny_lora`` here when it is imported
_ADAPTER_WRITER: list = []
#: the layer class whose instances are swapped out while the base model is written
_LAYER_CLASS: list = []


def register_adapter_writer(writer) -> None:
    """Set the function that writes ``tiny_lora_v.pt`` (see :data:`_ADAPTER_WRITER`)."""
    _ADAPTER_WRITER[:] = [writer]


def enable_save_pretrained(model: nn.Module, layer_class: type) -> bool:
    """Give ``model`` (a transformers ``PreTrainedModel``) the adapter-aware ``save_pretrained``
    for its ``layer_class`` layers; False for other models (left as they are)."""
    _LAYER_CLASS[:] = [layer_class]
    cls = type(model)
    if cls.__name__.endswith(_SUFFIX) or not callable(getattr(cls, "save_pretrained", None)) \
            or not hasattr(model, "config"):
        return False
    model.__class__ = _subclass(cls)
    return True


def _subclass(cls):
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__ + _SUFFIX, (cls,), {
            "save_pretrained": _save_pretrained, "__module__": __name__,
            "__doc__": f"{cls.__name__} carrying TinyLoRA layers: save_pretrained writes the base "
                       "model under its usual names and the adapter beside it "
                       "(tinylora_kernels.saving).",
        })
        sub._tinylora_base_class = cls
        _CLASSES[cls] = sub
        setattr(sys.modules[__name__], sub.__name__, sub)      # picklable by name
    return sub


def __getattr__(name):
    """``<Class>WithTinyLoRA`` for a transformers class, made on first use (unpickling a model in
    a process that has not adapted one yet)."""
    if name.endswith(_SUFFIX):
        import transformers

        base = getattr(transformers, name[:-len(_SUFFIX)], None)
        if isinstance(base, type):
            return _subclass(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
    """Write the base model under its usual names and the adapter beside it as
    ``tiny_lora_v.pt`` (see :mod:`tinylora_kernels.saving`); a fully merged model is written with
    its merged weights and no adapter file."""
    base_cls = type(self)._tinylora_base_class
    swaps = [(parent, name, child) for parent in self.modules()
             for name, child in parent.named_children() if isinstance(child, _LAYER_CLASS[0])]
    if not swaps:
        return base_cls.save_pretrained(self, save_directory, *args, state_dict=state_dict,
                                        **kwargs)
    layers = [child for _, _, child in swaps]
    merged = [m.merged for m in layers]
    if any(merged) and not all(merged):
        raise ValueError(f"save_pretrained: {sum(merged)} of {len(layers)} TinyLoRA layers are "
                         "merged; call merge_tiny_lora(model) or unmerge_tiny_lora(model) first, "
                         "so that the weights written are all base or all merged")
    seed = _recorded_seed(layers) if not all(merged) else None
    if os.path.isfile(save_directory):
        raise NotADirectoryError(f"save_pretrained: {save_directory} is a file; give a directory")
    os.makedirs(save_directory, exist_ok=True)
    tmp = None
    if seed is not None:
        fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=".tmp-tiny-lora-")
        os.close(fd)
    try:
        if tmp is not None:
            _ADAPTER_WRITER[0](self, tmp, seed=seed,
                               model_id=str(getattr(self.config, "_name_or_path", "") or ""))
        if state_dict is not None:
            state_dict = base_state_dict(state_dict, swaps, self)
        with _as_base_model(self, swaps, base_cls):
            base_cls.save_pretrained(self, save_directory, *args, state_dict=state_dict,
                                     **kwargs)
        if tmp is not None:
            os.replace(tmp, os.path.join(save_directory, ADAPTER_FILE))
            tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _recorded_seed(layers) -> int:
    """The one seed the layers' P were drawn from, or a ValueError saying what to call."""
    seeds = {m.p_seed for m in layers}
    if len(seeds) != 1 or None in seeds:
        raise ValueError(
            "save_pretrained: the seed that drew this adapter's projections P is not recorded "
            "(the global RNG was not freshly seeded right before apply_tiny_lora, or the layers "
            "came from elsewhere), so the adapter cannot be written in a form that loads back. "
            "Nothing was written. Write the adapter with save_tiny_lora(model, path, seed=..., "
            "model_id=...) and the base model with merge_tiny_lora + save_pretrained, or "
            "export_merged(model, path)")
    return seeds.pop()


def base_state_dict(state_dict: dict, swaps, model) -> dict:
    """A state dict of the adapted model as the base model names it: ``.base_layer.`` dropped
    from the adapted layers' keys, their adapter buffers and v left out."""
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(layer)] + "." for _, _, layer in swaps]
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            if not key.startswith("tiny_lora_params."):
                out[key] = value
        elif key.startswith(prefix + "base_layer."):
            out[prefix + key[len(prefix) + len("base_layer."):]] = value
    return out


class _as_base_model:
    """Within the block the model is its base model: the base layers back in place of the
    TinyLoRA layers, v's holder detached, the class the base class (transformers records
    ``type(model).__name__`` as the architecture). Restored on exit, errors included."""

    def __init__(self, model, swaps, base_cls):
        self.model, self.swaps, self.base_cls = model, swaps, base_cls

    def __enter__(self):
        m = self.model
        self.params = m._modules.pop("tiny_lora_params", None)
        self.cls = type(m)
        m.__class__ = self.base_cls
        for parent, name, layer in self.swaps:
            parent._modules[name] = layer.base_layer

    def __exit__(self, *exc):
        m = self.model
        for parent, name, layer in self.swaps:
            parent._modules[name] = layer
        m.__class__ = self.cls
        if self.params is not None:
            m._modules["tiny_lora_params"] = self.params
        return False
