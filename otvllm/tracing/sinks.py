"""Where recorded spans go: the application's TracerProvider (library mode), or the export
process that `otvllm.tracing.configure()` started (CLI, benchmark, compose demo)."""

from opentelemetry import trace

from otvllm.tracing.emit import emit_records
from otvllm.tracing.records import SpanRecord

TRACER_NAME = "otvllm"
_configured_sink = None


class ProviderSink:
    """Emits through the global TracerProvider the application configured, in the caller's
    context; nothing is built when no provider was set."""

    def emit(self, records: list[SpanRecord], parent_context=None) -> None:
        provider = trace.get_tracer_provider()
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            return
        from otvllm import __version__
        emit_records(records, provider.get_tracer(TRACER_NAME, __version__), parent_context)


def current_sink():
    return _configured_sink or ProviderSink()


def set_sink(sink) -> None:
    global _configured_sink
    _configured_sink = sink
