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

from .cases import nf4_linear
from .report import result
from .timing import environment, measure, timing_method

__all__ = ["adapter_batch_cost", "TARGET"]

#: different v per row over one shared v, at most (CPU)
TARGET = 1.1


def _layer_case(n: int, k: int, rows: int, rounds: int, device: str) -> dict:
    from .. import AdapterSet, TinyLoRAGlobalParams, apply_tiny_lora

    gen = torch.Generator().manual_seed(0)
    lin = nf4_linear(torch.randn(n, k, generator=gen) * 0.02, device, torch.bfloat16)
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

    t = measure({"shared_v": shared, "v_per_row": per_row}, device, clock="wall",
                rounds=rounds, reps=50)
    return {"case": {"case": "layer", "N": n, "K": k, "sequences": rows, "tokens": 1},
            "floor_us": None, "providers": t}


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

    t = measure({"shared_v": shared, "v_per_row": per_row}, device, clock="wall",
                rounds=rounds, reps=1)
    for v in t.values():
        v["tokens_per_s"] = batch * new_tokens / (v["median_us"] * 1e-6)
    return {"case": {"case": "generate, 8-layer tiny Qwen2", "sequences": batch,
                     "tokens": new_tokens}, "floor_us": None, "providers": t}


def adapter_batch_cost(device: str = "cpu", rounds: int = 7, progress=None) -> dict:
    """Both measurements (see the module docstring); the ratio column is time(v per row) /
    time(shared v)."""
    say = progress or (lambda msg: None)
    say("layer, M = 64")
    rows = [_layer_case(1024, 1024, 64, rounds, device)]
    say("generate, 8 sequences")
    rows.append(_generate_case(8, 16, rounds, device))
    summary = []
    for r in rows:
        t = r["providers"]
        ratio = t["v_per_row"]["median_us"] / t["shared_v"]["median_us"]
        summary.append(f"{r['case']['case']}: a v per row costs {ratio:.2f}x the time of one "
                       f"shared v (target ≤ {TARGET})")
    return result(
        "adapters", f"a different v in every row vs one shared v (4-bit NF4, bf16 activations, "
        f"{device})", device, timing_method(device, "wall", rounds=rounds), rows,
        env=environment(device), dtype="torch.bfloat16", baseline="shared_v",
        legend={"shared_v": "the batch with the model's one v",
                "v_per_row": "the same batch, every sequence its own v (AdapterSet.per_sequence)"},
        summary=summary, target=TARGET)
