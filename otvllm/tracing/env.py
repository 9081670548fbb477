"""Numeric settings from environment variables, checked with the variable's name."""

import math
import os


def env_number(name: str, default, kind=int, minimum=1):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number < minimum:
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'} >= {minimum}, "
                         f"got {value!r}")
    return number
