"""``tiny_lora_v.pt`` checkpoints: the users' format, read, validated, written and restored.

The users' program writes a ``torch.save``d dict with ``global_v`` (bf16, (u,)), ``u_value``,
``rank``, ``seed``, ``model_id``, ``total_replaced_layers`` and, in newer files, ``is_quantized``.
That is not enough to rebuild the adapter unambiguously (the projection convention, how P was
drawn, which SVD), so files written here add keys for those; files without them still load, with
the documented defaults and the caller's choice of convention.

A checkpoint is untrusted input: it is read with ``torch.load(weights_only=True)`` onto the CPU and
every field is checked before the model is touched.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from .factors import RNG_SCHEMES, SVD_METHODS, draw_projections, p_scale
from .validation import as_int
from .layers import TinyLoRAGlobalParams, apply_tiny_lora, find_targets, tiny_lora_layers
from .saving import register_adapter_writer
from .torch_path import PROJECTIONS

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "CheckpointError", "TinyLoRACheckpoint", "read_checkpoint",
           "save_tiny_lora", "load_tiny_lora"]

#: Version of the keys this package adds. Files without ``format_version`` are the users' (0).
FORMAT_VERSION = 1

_USER_KEYS = {"global_v": torch.Tensor, "u_value": int, "rank": int, "seed": int, "model_id": str,
              "total_replaced_layers": int}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the problem."""


@dataclass(frozen=True)
class TinyLoRACheckpoint:
    """A validated ``tiny_lora_v.pt``. ``projection`` is None when the file does not say."""

    path: str
    global_v: torch.Tensor
    u_value: int
    rank: int
    seed: int
    model_id: str
    total_replaced_layers: int
    is_quantized: Optional[bool] = None
    format_version: int = 0
    projection: Optional[str] = None
    rng_scheme: str = "global"
    p_device_type: Optional[str] = None
    svd: str = "cpu"
    buffer_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)

    @property
    def written_by_users_program(self) -> bool:
        return self.format_version == 0

    def describe(self) -> str:
        """A human-readable summary: what the file holds and what it needs to be restored."""
        v = self.global_v.float()
        conv = self.projection or ("not recorded: pass projection='full' or 'diagonal' "
                                   "(real checkpoints from the later users' program are "
                                   "'diagonal'; the checkpoint documentation's is 'full')")
        rows = [
            ("file", self.path),
            ("written by", "the users' training program (no format_version)"
             if self.written_by_users_program else f"tinylora_kernels, format {self.format_version}"),
            ("model_id", self.model_id),
            ("u (len v)", str(self.u_value)),
            ("rank", str(self.rank)),
            ("seed", str(self.seed)),
            ("replaced layers", str(self.total_replaced_layers)),
            ("quantized base", {None: "not recorded", True: "yes", False: "no"}[self.is_quantized]),
            ("v", f"{self.global_v.dtype}, mean |v| = {v.abs().mean().item():.3g}, "
                  f"max |v| = {v.abs().max().item():.3g}"),
            ("projection", conv),
            ("P drawn from", {"global": "the global torch RNG after torch.manual_seed(seed)",
                              "per_layer": "a private CPU generator per layer (seed + index)"}
             [self.rng_scheme]
             + (f", on {self.p_device_type}" if self.p_device_type else
                (", device not recorded (the same device type as training is needed)"
                 if self.rng_scheme == "global" else ""))),
            ("SVD", {"cpu": "CPU float32 LAPACK (the users' path)",
                     "device": "on the layer's device (opt-in)"}[self.svd]),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)


