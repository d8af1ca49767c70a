"""argparse value types shared by the command-line tools.

Paths get `~` expanded here because a shell leaves it alone in `--flag=~/x`, and an empty path is refused
rather than read as the current folder (an unset shell variable would otherwise point a tool at `.`).
"""

import argparse
import math
import os
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def bounded_float(low: float | None = None, high: float | None = None, *, low_open=False, high_open=False):
    """An argparse type: a finite number between `low` and `high` (excluded where `*_open`). NaN, infinities and
    numbers of the wrong sign never reach a run, where they would train garbage without an error."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


def bounded_int(low: int, high: int):
    """An argparse type: an integer from `low` to `high`; a size read from a flag never exceeds what is usable."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {value}")
        return value

    return parse


def path_text(text: str) -> str:
    """A path (or a Hub id) with `~` expanded; never empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an unset shell variable?)")
    return os.path.expanduser(text)


def output_folder(text: str) -> str:
    """A folder that exists or can be created: neither it nor a folder above it is a file."""
    path = path_text(text)
    for existing in (Path(path), *Path(path).parents):
        if existing.exists():
            if not existing.is_dir():
                raise argparse.ArgumentTypeError(f"{existing} is a file, so {path} cannot be a folder")
            break
    return path


finite_float = bounded_float()
