"""The export process: owns the OpenTelemetry SDK and its exporters.

Building SDK spans and encoding them for OTLP is tens of microseconds of Python per span;
done in the engine's process it would hold the GIL while the engine waits on the GPU. Here
records arrive as the engine produces them (pickled lists of (kind, payload) messages on
stdin, see records.py) and become spans at once, so a collector sees the run while it goes
on. The process lives in its own session, so a Ctrl-C or SIGTERM to the engine's process
group does not reach it; when its input closes, whether by `close` or because the engine
process died, it ends the spans still open as interrupted and writes the trace file, which
never waits for the network. Answers (pickled) on stdout.

Started by `ProcessSink` (process_sink.py) as `python -P -c "...main()"` in a neutral
working directory, so nothing is imported from the user's current directory.
"""

import logging
import os
import pickle
import signal
import sys
import threading
from typing import Sequence

from otvllm.tracing.recording.records import FOREIGN

# Control messages from the parent, besides the records' own (records.OPEN, SPANS, CLOSE).
FLUSH, SHUTDOWN = "flush", "shutdown"
_INPUT_LOST = "input lost"


class _CountingExporter:
    """Wraps a network exporter, counting what it sent and what it failed to send."""

    def __init__(self, exporter, label: str):
        self.exporter = exporter
        self.label = label
        self.exported = self.failed = 0
        self.first_error: str | None = None

    def export(self, spans: Sequence):
        from opentelemetry.sdk.trace.export import SpanExportResult
        try:
            result = self.exporter.export(spans)
        except Exception as e:  # an exporter must not take the process down
            result, self.first_error = SpanExportResult.FAILURE, self.first_error or repr(e)
        if result == SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
            self.first_error = self.first_error or "the exporter reported a failure"
        return result

    def shutdown(self):
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def _network_exporter(settings: dict):
    endpoint, protocol, timeout = settings["endpoint"], settings["protocol"], settings["timeout_s"]
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"), timeout=timeout)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
        exporter = OTLPSpanExporter(endpoint=url, timeout=timeout)
    return _CountingExporter(exporter, f"OTLP/{protocol} {settings['endpoint_label']}")


class _Exporting:
    """The SDK side: a provider whose spans go to the file (synchronously, nothing is ever
    dropped before the cap) and to the network (batched, dropped when the queue is full)."""

    def __init__(self, settings: dict):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        from otvllm.tracing.export.jaeger_file import JaegerJsonFileExporter
        from otvllm.tracing.recording.builder import SpanBuilder
        from otvllm.tracing.recording.sinks import TRACER_NAME

        self.settings = settings
        self.resource = Resource.create({"service.name": settings["service_name"],
                                         "service.version": settings["version"]})
        self.provider = TracerProvider(resource=self.resource)
        self.processors = []
        self.file = None
        if settings.get("trace_file"):
            self.file = JaegerJsonFileExporter(settings["trace_file"], settings["file_max_spans"],
                                               settings["file_mode"])
            self.processors.append(SimpleSpanProcessor(self.file))
        self.network = self.network_processor = None
        if settings.get("endpoint"):
            self.network = _network_exporter(settings)
            self.network_processor = BatchSpanProcessor(self.network, max_queue_size=1 << 16,
                                                        max_export_batch_size=512, schedule_delay_millis=200)
            self.processors.append(self.network_processor)
        for processor in self.processors:
            self.provider.add_span_processor(processor)
        self.builder = SpanBuilder(self.provider.get_tracer(TRACER_NAME, settings["version"]))

    def handle(self, kind: str, payload) -> None:
        if isinstance(payload, bytes):   # an open or close record, pickled when it was sent
            payload = pickle.loads(payload)
        if kind == FOREIGN:
            from otvllm.tracing.export.forwarding import rebuild
            span = rebuild(payload, self.resource)
            for processor in self.processors:
                processor.on_end(span)
            return
        self.builder.handle(kind, payload)

    def end_open(self, kind: str, message: str) -> None:
        self.builder.end_open(kind, message)

    def write_file(self) -> dict | None:
        if self.file is None:
            return None
        result = {"path": self.file.path, "spans": self.file.spans, "dropped": self.file.dropped, "error": None}
        try:
            self.file.write()
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        return result

    def flush_network(self) -> dict | None:
        if self.network is None:
            return None
        # BatchSpanProcessor.force_flush does not honour its timeout (it sends every queued
        # batch, each up to the exporter's timeout): bound the wait here.
        flushing = threading.Thread(target=self.network_processor.force_flush, daemon=True)
        flushing.start()
        flushing.join(self.settings["timeout_s"])
        done = not flushing.is_alive()
        n = self.network
        return {"label": n.label, "exported": n.exported, "failed": n.failed, "error": n.first_error,
                "finished": bool(done)}


def _reply(stdout, message) -> None:
    try:
        pickle.dump(message, stdout)
        stdout.flush()
    except (BrokenPipeError, OSError, ValueError):   # the engine process is gone
        pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # belt and braces: it is in its own session anyway
    # The SDK's exporters log every retry; the parent prints one summary line instead.
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    exporting = _Exporting(pickle.load(stdin))
    while True:
        try:
            messages = pickle.load(stdin)
        except (EOFError, pickle.UnpicklingError, OSError):
            messages = [(_INPUT_LOST, None)]
        for kind, payload in messages:
            if kind in (SHUTDOWN, _INPUT_LOST):
                if kind == _INPUT_LOST:
                    exporting.end_open("ProcessExited", "the engine process ended before this span did "
                                                        "(killed, or it crashed)")
                else:
                    exporting.end_open("TracingShutdown", "tracing was shut down while this span was open")
                _reply(stdout, ("file", exporting.write_file()))
                _reply(stdout, ("network", exporting.flush_network()))
                os._exit(0)   # do not wait for exporter threads stuck on a hung collector
            if kind == FLUSH:
                _reply(stdout, ("network", exporting.flush_network()))
                continue
            exporting.handle(kind, payload)
