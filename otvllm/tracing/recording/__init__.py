"""Recording on the engine thread: plain records of spans, handed to a sink. Uses the
OpenTelemetry API only (never the SDK)."""
