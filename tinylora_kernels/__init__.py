"""tinylora_kernels: TinyLoRA adapters on 4-bit (NF4) and 16-bit language models.

A drop-in for the users' ``TinyLoRAGlobalParams`` / ``TinyLoRALinear`` / ``apply_tiny_lora`` that
computes the adapter factorized, reads and writes their ``tiny_lora_v.pt`` checkpoints, and keeps a
pure-torch reference of every piece of math as the oracle for the fused kernels.

Importing this package needs neither a GPU nor Triton nor bitsandbytes.
"""

from .adapter_set import AdapterSet
from .backend import use_backend
from .checkpoint import (CheckpointError, TinyLoRACheckpoint, load_tiny_lora, read_checkpoint,
                         save_tiny_lora)
from .factors import FactorCache
from .interop import (export_lora, export_merged, import_peft_tinylora, merge_tiny_lora,
                      unmerge_tiny_lora)
from .layers import (TinyLoRAGlobalParams, TinyLoRALinear, apply_tiny_lora, set_backend,
                     tiny_lora_layers)
from .nf4 import NF4Weight, dequantize_nf4
from .reference import AdapterFactors, adapter_delta, projection_matrix

__version__ = "0.1.0"


def __getattr__(name):
    # imported on first use: it imports transformers' Trainer machinery
    if name == "TinyLoRACallback":
        from .training import TinyLoRACallback
        return TinyLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_environment():
    """A bad ``TINYLORA_BACKEND`` is said at import (and raised by ``apply_tiny_lora``)."""
    import warnings

    from . import backend

    try:
        backend.from_environment()
    except ValueError as exc:
        warnings.warn(str(exc), stacklevel=3)


_check_environment()

__all__ = [
    "AdapterFactors",
    "AdapterSet",
    "CheckpointError",
    "FactorCache",
    "NF4Weight",
    "TinyLoRACheckpoint",
    "TinyLoRAGlobalParams",
    "TinyLoRACallback",
    "TinyLoRALinear",
    "adapter_delta",
    "apply_tiny_lora",
    "dequantize_nf4",
    "export_lora",
    "import_peft_tinylora",
    "export_merged",
    "load_tiny_lora",
    "merge_tiny_lora",
    "projection_matrix",
    "read_checkpoint",
    "save_tiny_lora",
    "set_backend",
    "tiny_lora_layers",
    "unmerge_tiny_lora",
    "use_backend",
]
