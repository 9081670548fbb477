"""`otvllm serve`: the engine in a process of its own (engine_process.py), the app on uvicorn
in this one. SIGTERM or Ctrl-C drains: the listening socket closes, running requests finish
(within --drain-timeout), then the engine process stops and the trace is flushed by the
caller (the CLI)."""

import os
import signal
import socket
import sys

import uvicorn

from otvllm.serving.app import build_app
from otvllm.serving.engine_client import EngineClient, EngineFailed
from otvllm.tokenizer import load_tokenizer


def _export_sink():
    """The export process's sink when this run is traced (the CLI started one), else None."""
    from otvllm.tracing.export.process_sink import ProcessSink
    from otvllm.tracing.recording.sinks import current_sink

    sink = current_sink()
    return sink if isinstance(sink, ProcessSink) else None


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the engine starts, so that a port in use or an address
    not of this machine is named at once, not after the model has loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def _http_instrumentor():
    """OpenTelemetry's FastAPI instrumentation, imported before the engine starts, so that a
    broken install is named at once, not after the model has loaded."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    return FastAPIInstrumentor


def _trace_http(app, sink, instrumentor) -> None:
    """HTTP server spans from OpenTelemetry's FastAPI instrumentation (which continues a
    client's `traceparent`), made by an SDK of this process and exported with otvllm's spans
    by the export process."""
    from opentelemetry.sdk.trace import TracerProvider

    from otvllm.tracing.export.forwarding import ForwardingProcessor

    provider = TracerProvider()
    provider.add_span_processor(ForwardingProcessor(sink))
    instrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="health,metrics",
                                exclude_spans=["receive", "send"])


def _metrics(args, engine: EngineClient, name: str):
    """Metrics for /metrics, and over OTLP where traces go (unless OTEL_SDK_DISABLED)."""
    from otvllm.environment import read
    from otvllm.serving.metrics import ServerMetrics
    from otvllm.tracing.export.setup import export_settings, otlp_endpoint

    if read("OTEL_SDK_DISABLED"):
        return None
    endpoint = args.otlp_endpoint or otlp_endpoint()
    settings = export_settings(endpoint=endpoint) if endpoint else None
    return ServerMetrics(lambda: engine.stats, name, read("OTEL_SERVICE_NAME"), settings,
                         read("OTEL_METRIC_EXPORT_INTERVAL"))


def serve(args, model: str, options: dict) -> int:
    from otvllm.tracing.recording.tracer import current_run_rid

    name = args.served_model_name or os.path.basename(os.path.normpath(model))
    sink = _export_sink() if args.trace_level != "off" else None
    try:
        listening = _listening_socket(args.host, args.port)
    except OSError as e:
        print(f"otvllm: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr,
              flush=True)
        return 1
    try:
        instrumentor = _http_instrumentor() if sink is not None else None
    except ImportError as e:
        print(f"otvllm: error: the HTTP server's spans need opentelemetry-instrumentation-fastapi, which "
              f"cannot be imported ({e}); reinstall otvllm's dependencies, or serve with --trace-level off",
              file=sys.stderr, flush=True)
        return 1
    try:
        engine = EngineClient(model, options, args.max_queue, args.stream_interval_ms / 1000, current_run_rid(), sink)
    except EngineFailed as e:
        print(f"otvllm: error: {e}", file=sys.stderr, flush=True)
        return 1
    metrics = None
    try:   # whatever fails from here on, the engine process must not outlive this one
        metrics = _metrics(args, engine, name)
        app = build_app(engine, load_tokenizer(model), name, metrics)
        if instrumentor is not None:
            _trace_http(app, sink, instrumentor)
    except BaseException:
        engine.stop()
        if metrics is not None:
            metrics.shutdown()
        raise
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
    try:
        server.run(sockets=[listening])
    finally:
        engine.stop()   # done already by the app's shutdown, unless the server never started
    if not server.started:
        return 1
    print("otvllm: stopped serving (running requests drained)", file=sys.stderr, flush=True)
    return 0


def _already_drained(signum, frame) -> None:
    pass
