#!/usr/bin/env python3
"""A small load generator for `otvllm serve` (or any OpenAI-compatible server), traced.

It sends a steady trickle of completions through the official `openai` client: a request
every 0.5-1.5 s at the default --rate 1, random prompt lengths, random max_tokens
(16-128), some of them streamed. Each request runs inside a CLIENT span of the load
generator's own OpenTelemetry tracer (service `otvllm-loadgen`, exported over OTLP), and
the span's context goes out as a W3C `traceparent` header (`opentelemetry.propagate.inject`
into the request's extra_headers). otvllm continues that trace, so Jaeger shows one trace
per request: loadgen client span -> otvllm's HTTP server span -> `request` span, whose
links lead to the `engine.step` spans that computed it.

In the compose demo stack it runs as the `loadgen` service. From the host, against a local
server (the OTLP endpoint is optional: without one the spans are made but not exported):

    otvllm serve &                    # the synthetic model on 127.0.0.1:8000
    python scripts/loadgen.py --base-url http://127.0.0.1:8000/v1 --max-requests 20
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 python scripts/loadgen.py --rate 2

Until the server answers GET {base-url}/models the load generator waits (retrying every
2 s, forever unless --wait-timeout); a request that fails later is logged, recorded as an
error on its span, and the trickle goes on. SIGTERM or Ctrl-C stops it: requests in
flight finish (up to --timeout), spans are flushed, and it exits 0.

Needs: openai, opentelemetry-sdk and opentelemetry-exporter-otlp (all in otvllm's image;
on the host, `pip install -e .[test]`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

SERVICE_NAME = "otvllm-loadgen"
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"

log = logging.getLogger("loadgen")

# Prompts are random sentences over this vocabulary. A fraction of them start with a shared
# preamble, so that the server's prefix cache sees some hits.
WORDS = (
    "the a an of to in on for with model token cache engine batch step request trace span latency "
    "throughput kernel attention memory block prefill decode queue server client stream sample "
    "temperature window metric histogram exemplar collector jaeger prometheus grafana python torch "
    "gpu cpu fast slow small large first last next every some many few quick lazy brown fox dog "
    "jumps over under between river mountain city forest ocean story poem letter summary answer "
    "question explain describe write list compare translate count why how what when where"
).split()
PREAMBLE = ("You are a helpful assistant running on otvllm, a tracing-first inference engine. "
            "Answer briefly and precisely. Every request you serve is traced from the client that "
            "sent it, through the HTTP server and the scheduler, down to the engine steps that "
            "computed its tokens, and its latency is exported as metrics with exemplars. ") * 2


@dataclass
class Result:
    ok: bool
    trace_id: str
    stream: bool
    seconds: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    ttft: float | None = None
    error: str | None = None
    text: str = field(default="", repr=False)


# ------------------------------------------------------------------------------ tracing

def make_tracer_provider(service_name: str = SERVICE_NAME, endpoint: str | None = None,
                         protocol: str | None = None):
    """A TracerProvider of the load generator's own (not the global one), exporting over OTLP
    to `endpoint` (gRPC, or HTTP/protobuf when protocol is http/protobuf). With no endpoint
    the spans are still made, so that `traceparent` is sent, but go nowhere."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource)
    if endpoint:
        protocol = (protocol or "grpc").strip().lower()
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
        elif protocol in ("http/protobuf", "http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            url = endpoint.rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url)
        else:
            raise ValueError(f"unsupported OTLP protocol {protocol!r} (grpc or http/protobuf)")
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return provider


def make_client(base_url: str, timeout: float = 120.0, max_retries: int = 2):
    import openai
    # The server needs no key; the client insists on one.
    return openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "unused",
                         timeout=timeout, max_retries=max_retries)


