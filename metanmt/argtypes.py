"""argparse ``type=`` checks for numeric flags: a value out of range is argparse's one-line error
(exit status 2) naming the flag and what was expected, before any work starts.

    p.add_argument("--beam", type=at_least(1))
    p.add_argument("--grad-clip", type=non_negative_float)
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _float(text: str, what: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    return _float(text, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _float(text, "a number >= 0", lambda v: v >= 0)
