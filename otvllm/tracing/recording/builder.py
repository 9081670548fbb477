"""Turn the stream of records (records.py) into OpenTelemetry spans through a tracer, with
their recorded timestamps. Used by the export process (its own SDK) and, in library mode,
by the ProviderSink (the application's provider). OpenTelemetry API only."""

from collections import OrderedDict

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags, TraceState

from otvllm.tracing import schema as S
from otvllm.tracing.recording.records import CLOSE, OPEN, SPANS, SpanRecord, now_ns


def _remote_context(parent):
    trace_id, span_id, flags, state = parent
    ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags),
                      trace_state=TraceState.from_header([state]) if state else TraceState())
    return trace.set_span_in_context(NonRecordingSpan(ctx))


LINKABLE = 50_000   # span contexts kept for links from later records (the newest)


class SpanBuilder:
    """Keeps the spans of open records, so that later records can be their children and an
    interrupted run can end them (`end_open`), and the contexts of recent spans, for links."""

    def __init__(self, tracer: trace.Tracer, default_parent=None):
        self.tracer = tracer
        self.default_parent = default_parent   # context for roots without a recorded parent
        self._open: dict[int, trace.Span] = {}
        self._contexts: OrderedDict[int, SpanContext] = OrderedDict()

    def handle(self, kind: str, payload) -> None:
        if kind == SPANS:
            local: dict[int, trace.Span] = {}
            for record in payload:
                span = self._start(record, local)
                local[record.rid] = span
                self._finish(span, record)
        elif kind == OPEN:
            self._open[payload.rid] = self._start(payload, {})
        elif kind == CLOSE:
            span = self._open.pop(payload.rid, None)
            if span is None:   # never announced
                span = self._start(payload, {})
            else:
                span.set_attributes(payload.attrs)
                for link in self._links(payload):
                    span.add_link(link.context)
            self._finish(span, payload)

    def _start(self, record: SpanRecord, local: dict) -> trace.Span:
        parent = local.get(record.parent) or self._open.get(record.parent) if record.parent else None
        if parent is not None:
            context = trace.set_span_in_context(parent)
        elif record.parent in self._contexts:   # a parent that ended and was sent before this record
            context = trace.set_span_in_context(NonRecordingSpan(self._contexts[record.parent]))
        elif record.remote_parent is not None:
            context = _remote_context(record.remote_parent)
        else:
            context = self.default_parent
        span = self.tracer.start_span(record.name, context=context, start_time=record.start_ns,
                                      attributes=record.attrs, links=self._links(record))
        self._contexts[record.rid] = span.get_span_context()
        if len(self._contexts) > LINKABLE:
            self._contexts.popitem(last=False)
        return span

    def _links(self, record: SpanRecord) -> list[Link]:
        if not record.links:
            return []
        contexts = self._contexts
        return [Link(contexts[rid]) for rid in record.links if rid in contexts]

    def _finish(self, span: trace.Span, record: SpanRecord) -> None:
        for name, timestamp, attrs in record.events:
            span.add_event(name, attributes=attrs, timestamp=timestamp)
        if record.error is not None:
            kind, message, stack = record.error
            span.set_attribute(S.ERROR_TYPE, kind)
            span.add_event("exception", attributes={"exception.type": kind, "exception.message": message,
                                                    "exception.stacktrace": stack}, timestamp=record.end_ns)
            span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}" if message else kind))
        span.end(end_time=max(record.end_ns, record.start_ns))

    def end_open(self, kind: str, message: str) -> None:
        """End every open span as interrupted (the run died before closing it)."""
        end = now_ns()
        for span in self._open.values():
            span.set_attribute(S.ERROR_TYPE, kind)
            span.set_attribute(S.INTERRUPTED, True)
            span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}"))
            span.end(end_time=end)
        self._open.clear()