def _server_address(base_url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit
    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def send_completion(client, tracer, model: str, prompt: str, max_tokens: int, stream: bool = False,
                    ignore_eos: bool = False, temperature: float = 0.8) -> Result:
    """One completion inside a CLIENT span whose context is injected as `traceparent`."""
    from opentelemetry.propagate import inject
    from opentelemetry.trace import SpanKind, Status, StatusCode

    host, port = _server_address(str(client.base_url))
    attributes = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": max_tokens,
        "gen_ai.request.temperature": temperature,
        "server.address": host,
        "server.port": port,
        "otvllm.loadgen.stream": stream,
        "otvllm.loadgen.prompt_chars": len(prompt),
    }
    start = time.perf_counter()
    # GenAI semantic conventions name a client span "{operation} {model}".
    with tracer.start_as_current_span(f"text_completion {model}", kind=SpanKind.CLIENT,
                                      attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        headers: dict[str, str] = {}
        inject(headers)   # traceparent (and tracestate/baggage) of the current span: this one
        extra_body = {"ignore_eos": True} if ignore_eos else None
        try:
            if stream:
                result = _stream(client, span, model, prompt, max_tokens, temperature, headers, extra_body, start)
            else:
                response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=temperature, extra_headers=headers,
                                                      extra_body=extra_body)
                choice = response.choices[0]
                usage = response.usage
                result = Result(True, trace_id, False, 0.0, usage.prompt_tokens if usage else None,
                                usage.completion_tokens if usage else None, choice.finish_reason,
                                text=choice.text or "")
                span.set_attribute("gen_ai.response.id", response.id)
                span.set_attribute("gen_ai.response.model", response.model)
        except Exception as e:   # noqa: BLE001 - any failure is one failed request, the trickle goes on
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"[:200]))
            span.set_attribute("error.type", type(e).__name__)
            return Result(False, trace_id, stream, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
        result.trace_id = trace_id
        result.seconds = time.perf_counter() - start
        if result.prompt_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", result.prompt_tokens)
        if result.completion_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", result.completion_tokens)
        if result.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [result.finish_reason])
        if result.ttft is not None:
            span.set_attribute("otvllm.loadgen.time_to_first_chunk_s", round(result.ttft, 6))
    return result


def _stream(client, span, model, prompt, max_tokens, temperature, headers, extra_body, start) -> Result:
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_headers=headers, extra_body=extra_body)
    ttft, finish_reason, usage, pieces, response_id = None, None, None, [], None
    for chunk in chunks:
        response_id = response_id or chunk.id
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices or []:
            if choice.text and ttft is None:
                ttft = time.perf_counter() - start
                span.add_event("gen_ai.first_chunk")
            pieces.append(choice.text or "")
            finish_reason = choice.finish_reason or finish_reason
    if response_id:
        span.set_attribute("gen_ai.response.id", response_id)
    return Result(True, "", True, 0.0, usage.prompt_tokens if usage else None,
                  usage.completion_tokens if usage else None, finish_reason, ttft, text="".join(pieces))


# ------------------------------------------------------------------------------ workload

def random_prompt(rng: random.Random, min_words: int, max_words: int, shared_prefix_fraction: float) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
    prompt = words[0].upper() + words[1:] + "."
    if rng.random() < shared_prefix_fraction:
        prompt = PREAMBLE + prompt
    return prompt


