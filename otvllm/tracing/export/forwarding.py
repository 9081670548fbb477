"""Spans that the engine's process makes with an SDK of its own (the HTTP server spans of
`otvllm serve`, from OpenTelemetry's FastAPI instrumentation), forwarded to the export
process as plain snapshots and exported there with otvllm's spans, ids unchanged, so that
the engine's request spans can be their children."""

from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from otvllm.tracing.recording.records import FOREIGN


def _context(ctx: SpanContext | None):
    if ctx is None:
        return None
    return ctx.trace_id, ctx.span_id, int(ctx.trace_flags), ctx.trace_state.to_header()


def _span_context(snapshot, remote: bool) -> SpanContext | None:
    if snapshot is None:
        return None
    trace_id, span_id, flags, state = snapshot
    return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags),
                       trace_state=TraceState.from_header([state]) if state else TraceState())


def snapshot(span: ReadableSpan) -> tuple:
    scope = span.instrumentation_scope
    return (span.name, _context(span.context), _context(span.parent), int(span.kind.value),
            dict(span.attributes or {}), [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events],
            [(_context(link.context), dict(link.attributes or {})) for link in span.links],
            (span.status.status_code.value, span.status.description), span.start_time, span.end_time,
            (scope.name, scope.version) if scope is not None else None)


def rebuild(data: tuple, resource) -> ReadableSpan:
    name, context, parent, kind, attrs, events, links, status, start, end, scope = data
    return ReadableSpan(
        name, context=_span_context(context, False), parent=_span_context(parent, True), resource=resource,
        attributes=attrs, events=[Event(n, a, t) for n, a, t in events],
        links=[Link(_span_context(c, True), a) for c, a in links], kind=SpanKind(kind),
        status=Status(StatusCode(status[0]), status[1]), start_time=start, end_time=end,
        instrumentation_scope=InstrumentationScope(*scope) if scope is not None else None)


class ForwardingProcessor(SpanProcessor):
    """Hands each ended span to a sink (the export process) instead of exporting it here."""

    def __init__(self, sink):
        self.sink = sink

    def on_end(self, span: ReadableSpan) -> None:
        self.sink.send(FOREIGN, snapshot(span))
