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

import os
import statistics
import time
from typing import Callable, Dict

import torch

__all__ = ["generate_cost", "generate_cost_markdown", "GENERATE_TARGET"]

#: adapted tokens/s over bitsandbytes alone, at least
GENERATE_TARGET = 0.85


def _env_set(name: str, value):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    return old


def generate_cost(layers: int = 8, new_tokens: int = 32, prompt: int = 8, rounds: int = 7,
                  device: str = "cpu", progress: Callable[[str], None] = None) -> dict:
    """Tokens/s of the three contenders above (see the module docstring)."""
    from .. import TinyLoRAGlobalParams, apply_tiny_lora
    from .timing import _environment
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
            old = _env_set("TINYLORA_CPU_DECODED_MB", decoded_mb)
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(ids, **kw)
                if device == "cuda":
                    torch.cuda.synchronize()
                return new_tokens / (time.perf_counter() - t0), out
            finally:
                _env_set("TINYLORA_CPU_DECODED_MB", old)
        return go

    fns: Dict[str, Callable] = {"bitsandbytes": run(bare), "tinylora": run(ours),
                                "tinylora_no_decoded_copy": run(ours, "0")}
    for fn in fns.values():            # warm-up: first calls build what is kept
        fn()
    per = {name: [] for name in fns}
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for name, fn in fns.items():
            per[name].append(fn()[0])
    med = {name: statistics.median(v) for name, v in per.items()}
    return {
        "what": f"eager generate, {layers}-layer 4-bit NF4 tiny Qwen2 (hidden "
                f"{bare.config.hidden_size}, intermediate {bare.config.intermediate_size}), "
                f"batch 1, prompt {prompt}, {new_tokens} new tokens, greedy, {device}",
        "env": _environment(device), "threads": torch.get_num_threads(),
        "adapted_layers": n_adapted, "rounds": rounds, "target": GENERATE_TARGET,
        "tokens_per_s": {name: {"median": med[name], "rounds": per[name]} for name in per},
        "ratio": {name: med[name] / med["bitsandbytes"] for name in per if name != "bitsandbytes"},
    }


def generate_cost_markdown(data: dict) -> str:
    """The tokens/s table with its legend, from :func:`generate_cost`'s JSON."""
    lines = [f"{data['what']}; torch {data['env']['torch']}, bitsandbytes "
             f"{data['env']['bitsandbytes']}, {data['threads']} threads; tokens/s, median of "
             f"{data['rounds']} interleaved rounds.", "",
             "| contender | tokens/s | vs bitsandbytes alone | target |", "|---|---|---|---|"]
    for name, row in data["tokens_per_s"].items():
        ratio = data["ratio"].get(name)
        shown = "1.00" if ratio is None else f"{ratio:.2f}"
        target = f"≥ {data['target']}" if name == "tinylora" else ""
        lines.append(f"| {name} | {row['median']:.1f} | {shown} | {target} |")
    lines += ["", "Legend: bitsandbytes = the model without adapter; tinylora = with the adapter "
              "(default settings: the CPU base product from a kept decoded copy of each NF4 "
              "weight within TINYLORA_CPU_DECODED_MB); tinylora_no_decoded_copy = the same with "
              "that copy turned off (NF4 decoded at every call, as bitsandbytes does here)."]
    return "\n".join(lines) + "\n"
