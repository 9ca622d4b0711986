"""Eager ``generate`` tokens/s of an adapted 4-bit model against the same model without adapter.

What users run: a random Qwen2 of ``layers`` decoder layers loaded in 4-bit NF4 through
``from_pretrained`` (as :func:`~tinylora_kernels.testing.tiny_qwen2` does), greedy decoding of
``new_tokens`` tokens in eval mode under ``torch.no_grad``. Contenders, timed in interleaved rounds
(a drifting machine skews all alike), median over rounds:

* ``bitsandbytes``: the model without adapter (its ``Linear4bit`` layers as they are);
* ``tinylora``: the same model with ``apply_tiny_lora`` (v random, non-zero), default settings;
* ``tinylora_no_decoded_copy``: the same with ``TINYLORA_CPU_DECODED_MB=0`` (the base product
  decodes NF4 at every call, as bitsandbytes does on a CPU without AVX512-BF16).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from .host import env_var
from .report import result
from .timing import environment, measure, timing_method

__all__ = ["generate_cost", "GENERATE_TARGET"]

#: adapted tokens/s over bitsandbytes alone, at least
GENERATE_TARGET = 0.85


def generate_cost(layers: int = 8, new_tokens: int = 32, prompt: int = 8, rounds: int = 7,
                  device: str = "cpu", progress: Callable[[str], None] = None) -> dict:
    """Tokens/s of the three contenders above (see the module docstring)."""
    from .. import TinyLoRAGlobalParams, apply_tiny_lora
    from ..testing import tiny_qwen2

    say = progress or (lambda msg: None)
    say("building the models")
    bare = tiny_qwen2(True, num_hidden_layers=layers, seed=0, device=device).eval()
    ours = tiny_qwen2(True, num_hidden_layers=layers, seed=0, device=device).eval()
    gp = TinyLoRAGlobalParams(u_dim=16, device=device)
    torch.manual_seed(0)
    n_adapted = apply_tiny_lora(ours, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.01)
    ids = torch.randint(0, bare.config.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(2)).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0)

    def run(model, decoded_mb=None):
        def go():
            with env_var("TINYLORA_CPU_DECODED_MB", decoded_mb), torch.no_grad():
                model.generate(ids, **kw)
        return go

    fns: Dict[str, Callable] = {"bitsandbytes": run(bare), "tinylora": run(ours),
                                "tinylora_no_decoded_copy": run(ours, "0")}
    say(f"{rounds} interleaved rounds")
    stats = measure(fns, device, clock="wall", rounds=rounds, reps=1)
    summary = []
    for name, st in stats.items():
        st["tokens_per_s"] = new_tokens / (st["median_us"] * 1e-6)
        if name != "bitsandbytes":
            ratio = st["tokens_per_s"] / stats["bitsandbytes"]["tokens_per_s"]
            summary.append(f"{name}: {st['tokens_per_s']:.1f} tokens/s = {ratio:.2f}x the "
                           f"tokens/s of bitsandbytes alone"
                           + (f" (target ≥ {GENERATE_TARGET})" if name == "tinylora" else ""))
    return result(
        "generate", f"eager generate, {layers}-layer 4-bit NF4 tiny Qwen2 (hidden "
        f"{bare.config.hidden_size}, intermediate {bare.config.intermediate_size}), batch 1, "
        f"greedy, {device}; µs per generate call", device,
        timing_method(device, "wall", rounds=rounds, reps=1),
        [{"case": {"layers": layers, "adapted_linears": n_adapted, "prompt": prompt,
                   "new_tokens": new_tokens}, "floor_us": None, "providers": stats}],
        env=environment(device), dtype=str(bare.dtype), baseline="bitsandbytes",
        legend=GENERATE_LEGEND, summary=summary, target=GENERATE_TARGET)


GENERATE_LEGEND = {
    "bitsandbytes": "the model without adapter",
    "tinylora": "the same model with the adapter, default settings (on a CPU the base product "
                "from a kept decoded copy of each NF4 weight within TINYLORA_CPU_DECODED_MB)",
    "tinylora_no_decoded_copy": "the same with that copy turned off (NF4 decoded at every "
                                "call, as bitsandbytes does on this CPU)"}
