"""Turn recorded spans into OpenTelemetry spans with their recorded timestamps."""

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from otvllm.tracing.records import SpanRecord


def emit_records(records: list[SpanRecord], tracer: trace.Tracer, parent_context=None) -> int:
    """Start and end one span per record, parents before children (records are in creation
    order, and a record is created after its parent). Returns the number of spans made."""
    spans: dict[int, trace.Span] = {}
    for record in records:
        parent = spans.get(id(record.parent)) if record.parent is not None else None
        context = trace.set_span_in_context(parent) if parent is not None else parent_context
        span = tracer.start_span(record.name, context=context, start_time=record.start_ns,
                                 attributes=record.attrs)
        for name, timestamp, attrs in record.events:
            span.add_event(name, attributes=attrs, timestamp=timestamp)
        if record.error is not None:
            kind, message, stack = record.error
            span.add_event("exception", attributes={"exception.type": kind, "exception.message": message,
                                                    "exception.stacktrace": stack}, timestamp=record.end_ns)
            span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}"))
        span.end(end_time=max(record.end_ns, record.start_ns))
        spans[id(record)] = span
    return len(spans)
