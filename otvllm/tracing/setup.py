"""`configure()`: otvllm sets up tracing itself (the CLI, the benchmark, the compose demo).

Applications that own a TracerProvider do not call this: otvllm's spans go to their
provider. Honours the standard variables: OTEL_SDK_DISABLED, OTEL_SERVICE_NAME,
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
OTEL_EXPORTER_OTLP_PROTOCOL (grpc, http/protobuf), OTEL_EXPORTER_OTLP_TIMEOUT (headers
and certificates are read by the OTLP exporters themselves).
"""

import os
import time

from otvllm.tracing.export_process import ProcessSink, warn_about_losses
from otvllm.tracing.sinks import set_sink

DEFAULT_EXPORT_TIMEOUT_S = 5.0


class TracingSession:
    """What `configure()` set up; `shutdown()` flushes and reports dropped spans once."""

    def __init__(self, sink: ProcessSink | None):
        self.sink = sink
        self.stats: dict | None = None

    @property
    def endpoint(self) -> str | None:
        return self.sink.endpoint if self.sink else None

    @property
    def trace_file(self) -> str | None:
        return self.sink.trace_file if self.sink else None

    def flush(self) -> dict | None:
        return self.sink.flush() if self.sink else None

    def shutdown(self) -> dict | None:
        if self.sink is None:
            return None
        set_sink(None)
        self.stats = self.sink.close()
        warn_about_losses(self.sink, self.stats)
        return self.stats


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def configure(service_name: str | None = None, endpoint: str | None = None, protocol: str | None = None,
              trace_file: str | None = None, timeout_s: float | None = None) -> TracingSession:
    """Export otvllm's spans over OTLP (endpoint from the argument or OTEL_EXPORTER_OTLP_*)
    and/or to a Jaeger JSON trace file, from a child process."""
    if _env("OTEL_SDK_DISABLED") in ("true", "True", "TRUE", "1"):
        return TracingSession(None)
    endpoint = endpoint or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    protocol = (protocol or _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    if protocol not in ("grpc", "http/protobuf", "http"):
        raise ValueError(f"unsupported OTLP protocol {protocol!r}: use grpc or http/protobuf")
    if timeout_s is None:
        timeout = _env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
        timeout_s = float(timeout) / (1000 if float(timeout) > 100 else 1) if timeout else DEFAULT_EXPORT_TIMEOUT_S
    if not endpoint and not trace_file:
        return TracingSession(None)
    service_name = service_name or _env("OTEL_SERVICE_NAME") or "otvllm"
    sink = ProcessSink(service_name, endpoint, "grpc" if protocol == "grpc" else "http", trace_file, timeout_s)
    set_sink(sink)
    return TracingSession(sink)


def default_trace_file() -> str:
    return os.path.abspath(time.strftime("otvllm-trace-%Y%m%d-%H%M%S.json"))
