"""What a v per sequence costs: a batch with a different adapter in every row against the same
batch with one shared v (:mod:`tinylora_kernels.adapter_set`).

Two measurements, each timed in interleaved rounds (median):

* ``layer``: one 4-bit TinyLoRA linear (``n`` x ``k``) called inside a model call on M = ``rows``
  sequences of one token (decode), every row its own v, against the same call with the model's v;
* ``generate``: eager greedy ``generate`` of an 8-layer 4-bit tiny Qwen2 on ``batch`` prompts,
  each its own v, against the same batch with one v (tokens/s).
"""

from __future__ import annotations


import torch
import torch.nn as nn

from .timing import interleaved

__all__ = ["adapter_batch_cost", "adapter_batch_markdown", "TARGET"]

#: different v per row over one shared v, at most (CPU)
TARGET = 1.1


def _layer_case(n: int, k: int, rows: int, rounds: int, device: str) -> dict:
    import bitsandbytes as bnb

    from .. import AdapterSet, TinyLoRAGlobalParams, apply_tiny_lora

    gen = torch.Generator().manual_seed(0)
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit((torch.randn(n, k, generator=gen) * 0.02), requires_grad=False,
                                   quant_type="nf4").to(device)
    lin.train()               # bitsandbytes' eval-mode CPU forward would repack the weight

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = lin

        def forward(self, x):
            return self.q_proj(x)

    model = One()
    gp = TinyLoRAGlobalParams(u_dim=16, device=device, dtype=torch.float32)
    torch.manual_seed(1)
    apply_tiny_lora(model, gp, progress=False)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(16, generator=gen) * 0.1)
    adapters = AdapterSet(model, {f"v{i}": torch.randn(16, generator=gen) * 0.1
                                  for i in range(rows)})
    x = torch.randn(rows, 1, k, generator=gen).to(device, torch.bfloat16)
    names = adapters.names

    def shared():
        with torch.no_grad():
            model(x)

    def per_row():
        with torch.no_grad(), adapters.per_sequence(model, names):
            model(x)

    t = interleaved({"shared_v": shared, "v_per_row": per_row}, rounds, 50, warmup=1)
    return {"n": n, "k": k, "rows": rows,
            "us": {name: v["median_us"] for name, v in t.items()},
            "ratio": t["v_per_row"]["median_us"] / t["shared_v"]["median_us"]}


def _generate_case(batch: int, new_tokens: int, rounds: int, device: str) -> dict:
    from .. import AdapterSet, TinyLoRAGlobalParams, apply_tiny_lora
    from ..testing import tiny_qwen2

    model = tiny_qwen2(True, num_hidden_layers=8, seed=0, device=device).eval()
    gp = TinyLoRAGlobalParams(u_dim=16, device=device)
    torch.manual_seed(0)
    apply_tiny_lora(model, gp, progress=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        gp.global_v.copy_(torch.randn(16, generator=gen) * 0.01)
    adapters = AdapterSet(model, {f"v{i}": torch.randn(16, generator=gen) * 0.01
                                  for i in range(batch)})
    ids = torch.randint(0, model.config.vocab_size, (batch, 8), generator=gen).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=0)

    def shared():
        with torch.no_grad():
            model.generate(ids, **kw)

    def per_row():
        with torch.no_grad(), adapters.per_sequence(model, adapters.names):
            model.generate(ids, **kw)

    t = interleaved({"shared_v": shared, "v_per_row": per_row}, rounds, 1, warmup=1)
    tps = {name: batch * new_tokens / (v["median_us"] * 1e-6) for name, v in t.items()}
    return {"batch": batch, "new_tokens": new_tokens, "tokens_per_s": tps,
            "ratio": t["v_per_row"]["median_us"] / t["shared_v"]["median_us"]}


def adapter_batch_cost(device: str = "cpu", rounds: int = 7, progress=None) -> dict:
    """Both measurements (see the module docstring); ratios are time(v per row) /
    time(shared v)."""
    from .timing import _environment

    say = progress or (lambda msg: None)
    say("layer, M = 64")
    layer = _layer_case(1024, 1024, 64, rounds, device)
    say("generate, 8 sequences")
    generate = _generate_case(8, 16, rounds, device)
    return {"what": "a different v in every row vs one shared v (time ratio; 4-bit NF4, bf16 "
                    f"activations, {device})", "env": _environment(device),
            "threads": torch.get_num_threads(), "rounds": rounds, "target": TARGET,
            "layer": layer, "generate": generate}


def adapter_batch_markdown(data: dict) -> str:
    """The cost table, from :func:`adapter_batch_cost`'s JSON."""
    lay, gen = data["layer"], data["generate"]
    return "\n".join([
        f"{data['what']}; torch {data['env']['torch']}, bitsandbytes "
        f"{data['env']['bitsandbytes']}, {data['threads']} threads; medians of "
        f"{data['rounds']} interleaved rounds.", "",
        "| case | shared v | a v per row | ratio | target |", "|---|---|---|---|---|",
        f"| layer {lay['n']} x {lay['k']}, M = {lay['rows']} (one token per sequence) | "
        f"{lay['us']['shared_v']:.1f} µs | {lay['us']['v_per_row']:.1f} µs | "
        f"{lay['ratio']:.2f} | ≤ {data['target']} |",
        f"| generate, 8-layer tiny Qwen2, {gen['batch']} sequences x {gen['new_tokens']} "
        f"tokens | {gen['tokens_per_s']['shared_v']:.1f} tokens/s | "
        f"{gen['tokens_per_s']['v_per_row']:.1f} tokens/s | {gen['ratio']:.2f} | "
        f"≤ {data['target']} |", "",
        "Ratio = time with a different v in every row / time with one shared v (lower is "
        "better; 1.00 = free)."]) + "\n"
