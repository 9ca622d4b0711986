"""The suite's cases and what each provider runs (see :mod:`tinylora_kernels.bench`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..backend import use_backend as _backend

#: (N, K) of every adapted linear, and the decoder-layer count, per model.
MODELS: Dict[str, dict] = {
    "qwen2.5-coder-3b": {"layers": 36, "shapes": {
        "q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048),
        "o_proj": (2048, 2048), "gate_proj": (11008, 2048), "up_proj": (11008, 2048),
        "down_proj": (2048, 11008)}},
    "qwen2.5-7b": {"layers": 28, "shapes": {
        "q_proj": (3584, 3584), "k_proj": (512, 3584), "v_proj": (512, 3584),
        "o_proj": (3584, 3584), "gate_proj": (18944, 3584), "up_proj": (18944, 3584),
        "down_proj": (3584, 18944)}},
    # the same structure at a size a 2-core CPU runs in seconds
    "cpu-reduced": {"layers": 2, "shapes": {
        "q_proj": (256, 256), "k_proj": (64, 256), "v_proj": (64, 256), "o_proj": (256, 256),
        "gate_proj": (704, 256), "up_proj": (704, 256), "down_proj": (256, 704)}},
}
PROVIDERS = ("materialized", "peft_style", "bnb_base", "dense_bf16", "reference", "fused",
             "fused_no_adapter")
#: what each provider runs (the bench Markdown's legend)
PROVIDER_DESCRIPTIONS = {
    "materialized": "the users' reference program: bitsandbytes Linear4bit + ΔW rebuilt (out x "
                    "in) at every call + a second full matmul",
    "peft_style": "bitsandbytes Linear4bit + the factorized adapter as separate torch ops "
                  "(x Aᵀ, · Rᵀ, · Bᵀ, add)",
    "bnb_base": "bitsandbytes Linear4bit alone, no adapter",
    "dense_bf16": "torch linear on the unquantized weight in the run's dtype + the factorized "
                  "adapter as separate torch ops",
    "reference": "this package's torch path: TinyLoRALinear with the reference backend",
    "fused": "this package's Triton kernels: TinyLoRALinear with the triton backend",
    "fused_no_adapter": "the same kernels as fused, by the same plan, with the adapter compiled "
                        "out (what the adapter costs inside them; forward only)",
}
MODES = ("fwd", "bwd", "fwd+bwd")
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
RANK, U = 2, 13


@dataclass(frozen=True)
class Case:
    """One case of the suite: a layer (or layers) of a model's shapes, at M rows, in a mode."""

    model: str
    layer: str       # a linear's name, "decoder_layer", or "stack<N>"
    M: int
    mode: str

    def linears(self) -> List[tuple]:
        shapes = MODELS[self.model]["shapes"]
        if self.layer in shapes:
            return [(self.layer, *shapes[self.layer])]
        repeat = int(self.layer[5:]) if self.layer.startswith("stack") else 1
        return [(name, n, k) for _ in range(repeat) for name, (n, k) in shapes.items()]


def default_cases(device: str, models=None, ms=None, modes=("fwd",), layers=None) -> List[Case]:
    """The default set: every linear, plus the decoder layer, for each model, M and mode."""
    if models is None:
        models = ["qwen2.5-coder-3b"] if device == "cuda" else ["cpu-reduced"]
    if ms is None:
        ms = [1, 16, 128, 4096] if device == "cuda" else [1, 16, 128]
    cases = []
    for model in models:
        names = layers or (list(MODELS[model]["shapes"]) + ["decoder_layer"])
        cases += [Case(model, name, m, mode) for mode in modes for m in ms for name in names]
    return cases


def cpu_note(models, what: str = "GPU figures need a GPU") -> str:
    """The note a CPU run carries: CPU timings, and reduced shapes where the run used them."""
    shapes = "reduced shapes and " if "cpu-reduced" in set(models) else ""
    return f"CPU run: {shapes}CPU timings; {what}"


def nf4_linear(w: torch.Tensor, device: str, compute_dtype: torch.dtype,
               bias: bool = False) -> torch.nn.Module:
    """bitsandbytes' ``Linear4bit`` holding ``w`` (out x in) in NF4 with double quantization,
    on ``device``: the 4-bit layer every bench mode times."""
    import bitsandbytes as bnb

    n, k = w.shape
    lin = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype,
                            compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to(device)
    return lin


