"""Trace detail levels, ordered: each level records everything the one below it does."""

from enum import IntEnum


class TraceLevel(IntEnum):
    OFF = 0        # no tracing work at all
    REQUEST = 1    # engine.init, llm.generate and one span per request
    STEP = 2       # plus engine steps (outliers detailed, the rest in aggregate spans)
    DEBUG = 3      # plus every step, per-sequence block spans and per-layer attention spans

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: "str | TraceLevel") -> "TraceLevel":
        """A level from its name; ValueError for anything else."""
        if isinstance(value, TraceLevel):
            return value
        name = value.strip().lower() if isinstance(value, str) else None
        if name not in NAMES:
            raise ValueError(f"invalid trace level {value!r}: choose one of {', '.join(NAMES)}")
        return cls[name.upper()]


NAMES = tuple(str(level) for level in TraceLevel)
