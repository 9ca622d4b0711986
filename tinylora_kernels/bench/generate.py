"""Eager ``generate`` tokens/s of an adapted 4-bit model against the same model without adapter.

What users run: a random Qwen2 of ``layers`` decoder layers loaded in 4-bit NF4 (bf16 compute,
double quant) through ``from_pretrained`` (as :func:`~tinylora_kernels.testing.tiny_qwen2` does),
greedy decoding of ``new_tokens`` tokens in eval mode under ``torch.no_grad``; the layers tiny
(hidden 64) or of a real model's shapes (``model``, e.g. ``qwen2.5-coder-3b``: its 7 linears'
shapes, a vocabulary of 128). Contenders, timed in interleaved rounds (a drifting machine skews
all alike), median over rounds:

* ``bitsandbytes``: the model without adapter (its ``Linear4bit`` layers as they are);
* ``tinylora``: the same model with ``apply_tiny_lora`` (v random, non-zero), default settings;
* ``tinylora_no_decoded_copy``: the same with ``TINYLORA_CPU_DECODED_MB=0`` (the base product
  decodes NF4 at every call, as bitsandbytes does on a CPU without AVX512-BF16), timed against
  ``bitsandbytes`` in rounds of its own (a budget of 0 frees the kept copies).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from .host import env_var
from .report import result
from .timing import environment, measure, timing_method

__all__ = ["generate_cost", "GENERATE_TARGET"]

#: adapted tokens/s over bitsandbytes alone, at least
GENERATE_TARGET = 0.9


def _sizes(model) -> dict:
    """tiny_qwen2 keyword arguments for a model of :data:`~.cases.MODELS` (None: tiny)."""
    if model is None:
        return {}
    from .cases import MODELS

    shapes = MODELS[model]["shapes"]
    hidden, inter = shapes["q_proj"][1], shapes["gate_proj"][0]
    head = 128
    return dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=hidden // head,
                num_key_value_heads=shapes["k_proj"][0] // head)


def generate_cost(layers: int = 8, new_tokens: int = 32, prompt: int = 8, rounds: int = 7,
                  device: str = "cpu", progress: Callable[[str], None] = None,
                  model: str = None) -> dict:
    """Tokens/s of the three contenders above (see the module docstring)."""
    from .. import TinyLoRAGlobalParams, apply_tiny_lora
    from ..testing import tiny_qwen2

    say = progress or (lambda msg: None)
    say("building the models")
    kw = dict(num_hidden_layers=layers, seed=0, device=device, compute_dtype=torch.bfloat16,
              **_sizes(model))
    bare = tiny_qwen2(True, **kw).eval()
    ours = tiny_qwen2(True, **kw).eval()
    say("adapting" + (" (the SVDs of full-size weights take a minute per layer on a CPU)"
                      if model else ""))
    gp = TinyLoRAGlobalParams(u_dim=16, device=device)
    torch.manual_seed(0)
    n_adapted = apply_tiny_lora(ours, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.01)
    ids = torch.randint(0, bare.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(2)).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0)

    def run(model, decoded_mb=None, **extra):
        def go():
            with env_var("TINYLORA_CPU_DECODED_MB", decoded_mb), torch.no_grad():
                model.generate(ids, **kw, **extra)
        return go

    fns: Dict[str, Callable] = {"bitsandbytes": run(bare), "tinylora": run(ours)}
    if device == "cuda":        # transformers compiles the decode step by itself on a GPU
        fns["tinylora_static_cache"] = run(ours, cache_implementation="static")
        say("compiling the static-cache decode step")
        fns["tinylora_static_cache"]()
    say(f"{rounds} interleaved rounds")
    stats = measure(fns, device, clock="wall", rounds=rounds, reps=1)
    # apart: a budget of 0 frees the kept copies, which the default contender would then remake
    # in every round
    say(f"{rounds} interleaved rounds without kept copies")
    stats["tinylora_no_decoded_copy"] = measure(
        {"bitsandbytes": run(bare), "tinylora_no_decoded_copy": run(ours, "0")}, device,
        clock="wall", rounds=rounds, reps=1)["tinylora_no_decoded_copy"]
    summary = []
    for name, st in stats.items():
        st["tokens_per_s"] = new_tokens / (st["median_us"] * 1e-6)
        if name != "bitsandbytes":
            ratio = st["tokens_per_s"] / stats["bitsandbytes"]["tokens_per_s"]
            summary.append(f"{name}: {st['tokens_per_s']:.1f} tokens/s = {ratio:.2f}x the "
                           f"tokens/s of bitsandbytes alone"
                           + (f" (target ≥ {GENERATE_TARGET})" if name == "tinylora" else ""))
    return result(
        "generate", f"eager generate, {layers}-layer 4-bit NF4 {model or 'tiny'} Qwen2 (hidden "
        f"{bare.config.hidden_size}, intermediate {bare.config.intermediate_size}, bf16 "
        f"compute), batch 1, greedy, {device}; µs per generate call", device,
        timing_method(device, "wall", rounds=rounds, reps=1),
        [{"case": {"layers": layers, "adapted_linears": n_adapted, "prompt": prompt,
                   "new_tokens": new_tokens}, "floor_us": None, "providers": stats}],
        env=environment(device), dtype=str(bare.dtype), baseline="bitsandbytes",
        legend=GENERATE_LEGEND, summary=summary, target=GENERATE_TARGET)


GENERATE_LEGEND = {
    "bitsandbytes": "the model without adapter",
    "tinylora": "the same model with the adapter, default settings (on a CPU the base product "
                "from a kept decoded copy of each NF4 weight within TINYLORA_CPU_DECODED_MB, or "
                "on a CPU with AVX512-BF16 bitsandbytes' packed kernel where it measured "
                "faster)",
    "tinylora_no_decoded_copy": "the same with TINYLORA_CPU_DECODED_MB=0: no kept copies "
                                "(NF4 decoded at every call, as bitsandbytes does on a CPU "
                                "without AVX512-BF16)",
    "tinylora_static_cache": "(GPU only) the adapted model with cache_implementation='static': "
                             "transformers compiles the decode step (CUDA graphs), compiled "
                             "before timing"}
