"""Export: the child process that owns the OpenTelemetry SDK and its exporters (OTLP, Jaeger
JSON file), the parent's side of it, and `configure()`."""
