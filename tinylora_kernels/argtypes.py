"""Argument types of the command line: each refuses bad input with a message naming what is
valid (argparse turns it into a usage error, exit code 2)."""

from __future__ import annotations

import argparse
from typing import List

import torch

__all__ = ["positive_int", "positive_float", "choices_list", "int_list", "device", "file_stem",
           "result_file"]


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def choices_list(valid, what: str, pattern: str = None):
    """An argparse type: a comma-separated list, each item one of ``valid`` (or matching the
    regular expression ``pattern``)."""
    import re

    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given")
        bad = [s for s in items if s not in valid and not (pattern and re.fullmatch(pattern, s))]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(valid)}")
        return items
    return parse


def int_list(text: str) -> List[int]:
    """Comma-separated whole numbers >= 1 (row counts)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        if not items:
            raise argparse.ArgumentTypeError("none given")
        return [positive_int(s) for s in items]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: row counts are comma-separated whole "
                                         f"numbers >= 1 ({exc})") from None


def device(text: str) -> str:
    """cpu, or cuda when torch sees a CUDA device."""
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose from cpu, cuda")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda, but torch sees no CUDA device here "
                                         f"(torch {torch.__version__})")
    return text


def result_file(text: str) -> str:
    """The path of an existing JSON result of ``tinylora-kernels bench`` (any version it
    reads)."""
    import json
    from pathlib import Path

    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a JSON result file of "
                                         "tinylora-kernels bench (e.g. one in it)")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text}: not a JSON result file ({exc})") from None
    from .bench.report import upgrade

    try:
        upgrade(data)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from None
    return text


def positive_float(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def file_stem(text: str) -> str:
    """A file name stem to write under --out: a plain name, no directory part (so nothing is
    written outside --out)."""
    import os

    if not text or text in (".", "..") or "/" in text or os.sep in text \
            or (os.altsep and os.altsep in text) or "\0" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain file name: give a name "
                                         "without a directory (the files go to --out)")
    return text
