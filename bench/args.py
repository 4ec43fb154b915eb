"""Command-line argument types shared by the benchmark scripts."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> list[int]:
    """A comma list of integers >= 1 (``"1,2,4"``), for ``argparse``'s ``type=``."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a comma list of integers >= 1, got {text!r}")
    return values
