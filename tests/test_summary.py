"""`otvllm trace summary`: numbers checked against a synthetic trace whose values are chosen here."""

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otvllm.tracing import schema as S
from otvllm.tracing.export.jaeger_file import JaegerJsonFileExporter
from otvllm.tracing.tools.summary import human_bytes, summarize_file

T0 = 1_760_000_000_000_000_000   # ns since the epoch
MS = 1_000_000
GiB = 1 << 30
REQUEST = "text_completion m"   # a request span is named by its operation and model
REQUEST_IDS = {S.GEN_AI_OPERATION: "text_completion", S.GEN_AI_REQUEST_MODEL: "m"}


class _Builder:
    def __init__(self, tracer):
        self.tracer = tracer

    def span(self, name, start_ms, end_ms, parent=None, base=T0, **attrs):
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        span = self.tracer.start_span(name, context=ctx, start_time=base + int(start_ms * MS), attributes=attrs)
        span.end(end_time=base + int(end_ms * MS))
        return span


def _step(b, gen, index, phase, start, end, seqs, tokens, children=None, base=T0):
    step = b.span(S.step_name(phase), start, end, gen, base=base, **{S.STEP_INDEX: index, S.PHASE: phase,
                                                         S.NUM_SEQS: seqs, S.NUM_BATCHED_TOKENS: tokens})
    for name, s, e, attrs in children or ():
        b.span(name, s, e, step, base=base, **attrs)
    return step


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    path = tmp_path_factory.mktemp("summary") / "trace.json"
    provider = TracerProvider(resource=Resource.create({"service.name": "otvllm"}))
    provider.add_span_processor(SimpleSpanProcessor(JaegerJsonFileExporter(str(path))))
    b = _Builder(provider.get_tracer("otvllm"))

    # Trace A: no aggregates on llm.generate, everything computed from the spans.
    # 1 prefill step (10 ms) + decode steps of 4, 16 and 3 ms; steps 0 and 2 have their phases.
    gen = b.tracer.start_span(S.GENERATE, start_time=T0)
    _step(b, gen, 0, "prefill", 0, 10, 2, 30, [
        (S.SCHEDULE, 0, 1, {}),
        (S.FORWARD, 1, 8, {S.MEM_PEAK: GiB + GiB // 2, S.GPU_TIME_MS: 6.5, S.CUDA_GRAPH: True}),
        (S.SAMPLE, 8, 9, {}), (S.POSTPROCESS, 9, 10, {})])
    _step(b, gen, 1, "decode", 10, 14, 2, 2)
    _step(b, gen, 2, "decode", 14, 30, 1, 1, [
        (S.SCHEDULE, 14, 15, {}), (S.FORWARD, 15, 28, {S.MEM_PEAK: 2 * GiB + GiB // 2, S.CUDA_GRAPH: False}),
        (S.SAMPLE, 28, 29, {}), (S.POSTPROCESS, 29, 30, {})])
    _step(b, gen, 3, "decode", 30, 33, 1, 1)
    b.span(REQUEST, 0, 14, gen, **REQUEST_IDS, **{S.GEN_AI_USAGE_INPUT_TOKENS: 20, S.GEN_AI_USAGE_OUTPUT_TOKENS: 2,
                                     S.REQUEST_TTFT_MS: 10.0, S.REQUEST_PREEMPTIONS: 0})
    b.span(REQUEST, 0, 33, gen, **REQUEST_IDS, **{S.GEN_AI_USAGE_INPUT_TOKENS: 10, S.GEN_AI_USAGE_OUTPUT_TOKENS: 4,
                                     S.REQUEST_TTFT_MS: 12.0, S.REQUEST_PREEMPTIONS: 1})
    gen.end(end_time=T0 + 100 * MS)

    # Trace B: aggregates present (and different from what its two traced steps would give).
    t1 = T0 + 10**9
    gen = b.tracer.start_span(S.GENERATE, start_time=t1, attributes={
        S.GEN_NUM_REQUESTS: 4, S.GEN_PROMPT_TOKENS: 1000, S.GEN_OUTPUT_TOKENS: 512, S.GEN_STEPS: 100,
        S.GEN_PREFILL_STEPS: 4, S.GEN_DECODE_STEPS: 96, S.GEN_PREFILL_TIME_MS: 40.0, S.GEN_DECODE_TIME_MS: 900.0,
        S.GEN_THROUGHPUT: 512.0, S.GEN_PREEMPTIONS: 3, S.GEN_PREFIX_HIT_RATE: 0.25,
        S.GEN_MEM_START: GiB, S.GEN_MEM_END: GiB + 256 * (1 << 20), S.GEN_MEM_PEAK: 5 * GiB,
        S.TRACE_STEPS_DETAILED: 2, S.TRACE_STEPS_AGGREGATED: 98, S.TRACE_AGGREGATE_SPANS: 2,
        S.TRACE_STEPS_OVER_BUDGET: 0, S.STEPS_COUNT: 100, S.STEP_TIME_MEAN_MS: 9.4, S.STEP_TIME_P50_MS: 9.0,
        S.STEP_TIME_P99_MS: 12.0, S.STEP_TIME_MAX_MS: 250.0, S.SLOWEST_STEP_INDEX: 50})
    _step(b, gen, 0, "prefill", 0, 10, 4, 1000, [(S.FORWARD, 1, 9, {S.MEM_PEAK: 3 * GiB, S.CUDA_GRAPH: False})],
          base=t1)
    _step(b, gen, 50, "decode", 500, 750, 4, 4, base=t1)
    gen.end(end_time=t1 + 1000 * MS)

    # Trace C: engine.init on a CPU machine. Trace D: a generate with no memory figures.
    t2 = T0 + 2 * 10**9
    init = b.tracer.start_span(S.ENGINE_INIT, start_time=t2)
    b.span(S.MODEL_LOAD, 0, 250, init, base=t2, **{S.MODEL_ARCHITECTURE: "Qwen3ForCausalLM", S.MODEL_LAYERS: 2,
                                                   S.MODEL_PARAMETER_BYTES: 3 * (1 << 20)})
    b.span(S.KV_CACHE_ALLOCATE, 250, 260, init, base=t2, **{S.BLOCKS_TOTAL: 512, S.BLOCK_SIZE: 256,
                                                            S.KV_CACHE_BYTES: 64 * (1 << 20)})
    init.end(end_time=t2 + 300 * MS)
    t3 = T0 + 3 * 10**9
    gen = b.tracer.start_span(S.GENERATE, start_time=t3)
    _step(b, gen, 0, "prefill", 0, 5, 1, 7, base=t3)
    gen.end(end_time=t3 + 5 * MS)
    # Trace F: a generate interrupted by Ctrl-C whose slowest step was not detailed.
    t5 = T0 + 5 * 10**9
    gen = b.tracer.start_span(S.GENERATE, start_time=t5, attributes={
        S.GEN_STEPS: 40, S.STEPS_COUNT: 40, S.STEP_TIME_MEAN_MS: 5.0, S.STEP_TIME_P50_MS: 4.0,
        S.STEP_TIME_P99_MS: 30.0, S.STEP_TIME_MAX_MS: 30.0, S.SLOWEST_STEP_INDEX: 33,
        S.ERROR_TYPE: "KeyboardInterrupt"})
    _step(b, gen, 0, "prefill", 0, 5, 1, 7, base=t5)
    gen.set_status(trace.Status(trace.StatusCode.ERROR, "KeyboardInterrupt: "))
    gen.end(end_time=t5 + 200 * MS)
    # Trace G: engine.init on CUDA, with decode and prefill graphs.
    t6 = T0 + 6 * 10**9
    init = b.tracer.start_span(S.ENGINE_INIT, start_time=t6)
    b.span(S.CUDA_GRAPH_CAPTURE, 0, 1500, init, base=t6, **{S.CUDA_GRAPH_BATCH_SIZES: [1, 2, 4, 8, 16],
                                                            S.CUDA_GRAPH_PREFILL_TOKENS: [16, 32, 1024, 1536, 8192]})
    init.end(end_time=t6 + 1600 * MS)
    # Trace E: not otvllm's.
    b.span("GET /health", 0, 2, base=T0 + 4 * 10**9)
    provider.shutdown()

    text = summarize_file(str(path))
    print(text)
    blocks = text.split("\n\n")[1:]
    assert len(blocks) == 7
    return blocks


def _line(block: str, start: str) -> str:
    lines = [ln.strip() for ln in block.splitlines() if ln.strip().startswith(start)]
    assert lines, f"no line starting with {start!r} in:\n{block}"
    return lines[0]


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(3 * (1 << 20)) == "3.00 MiB"
    assert human_bytes(5 * GiB) == "5.00 GiB"


def test_generate_from_step_spans(summary):
    a = summary[0]
    assert a.startswith(S.GENERATE)
    head = _line(a, "Generation complete")
    assert "4 steps (1 prefill, 3 decode)" in head
    assert "requests=2" in head and "prompt_tokens=30" in head and "total_output_tokens=6" in head
    times = _line(a, "prefill_time")
    assert "prefill_time=10.00 ms" in times and "decode_time=23.00 ms" in times   # 4 + 16 + 3
    assert "throughput=60.0 tok/s" in times          # 6 tokens in 100 ms
    prefill, decode = _line(a, "prefill "), _line(a, "decode ")
    assert "1 steps" in prefill and "total    10.00 ms" in prefill and "min/mean/max 2/2.0/2" in prefill
    assert "3 steps" in decode and "mean    7.67 ms" in decode and "min/mean/max 1/1.3/2" in decode
    # of the steps with a forward span: the prefill's replayed a graph, the decode's did not
    assert prefill.endswith("from CUDA graphs 1/1") and decode.endswith("from CUDA graphs 0/1")
    assert "2.00 ms" in _line(a, S.SCHEDULE) and "6.1%" in _line(a, S.SCHEDULE)   # 2 of 33 ms
    assert "20.00 ms" in _line(a, S.FORWARD) and "60.6%" in _line(a, S.FORWARD)
    assert "6.50 ms" in _line(a, "(model.forward GPU time")
    assert _line(a, "slowest detailed step").startswith("slowest detailed step: #2 (decode")
    assert _line(a, "slowest detailed step").endswith("16.00 ms")
    assert _line(a, "CUDA memory") == "CUDA memory: peak 2.50 GiB"
    assert _line(a, "preemptions") == "preemptions: 1"
    assert _line(a, "time to first token") == "time to first token: mean 11.00 ms, max 12.00 ms (2 requests)"
    assert "aggregate" not in a
    assert "time per forward part" not in a and "content captured" not in a   # neither in this trace


def test_generate_prefers_aggregates(summary):
    b = summary[1]
    head = _line(b, "Generation complete")
    assert "100 steps (4 prefill, 96 decode)" in head
    assert "requests=4" in head and "prompt_tokens=1,000" in head and "total_output_tokens=512" in head
    times = _line(b, "prefill_time")
    assert "prefill_time=40.00 ms" in times and "decode_time=900.00 ms" in times and "throughput=512.0 tok/s" in times
    assert "2 of 100 steps detailed" in b
    assert "CUDA graphs" not in b   # no forward replayed one
    assert _line(b, "prefix cache hit rate").startswith("prefix cache hit rate: 25.0%")
    memory = _line(b, "CUDA memory")
    assert memory.startswith("CUDA memory: peak 5.00 GiB")
    assert "at start 1.00 GiB" in memory and "at end 1.25 GiB (+256.00 MiB)" in memory
    assert _line(b, "preemptions") == "preemptions: 3"
    assert "2 steps detailed, 98 in 2 aggregate spans" in _line(b, "trace:")
    assert _line(b, "step time over all 100 steps") == (
        "step time over all 100 steps: mean 9.40 ms, p50 9.00 ms, p99 12.00 ms, max 250.00 ms")
    assert _line(b, "slowest step") == "slowest step: #50 (decode, 4 seqs, 4 tokens) 250.00 ms, detailed (?)"


def test_interrupted_generate_and_slowest_step_not_detailed(summary):
    f = summary[5]
    assert _line(f, "Generation interrupted (KeyboardInterrupt)").startswith(
        "Generation interrupted (KeyboardInterrupt): 40 steps")
    assert _line(f, "slowest step") == "slowest step: #33 30.00 ms, not detailed (in an engine.steps aggregate span)"


def test_init_and_cpu_and_foreign_traces(summary):
    c, d, e = summary[2:5]
    assert c.startswith(S.ENGINE_INIT)
    assert "init 300.00 ms" in c
    assert _line(c, "model:").startswith("model: Qwen3ForCausalLM: 2 layers")
    assert "3.00 MiB of parameters" in c
    assert _line(c, "model.load") == "model.load 250.00 ms"
    assert _line(c, "KV cache") == "KV cache: 512 blocks of 256 tokens, 64.00 MiB (allocated in 10.00 ms)"
    assert _line(c, "CUDA memory") == "CUDA memory: n/a (CPU)"
    assert _line(d, "CUDA memory") == "CUDA memory: n/a (CPU)"
    assert "1 steps (1 prefill, 0 decode)" in d
    assert e.startswith("GET /health") and "no otvllm spans" in e


def test_debug_forward_parts_and_captured_content(tmp_path):
    path = tmp_path / "trace.json"
    provider = TracerProvider(resource=Resource.create({"service.name": "otvllm"}))
    provider.add_span_processor(SimpleSpanProcessor(JaegerJsonFileExporter(str(path))))
    b = _Builder(provider.get_tracer("otvllm"))
    gen = b.tracer.start_span(S.GENERATE, start_time=T0)
    # Two forwards of 10 and 4 ms, their parts as debug level records them (children of the forward).
    for index, (start, end, parts) in enumerate([
            (1, 11, [(S.EMBEDDING, 1, 2), (S.NORM, 2, 2.5), (S.ATTENTION, 2.5, 5.5), (S.NORM, 5.5, 6),
                     (S.MLP, 6, 8), (S.NORM, 8, 8.5), (S.LM_HEAD, 8.5, 10.5)]),
            (12, 16, [(S.EMBEDDING, 12, 12.5), (S.ATTENTION, 12.5, 14.5), (S.MLP, 14.5, 15.5),
                      (S.LM_HEAD, 15.5, 16)])]):
        step = _step(b, gen, index, "prefill" if index == 0 else "decode", start - 1, end, 1, 5)
        forward = b.span(S.FORWARD, start, end, step)
        for name, s, e in parts:
            b.span(name, s, e, forward)
    # Content on two requests of three, log-probabilities (top 3) on one.
    content = {S.REQUEST_PROMPT_TOKEN_IDS: [1, 2], S.REQUEST_OUTPUT_TOKEN_IDS: [3, 4],
               S.GEN_AI_INPUT_MESSAGES: '[{"role": "user", "parts": []}]'}
    logprobs = {S.REQUEST_LOGPROBS: [-0.5, -1.0], S.REQUEST_TOP_LOGPROBS_N: 3}
    b.span(REQUEST, 0, 16, gen, **REQUEST_IDS, **content, **logprobs)
    b.span(REQUEST, 0, 16, gen, **REQUEST_IDS, **content)
    b.span(REQUEST, 0, 16, gen, **REQUEST_IDS)
    gen.end(end_time=T0 + 20 * MS)
    provider.shutdown()

    text = summarize_file(str(path))
    lines = [ln.strip() for ln in text.splitlines()]
    start = lines.index(f"time per forward part (of 14.00 ms in 2 {S.FORWARD} spans of detailed steps):")
    assert [" ".join(ln.split()) for ln in lines[start + 1:start + 7]] == [
        f"{S.EMBEDDING} 1.50 ms 10.7%", f"{S.NORM} 1.50 ms 10.7%", f"{S.ATTENTION} 5.00 ms 35.7%",
        f"{S.MLP} 3.00 ms 21.4%", f"{S.LM_HEAD} 2.50 ms 17.9%", "(outside the parts) 0.50 ms 3.6%"]
    assert ("content captured: 2 of 3 requests carry their prompt and output token ids and text; "
            "log-probabilities in 1 (top 3)") in lines


def test_init_names_the_cuda_graphs_captured(summary):
    g = summary[6]
    assert _line(g, "CUDA graphs") == ("CUDA graphs: 5 decode batch sizes, 5 prefill token counts (up to 8,192 "
                                       "tokens) captured in 1500.00 ms")
