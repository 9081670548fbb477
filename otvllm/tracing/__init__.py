"""otvllm's tracing, split by who runs it:

- `recording/`: on the engine thread, OpenTelemetry API only (the tracer, its records, the
  step retention policy, the library-mode sink);
- `export/`: the export process that owns the SDK and its exporters, its parent side, and
  `configure()` for programs that let otvllm own tracing (the CLI, the benchmark);
- `tools/`: reading trace files and summarising them.

`schema.py` names every span and attribute; `level.py` the trace levels."""

__all__ = ["configure", "TracingSession"]


def __getattr__(name: str):
    # Lazy, so that the export process does not import what it does not need.
    if name in __all__:
        from otvllm.tracing.export import setup
        return getattr(setup, name)
    raise AttributeError(f"module 'otvllm.tracing' has no attribute {name!r}")
