"""Library mode: the application owns the TracerProvider; otvllm's spans join its traces."""

import subprocess
import sys

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from otvllm import LLM, SamplingParams
from otvllm.tracing import schema as S
from otvllm.tracing.recording import sinks
from tests.helpers import make_llm

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def exporter():
    """The application's provider, installed once (OpenTelemetry allows one global provider)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another test installed a global TracerProvider first")
    return memory


def test_importing_otvllm_installs_no_provider():
    code = ("import otvllm, otvllm.tracing, otvllm.cli\n"
            "from otvllm import LLM, SamplingParams\n"
            "from opentelemetry import trace\n"
            "assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), trace.get_tracer_provider()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spans_nest_under_the_callers_span(exporter, qwen3_dir):
    exporter.clear()
    app = trace.get_tracer("my.app")
    with app.start_as_current_span("handle_batch") as parent:
        llm = make_llm(qwen3_dir)
        outputs = llm.generate([[1, 2, 3], [4, 5]], PARAMS, use_tqdm=False)
    # Every span of the call was ended and handed over by the time generate returned.
    spans = exporter.get_finished_spans()
    ours = [s for s in spans if s.instrumentation_scope.name == "otvllm"]
    by_id = {s.context.span_id: s for s in spans}
    init = [s for s in ours if s.name == S.ENGINE_INIT][0]
    generate = [s for s in ours if s.name == S.GENERATE][0]
    for root in (init, generate):
        assert root.parent.span_id == parent.get_span_context().span_id
        assert root.context.trace_id == parent.get_span_context().trace_id
    assert all(s.context.trace_id == parent.get_span_context().trace_id for s in ours)
    requests = [s for s in ours if S.is_request(s.name, s.attributes)]
    assert [r.attributes[S.GEN_AI_USAGE_OUTPUT_TOKENS] for r in requests] == [len(o.token_ids) for o in outputs]
    assert all(by_id[by_id[r.parent.span_id].parent.span_id] is generate for r in requests)
    assert {by_id[r.parent.span_id].name for r in requests} == {S.REQUESTS}
    steps = [s for s in ours if S.is_step(s.name)]
    assert len(steps) == PARAMS.max_tokens
    assert all(by_id[s.parent.span_id] is generate for s in steps)


def test_flush_after_generate_exports_everything(exporter, qwen3_dir):
    llm = make_llm(qwen3_dir)
    exporter.clear()
    llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False)
    trace.get_tracer_provider().force_flush()
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count(S.GENERATE) == 1 and sum(map(S.is_step, names)) == PARAMS.max_tokens


def test_a_failing_phase_ends_spans_with_error_and_the_engine_recovers(exporter, qwen3_dir, monkeypatch):
    llm = make_llm(qwen3_dir)
    real_forward = llm.engine.runner.forward
    calls = []

    def broken_forward(inputs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("kernel exploded")
        return real_forward(inputs)

    monkeypatch.setattr(llm.engine.runner, "forward", broken_forward)
    exporter.clear()
    with pytest.raises(RuntimeError, match="kernel exploded"):
        llm.generate([[1, 2, 3], [4, 5, 6, 7]], PARAMS, use_tqdm=False)
    spans = {s.name: s for s in exporter.get_finished_spans() if s.status.status_code == StatusCode.ERROR}
    assert {S.FORWARD, S.step_name("decode"), S.GENERATE} <= set(spans)
    forward = spans[S.FORWARD]
    assert "kernel exploded" in forward.status.description
    assert forward.events[0].name == "exception"
    assert forward.events[0].attributes["exception.type"] == "RuntimeError"
    requests = [s for s in exporter.get_finished_spans() if S.is_request(s.name, s.attributes)]
    assert len(requests) == 2 and all(r.status.status_code == StatusCode.ERROR for r in requests)
    # The failed call's requests were dropped and their blocks freed: the engine still works.
    manager = llm.engine.block_manager
    assert llm.engine.is_finished() and manager.num_free_blocks == manager.num_blocks
    monkeypatch.setattr(llm.engine.runner, "forward", real_forward)
    assert len(llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False)[0].token_ids) == PARAMS.max_tokens


def test_cuda_out_of_memory_at_start_up_says_what_to_change(exporter, qwen3_dir, monkeypatch):
    from otvllm.core.model_runner import ModelRunner

    def out_of_memory(self, num_blocks):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ModelRunner, "allocate_kv_cache", out_of_memory)
    exporter.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError, match="gpu_memory_utilization.*max_num_seqs.*max_model_len"):
        make_llm(qwen3_dir)
    failed = {s.name: s for s in exporter.get_finished_spans() if s.status.status_code == StatusCode.ERROR}
    assert {S.KV_CACHE_ALLOCATE, S.ENGINE_INIT} <= set(failed)
    assert "max_model_len" in failed[S.KV_CACHE_ALLOCATE].attributes[S.ERROR_ADVICE]


@pytest.mark.parametrize("switch", [("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true"),
                                    ("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY"),
                                    ("OTVLLM_TRACE_CONTENT", "1")])
def test_prompt_text_only_with_opt_in(exporter, qwen3_dir, monkeypatch, switch):
    import json

    llm = make_llm(qwen3_dir)
    exporter.clear()
    llm.generate(["secret prompt"], PARAMS, use_tqdm=False)
    assert not any("secret" in str(v) for s in exporter.get_finished_spans() for v in s.attributes.values())
    for off in ("false", "EVENT_ONLY", "NO_CONTENT"):   # no content on spans
        monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", off)
        exporter.clear()
        llm.generate(["secret prompt"], PARAMS, use_tqdm=False)
        assert not any("secret" in str(v) for s in exporter.get_finished_spans() for v in s.attributes.values())
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")
    monkeypatch.setenv(*switch)
    exporter.clear()
    out = llm.generate(["secret prompt"], PARAMS, use_tqdm=False)[0]
    request = [s for s in exporter.get_finished_spans() if S.is_request(s.name, s.attributes)][0]
    a = request.attributes
    assert json.loads(a[S.GEN_AI_INPUT_MESSAGES]) == [
        {"role": "user", "parts": [{"type": "text", "content": "secret prompt"}]}]
    assert json.loads(a[S.GEN_AI_OUTPUT_MESSAGES]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": out.text}], "finish_reason": "length"}]
    assert list(a[S.REQUEST_PROMPT_TOKEN_IDS]) == llm.tokenizer.encode("secret prompt")
    assert list(a[S.REQUEST_OUTPUT_TOKEN_IDS]) == out.token_ids
    assert S.REQUEST_LOGPROBS not in a   # none asked for


def test_level_off_emits_nothing_to_the_callers_provider(exporter, qwen3_dir):
    exporter.clear()
    make_llm(qwen3_dir, trace_level="off").generate([[1, 2]], PARAMS, use_tqdm=False)
    assert exporter.get_finished_spans() == ()


def test_a_failed_start_up_at_debug_level_reports_the_real_error(exporter, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path), trace_level="debug")
    init = [s for s in exporter.get_finished_spans() if s.name == S.ENGINE_INIT][-1]
    assert init.status.status_code == StatusCode.ERROR and "no config.json" in init.status.description


def test_step_spans_reach_the_callers_processor_while_generate_runs(exporter, qwen3_dir, monkeypatch):
    # Records wait PUMP_DELAY_S before the engine thread builds them; on a fast machine the whole
    # call can end sooner, so the wait is taken away: what is tested is that spans are built
    # between steps, not at the call's end.
    monkeypatch.setattr(sinks, "PUMP_DELAY_S", 0.0)
    llm = make_llm(qwen3_dir)
    engine_steps_at_delivery = []   # how far the engine was when each step span reached the processor

    class Watch(SimpleSpanProcessor):
        def on_end(self, span):
            if S.is_step(span.name):
                engine_steps_at_delivery.append(llm.engine.step_index)

    trace.get_tracer_provider().add_span_processor(Watch(InMemorySpanExporter()))
    start = llm.engine.step_index
    # Over a hundred steps, so that "mid-call" is unmistakable.
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True),
                 use_tqdm=False)
    end = llm.engine.step_index
    delivered = [i for i in engine_steps_at_delivery if start <= i <= end]
    assert delivered and min(delivered) < end - 10, "step spans reached the application only at the call's end"


def test_two_threads_on_one_llm_get_correct_outputs(exporter, qwen3_dir):
    import threading

    llm = make_llm(qwen3_dir)
    prompts = [[[1, 2, 3], [4, 5, 6, 7]], [[9, 8], [7, 7, 7, 7, 7]]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [[o.token_ids for o in llm.generate(p, params, use_tqdm=False)] for p in prompts]
    results, errors = [None, None], []

    def call(i):
        try:
            results[i] = [o.token_ids for o in llm.generate(prompts[i], params, use_tqdm=False)]
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    for _ in range(3):
        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and results == alone


def test_generate_from_inside_generate_is_a_clear_error(exporter, qwen3_dir):
    llm = make_llm(qwen3_dir)
    engine_step = llm.engine.step
    seen = []

    def step_calling_generate():
        if not seen:
            with pytest.raises(RuntimeError, match="one call runs at a time"):
                llm.generate([[1, 2]], PARAMS, use_tqdm=False)
            seen.append(1)
        return engine_step()

    llm.engine.step = step_calling_generate
    assert len(llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False)[0].token_ids) == PARAMS.max_tokens
    assert seen == [1]
