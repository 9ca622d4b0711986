"""Which backend the user asked for. What a call then runs is the router's decision
(:mod:`tinylora_kernels.router`).

Three ways to ask, the most specific scope first:

1. ``with use_backend("reference"): ...`` — for the calls inside the block, in this thread or
   asyncio task only (a :mod:`contextvars` variable: thread-safe, nothing global is rewritten);
2. ``set_backend(model, "triton")`` — for the TinyLoRA layers of one model (``None`` clears it;
   defined with the layers, :func:`tinylora_kernels.layers.set_backend`, which this module, below
   them, does not import);
3. ``TINYLORA_BACKEND`` — for the process; checked when the package is imported and when layers are
   applied, so a typo is reported there, naming the valid values.

Values: ``auto`` (default: the path the committed measurements show fastest for the call),
``reference`` (always the torch path: bitsandbytes' matmul + the factorized adapter), ``triton``
(always the Triton kernels; raises and says why when they cannot take a call).
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from typing import Optional

import torch

from . import call_scope

BACKENDS = ("auto", "reference", "triton")
ENV = "TINYLORA_BACKEND"

_context: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "tinylora_backend", default=None)
_env_seen: dict = {}          # raw variable value -> validated backend (validated once per value)


def validate(name, what: str = "backend") -> str:
    """``name`` normalised (strip, lower case), or ValueError naming the valid values."""
    value = str(name).strip().lower() if name is not None else ""
    if value not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return value


def from_environment() -> str:
    """The backend ``TINYLORA_BACKEND`` asks for (``auto`` when unset or empty; read once per model
    call, see :mod:`tinylora_kernels.call_scope`)."""
    raw = os.environ.get(ENV) if torch.compiler.is_compiling() else call_scope.env(ENV)
    try:
        return _env_seen[raw]
    except KeyError:
        pass
    value = "auto" if raw is None or not raw.strip() else validate(raw, ENV)
    _env_seen[raw] = value
    return value


def _context_value() -> Optional[str]:
    return _context.get()


# torch.compile cannot trace ContextVar.get: it calls this once while tracing and keeps the value
# (the backend is fixed when a graph is traced, as the README says)
_traced_context_value = torch.compiler.assume_constant_result(_context_value)


def requested(layer=None) -> str:
    """The backend in force for a call of ``layer``: context, then the layer's model, then the
    environment."""
    value = _traced_context_value() if torch.compiler.is_compiling() else _context.get()
    if value is not None:
        return value
    value = getattr(layer, "backend", None)
    if value is not None:
        return value
    return from_environment()


def describe(layer=None) -> str:
    """Where the backend in force for ``layer`` was asked for, in the words the user wrote it
    (for error messages)."""
    value = _context.get()
    if value is not None:
        return f"use_backend({value!r})"
    value = getattr(layer, "backend", None)
    if value is not None:
        return f"set_backend(model, {value!r})"
    return f"{ENV}={from_environment()}"


@contextmanager
def use_backend(name: str):
    """Within the block (this thread / task only), TinyLoRA layers use backend ``name``."""
    token = _context.set(validate(name))
    try:
        yield
    finally:
        _context.reset(token)


#: The former name of :func:`use_backend`.
forced = use_backend
