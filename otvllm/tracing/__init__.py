"""otvllm's tracing: span schema, engine-side recording, export (OTLP, Jaeger JSON file), summaries.

Library code only uses the OpenTelemetry API; `configure()` is for programs that let otvllm
own the SDK (the CLI, the benchmark)."""

__all__ = ["configure", "TracingSession"]


def __getattr__(name: str):
    # Lazy, so that `python -m otvllm.tracing.export_process` does not import itself twice.
    if name in __all__:
        from otvllm.tracing import setup
        return getattr(setup, name)
    raise AttributeError(f"module 'otvllm.tracing' has no attribute {name!r}")
