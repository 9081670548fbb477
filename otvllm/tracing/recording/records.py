"""What the engine thread records: plain, picklable objects that become OpenTelemetry spans
later, off the engine's critical path (builder.py), in this process or in the export process.

A record names its parent by `rid` (unique in the recording process), so that records can
cross a process boundary and arrive in pieces: a long-lived record (`llm.generate`, a
request) is announced with `OPEN` when it starts and sent again whole with `CLOSE`; finished
records travel in `SPANS` batches whose parents are open or earlier in the same batch."""

import itertools
import os
import time
import traceback

from opentelemetry import trace

now_ns = time.time_ns

OPEN, SPANS, CLOSE = "open", "spans", "close"
FOREIGN = "foreign"   # a finished span made by another SDK in the engine's process (export/forwarding.py)

_rids = itertools.count(1)


def restart_rids() -> None:
    """Give this process rids that no other process uses: for a process whose records join
    another's trace through the same export process (the engine process of `otvllm serve`)."""
    global _rids
    _rids = itertools.count((os.getpid() << 32) + 1)

RemoteParent = tuple[int, int, int, str]   # trace id, span id, trace flags, tracestate header


def error_type(exc: BaseException) -> str:
    """The `error.type` of an exception: a signal's name for an interrupt (see cli.Terminated)."""
    return getattr(exc, "error_type", None) or type(exc).__qualname__


class SpanRecord:
    __slots__ = ("rid", "name", "parent", "remote_parent", "start_ns", "end_ns", "attrs", "events", "error",
                 "links")

    def __init__(self, name: str, parent: "SpanRecord | None", start_ns: int, end_ns: int = 0,
                 attrs: dict | None = None):
        self.rid = next(_rids)
        self.name = name
        self.parent = parent.rid if parent is not None else None
        self.remote_parent: RemoteParent | None = None   # for a root: the span it continues
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.attrs = attrs if attrs is not None else {}
        self.events: list[tuple[str, int, dict]] = []
        self.error: tuple[str, str, str] | None = None   # (error.type, message, traceback)
        self.links: list[int] | None = None   # rids of records in other traces that this one relates to

    def fail(self, exc: BaseException) -> None:
        if self.error is None:   # the innermost failure is the one to report
            self.error = (error_type(exc), str(exc),
                          "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))

    # `with record:` ends it when the block ends, in ERROR if the block raised.
    def __enter__(self) -> "SpanRecord":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self.end_ns = now_ns()
        if exc is not None:
            self.fail(exc)
        return False

    def __repr__(self) -> str:
        return f"SpanRecord({self.name!r}, {(self.end_ns - self.start_ns) / 1e6:.3f} ms)"


def remote_parent_of(context=None) -> RemoteParent | None:
    """The current span of an OpenTelemetry context as a picklable parent, or None."""
    ctx = trace.get_current_span(context).get_span_context()
    if not ctx.is_valid:
        return None
    return ctx.trace_id, ctx.span_id, int(ctx.trace_flags), ctx.trace_state.to_header()
