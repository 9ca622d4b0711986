"""What identifies the content of a CPU ``Linear4bit``'s storage: a fingerprint of the packed
bytes and of every quant-state tensor, comparable with ``==`` (:func:`storage_fingerprint`).

The kept CPU copies of :mod:`tinylora_kernels.bnb` are tied to it: content, not pointers,
version counters or object identities, which ``weight.data.copy_(...)`` or an in-place edit of
``quant_state.absmax`` leave unchanged.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["storage_fingerprint"]


#: tensors up to this many bytes are compared whole (their bytes kept); larger ones by block sums
_WHOLE_BYTES = 1 << 16
#: 64-bit words per row of the grid a larger tensor's bytes are summed over
_GRID_WORDS = 64


class _Bytes:
    """A CPU tensor's bytes, viewed without a copy (a copy only when it is not contiguous):
    small ones as a numpy array, larger ones also as a torch grid of 64-bit words, 64 a row."""

    __slots__ = ("raw", "grid", "tail")

    def __init__(self, t: torch.Tensor):
        if t.requires_grad:
            t = t.detach()
        if t.dtype != torch.uint8 or not t.is_contiguous():
            t = t.contiguous().reshape(-1).view(torch.uint8)
        self.raw = t.reshape(-1).numpy()
        self.grid = self.tail = None
        if self.raw.nbytes > _WHOLE_BYTES and t.data_ptr() % 8 == 0:
            whole = self.raw.nbytes // (8 * _GRID_WORDS) * (8 * _GRID_WORDS)
            self.grid = t.reshape(-1)[:whole].view(torch.int64).view(-1, _GRID_WORDS)
            self.tail = self.raw[whole:]

    def content(self):
        """What identifies the bytes now: up to 64 KiB the bytes themselves; larger, the
        wrapping sum of each 512-byte row of the grid (one changed word always changes it, and
        so does any change a row's sum sees: a reload, a scale edit, a partial write; two words
        exchanged within one row do not) and the bytes past the grid. The sums run through
        torch (vectorized, threaded: ~70 µs for the 11 MB of a 3B model's largest weight)."""
        if self.grid is None:
            return self.raw.tobytes()
        return (self.grid.sum(1).numpy().tobytes(), self.tail.tobytes())


#: layer -> (which tensors, their byte views): the numpy views of what a decode reads, kept while
#: the layer holds the same tensors (the views share their memory: writes show through them)
_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decode_inputs(layer) -> list:
    """Byte views of the packed weight and every quant-state tensor, and the quant state's
    scalars, of a CPU ``Linear4bit``."""
    qs = layer.weight.quant_state
    items = [layer.weight, qs.absmax, qs.code, tuple(qs.shape), int(qs.blocksize), qs.dtype]
    if qs.nested:
        items += [qs.state2.absmax, qs.state2.code, qs.offset, int(qs.state2.blocksize)]
    which = tuple((id(t), t.data_ptr()) if isinstance(t, torch.Tensor) else t for t in items)
    kept = _VIEWS.get(layer)
    if kept is None or kept[0] != which:
        views = [_Bytes(t) if isinstance(t, torch.Tensor) else t for t in items]
        kept = _VIEWS[layer] = (which, views)
    return kept[1]


def storage_fingerprint(layer) -> tuple:
    """A fingerprint of everything a CPU ``Linear4bit``'s decode reads: the packed bytes and the
    quant state (tensors by content, see :class:`_Bytes`; scalars by value), comparable with
    ``==``. Equal fingerprints mean the same decoded weight (for tensors over 64 KiB: up to
    changes that leave the sum of every 512-byte block as it was)."""
    return tuple(v.content() if isinstance(v, _Bytes) else v for v in _decode_inputs(layer))
