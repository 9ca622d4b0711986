"""What one model call, and one ``generate`` call, may read once instead of at every layer call.

Two things a layer call would otherwise redo, held for a span in which they cannot change:

* **Environment variables** (``TINYLORA_BACKEND``, ``TINYLORA_CPU_DECODED_MB``): read once per
  model call, at the first layer call that asks, and kept until the call ends (:func:`env`). A
  layer called on its own reads them at every call.

* **The content checks of kept CPU copies of 4-bit base weights**
  (:func:`tinylora_kernels.bnb.cpu_decoded_weight`): outside ``generate`` every call checks the
  storage a kept copy was made from. Within one call of transformers' ``generate``, whose
  decode steps are model calls with nothing of the user's in between but its callbacks
  (logits processors, stopping criteria, streamers), each layer's copy is checked at the first
  step that uses it and trusted for the rest of that ``generate`` (:func:`checked`): the check
  reads every byte of the weight, nearly what the product itself reads. A callback that writes
  base weights DURING a ``generate`` is not seen until that ``generate`` returns; any write
  between two ``generate`` calls, or between a ``generate`` and a plain call, is.

  One ``generate`` call is recognised by the ``GenerationConfig`` it works on: transformers
  deep-copies it at the start of every call (``_prepare_generation_config``), so the copy, held
  here by weak reference only, names that call and no other. Where it cannot be found (another
  transformers, a model called outside ``generate``), every call checks.

Both are per thread.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Optional

__all__ = ["generate_frame", "env", "open_call", "close_call", "checked", "trusting", "generation",
           "mark_checked"]

_GENERATE_FILE = "transformers/generation/utils.py"


def generate_frame(depth: int = 2, limit: int = 40):
    """The frame of transformers' ``generate`` this code runs inside (searched from ``depth``
    frames up, at most ``limit`` frames), or None."""
    frame = sys._getframe(depth)
    for _ in range(limit):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "generate" and code.co_filename.replace("\\", "/").endswith(
                _GENERATE_FILE):
            return frame
        frame = frame.f_back
    return None


def _generate_token(frame) -> Optional[object]:
    """The per-call ``GenerationConfig`` copy of the ``generate`` running in ``frame``, or None
    where it is not (yet) a copy of this call's own."""
    local = frame.f_locals
    config = local.get("generation_config")
    model = local.get("self")
    if config is None or config is getattr(model, "generation_config", None):
        return None
    try:
        weakref.ref(config)
    except TypeError:
        return None
    return config


class _Scope(threading.local):
    def __init__(self):
        self.depth = 0                  # open model calls (any model) in this thread
        self.env: Optional[dict] = None
        self.token = None               # weak reference to the generate call's config copy
        self.checked = None             # kind of copy -> layers whose copies were checked in it
        self.trusting = False           # inside a model call of that generate
        self.generation = 0             # counts the generate calls seen


_SCOPE = _Scope()


def env(name: str, default: str = None) -> Optional[str]:
    """``os.environ.get(name, default)``, read once per model call (every call outside one)."""
    scope = _SCOPE
    if scope.env is None:
        return os.environ.get(name, default)
    key = (name, default)
    if key not in scope.env:
        scope.env[key] = os.environ.get(name, default)
    return scope.env[key]


def open_call(check_generate: bool) -> None:
    """A model call begins (nested calls share the outermost's state). ``check_generate``:
    whether kept copies exist that a ``generate`` step could trust (finding the ``generate``
    costs a walk up the stack)."""
    scope = _SCOPE
    scope.depth += 1
    if scope.depth > 1:
        return
    scope.env = {}
    scope.trusting = False
    if not check_generate:
        return
    frame = generate_frame(3)
    token = None if frame is None else _generate_token(frame)
    del frame
    if token is None:
        scope.token = scope.checked = None
        return
    if scope.token is None or scope.token() is not token:
        scope.token = weakref.ref(token)
        scope.checked = {}
        scope.generation += 1
    scope.trusting = True


def close_call() -> None:
    """The model call opened by :func:`open_call` ends."""
    scope = _SCOPE
    if scope.depth > 0:
        scope.depth -= 1
        if scope.depth == 0:
            scope.env = None
            scope.trusting = False


def checked(layer, kind: str):
    """What :func:`mark_checked` recorded for ``layer``'s kept copy of this ``kind`` earlier in
    the ``generate`` call this model call belongs to, or None (always None outside one)."""
    scope = _SCOPE
    if not scope.trusting:
        return None
    seen = scope.checked.get(kind)
    return None if seen is None else seen.get(layer)


def generation() -> Optional[int]:
    """A number naming the ``generate`` call this model call belongs to (None outside one, or
    where its checks may not be reused): what was checked under the same number may be reused."""
    scope = _SCOPE
    return scope.generation if scope.trusting else None


def trusting() -> bool:
    """Whether this model call belongs to a ``generate`` call whose checks it may reuse."""
    return _SCOPE.trusting


def mark_checked(layer, kind: str, value) -> None:
    """``layer``'s kept copy of this ``kind`` (``value``) was just checked (or made) in this
    model call."""
    scope = _SCOPE
    if scope.trusting:
        seen = scope.checked.get(kind)
        if seen is None:
            seen = scope.checked[kind] = weakref.WeakKeyDictionary()
        seen[layer] = value
