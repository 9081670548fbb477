"""Trace detail levels, ordered: each level records everything the one below it does."""

import os
from enum import IntEnum


class TraceLevel(IntEnum):
    OFF = 0        # no tracing work at all
    REQUEST = 1    # engine.init, llm.generate and one span per request
    STEP = 2       # plus engine steps (outliers detailed, the rest in aggregate spans)
    DEBUG = 3      # plus every step, per-sequence block spans and per-layer attention spans

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: "str | TraceLevel | None") -> "TraceLevel":
        """`value`, or OTVLLM_TRACE_LEVEL when None, or `step`; ValueError for anything else."""
        if isinstance(value, TraceLevel):
            return value
        if value is None:
            value = os.environ.get("OTVLLM_TRACE_LEVEL", "").strip() or "step"
        name = value.strip().lower() if isinstance(value, str) else None
        if name not in NAMES:
            raise ValueError(f"invalid trace level {value!r} (from trace_level= or OTVLLM_TRACE_LEVEL): "
                             f"choose one of {', '.join(NAMES)}")
        return cls[name.upper()]


NAMES = tuple(str(level) for level in TraceLevel)
