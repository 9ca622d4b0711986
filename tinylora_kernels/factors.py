"""The frozen factors of a TinyLoRA layer: top-r SVD of the base weight, and the random P.

Two things here decide whether a trained v means the same thing tomorrow:

* the SVD path. The default (``svd="cpu"``) is the users' program exactly: weight decoded to its
  storage dtype, then float32, then the CPU, then ``torch.linalg.svd(full_matrices=False)``.
  LAPACK on the CPU fixes the signs of the singular vectors; any other SVD may flip a sign pair
  and so change ΔW for the same v. ``svd="device"`` runs the same decomposition on the layer's
  own device (fast on a GPU); it is opt-in and recorded in checkpoints.
* the random P, drawn in bf16 from the GLOBAL torch RNG on the layer's device (``rng="global"``,
  the users' scheme), or from a private CPU generator seeded with seed + layer index
  (``rng="per_layer"``), which gives the same P on every device.

Nothing in this module draws from the global RNG except :func:`draw_projections` itself.

:class:`FactorCache` keeps SVD results on disk, keyed by a hash of the exact stored bytes of the
weight (packed NF4 data and every scale, or the dense tensor), the rank, the SVD path and the torch
version: a changed weight can never hit a stale entry.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .bnb import is_linear4bit, nf4_of
from .nf4 import dequantize_nf4

log = logging.getLogger(__name__)

__all__ = ["SVD_METHODS", "RNG_SCHEMES", "FactorCache", "base_weight_fp32", "top_r_svd",
           "draw_projections", "p_scale", "global_rng_is_fresh", "finite_weight_fp32"]

SVD_METHODS = ("cpu", "device")
RNG_SCHEMES = ("global", "per_layer")


def base_weight_fp32(layer) -> torch.Tensor:
    """The layer's weight as the users' program feeds it to the SVD: decoded, float32, on its device."""
    if is_linear4bit(layer):
        return dequantize_nf4(nf4_of(layer)).float()
    return layer.weight.detach().float()


def top_r_svd(w: torch.Tensor, rank: int, method: str = "cpu"
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First r columns of U, first r singular values, first r rows of Vh (fp32, on the CPU)."""
    if method not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {method!r}")
    if method == "cpu":
        w = w.cpu()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return U[:, :rank].cpu(), S[:rank].cpu(), Vh[:rank, :].cpu()


def p_scale(projection: str, rank: int) -> float:
    """The factor P is divided by at draw time: 1 (full) or sqrt(r) (diagonal)."""
    return math.sqrt(rank) if projection == "diagonal" else 1.0


def draw_projections(u: int, rank: int, projection: str, device: torch.device,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one layer's P in bf16: (u, r, r) for ``full``, (u, r) / sqrt(r) for ``diagonal``.

    Without ``generator`` this is the users' draw, from the global RNG on ``device``. With a
    private CPU generator the draw is made on the CPU and moved, so it is device independent.
    """
    shape = (u, rank, rank) if projection == "full" else (u, rank)
    if generator is None:
        P = torch.randn(*shape, device=device, dtype=torch.bfloat16)
    else:
        P = torch.randn(*shape, generator=generator, dtype=torch.bfloat16).to(device)
    if projection == "diagonal":
        P = P / math.sqrt(rank)
    return P


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


def weight_fingerprint(layer) -> str:
    """A hash of exactly what the SVD input is computed from (stored bytes and their metadata)."""
    h = hashlib.blake2b(digest_size=20)
    if is_linear4bit(layer):
        w = nf4_of(layer)
        h.update(repr(("nf4", w.shape, str(w.dtype), w.blocksize, w.blocksize2,
                       w.double_quant)).encode())
        for t in (w.packed, w.absmax, w.code, w.absmax2, w.code2, w.offset):
            if t is not None:
                h.update(str(t.dtype).encode())
                h.update(_tensor_bytes(t))
    else:
        wt = layer.weight
        h.update(repr(("dense", tuple(wt.shape), str(wt.dtype))).encode())
        h.update(_tensor_bytes(wt))
    return h.hexdigest()


class FactorCache:
    """SVD factors on disk, one small file per (weight content, rank, SVD path, torch version).

    Writes are atomic (temporary file + rename); an unreadable or mismatching entry is ignored and
    recomputed, never trusted.
    """

    def __init__(self, directory: Union[str, os.PathLike]):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"factor_cache must be a directory; {str(self.directory)!r} is a "
                             "file")
        self.hits = 0
        self.misses = 0

    def key(self, layer, rank: int, method: str) -> str:
        return hashlib.blake2b(
            repr((weight_fingerprint(layer), rank, method, torch.__version__)).encode(),
            digest_size=20).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"svd-{key}.pt"

    def load(self, key: str, shape: Tuple[int, int], rank: int):
        path = self._path(key)
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            U, S, Vh = entry["U"], entry["S"], entry["Vh"]
            ok = (entry.get("key") == key and U.shape == (shape[0], rank)
                  and S.shape == (rank,) and Vh.shape == (rank, shape[1]))
        except Exception as exc:  # a torn or foreign file: recompute rather than fail
            log.warning("ignoring unreadable SVD cache entry %s (%s)", path, exc)
            return None
        if not ok:
            log.warning("ignoring SVD cache entry %s: it does not match this layer", path)
            return None
        return U, S, Vh

    def store(self, key: str, factors) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        U, S, Vh = factors
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-svd-")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": key, "U": U, "S": S, "Vh": Vh}, f)
            os.replace(tmp, self._path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def factors(self, layer, rank: int, method: str):
        """The layer's top-r SVD, from the cache when present, computed and stored otherwise."""
        key = self.key(layer, rank, method)
        shape = (layer.out_features, layer.in_features)
        hit = self.load(key, shape, rank)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        result = top_r_svd(base_weight_fp32(layer), rank, method)
        self.store(key, result)
        return result


def global_rng_is_fresh(targets, seed: int) -> bool:
    """Whether the generators P will be drawn from sit exactly at ``manual_seed(seed)``.

    Only then does the seed alone reproduce P; checkpoints record it so a wrong seed at save time
    is caught instead of silently producing a file that restores a different model.
    """
    devices = {child.weight.device for _, _, child in targets}
    try:
        for dev in devices:
            if dev.type == "cpu":
                state = torch.get_rng_state()
                ref = torch.Generator().manual_seed(seed).get_state()
            elif dev.type == "cuda":
                state = torch.cuda.get_rng_state(dev)
                ref = torch.Generator(device=dev).manual_seed(seed).get_state()
            else:
                return False
            if not torch.equal(state, ref):
                return False
    except Exception:
        return False
    return True


def finite_weight_fp32(layer) -> torch.Tensor:
    """:func:`base_weight_fp32`, or ValueError when it holds NaN or Inf (its SVD would be NaN,
    and so every output of the adapted layer, whatever v)."""
    W = base_weight_fp32(layer)
    bad = ~torch.isfinite(W)
    if bad.any():
        raise ValueError(f"the base weight holds {int(bad.sum())} NaN/Inf value(s) (first at "
                         f"{tuple(bad.nonzero()[0].tolist())}); its SVD, and so the adapter, "
                         "would be NaN")
    return W
