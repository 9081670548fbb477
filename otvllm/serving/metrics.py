"""The server's metrics, through the OpenTelemetry metrics SDK: exported over OTLP (the same
endpoint and OTEL_* variables as the traces) and served for Prometheus at /metrics.

The GenAI server metrics (OpenTelemetry semantic conventions, seconds) are recorded when a
request ends, inside its HTTP server span, so their histogram buckets carry exemplars with
that request's trace id. The engine's gauges and counters are the latest figures its process
sent (with each step's news), read when metrics are collected."""

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from otvllm.tracing import schema as S

# Bucket boundaries the GenAI semantic conventions give for these instruments (seconds).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

TTFT = "gen_ai.server.time_to_first_token"
TPOT = "gen_ai.server.time_per_output_token"
DURATION = "gen_ai.server.request.duration"
TOKENS = "otvllm.tokens"                       # counter, attribute gen_ai.token.type = input | output
RUNNING = "otvllm.requests.running"
WAITING = "otvllm.requests.waiting"
KV_USAGE = "otvllm.kv_cache.usage"             # fraction of KV blocks in use
PREFIX_HIT_RATE = "otvllm.prefix_cache.hit_rate"
PREEMPTIONS = "otvllm.preemptions"
STEPS = "otvllm.steps"


class ServerMetrics:
    def __init__(self, stats, model_name: str, service_name: str, otlp: dict | None, interval_ms: int):
        """`stats()`: the engine's latest gauges (running, waiting, kv_usage, prefix_hit_rate,
        preemptions, steps)."""
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        readers = [PrometheusMetricReader(registry=self.registry)]
        if otlp is not None:
            readers.append(_otlp_reader(otlp, interval_ms))
        views = [View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(buckets))
                 for name, buckets in ((TTFT, TTFT_BUCKETS), (TPOT, TPOT_BUCKETS), (DURATION, DURATION_BUCKETS))]
        from otvllm import __version__
        self.provider = MeterProvider(metric_readers=readers, views=views, resource=Resource.create(
            {"service.name": service_name, "service.version": __version__}))
        meter = self.provider.get_meter("otvllm", __version__)
        self.attrs = {S.GEN_AI_OPERATION: "text_completion", S.GEN_AI_REQUEST_MODEL: model_name,
                      S.GEN_AI_SYSTEM: "otvllm"}
        self.ttft = meter.create_histogram(TTFT, unit="s", description="Time to generate the first token")
        self.tpot = meter.create_histogram(TPOT, unit="s", description="Time per output token after the first")
        self.duration = meter.create_histogram(DURATION, unit="s", description="Request duration, arrival to end")
        self.tokens = meter.create_counter(TOKENS, unit="{token}", description="Prompt and generated tokens")

        def observe(key: str):
            from opentelemetry.metrics import Observation
            return lambda options: [Observation(stats().get(key, 0))]

        meter.create_observable_gauge(RUNNING, [observe("running")], unit="{request}",
                                      description="Requests in the running batch")
        meter.create_observable_gauge(WAITING, [observe("waiting")], unit="{request}",
                                      description="Requests waiting for the engine")
        meter.create_observable_gauge(KV_USAGE, [observe("kv_usage")], unit="1",
                                      description="Fraction of KV-cache blocks in use")
        meter.create_observable_gauge(PREFIX_HIT_RATE, [observe("prefix_hit_rate")], unit="1",
                                      description="Prompt tokens served from the prefix cache, of all prompt tokens, "
                                                  "at first admissions, since start")
        meter.create_observable_counter(PREEMPTIONS, [observe("preemptions")], unit="{preemption}",
                                        description="Sequences preempted since start")
        meter.create_observable_counter(STEPS, [observe("steps")], unit="{step}", description="Engine steps since start")

    def request_ended(self, request, completion_tokens: int, end_ns: int, finish_reason: str) -> None:
        """Record one request's figures (a ServerRequest); call it in the request's context
        (for exemplars)."""
        attrs = dict(self.attrs)
        attrs["gen_ai.response.finish_reasons"] = finish_reason
        self.duration.record((end_ns - request.arrival_ns) / 1e9, attrs)
        self.tokens.add(request.num_prompt_tokens, {**self.attrs, "gen_ai.token.type": "input"})
        self.tokens.add(completion_tokens, {**self.attrs, "gen_ai.token.type": "output"})
        if request.first_token_ns:
            self.ttft.record((request.first_token_ns - request.arrival_ns) / 1e9, attrs)
            if completion_tokens > 1:
                self.tpot.record((end_ns - request.first_token_ns) / 1e9 / (completion_tokens - 1), attrs)

    def prometheus_text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def shutdown(self) -> None:
        self.provider.shutdown(timeout_millis=5000)


def _otlp_reader(otlp: dict, interval_ms: int):
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    endpoint, timeout = otlp["endpoint"], otlp["timeout_s"]
    if otlp["protocol"] == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        exporter = OTLPMetricExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"), timeout=timeout)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        url = endpoint if endpoint.rstrip("/").endswith("/v1/metrics") else endpoint.rstrip("/") + "/v1/metrics"
        exporter = OTLPMetricExporter(endpoint=url, timeout=timeout)
    return PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms)
