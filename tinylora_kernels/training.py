"""Training with Hugging Face's ``Trainer`` family (TRL's ``GRPOTrainer`` included).

Two things the users' program did by hand are done here:

* the ``Trainer`` refuses to fine-tune a bitsandbytes-quantized model that carries no trainable
  adapter it knows of ("purely quantized"); a model adapted by :func:`~tinylora_kernels.apply_tiny_lora`
  does carry one, and ``apply_tiny_lora`` tells transformers so
  (:func:`tinylora_kernels.bnb.declare_adapter`: the model's quantizer gets a subclass that says its
  model is trainable; nothing else about it changes: saving, loading and moving the model behave as
  before);
* :class:`TinyLoRACallback` writes ``tiny_lora_v.pt`` in the users' format into every checkpoint
  directory the trainer saves and into ``output_dir`` at the end, from the main process only.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

__all__ = ["TinyLoRACallback"]

def _trainer_callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:                                       # pragma: no cover
        return object
    return TrainerCallback


class TinyLoRACallback(_trainer_callback_base()):
    """Writes ``tiny_lora_v.pt`` (the users' format, see :func:`~tinylora_kernels.save_tiny_lora`)
    at each trainer save, into that checkpoint's directory, and at the end of training into
    ``output_dir``. Only the main process writes.

    Args:
        seed: the value given to ``torch.manual_seed`` right before ``apply_tiny_lora`` (or its
            ``rng_seed``): the checkpoint needs it to rebuild P.
        model_id: what the base model is called (recorded in the file).
        filename: the checkpoint's file name.
    """

    def __init__(self, seed: int, model_id: str, filename: str = "tiny_lora_v.pt"):
        self.seed = seed
        self.model_id = model_id
        self.filename = filename
        self.written = []

    def _write(self, model, directory: str, args) -> Optional[str]:
        if not getattr(args, "should_save", True):         # not the main process
            return None
        from .checkpoint import save_tiny_lora

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, self.filename)
        save_tiny_lora(_unwrap(model), path, seed=self.seed, model_id=self.model_id)
        self.written.append(path)
        log.info("wrote %s", path)
        return path

    def on_save(self, args, state, control, model=None, **kwargs):
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self._write(model, directory, args)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(model, args.output_dir, args)
        return control


def _unwrap(model):
    """The adapted model inside DDP / accelerate wrappers."""
    while hasattr(model, "module") and not hasattr(model, "tiny_lora_params"):
        model = model.module
    return model
