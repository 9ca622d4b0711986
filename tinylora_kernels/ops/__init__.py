"""Triton kernels. Imported lazily: ``import tinylora_kernels`` needs neither Triton nor a GPU."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def triton_missing() -> Optional[str]:
    """None when Triton imports, else why not (the text a forced backend reports)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"Triton cannot be imported ({type(exc).__name__}: {exc})"
    return None
