"""What the engine thread records: plain objects, turned into OpenTelemetry spans later,
off the engine's critical path (see emit.py)."""

import time
import traceback

now_ns = time.time_ns


class SpanRecord:
    __slots__ = ("name", "parent", "start_ns", "end_ns", "attrs", "events", "error")

    def __init__(self, name: str, parent: "SpanRecord | None", start_ns: int, end_ns: int = 0,
                 attrs: dict | None = None):
        self.name = name
        self.parent = parent
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.attrs = attrs if attrs is not None else {}
        self.events: list[tuple[str, int, dict]] = []
        self.error: tuple[str, str, str] | None = None   # (type, message, traceback)

    def fail(self, exc: BaseException) -> None:
        self.error = (type(exc).__qualname__, str(exc),
                      "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    def __repr__(self) -> str:
        return f"SpanRecord({self.name!r}, {(self.end_ns - self.start_ns) / 1e6:.3f} ms)"
