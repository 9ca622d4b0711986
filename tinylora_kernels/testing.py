"""Small random models and the float64 oracle, for tests, ``tinylora-kernels check`` and benchmarks.

Nothing is downloaded: a Qwen2 architecture is built from a config with random weights, saved to a
directory and loaded back through ``from_pretrained`` with a ``BitsAndBytesConfig``, exactly the
way users load the real model.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Optional

import torch

from .reference import tinylora_f64

__all__ = ["tiny_qwen2_config", "tiny_qwen2", "tinylora_f64", "reference_error_budget",
           "layer_truth_and_lowp"]


def tiny_qwen2_config(num_hidden_layers: int = 2, hidden_size: int = 64,
                      intermediate_size: int = 128, num_attention_heads: int = 4,
                      num_key_value_heads: int = 2, vocab_size: int = 128):
    """A Qwen2 config with the real layer names (q/k/v/o, gate/up/down) and tiny sizes."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=256,
        tie_word_embeddings=False, use_cache=True)


def tiny_qwen2(quantized: bool = True, *, double_quant: bool = True,
               compute_dtype: torch.dtype = torch.float16, seed: int = 0,
               directory: Optional[str] = None, dtype: torch.dtype = torch.bfloat16,
               device: str = "cpu", quant_storage: torch.dtype = torch.uint8, **config_kwargs):
    """A random Qwen2 causal LM, loaded as users load theirs.

    ``quantized=True`` loads it with ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
    bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=quant_storage)`` (needs
    bitsandbytes; ``quant_storage=torch.bfloat16`` is QLoRA-FSDP's storage). The unquantized
    parts, and the dtype the NF4 weights decode to, are ``dtype`` (bf16, as in the users' setup).
    The weights are drawn from ``seed`` inside a forked RNG: the caller's global RNG state is not
    changed.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_qwen2_config(**config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # the default init (std 0.02) is fine, but make the spectrum less flat so that the
        # top-r singular directions are well separated and comparisons are meaningful
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape[0], 1) @ torch.randn(1, p.shape[1]) * 0.05)
    ctx = tempfile.TemporaryDirectory() if directory is None else contextlib.nullcontext(directory)
    with ctx as d, _quiet_transformers():
        model.save_pretrained(d)
        if not quantized:
            return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device)
        from transformers import BitsAndBytesConfig

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_quant_storage=quant_storage)
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=qc, device_map=device,
                                                    dtype=dtype)


@contextlib.contextmanager
def _quiet_transformers():
    """No save/load progress bars for these tiny models (restored after)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def reference_error_budget(y_test: torch.Tensor, y_lowp: torch.Tensor, y_f64: torch.Tensor,
                           atol: float = 1e-5) -> tuple:
    """(error of y_test, allowed error) under the 2x-torch rule.

    ``y_lowp`` is torch's own low-precision computation of the same function; the tested output
    may be at most twice as far from the float64 truth, plus ``atol``.
    """
    err = (y_test.double() - y_f64).abs().max().item()
    budget = 2 * (y_lowp.double() - y_f64).abs().max().item() + atol
    return err, budget


def layer_truth_and_lowp(layer, x: torch.Tensor):
    """For a TinyLoRALinear and an input, (float64 truth, torch's own low-precision result).

    The truth uses the exact stored values (decoded NF4 weight, bf16 buffers, v). The
    low-precision result is the users' formula, ΔW formed, in the dtype the base layer computes
    in for this x (bitsandbytes' compute dtype for a 4-bit base), rounded to the output dtype.
    """
    from .bnb import is_linear4bit, linear4bit_compute_dtype, nf4_of
    from .nf4 import dequantize_nf4

    base = layer.base_layer
    # The exact weight: NF4 level x block scale as one fp32 product (not rounded to the quant
    # state's dtype: bitsandbytes decodes straight to the compute dtype).
    W = dequantize_nf4(nf4_of(base), torch.float32) if is_linear4bit(base) else base.weight
    v = layer.global_params_ref.global_v
    truth = tinylora_f64(x, W, layer.U, layer.S, layer.Vh, layer.P, v, layer.projection,
                         base.bias)
    if is_linear4bit(base):
        cd = linear4bit_compute_dtype(base, x)
    else:
        cd = base.weight.dtype
    S = layer.S.to(cd)
    S = S if S.dim() == 2 else torch.diag(S)
    if layer.projection == "full":
        R = torch.einsum("u,urs->rs", v.to(cd), layer.P.to(cd))
    else:
        R = torch.diag(v.to(cd) @ layer.P.to(cd))
    delta_w = layer.U.to(cd) @ S @ R @ layer.Vh.to(cd)
    xl = x.to(cd)
    lowp = xl @ W.to(cd).T + xl @ delta_w.T
    if base.bias is not None:
        lowp = lowp + base.bias.to(cd)
    return truth, lowp.to(x.dtype)
