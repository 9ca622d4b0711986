"""Argument checks shared by the public functions: one wording for one mistake."""

from __future__ import annotations

import operator

__all__ = ["as_int"]


def as_int(value, name: str) -> int:
    """``value`` as a Python int: ints and integer scalars of numpy or torch (anything with
    ``__index__``) are accepted, bools and everything else refused with a TypeError naming
    ``name``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be an int, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
