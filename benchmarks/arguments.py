"""Argument types the benchmark scripts share: a bad value is an argparse usage error that names
it (exit 2, one line), before any work starts."""

import argparse


def positive_ints(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be a positive integer")
    return values
