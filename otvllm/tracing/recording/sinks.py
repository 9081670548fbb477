"""Where the engine's records go: the application's TracerProvider (library mode), or the
export process that `otvllm.tracing.configure()` started (CLI, benchmark, compose demo).

A sink takes records as they finish (`send`, never blocking: past its bound it drops finished
spans and says so), may do a bounded slice of work between steps (`pump`), and finishes
its work when a call ends (`drain`)."""

import time
from collections import deque

from opentelemetry import trace

from otvllm.tracing.recording.builder import SpanBuilder
from otvllm.tracing.recording.records import SPANS

TRACER_NAME = "otvllm"
PENDING_LIMIT = 100_000      # finished spans waiting to be built; more are dropped and counted
PUMP_SLICE_S = 0.001         # the engine thread builds spans for at most this long per step
PUMP_DELAY_S = 0.25          # and only for records older than this: fewer, larger slices

_configured_sink = None


class ProviderSink:
    """Library mode: spans built through the global TracerProvider the application set, on the
    engine thread, in slices of at most PUMP_SLICE_S after a step (while the device runs the
    step just launched), so the application's processors see each step within a second."""

    def __init__(self):
        self._pending: deque = deque()
        self._pending_spans = 0
        self._provider = None
        self._builder: SpanBuilder | None = None

    @property
    def active(self) -> bool:
        provider = trace.get_tracer_provider()
        return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))

    def _builder_for_provider(self) -> SpanBuilder:
        provider = trace.get_tracer_provider()
        if self._builder is None or provider is not self._provider:
            from otvllm import __version__
            self._provider = provider
            self._builder = SpanBuilder(provider.get_tracer(TRACER_NAME, __version__))
        return self._builder

    def send(self, kind: str, payload) -> bool:
        if kind == SPANS:
            if self._pending_spans + len(payload) > PENDING_LIMIT:
                return False
            self._pending_spans += len(payload)
        self._pending.append((time.monotonic(), kind, payload))
        return True

    def pump(self) -> None:
        pending = self._pending
        if not pending or time.monotonic() - pending[0][0] < PUMP_DELAY_S:
            return
        deadline = time.monotonic() + PUMP_SLICE_S
        builder = self._builder_for_provider()
        while pending and time.monotonic() < deadline:
            self._build_one(builder)

    def drain(self) -> None:
        if self._pending:
            builder = self._builder_for_provider()
            while self._pending:
                self._build_one(builder)

    def _build_one(self, builder: SpanBuilder) -> None:
        _, kind, payload = self._pending.popleft()
        if kind == SPANS:
            self._pending_spans -= len(payload)
        builder.handle(kind, payload)


def current_sink():
    return _configured_sink or _library_sink


def set_sink(sink) -> None:
    global _configured_sink
    _configured_sink = sink


_library_sink = ProviderSink()