# -- the layers each provider runs ------------------------------------------------------------
class SharedModel(torch.nn.Module):
    """The suite's adapted linears as one model: one v for all of them, and a model call (v's
    view, every layer's R and adapter operands formed once, as in a real model's call) around
    each timed call of the package's providers."""

    def __init__(self, device: str, gen: torch.Generator):
        from .. import TinyLoRAGlobalParams
        from ..adapter_state import install_call_hooks

        super().__init__()
        self.gp = TinyLoRAGlobalParams(u_dim=U, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.gp.global_v.copy_(torch.randn(U, generator=gen) * 0.1)
        self.layers = torch.nn.ModuleList()
        install_call_hooks(self, self.gp)

    def call(self):
        """The context of one model call."""
        from ..adapter_state import model_call

        return model_call(self)


class _Linear:
    """One adapted linear in every form the providers need, built from one random weight."""

    def __init__(self, n: int, k: int, device: str, dtype: torch.dtype, gen: torch.Generator,
                 model: Optional["SharedModel"] = None):
        from .. import TinyLoRAGlobalParams, TinyLoRALinear

        w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        self.dense = w.to(device)
        lin = nf4_linear(w, device, dtype)
        self.gp = TinyLoRAGlobalParams(u_dim=U, device=device, dtype=torch.float32) \
            if model is None else model.gp
        self.layer = TinyLoRALinear(lin, RANK, None, self.gp, projection="diagonal",
                                    svd="device" if device == "cuda" else "cpu",
                                    generator=torch.Generator().manual_seed(n * 7 + k))
        if model is None:
            with torch.no_grad():
                self.gp.global_v.copy_(torch.randn(U, generator=gen) * 0.1)
        else:
            model.layers.append(self.layer)
        self.lin4 = lin

    def base(self, x):
        import bitsandbytes as bnb

        # called directly: Linear4bit.forward would repack the weight in place on some CPUs
        return bnb.matmul_4bit(x, self.lin4.weight.t(), quant_state=self.lin4.weight.quant_state)

    def factors(self, dtype):
        f = self.layer.adapter_factors()
        return f.A.to(dtype), f.B.to(dtype), f.R.to(dtype)

    def run(self, provider: str, x):
        if provider == "bnb_base":
            return self.base(x)
        if provider in ("peft_style", "dense_bf16"):
            A, B, R = self.factors(x.dtype)
            base = self.base(x) if provider == "peft_style" else F.linear(x, self.dense)
            return base + ((x @ A.t()) @ R.t()) @ B.t()
        if provider == "materialized":
            lay = self.layer
            v = self.gp.global_v.to(torch.bfloat16)
            R = torch.diag(v @ lay.P)
            delta = (lay.U * lay.S) @ R @ lay.Vh               # out x in, every call
            return self.base(x) + x @ delta.to(x.dtype).t()
        if provider == "fused_no_adapter":
            return self._kernels_alone(x)
        with _backend("triton" if provider == "fused" else "reference"):
            return self.layer(x)

    def _kernels_alone(self, x):
        from .. import router
        from ..ops.custom_ops import kernel_forward

        with _backend("triton"):
            plan = router.explain(self.layer, x)
        if plan.path not in ("gemv", "fused", "large_m"):
            raise RuntimeError(f"the plan is {plan.path}, not a kernel path")
        return kernel_forward(plan.path, x, self.layer.kernel_weight(), None, None,
                              out_dtype=plan.out_dtype, config=plan.config)


def provider_missing(provider: str, device: str, mode: str = "fwd") -> Optional[str]:
    """None when the provider can run ``mode`` on ``device``, else why not."""
    if provider == "fused_no_adapter" and mode != "fwd":
        return "forward only (it measures the adapter's cost inside the forward kernels)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return "bitsandbytes is not installed"
    if provider in ("fused", "fused_no_adapter"):
        from ..ops import triton_missing

        why = triton_missing()
        if why is None and device == "cpu":
            why = "the Triton kernels are timed on a GPU (their CPU interpreter is for tests)"
        return why
    return None