def wait_for_server(base_url: str, timeout: float | None, stop: threading.Event, interval: float = 2.0) -> list[str]:
    """Poll GET {base_url}/models until it answers; returns the model ids it lists."""
    url = base_url.rstrip("/") + "/models"
    deadline = None if timeout is None else time.monotonic() + timeout
    last_error = None
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.load(resp)
            return [m["id"] for m in body.get("data", []) if "id" in m]
        except (OSError, ValueError, urllib.error.URLError) as e:
            error = f"{type(e).__name__}: {e}"
            if error != last_error:
                log.info("waiting for the server at %s (%s)", url, error)
                last_error = error
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no answer from {url} within {timeout:g} s ({last_error})")
        stop.wait(interval)
    return []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                   help="the server's OpenAI API root (default: OPENAI_BASE_URL, else %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the first one GET /models lists)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="mean requests per second; gaps are uniform in [0.5, 1.5] / rate")
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many requests (0: run forever)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="requests in flight at most; the schedule waits when all are busy")
    p.add_argument("--min-tokens", type=int, default=16, help="smallest max_tokens of a request")
    p.add_argument("--max-tokens", type=int, default=128, help="largest max_tokens of a request")
    p.add_argument("--min-words", type=int, default=4, help="shortest prompt, in words")
    p.add_argument("--max-words", type=int, default=120, help="longest prompt, in words")
    p.add_argument("--stream-fraction", type=float, default=0.3, help="fraction of requests that stream")
    p.add_argument("--shared-prefix-fraction", type=float, default=0.3,
                   help="fraction of prompts that start with a common preamble (prefix-cache hits)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to generate max_tokens whatever the model says (otvllm, vLLM)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=None, help="seed of the workload's randomness")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    p.add_argument("--wait-timeout", type=float, default=None,
                   help="seconds to wait for the server at start (default: forever)")
    p.add_argument("--otlp-endpoint", default=None,
                   help="OTLP endpoint for the spans (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                        "OTEL_EXPORTER_OTLP_ENDPOINT; none: spans are not exported)")
    p.add_argument("--service-name", default=SERVICE_NAME, help="service.name of the spans")
    p.add_argument("--quiet", action="store_true", help="no line per request")
    args = p.parse_args(argv)
    if args.rate <= 0:
        p.error("--rate must be > 0")
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    if not 1 <= args.min_words <= args.max_words:
        p.error("need 1 <= --min-words <= --max-words")
    if args.concurrency < 1 or args.max_requests < 0:
        p.error("--concurrency must be >= 1 and --max-requests >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # INFO for this script only: the HTTP client logs every request at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    endpoint = (args.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    provider = make_tracer_provider(args.service_name, endpoint, protocol)
    tracer = provider.get_tracer("otvllm.loadgen")

    stop = threading.Event()

    def on_signal(signum, frame):
        if not stop.is_set():
            log.info("stopping (signal %d): waiting for the requests in flight", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    rng = random.Random(args.seed)
    sent = failed = 0
    try:
        models = wait_for_server(args.base_url, args.wait_timeout, stop)
        if stop.is_set():
            return 0
        model = args.model or (models[0] if models else None)
        if model is None:
            log.error("%s/models lists no model; pass --model", args.base_url.rstrip("/"))
            return 2
        log.info("sending to %s, model %s, %.2g requests/s%s; traces to %s as service %s", args.base_url, model,
                 args.rate, f", {args.max_requests} requests" if args.max_requests else "", endpoint or "nowhere",
                 args.service_name)
        client = make_client(args.base_url, args.timeout)
        slots = threading.Semaphore(args.concurrency)
        lock = threading.Lock()
        counts = {"ok": 0, "failed": 0}

        def one(index: int, prompt: str, max_tokens: int, stream: bool) -> None:
            try:
                r = send_completion(client, tracer, model, prompt, max_tokens, stream, args.ignore_eos,
                                    args.temperature)
                with lock:
                    counts["ok" if r.ok else "failed"] += 1
                if not r.ok:
                    log.warning("request %d failed after %.2f s: %s (trace %s)", index, r.seconds, r.error,
                                r.trace_id)
                elif not args.quiet:
                    ttft = f", first chunk {r.ttft * 1000:.0f} ms" if r.ttft is not None else ""
                    log.info("request %d: %s prompt tokens -> %s tokens (%s) in %.2f s%s%s, trace %s", index,
                             r.prompt_tokens, r.completion_tokens, r.finish_reason, r.seconds,
                             ", streamed" if r.stream else "", ttft, r.trace_id)
            finally:
                slots.release()

        with ThreadPoolExecutor(max_workers=args.concurrency, thread_name_prefix="loadgen") as pool:
            next_at = time.monotonic()
            while not stop.is_set() and (not args.max_requests or sent < args.max_requests):
                delay = next_at - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
                while not slots.acquire(timeout=0.5):
                    if stop.is_set():
                        break
                if stop.is_set():
                    break
                prompt = random_prompt(rng, args.min_words, args.max_words, args.shared_prefix_fraction)
                max_tokens = rng.randint(args.min_tokens, args.max_tokens)
                stream = rng.random() < args.stream_fraction
                sent += 1
                pool.submit(one, sent, prompt, max_tokens, stream)
                next_at = max(next_at, time.monotonic()) + rng.uniform(0.5, 1.5) / args.rate
        failed = counts["failed"]
        log.info("done: %d requests sent, %d succeeded, %d failed", sent, counts["ok"], failed)
    except TimeoutError as e:
        log.error("%s", e)
        return 1
    finally:
        provider.shutdown()   # flushes the last spans
    # A bounded run (--max-requests) fails when a request failed; a stopped endless one does not.
    return 1 if failed and args.max_requests and not stop.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