def _fail(path, msg) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def _load_failure(path: str, exc: Exception) -> str:
    """Why ``torch.load`` refused a file, in words a user can act on."""
    import re
    import zipfile

    with open(path, "rb") as f:
        head = f.read(16)
    size = os.path.getsize(path)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return (f"the file is truncated or damaged: it starts as the zip archive torch.save "
                f"writes, but the archive is incomplete ({size} bytes); copy it again from its "
                "source")
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        return (f"not a torch checkpoint (torch.save writes a zip archive; this file starts with "
                f"{head!r})")
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global ['\"]?([\w.]+)", text)
    if found:
        return (f"the file asks to load the Python object {found.group(1)!r}, which was refused: "
                "a TinyLoRA checkpoint holds only tensors and plain values, and loading anything "
                "else could run code from the file")
    first = text.splitlines()[0] if text else ""
    return f"not a loadable tensors-only torch file ({type(exc).__name__}: {first})"


def read_checkpoint(path: Union[str, os.PathLike]) -> TinyLoRACheckpoint:
    """Read and validate a ``tiny_lora_v.pt`` (users' or ours) without touching any model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no TinyLoRA checkpoint at {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _fail(path, _load_failure(path, exc)) from None
    if not isinstance(sd, dict):
        raise _fail(path, f"expected a dict of checkpoint keys, found {type(sd).__name__}")
    missing = [k for k in _USER_KEYS if k not in sd]
    if missing:
        raise _fail(path, f"missing key(s) {missing}; a tiny_lora_v.pt holds {list(_USER_KEYS)}")
    for key, typ in _USER_KEYS.items():
        val = sd[key]
        if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
            raise _fail(path, f"{key!r} should be {typ.__name__}, found {type(val).__name__}")
    v = sd["global_v"]
    if v.dim() != 1 or not v.is_floating_point():
        raise _fail(path, f"'global_v' should be a 1-D floating tensor, found {v.dtype} of shape "
                          f"{tuple(v.shape)}")
    if v.numel() == 0:
        raise _fail(path, "'global_v' is empty (0 entries); a TinyLoRA v has at least one")
    if sd["u_value"] != v.numel():
        raise _fail(path, f"u_value={sd['u_value']} but global_v has {v.numel()} entries")
    if not 0 <= sd["seed"] < 2 ** 64:
        raise _fail(path, f"'seed' must be in [0, 2**64) (what torch.manual_seed takes), found "
                          f"{sd['seed']}")
    if sd["rank"] < 1:
        raise _fail(path, f"rank must be >= 1, found {sd['rank']}")
    if sd["total_replaced_layers"] < 1:
        raise _fail(path, f"total_replaced_layers must be >= 1, found {sd['total_replaced_layers']}")
    if not torch.isfinite(v).all():
        bad = (~torch.isfinite(v)).nonzero().flatten().tolist()
        raise _fail(path, f"global_v has non-finite entries at {bad}")
    if "is_quantized" in sd and not isinstance(sd["is_quantized"], bool):
        raise _fail(path, f"'is_quantized' should be bool, found {type(sd['is_quantized']).__name__}")

    fmt = sd.get("format_version", 0)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 0:
        raise _fail(path, f"'format_version' should be a non-negative int, found {fmt!r}")
    if fmt > FORMAT_VERSION:
        raise _fail(path, f"format_version {fmt} is newer than this tinylora_kernels reads "
                          f"({FORMAT_VERSION}); upgrade the package")

    def choice(key, allowed, default):
        val = sd.get(key, default)
        if val is not default and val not in allowed:
            raise _fail(path, f"{key!r} must be one of {allowed}, found {val!r}")
        return val

    projection = choice("projection", PROJECTIONS, None)
    rng_scheme = choice("rng_scheme", RNG_SCHEMES, "global")
    svd = choice("svd", SVD_METHODS, "cpu")
    buffer_dtype = choice("buffer_dtype", ("bfloat16",), "bfloat16")
    p_device_type = sd.get("p_device_type")
    if p_device_type is not None and not isinstance(p_device_type, str):
        raise _fail(path, f"'p_device_type' should be str, found {type(p_device_type).__name__}")
    if projection is not None and "p_scale" in sd:
        expected = p_scale(projection, sd["rank"])
        if not isinstance(sd["p_scale"], (int, float)) or not math.isclose(sd["p_scale"], expected):
            raise _fail(path, f"p_scale={sd['p_scale']!r} does not match the {projection!r} "
                              f"projection at rank {sd['rank']} (expected {expected})")
    scales = sd.get("base_block_scales")
    if scales is not None and scales not in ("as_stored", "rounded_to_bf16"):
        raise _fail(path, f"'base_block_scales' must be 'as_stored' or 'rounded_to_bf16', found "
                          f"{scales!r}")
    known = set(_USER_KEYS) | {"is_quantized", "format_version", "projection", "rng_scheme", "svd",
                               "buffer_dtype", "p_device_type", "p_scale"}
    return TinyLoRACheckpoint(
        path=path, global_v=v, u_value=sd["u_value"], rank=sd["rank"], seed=sd["seed"],
        model_id=sd["model_id"], total_replaced_layers=sd["total_replaced_layers"],
        is_quantized=sd.get("is_quantized"), format_version=fmt, projection=projection,
        rng_scheme=rng_scheme, p_device_type=p_device_type, svd=svd, buffer_dtype=buffer_dtype,
        extra={k: val for k, val in sd.items() if k not in known})


def _model_layers(model: nn.Module):
    layers = [m for _, m in tiny_lora_layers(model)]
    if not layers:
        raise ValueError("the model has no TinyLoRA layers: run apply_tiny_lora (or "
                         "load_tiny_lora) first")
    return layers


def _redraw(layers, seed: int, device_type: Optional[str] = None):
    """The P each layer would hold had it been adapted after ``seed`` (its RNG scheme), drawn
    inside a forked RNG; None when that cannot be redrawn here (no such device)."""
    first = layers[0]
    if first.rng_scheme == "per_layer":
        return [draw_projections(m.u, m.rank, m.projection, m.P.device,
                                 torch.Generator(device="cpu").manual_seed(seed + i))
                for i, m in enumerate(layers)]
    dev = torch.device(device_type or first.p_device_type)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return None
    if dev.type not in ("cpu", "cuda"):
        return None
    # each layer drew on its own device's generator (several GPUs: several generators)
    devices = [m.P.device if m.P.device.type == dev.type else dev for m in layers]
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return [draw_projections(m.u, m.rank, m.projection, d) for m, d in zip(layers, devices)]


def _draws_match(layers, seed: int) -> Optional[bool]:
    drawn = _redraw(layers, seed)
    if drawn is None:
        return None
    return all(torch.equal(p.to(m.P.device), m.P) for p, m in zip(drawn, layers))


def _check_projections(layers, seed: int) -> None:
    """Refuse to save when ``seed`` does not redraw exactly the P the layers hold (one draw of
    u r r numbers per layer); name the seed that does, when one the layers recorded fits."""
    ok = _draws_match(layers, seed)
    if ok is None:
        warnings.warn(f"P was drawn on {layers[0].p_device_type}, which this process does not "
                      "have: the saved seed is not checked against the layers' projections",
                      stacklevel=3)
        return
    if ok:
        return
    recorded = sorted({m.p_seed for m in layers if m.p_seed is not None and m.p_seed != seed})
    fits = [s for s in recorded if _draws_match(layers, s)]
    hint = (f"they were drawn after torch.manual_seed({fits[0]}): pass seed={fits[0]}" if fits else
            "no seed these layers recorded reproduces them either (e.g. the global RNG was not "
            "freshly seeded right before apply_tiny_lora: call torch.manual_seed(seed) first, "
            "or use apply_tiny_lora(..., rng_seed=seed))")
    raise ValueError(f"seed={seed} does not reproduce the projections P this model holds "
                     f"(RNG scheme {layers[0].rng_scheme!r}, projection "
                     f"{layers[0].projection!r}): the file would restore a different adapter; "
                     f"{hint}")


def save_tiny_lora(model: nn.Module, path: Union[str, os.PathLike], *, seed: int,
                   model_id: str) -> None:
    """Write ``tiny_lora_v.pt``: the users' keys plus what makes reconstruction unambiguous.

    ``seed`` is the value given to ``torch.manual_seed`` before ``apply_tiny_lora`` (or its
    ``rng_seed``). Before writing, P is redrawn from ``seed`` (one small draw per layer) and
    compared with the P the layers hold: a mismatch is an error naming the seed that fits, since
    that file would restore a different adapter. The write is atomic: an existing file is replaced
    only by a complete new one.
    """
    seed = as_int(seed, "seed")
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64) (what torch.manual_seed takes), got {seed}")
    if not isinstance(model_id, str):
        raise TypeError(f"model_id must be a str, got {type(model_id).__name__}")
    layers = _model_layers(model)
    params = layers[0].global_params_ref
    first = layers[0]
    foreign = [m for m in layers if m.rng_scheme not in RNG_SCHEMES]
    if foreign:
        raise ValueError(f"these TinyLoRA layers came from elsewhere (origin "
                         f"{foreign[0].rng_scheme!r}): no seed reproduces their factors, so this "
                         "format cannot hold them; keep the source adapter, or export_lora()")
    for attr in ("rank", "projection", "rng_scheme", "svd", "u"):
        values = {getattr(m, attr) for m in layers}
        if len(values) > 1:
            raise ValueError(f"the model's TinyLoRA layers disagree on {attr}: {sorted(values)}")
    if any(m.global_params_ref is not params for m in layers):
        raise ValueError("the model's TinyLoRA layers do not share one v; this format holds one")
    _check_projections(layers, seed)
    v = params.global_v.detach()
    if not torch.isfinite(v).all():
        raise ValueError("global_v has non-finite entries; refusing to save it")
    sd = {
        "global_v": v.cpu().clone(),
        "u_value": int(v.numel()),
        "rank": int(first.rank),
        "seed": int(seed),
        "model_id": model_id,
        "total_replaced_layers": len(layers),
        "is_quantized": bool(any(m.is_quantized for m in layers)),
        "format_version": FORMAT_VERSION,
        "projection": first.projection,
        "p_scale": p_scale(first.projection, first.rank),
        "rng_scheme": first.rng_scheme,
        "p_device_type": first.p_device_type,
        "svd": first.svd,
        "buffer_dtype": "bfloat16",
    }
    if any(m.is_quantized for m in layers):
        rounded = any(getattr(m, "scales_rounded_bf16", False) for m in layers)
        sd["base_block_scales"] = "rounded_to_bf16" if rounded else "as_stored"
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path}: it is a directory; give a file path, "
                                f"e.g. {os.path.join(path, 'tiny_lora_v.pt')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save {path}: the directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-tiny-lora-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(sd, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tiny_lora(model: nn.Module, path: Union[str, os.PathLike], *,
                   projection: Optional[str] = None, v_dtype: Optional[torch.dtype] = None,
                   factor_cache=None, progress: bool = True) -> nn.Module:
    """Restore a checkpoint onto ``model``: validate, seed, apply, copy v; return the model.

    The same model object is adapted in place and returned, with its
    :class:`TinyLoRAGlobalParams` at ``model.tiny_lora_params``. ``projection`` names the
    convention when the file does not record it (default ``"full"``, with a warning) and must
    agree with the file when it does. ``v_dtype`` (default: the file's) is the dtype v is kept in,
    e.g. float32 to go on training. Any problem raises before the model is touched; the caller's
    RNG state is left as it was.

    A model that already carries TinyLoRA layers made the same way (rank, u, projection, seed)
    just receives the new v.
    """
    if v_dtype is not None and (not isinstance(v_dtype, torch.dtype)
                                or not v_dtype.is_floating_point):
        raise ValueError(f"v_dtype must be a floating torch dtype (e.g. torch.float32), got "
                         f"{v_dtype!r}")
    ck = read_checkpoint(path)
    if projection is not None and projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if ck.projection is not None and projection is not None and projection != ck.projection:
        raise CheckpointError(f"{ck.path}: the file was written with projection="
                              f"{ck.projection!r}, but projection={projection!r} was asked for")
    if ck.projection is None and projection is None:
        warnings.warn(f"{ck.path} does not record its projection convention; using 'full' (the "
                      "checkpoint documentation's). Pass projection='diagonal' for files from "
                      "the later users' program", stacklevel=2)
    proj = ck.projection or projection or "full"
    v = ck.global_v.to(v_dtype) if v_dtype is not None else ck.global_v

    existing = tiny_lora_layers(model)
    if existing:
        return _load_into_adapted(model, ck, proj, v, [m for _, m in existing], v_dtype)

    targets = find_targets(model)
    if len(targets) != ck.total_replaced_layers:
        raise CheckpointError(
            f"{ck.path}: the checkpoint adapted {ck.total_replaced_layers} layers of "
            f"{ck.model_id!r}, this model has {len(targets)} target layers; it is not the "
            "model the checkpoint was trained on")
    too_small = [n for _, n, c in targets if min(c.out_features, c.in_features) < ck.rank]
    if too_small:
        raise CheckpointError(f"{ck.path}: rank {ck.rank} exceeds the size of layer(s) "
                              f"{too_small[:3]}")
    quantized = any(hasattr(c.weight, "quant_state") for _, _, c in targets)
    if ck.is_quantized is not None and ck.is_quantized != quantized:
        warnings.warn(f"{ck.path} was trained on a {'4-bit' if ck.is_quantized else 'float'} "
                      f"base and this model is {'4-bit' if quantized else 'float'}: the SVD "
                      "factors, and so the adapter, differ from the trained ones", stacklevel=2)
    if ck.extra.get("base_block_scales") == "rounded_to_bf16":
        warnings.warn(f"{ck.path} was trained on a 4-bit base whose block scales bitsandbytes had "
                      "rounded to bf16 (an eval-mode CPU forward before apply_tiny_lora); a "
                      "freshly loaded model keeps them unrounded, so its outputs differ slightly "
                      "(~1e-2 in the logits) from the trained model's", stacklevel=2)
    device = targets[0][2].weight.device
    if (ck.rng_scheme == "global" and ck.p_device_type is not None
            and device.type != ck.p_device_type):
        warnings.warn(f"P was drawn on {ck.p_device_type} in training and would be drawn on "
                      f"{device.type} here: the global RNGs of the two device types differ, so "
                      "the adapter will not be the trained one", stacklevel=2)

    params = TinyLoRAGlobalParams(u_dim=ck.u_value, device=device, dtype=v.dtype)
    with torch.no_grad():
        params.global_v.copy_(v.to(device))
    cuda_devices = sorted({c.weight.device.index or 0 for _, _, c in targets
                           if c.weight.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        rng_seed = None
        if ck.rng_scheme == "global":
            torch.manual_seed(ck.seed)
        else:
            rng_seed = ck.seed
        apply_tiny_lora(model, params, ck.rank, projection=proj, svd=ck.svd, rng_seed=rng_seed,
                        factor_cache=factor_cache, progress=progress)
    return model


def _load_into_adapted(model, ck: TinyLoRACheckpoint, proj: str, v: torch.Tensor, layers,
                       v_dtype: Optional[torch.dtype] = None):
    """Copy v into a model already adapted the same way as the checkpoint; refuse otherwise."""
    first = layers[0]
    mismatch = []
    if len(layers) != ck.total_replaced_layers:
        mismatch.append(f"{len(layers)} TinyLoRA layers vs {ck.total_replaced_layers} in the file")
    if first.rank != ck.rank:
        mismatch.append(f"rank {first.rank} vs {ck.rank}")
    if first.u != ck.u_value:
        mismatch.append(f"u {first.u} vs {ck.u_value}")
    if first.projection != proj:
        mismatch.append(f"projection {first.projection!r} vs {proj!r}")
    if first.rng_scheme != ck.rng_scheme:
        mismatch.append(f"RNG scheme {first.rng_scheme!r} vs {ck.rng_scheme!r}")
    if first.p_seed != ck.seed:
        mismatch.append(f"P drawn with seed {first.p_seed} (None: unknown) vs {ck.seed}")
    if mismatch:
        raise CheckpointError(f"{ck.path}: the model is already adapted differently from this "
                              f"checkpoint ({'; '.join(mismatch)}); load it into a fresh model")
    merged = [m for m in layers if m.merged]
    if merged:
        raise CheckpointError(f"{ck.path}: {merged[0]._label()} (and {len(merged) - 1} more) "
                              "hold ΔW merged into their base weights; unmerge_tiny_lora(model) "
                              "before loading another v (the model is left as it was)")
    params = first.global_params_ref
    if v_dtype is not None and v_dtype != params.global_v.dtype:
        raise CheckpointError(
            f"{ck.path}: v_dtype={v_dtype} was asked for, but this model is already adapted and "
            f"keeps v in {params.global_v.dtype} (an optimizer may hold it); load into a fresh "
            "model to choose v's dtype, or leave v_dtype out")
    with torch.no_grad():
        params.global_v.copy_(v.to(params.global_v.device, params.global_v.dtype))
    return model


# save_pretrained of an adapted model writes its adapter with this module's writer
register_adapter_writer(save_tiny_lora)
