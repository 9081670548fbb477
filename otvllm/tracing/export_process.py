"""A child process that owns the OpenTelemetry SDK and its exporters.

Building SDK spans and encoding them for OTLP is tens of microseconds of Python per span;
done in the engine's process it would hold the GIL while the engine waits on the GPU.
The engine process only pickles its records into a pipe (from a writer thread); this
process turns them into spans and exports them. A collector that is down or hangs only
slows this process: the engine never waits for it, and at shutdown the spans that could
not be sent are counted and reported in one warning.

Run as `python -m otvllm.tracing.export_process` by `ProcessSink`; speaks pickled
messages on stdin/stdout.
"""

import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from typing import Sequence

from otvllm.tracing.records import SpanRecord


# ---- the child ---------------------------------------------------------------------------------

class _CountingExporter:
    """Wraps an exporter, counting what it sent and what it failed to send."""

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


def _make_exporters(settings: dict) -> list[_CountingExporter]:
    exporters = []
    if settings.get("endpoint"):
        endpoint, protocol = settings["endpoint"], settings.get("protocol") or "grpc"
        timeout = settings.get("timeout_s")
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            insecure = not endpoint.startswith("https://")
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=timeout)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url, timeout=timeout)
        exporters.append(_CountingExporter(exporter, f"OTLP/{protocol} {endpoint}"))
    if settings.get("trace_file"):
        from otvllm.tracing.jaeger_json import JaegerJsonFileExporter
        exporters.append(_CountingExporter(JaegerJsonFileExporter(settings["trace_file"]), settings["trace_file"]))
    return exporters


def _child_main() -> None:
    # The SDK's exporters log every retry; the parent prints one summary warning instead.
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from otvllm.tracing.emit import emit_records
    from otvllm.tracing.sinks import TRACER_NAME

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    settings = pickle.load(stdin)
    resource = Resource.create({"service.name": settings["service_name"]})
    provider = TracerProvider(resource=resource)
    exporters = _make_exporters(settings)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 16,
                                                       max_export_batch_size=512, schedule_delay_millis=200))
    tracer = provider.get_tracer(TRACER_NAME, settings["version"])
    received = 0
    while True:
        try:
            kind, payload = pickle.load(stdin)
        except EOFError:
            kind, payload = "close", None
        if kind == "records":
            received += emit_records(payload, tracer)
            continue
        provider.force_flush()
        if kind == "close":
            provider.shutdown()
        stats = {"received": received, "exporters": [
            {"label": e.label, "exported": e.exported, "failed": e.failed, "error": e.first_error}
            for e in exporters]}
        pickle.dump(stats, stdout)
        stdout.flush()
        if kind == "close":
            return


# ---- the parent ----------------------------------------------------------------------------------

class ProcessSink:
    """Sends recorded spans to the export child; never blocks the engine on the exporter."""

    def __init__(self, service_name: str, endpoint: str | None, protocol: str | None,
                 trace_file: str | None, timeout_s: float):
        from otvllm import __version__
        self.timeout_s = timeout_s
        self.endpoint, self.trace_file = endpoint, trace_file
        self.sent = 0
        self.lost = 0     # spans that never reached the child (it died)
        self._proc = subprocess.Popen([sys.executable, "-m", "otvllm.tracing.export_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env())
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="otvllm-trace-writer", daemon=True)
        self._writer.start()
        self._queue.put((None, pickle.dumps({"service_name": service_name, "endpoint": endpoint,
                                             "protocol": protocol, "trace_file": trace_file,
                                             "timeout_s": timeout_s, "version": __version__})))
        self._closed = False

    def _write_loop(self) -> None:
        pipe = self._proc.stdin
        while True:
            count, data = self._queue.get()
            if data is None:
                return
            try:
                pipe.write(data)
                pipe.flush()
            except (BrokenPipeError, OSError, ValueError):
                self.lost += count or 0

    def emit(self, records: list[SpanRecord], parent_context=None) -> None:
        # parent_context is not carried across processes: the CLI's spans start their own traces.
        if self._closed or not records:
            return
        self.sent += len(records)
        self._queue.put((len(records), pickle.dumps(("records", records), protocol=pickle.HIGHEST_PROTOCOL)))

    def flush(self) -> dict | None:
        """Wait (at most the export timeout) until the child has exported what it was sent."""
        return self._request("flush")

    def close(self) -> dict | None:
        """Flush, stop the child and return its counts; None if it did not answer in time."""
        if self._closed:
            return None
        stats = self._request("close")
        self._closed = True
        self._queue.put((None, None))
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        return stats

    def _request(self, kind: str) -> dict | None:
        if self._proc.poll() is not None:
            return None
        self._queue.put((0, pickle.dumps((kind, None))))
        result: list = []
        reader = threading.Thread(target=lambda: result.append(_read_stats(self._proc.stdout)), daemon=True)
        reader.start()
        reader.join(self.timeout_s + 2.0)
        if not result or result[0] is None:
            self._proc.kill()
            self._closed = True
            return None
        return result[0]


def _read_stats(pipe) -> dict | None:
    try:
        return pickle.load(pipe)
    except (EOFError, pickle.UnpicklingError, OSError):
        return None


def _child_env() -> dict:
    env = dict(os.environ)
    # The child must import otvllm from the same place as the parent.
    paths = [p for p in sys.path if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def warn_about_losses(sink: ProcessSink, stats: dict | None, stream=None) -> str | None:
    """One warning line if spans were dropped, else None (and nothing printed)."""
    stream = stream or sys.stderr
    if stats is None:
        message = (f"otvllm: tracing: the span exporter did not finish within {sink.timeout_s:.0f} s; "
                   f"up to {sink.sent} spans were dropped")
    else:
        problems = [f"{e['failed']} spans could not be sent to {e['label']} ({e['error']})"
                    for e in stats["exporters"] if e["failed"]]
        if sink.lost:
            problems.append(f"{sink.lost} spans were lost before export")
        if not problems:
            return None
        message = "otvllm: tracing: " + "; ".join(problems) + "; generation was not affected"
    print(message, file=stream, flush=True)
    return message


if __name__ == "__main__":
    _child_main()
