"""`otvllm serve`: the app on uvicorn. SIGTERM or Ctrl-C drains: the listening socket
closes, running requests finish (within --drain-timeout), then the engine loop stops and
the trace is flushed by the caller (the CLI)."""

import os
import signal
import sys

import uvicorn

from otvllm.serving.app import build_app


def _trace_http(app) -> None:
    """HTTP server spans from OpenTelemetry's FastAPI instrumentation (which continues a
    client's `traceparent`), made by an SDK of this process and exported with otvllm's spans
    by the export process."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider

    from otvllm.tracing.export.forwarding import ForwardingProcessor
    from otvllm.tracing.export.process_sink import ProcessSink
    from otvllm.tracing.recording.sinks import current_sink

    sink = current_sink()
    if not isinstance(sink, ProcessSink):
        return
    provider = TracerProvider()
    provider.add_span_processor(ForwardingProcessor(sink))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="health,metrics",
                                       exclude_spans=["receive", "send"])


def _metrics(args, llm, name: str):
    """Metrics for /metrics, and over OTLP where traces go (unless OTEL_SDK_DISABLED)."""
    from otvllm.environment import read
    from otvllm.serving.metrics import ServerMetrics
    from otvllm.tracing.export.setup import export_settings, otlp_endpoint

    if read("OTEL_SDK_DISABLED"):
        return None
    endpoint = args.otlp_endpoint or otlp_endpoint()
    settings = export_settings(endpoint=endpoint) if endpoint else None
    return ServerMetrics(llm.engine, name, read("OTEL_SERVICE_NAME"), settings, read("OTEL_METRIC_EXPORT_INTERVAL"))


def serve(args, llm) -> int:
    name = args.served_model_name or os.path.basename(os.path.normpath(llm.config.model))
    app = build_app(llm, name, args.max_queue, _metrics(args, llm, name), args.stream_interval_ms / 1000)
    if llm.engine.resolved.trace_level != "off":
        _trace_http(app)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    server = uvicorn.Server(config)
    announce = server.startup

    async def startup(sockets=None):
        await announce(sockets)
        if server.started:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            print(f"otvllm: serving {name} on http://{host}:{port}", file=sys.stderr, flush=True)

    server.startup = startup
    # uvicorn handles SIGINT and SIGTERM while it runs (it drains), then hands the signal it
    # caught to the handler it found: make that one do nothing more, so the run ends with 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _already_drained)
    server.run()
    if not server.started:
        return 1
    print("otvllm: stopped serving (running requests drained)", file=sys.stderr, flush=True)
    return 0


def _already_drained(signum, frame) -> None:
    pass
