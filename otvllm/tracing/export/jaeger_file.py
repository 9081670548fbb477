"""Spans as Jaeger JSON: the format Jaeger's query API returns and Jaeger UI's "Upload" tab opens in
the browser alone (no Jaeger server needed), for machines with no collector.

Follows Jaeger's JSON model (jaeger model/json) and the OpenTelemetry-to-Jaeger mapping: times in
integer microseconds since the epoch, the parent as the first `CHILD_OF` reference, attributes as
typed tags (arrays as a JSON string), events as logs with an `event` field, the resource as the
trace's process, kind/status/scope as `span.kind`, `error`, `otel.status_*`, `otel.scope.*` tags."""

import json
import math
import os
import threading
from typing import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

from otvllm.tracing.export.trace_file import file_mode, write_atomically

_KINDS = {SpanKind.CLIENT: "client", SpanKind.SERVER: "server",
          SpanKind.PRODUCER: "producer", SpanKind.CONSUMER: "consumer"}


def _tag(key: str, value) -> dict:
    # bool before int: bool is a subclass of int
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"key": key, "type": "float64", "value": value}
        return {"key": key, "type": "string", "value": repr(value)}   # JSON has no NaN/Infinity
    if isinstance(value, str):
        return {"key": key, "type": "string", "value": value}
    if isinstance(value, (bytes, bytearray)):
        return {"key": key, "type": "string", "value": value.hex()}
    if isinstance(value, Sequence):
        return {"key": key, "type": "string", "value": json.dumps(list(value), default=str)}
    return {"key": key, "type": "string", "value": str(value)}


def _tags(attrs) -> list[dict]:
    return [_tag(k, v) for k, v in (attrs or {}).items()]


def _us(ns: int | None) -> int:
    return (ns or 0) // 1000


def _span_tags(span: ReadableSpan) -> list[dict]:
    tags = _tags(span.attributes)
    scope = span.instrumentation_scope
    if scope is not None:
        tags.append(_tag("otel.scope.name", scope.name))
        if scope.version:
            tags.append(_tag("otel.scope.version", scope.version))
    if span.kind in _KINDS:
        tags.append(_tag("span.kind", _KINDS[span.kind]))
    code = span.status.status_code
    if code is StatusCode.ERROR:
        tags = [t for t in tags if t["key"] != "error"]   # the status wins over an `error` attribute
        tags.append(_tag("error", True))
    if code is not StatusCode.UNSET:
        tags.append(_tag("otel.status_code", code.name))
        if span.status.description:
            tags.append(_tag("otel.status_description", span.status.description))
    for key, n in (("otel.dropped_attributes_count", span.dropped_attributes),
                   ("otel.dropped_events_count", span.dropped_events),
                   ("otel.dropped_links_count", span.dropped_links)):
        if n:
            tags.append(_tag(key, n))
    trace_state = span.context.trace_state
    if trace_state:
        tags.append(_tag("w3c.tracestate", trace_state.to_header()))
    return tags


def _logs(span: ReadableSpan) -> list[dict]:
    logs = []
    for ev in span.events:
        fields = _tags(ev.attributes)
        if not any(f["key"] == "event" for f in fields):   # an `event` attribute takes precedence
            fields.insert(0, _tag("event", ev.name))
        logs.append({"timestamp": _us(ev.timestamp), "fields": fields})
    return logs


class _TraceBuilder:
    """One trace's spans and its processes (one per distinct resource)."""

    def __init__(self, trace_id: str):
        self.trace_id = trace_id
        self.spans: list[dict] = []
        self._process_ids: dict = {}          # resource key -> "p1", "p2", ...
        self.processes: dict[str, dict] = {}

    def process_id(self, resource) -> str:
        attrs = dict(resource.attributes) if resource is not None else {}
        key = json.dumps(sorted((k, _tag(k, v)["value"]) for k, v in attrs.items()))
        pid = self._process_ids.get(key)
        if pid is None:
            pid = self._process_ids[key] = f"p{len(self._process_ids) + 1}"
            service = str(attrs.pop("service.name", "unknown_service"))
            self.processes[pid] = {"serviceName": service, "tags": _tags(attrs)}
        return pid

    def add(self, span: ReadableSpan) -> None:
        ctx = span.context
        refs = []
        if span.parent is not None and span.parent.span_id:
            refs.append({"refType": "CHILD_OF", "traceID": self.trace_id,
                         "spanID": f"{span.parent.span_id:016x}"})
        for link in span.links:
            refs.append({"refType": "FOLLOWS_FROM", "traceID": f"{link.context.trace_id:032x}",
                         "spanID": f"{link.context.span_id:016x}"})
        start = _us(span.start_time)
        end = _us(span.end_time) if span.end_time else start
        self.spans.append({
            "traceID": self.trace_id,
            "spanID": f"{ctx.span_id:016x}",
            "operationName": span.name,
            "references": refs,
            # Jaeger's flag bits are 1 = sampled, 2 = debug; W3C's 2 is "random trace id": keep only sampled
            "flags": 1 if ctx.trace_flags.sampled else 0,
            "startTime": start,
            "duration": max(0, end - start),
            "tags": _span_tags(span),
            "logs": _logs(span),
            "processID": self.process_id(span.resource),
            "warnings": None,
        })

    def to_json(self) -> dict:
        spans = sorted(self.spans, key=lambda s: s["startTime"])
        return {"traceID": self.trace_id, "spans": spans, "processes": dict(self.processes), "warnings": None}


def _add_all(builders: dict[str, _TraceBuilder], spans: Sequence[ReadableSpan]) -> None:
    for span in spans:
        tid = f"{span.context.trace_id:032x}"
        builder = builders.get(tid)
        if builder is None:
            builder = builders[tid] = _TraceBuilder(tid)
        builder.add(span)


def _document(builders: dict[str, _TraceBuilder]) -> dict:
    traces = [b.to_json() for b in builders.values()]
    # Newest first, the order of Jaeger UI's search results ("Most Recent"), so the file's first
    # trace is the one the UI lists first.
    traces.sort(key=lambda t: min((s["startTime"] for s in t["spans"]), default=0), reverse=True)
    return {"data": traces, "total": 0, "limit": 0, "offset": 0, "errors": None}


def spans_to_jaeger(spans: Sequence[ReadableSpan]) -> dict:
    """`{"data": [trace, ...]}` with one trace per trace id, newest first."""
    builders: dict[str, _TraceBuilder] = {}
    _add_all(builders, spans)
    return _document(builders)


class JaegerJsonFileExporter(SpanExporter):
    """Collects spans (converted as they are exported) and writes the whole file, atomically,
    on `write()` (and force_flush, shutdown). Holds at most `max_spans` spans; later ones are
    counted in `dropped`. The file's mode is `mode`, by default 0666 less the umask."""

    def __init__(self, path: str, max_spans: int = 1 << 62, mode: int | None = None):
        self.path = os.path.abspath(path)
        self.max_spans = max_spans
        self.mode = mode if mode is not None else file_mode(private=False)
        self.spans = 0
        self.dropped = 0
        self._builders: dict[str, _TraceBuilder] = {}
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            room = self.max_spans - self.spans
            if room < len(spans):
                self.dropped += len(spans) - max(room, 0)
                spans = spans[:max(room, 0)]
            _add_all(self._builders, spans)
            self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.write()
        return True

    def shutdown(self) -> None:
        self.write()

    def write(self) -> None:
        with self._lock:
            doc = _document(self._builders)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_atomically(self.path, json.dumps(doc, separators=(",", ":")).encode(), self.mode)
