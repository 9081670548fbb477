"""otvllm's tracing: span schema, engine-side recording, export (OTLP, Jaeger JSON file), summaries.

Library code only uses the OpenTelemetry API; `configure()` is for programs that let otvllm
own the SDK (the CLI, the benchmark)."""

from otvllm.tracing.setup import TracingSession, configure

__all__ = ["configure", "TracingSession"]
