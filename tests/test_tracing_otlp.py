"""What arrives over the wire at a real OTLP/gRPC receiver when otvllm configures tracing itself."""

import io
import json
import os
import time
from contextlib import redirect_stderr

import pytest
import torch

import otvllm
from otvllm import SamplingParams
from otvllm.tracing import configure
from otvllm.tracing import schema as S
from tests.helpers import PARAMS, PROMPTS, by_name, make_llm, traced_run
from tests.otlp_receiver import HangingReceiver, OtlpReceiver, closed_port

BLOCK = 16


@pytest.fixture(scope="module")
def step_run(qwen3_dir):
    return traced_run(qwen3_dir)


def requests_of(spans):
    return [s for s in spans if S.is_request(s["name"], s["attributes"])]


def test_every_schema_span_arrives_with_the_service_name(step_run):
    spans, _, _ = step_run
    names = {s["name"] for s in spans}
    request = S.request_name(S.OPERATION_TEXT_COMPLETION, "qwen3")   # the model directory's name
    expected = {S.ENGINE_INIT, S.CONFIG_LOAD, S.TOKENIZER_LOAD, S.MODEL_LOAD, S.KV_CACHE_ALLOCATE, S.GENERATE,
                S.REQUESTS, request, S.step_name("prefill"), S.step_name("decode"), S.SCHEDULE,
                S.BLOCK_ALLOCATE, S.PREPARE_INPUTS, S.FORWARD, S.SAMPLE, S.POSTPROCESS}
    assert expected <= names
    assert {s["resource"]["service.name"] for s in spans} == {"otvllm-test"}
    assert {s["resource"]["service.version"] for s in spans} == {otvllm.__version__}
    assert {s["scope_name"] for s in spans} == {"otvllm"}


def test_parent_child_structure(step_run):
    spans, _, _ = step_run
    by_id = {s["span_id"]: s for s in spans}

    def kind(name):   # a step's name carries its phase
        return S.STEP if S.is_step(name) else name

    def parent_kind(span):
        return kind(by_id[span["parent_span_id"]]["name"]) if span["parent_span_id"] else None

    expected_parent = {
        S.ENGINE_INIT: None, S.CONFIG_LOAD: S.ENGINE_INIT, S.TOKENIZER_LOAD: S.ENGINE_INIT,
        S.MODEL_LOAD: S.ENGINE_INIT, S.KV_CACHE_ALLOCATE: S.ENGINE_INIT,
        S.GENERATE: None, S.REQUESTS: S.GENERATE, S.request_name(S.OPERATION_TEXT_COMPLETION, "qwen3"): S.REQUESTS,
        S.STEP: S.GENERATE, S.SCHEDULE: S.STEP,
        S.BLOCK_ALLOCATE: S.SCHEDULE, S.PREPARE_INPUTS: S.STEP, S.FORWARD: S.STEP, S.SAMPLE: S.STEP,
        S.POSTPROCESS: S.STEP,
    }
    for span in spans:
        assert parent_kind(span) == expected_parent[kind(span["name"])], span["name"]
    generate = by_name(spans, S.GENERATE)[0]
    assert all(s["trace_id"] == generate["trace_id"] for s in spans if s["name"] not in
               (S.ENGINE_INIT, S.CONFIG_LOAD, S.TOKENIZER_LOAD, S.MODEL_LOAD, S.KV_CACHE_ALLOCATE))
    for span in spans:   # children lie within their parents
        if span["parent_span_id"]:
            parent = by_id[span["parent_span_id"]]
            assert parent["start_ns"] <= span["start_ns"] <= span["end_ns"] <= parent["end_ns"], span["name"]


def test_forward_spans_carry_the_batch_shapes(step_run):
    spans, _, llm = step_run
    vocab = llm.engine.spec.vocab_size
    forwards = by_name(spans, S.FORWARD)
    prefill = [f for f in forwards if f["attributes"][S.PHASE] == "prefill"]
    decode = [f for f in forwards if f["attributes"][S.PHASE] == "decode"]
    assert len(prefill) == 1 and len(decode) == PARAMS.max_tokens - 1
    a = prefill[0]["attributes"]
    total = sum(len(p) for p in PROMPTS)
    assert a[S.SHAPE_PREFIX + "input_ids"] == [total]
    assert a[S.SHAPE_PREFIX + "positions"] == [total]
    assert a[S.SHAPE_PREFIX + "slot_mapping"] == [total]
    assert a[S.SHAPE_PREFIX + "cu_seqlens_q"] == [len(PROMPTS) + 1]
    assert a[S.SHAPE_PREFIX + "block_tables"] == [len(PROMPTS), 3]     # 35 tokens: 3 blocks of 16
    assert a[S.SHAPE_PREFIX + "logits"] == [len(PROMPTS), vocab]
    assert a[S.CUDA_GRAPH] is False
    d = decode[0]["attributes"]
    assert d[S.SHAPE_PREFIX + "input_ids"] == [len(PROMPTS)]
    assert d[S.SHAPE_PREFIX + "context_lens"] == [len(PROMPTS)]
    assert d[S.SHAPE_PREFIX + "logits"] == [len(PROMPTS), vocab]


def test_step_spans_describe_each_step(step_run):
    spans, _, _ = step_run
    steps = sorted(by_name(spans, S.STEP), key=lambda s: s["attributes"][S.STEP_INDEX])
    # Each step launches one token per sequence and postprocesses the step before it; the last
    # step, with nothing left to launch, also postprocesses its own tokens.
    n = PARAMS.max_tokens
    assert [s["attributes"][S.STEP_INDEX] for s in steps] == list(range(n))
    assert [s["attributes"][S.PHASE] for s in steps] == ["prefill"] + ["decode"] * (n - 1)
    assert steps[0]["attributes"][S.NUM_BATCHED_TOKENS] == sum(len(p) for p in PROMPTS)
    assert all(s["attributes"][S.NUM_SEQS] == len(PROMPTS) for s in steps)
    postprocess = by_name(spans, S.POSTPROCESS)
    assert sorted(p["parent_span_id"] for p in postprocess) == sorted(
        [s["span_id"] for s in steps[1:]] + [steps[-1]["span_id"]])
    assert all(p["attributes"][S.TOKENS_APPENDED] == len(PROMPTS) for p in postprocess)
    schedule = [s for s in by_name(spans, S.SCHEDULE) if s["attributes"][S.PHASE] == "prefill"][0]
    assert schedule["attributes"][S.NUM_WAITING] == 0
    assert schedule["attributes"][S.NUM_RUNNING] == len(PROMPTS)
    finished = [p for p in postprocess if p["attributes"][S.FINISHED_SEQS]]
    assert len(finished) == 1 and finished[0]["attributes"][S.FINISH_REASONS] == ["length"] * len(PROMPTS)
    assert finished[0]["parent_span_id"] == steps[-1]["span_id"]


def test_block_allocation_spans_agree_with_the_engine(step_run):
    spans, _, llm = step_run
    prefill = [s for s in by_name(spans, S.BLOCK_ALLOCATE) if s["attributes"][S.PHASE] == "prefill"]
    assert len(prefill) == 1
    a = prefill[0]["attributes"]
    assert a[S.BLOCKS_NEW] == sum(-(-len(p) // BLOCK) for p in PROMPTS)
    assert a[S.BLOCKS_SEQUENCES] == len(PROMPTS)
    assert a[S.BLOCKS_CACHE_HITS] == 0
    assert a[S.BLOCKS_FREE] + a[S.BLOCKS_USED] == llm.engine.block_manager.num_blocks
    decode = [s for s in by_name(spans, S.BLOCK_ALLOCATE) if s["attributes"][S.PHASE] == "decode"]
    # 3 + 6 tokens crosses no block boundary; 20 + 6 neither; 35 + 6 neither: 1 new block would show here.
    assert sum(s["attributes"][S.BLOCKS_NEW] for s in decode) == sum(
        -(-(len(p) + PARAMS.max_tokens - 1) // BLOCK) - (-(-len(p) // BLOCK)) for p in PROMPTS)


def test_request_spans_have_gen_ai_usage_and_events(step_run):
    spans, outputs, _ = step_run
    requests = sorted(requests_of(spans), key=lambda s: s["attributes"][S.SEQ_ID])
    assert len(requests) == len(PROMPTS)
    for span, prompt, out in zip(requests, PROMPTS, outputs):
        a = span["attributes"]
        assert a[S.GEN_AI_USAGE_INPUT_TOKENS] == len(prompt)
        assert a[S.GEN_AI_USAGE_OUTPUT_TOKENS] == len(out.token_ids) == PARAMS.max_tokens
        assert a[S.GEN_AI_RESPONSE_FINISH_REASONS] == ["length"]
        assert a[S.GEN_AI_REQUEST_MAX_TOKENS] == PARAMS.max_tokens
        assert a[S.GEN_AI_REQUEST_TEMPERATURE] == 0.0 and a[S.GEN_AI_REQUEST_TOP_P] == 1.0
        assert a[S.GEN_AI_OPERATION] == "text_completion" and a[S.GEN_AI_SYSTEM] == "otvllm"
        assert span["name"] == f"text_completion {a[S.GEN_AI_REQUEST_MODEL]}" == "text_completion qwen3"
        assert a[S.GEN_AI_RESPONSE_MODEL] == "qwen3"
        assert a[S.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 0   # nothing shared with an earlier prompt
        assert a[S.REQUEST_TTFT_MS] >= a[S.REQUEST_QUEUE_TIME_MS] >= 0
        events = {e["name"]: e["attributes"] for e in span["events"]}
        assert events[S.EVENT_SCHEDULED][S.EVENT_STEP] == 0
        assert events[S.EVENT_FIRST_TOKEN][S.EVENT_STEP] == 0
        assert events[S.EVENT_FINISHED][S.EVENT_STEP] == PARAMS.max_tokens - 1
        assert events[S.EVENT_FINISHED][S.EVENT_REASON] == "length"
        assert not a.keys() & {S.GEN_AI_INPUT_MESSAGES, S.GEN_AI_OUTPUT_MESSAGES, S.REQUEST_PROMPT_TOKEN_IDS,
                               S.REQUEST_OUTPUT_TOKEN_IDS}   # content is opt-in


def test_generate_span_totals(step_run):
    spans, _, _ = step_run
    a = by_name(spans, S.GENERATE)[0]["attributes"]
    assert a[S.GEN_NUM_REQUESTS] == len(PROMPTS)
    assert a[S.GEN_PROMPT_TOKENS] == sum(len(p) for p in PROMPTS)
    assert a[S.GEN_OUTPUT_TOKENS] == len(PROMPTS) * PARAMS.max_tokens
    assert a[S.GEN_STEPS] == PARAMS.max_tokens
    assert a[S.GEN_PREFILL_STEPS] == 1 and a[S.GEN_DECODE_STEPS] == PARAMS.max_tokens - 1
    assert a[S.GEN_PREEMPTIONS] == 0
    assert a[S.TRACE_STEPS_AGGREGATED] == 0 and a[S.TRACE_STEPS_DETAILED] == PARAMS.max_tokens
    assert a[S.STEPS_COUNT] == PARAMS.max_tokens and a[S.SLOWEST_STEP_DETAILED] is True
    steps = by_name(spans, S.STEP)
    durations_ms = sorted((s["end_ns"] - s["start_ns"]) / 1e6 for s in steps)
    assert a[S.STEP_TIME_MAX_MS] == pytest.approx(durations_ms[-1], abs=0.01)
    assert a[S.STEP_TIME_P50_MS] == pytest.approx(durations_ms[len(durations_ms) // 2 - 1 + len(durations_ms) % 2],
                                                  abs=0.01)
    assert a[S.STEP_TIME_MEAN_MS] == pytest.approx(sum(durations_ms) / len(durations_ms), abs=0.01)
    assert a[S.GEN_AI_REQUEST_MODEL] == "qwen3"


def test_start_up_phases_are_spans_one_after_another(step_run, qwen3_dir):
    import json

    from transformers import AutoTokenizer

    spans, _, _ = step_run
    init = by_name(spans, S.ENGINE_INIT)[0]
    phases = sorted((s for s in spans if s["parent_span_id"] == init["span_id"]), key=lambda s: s["start_ns"])
    assert [s["name"] for s in phases] == [S.CONFIG_LOAD, S.TOKENIZER_LOAD, S.MODEL_LOAD, S.KV_CACHE_ALLOCATE]
    assert all(a["end_ns"] <= b["start_ns"] for a, b in zip(phases, phases[1:]))
    config, tokenizer = phases[0]["attributes"], phases[1]["attributes"]
    with open(f"{qwen3_dir}/config.json") as f:
        assert config[S.MODEL_ARCHITECTURE] == json.load(f)["architectures"][0]
    reference = AutoTokenizer.from_pretrained(qwen3_dir)
    assert tokenizer[S.TOKENIZER_CLASS] == type(reference).__name__
    assert tokenizer[S.TOKENIZER_VOCAB_SIZE] == len(reference)


def test_model_load_and_kv_cache_spans(step_run):
    spans, _, llm = step_run
    load = by_name(spans, S.MODEL_LOAD)[0]["attributes"]
    spec = llm.engine.spec
    assert load[S.MODEL_ARCHITECTURE] == "Qwen3ForCausalLM"
    assert (load[S.MODEL_LAYERS], load[S.MODEL_HEADS], load[S.MODEL_KV_HEADS], load[S.MODEL_HEAD_DIM]) == (
        spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim)
    assert load[S.MODEL_PARAMETER_BYTES] == sum(p.numel() * 4 for p in llm.engine.runner.model.parameters())
    kv = by_name(spans, S.KV_CACHE_ALLOCATE)[0]["attributes"]
    blocks = llm.engine.block_manager.num_blocks
    assert kv[S.BLOCKS_TOTAL] == blocks and kv[S.BLOCK_SIZE] == BLOCK
    assert kv[S.KV_CACHE_SHAPE] == [2, spec.num_layers, blocks, BLOCK, spec.num_kv_heads, spec.head_dim]
    assert kv[S.KV_CACHE_BYTES] == 2 * spec.num_layers * blocks * BLOCK * spec.num_kv_heads * spec.head_dim * 4


def test_engine_init_reports_the_config_as_start_up_resolved_it(qwen3_dir):
    # max_model_len and the KV blocks left to start-up; the CPU cache holds max_num_seqs sequences.
    spans, _, llm = traced_run(qwen3_dir, level="request", max_model_len=None, max_num_batched_tokens=4096,
                               max_num_seqs=2)
    init = by_name(spans, S.ENGINE_INIT)[0]["attributes"]
    config = {key.removeprefix(S.CONFIG_PREFIX): value for key, value in init.items()
              if key.startswith(S.CONFIG_PREFIX)}
    limit = json.load(open(os.path.join(qwen3_dir, "config.json")))["max_position_embeddings"]
    assert config["max_model_len"] == min(limit, 4096)
    blocks = llm.engine.block_manager.num_blocks
    assert config["num_kvcache_blocks"] == blocks == 2 * -(-config["max_model_len"] // BLOCK)
    assert (config["device"], config["dtype"], config["attention_backend"]) == ("cpu", "float32", "torch")
    assert (config["enforce_eager"], config["cuda_graphs"], config["torch_compile"]) == (False, False, False)
    assert config["cpu_threads"] == torch.get_num_threads()
    assert (config["trace_level"], config["kvcache_block_size"], config["max_num_seqs"]) == ("request", BLOCK, 2)


def test_prefix_cache_hits_show_on_block_spans(qwen3_dir):
    shared = [5] * 32
    prompts = [shared + [1, 2], shared + [3, 4, 5]]
    with OtlpReceiver() as receiver:
        session = configure(endpoint=receiver.endpoint)
        try:
            llm = make_llm(qwen3_dir)
            llm.generate(prompts[:1], PARAMS, use_tqdm=False)
            hits_before = llm.engine.block_manager.num_cache_hits
            llm.generate(prompts[1:], PARAMS, use_tqdm=False)
            hits = llm.engine.block_manager.num_cache_hits - hits_before
        finally:
            session.shutdown()
        spans = receiver.spans()
    assert hits == 2
    generates = sorted(by_name(spans, S.GENERATE), key=lambda s: s["start_ns"])
    second = generates[1]
    block_spans = [s for s in by_name(spans, S.BLOCK_ALLOCATE)
                   if s["trace_id"] == second["trace_id"] and s["attributes"][S.PHASE] == "prefill"]
    assert block_spans[0]["attributes"][S.BLOCKS_CACHE_HITS] == hits
    # As vLLM counts it: cached prompt tokens of all prompt tokens (the last token is always
    # computed); every full block looked up was a hit.
    assert second["attributes"][S.GEN_PREFIX_HIT_RATE] == 32 / len(prompts[1])
    assert second["attributes"][S.GEN_PREFIX_CACHED_TOKENS] == 32
    assert second["attributes"][S.GEN_PREFIX_BLOCK_HIT_RATE] == 1.0
    request = [s for s in requests_of(spans) if s["trace_id"] == second["trace_id"]][0]
    assert request["attributes"][S.REQUEST_CACHED_TOKENS] == 32
    assert request["attributes"][S.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 32


def test_response_ids_are_unique_across_calls_and_engines(qwen3_dir):
    with OtlpReceiver() as receiver:
        session = configure(endpoint=receiver.endpoint)
        try:
            first, second = make_llm(qwen3_dir), make_llm(qwen3_dir)
            for llm in (first, second, first):
                llm.generate(PROMPTS, PARAMS, use_tqdm=False)
            second.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
        finally:
            session.shutdown()
        spans = receiver.spans()
    ids = [s["attributes"][S.GEN_AI_RESPONSE_ID] for s in requests_of(spans)]
    assert len(ids) == 3 * len(PROMPTS) + 1 and len(set(ids)) == len(ids)


def test_level_off_sends_nothing(qwen3_dir):
    spans, outputs, _ = traced_run(qwen3_dir, level="off")
    assert spans == []
    assert len(outputs[0].token_ids) == PARAMS.max_tokens


def test_level_request_sends_request_spans_only(qwen3_dir):
    spans, _, _ = traced_run(qwen3_dir, level="request")
    names = {s["name"] for s in spans}
    assert {S.GENERATE, S.ENGINE_INIT} <= names and len(requests_of(spans)) == len(PROMPTS)
    assert not by_name(spans, S.STEP) and not names & {*S.STEP_PHASE_SPANS, S.BLOCK_ALLOCATE}
    request = requests_of(spans)[0]
    assert {e["name"] for e in request["events"]} == {S.EVENT_SCHEDULED, S.EVENT_FIRST_TOKEN, S.EVENT_FINISHED}


def test_level_debug_adds_per_sequence_blocks_and_attention_layers(qwen3_dir):
    spans, _, llm = traced_run(qwen3_dir, level="debug")
    spec = llm.engine.spec
    prefill_block = [s for s in by_name(spans, S.BLOCK_ALLOCATE) if S.SEQ_ID in s["attributes"]]
    assert len(prefill_block) == len(PROMPTS)
    assert sorted(s["attributes"][S.BLOCKS_NEW] for s in prefill_block) == sorted(
        -(-len(p) // BLOCK) for p in PROMPTS)
    layers = by_name(spans, S.ATTENTION)
    assert len(layers) == spec.num_layers * PARAMS.max_tokens
    prefill_layer = [s for s in layers if s["attributes"][S.ATTENTION_PATH] == "prefill"][0]["attributes"]
    total = sum(len(p) for p in PROMPTS)
    assert prefill_layer[S.SHAPE_PREFIX + "q"] == [total, spec.num_heads, spec.head_dim]
    assert prefill_layer[S.SHAPE_PREFIX + "k"] == [total, spec.num_kv_heads, spec.head_dim]
    assert prefill_layer[S.SHAPE_PREFIX + "k_cache"] == [llm.engine.block_manager.num_blocks, BLOCK,
                                                          spec.num_kv_heads, spec.head_dim]
    # Every module a forward runs is a span of its own, in order, one after another, within the
    # forward: its children add up to it (less the Python between them).
    expected = [(S.EMBEDDING, None)]
    for i in range(spec.num_layers):
        expected += [(S.NORM, i), (S.ATTENTION, i), (S.NORM, i), (S.MLP, i)]
    expected += [(S.NORM, None), (S.LM_HEAD, None)]
    hidden = [sum(len(p) for p in PROMPTS), spec.hidden_size]
    for forward in by_name(spans, S.FORWARD):
        parts = sorted((s for s in spans if s["parent_span_id"] == forward["span_id"]), key=lambda s: s["start_ns"])
        assert [(s["name"], s["attributes"].get(S.LAYER_INDEX)) for s in parts] == expected
        assert all(a["end_ns"] <= b["start_ns"] for a, b in zip(parts, parts[1:]))
        assert forward["start_ns"] <= parts[0]["start_ns"] and parts[-1]["end_ns"] <= forward["end_ns"]
        positions = [s["attributes"][S.NORM_POSITION] for s in parts if s["name"] == S.NORM]
        assert positions == ["input", "post_attention"] * spec.num_layers + ["final"]
    prefill = [s for s in by_name(spans, S.FORWARD) if s["attributes"][S.PHASE] == "prefill"][0]
    mlp = next(s for s in spans if s["parent_span_id"] == prefill["span_id"] and s["name"] == S.MLP)
    assert mlp["attributes"][S.SHAPE_PREFIX + "input"] == mlp["attributes"][S.SHAPE_PREFIX + "output"] == hidden
    head = next(s for s in spans if s["parent_span_id"] == prefill["span_id"] and s["name"] == S.LM_HEAD)
    assert head["attributes"][S.SHAPE_PREFIX + "output"] == [len(PROMPTS), spec.vocab_size]


LONG = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)


def long_run(model_dir, monkeypatch, max_spans):
    monkeypatch.setenv("OTVLLM_TRACE_MAX_SPANS", str(max_spans))
    spans, _, _ = traced_run(model_dir, prompts=[[1] * 5, [2] * 9], params=LONG, max_model_len=128)
    generate = by_name(spans, S.GENERATE)[0]
    trace = [s for s in spans if s["trace_id"] == generate["trace_id"]]
    a = generate["attributes"]
    steps = by_name(trace, S.STEP)
    aggregates = by_name(trace, S.STEPS)
    assert a[S.GEN_STEPS] == 100 and a[S.STEPS_COUNT] == 100
    assert a[S.TRACE_STEPS_DETAILED] == len(steps)
    assert a[S.TRACE_STEPS_DETAILED] + a[S.TRACE_STEPS_AGGREGATED] == 100
    assert a[S.TRACE_AGGREGATE_SPANS] == len(aggregates)
    # Every step is in exactly one span: its own, or one aggregate's range.
    covered = [s["attributes"][S.STEP_INDEX] for s in steps]
    for agg in aggregates:
        first, last = agg["attributes"][S.STEPS_FIRST_INDEX], agg["attributes"][S.STEPS_LAST_INDEX]
        assert agg["attributes"][S.STEPS_COUNT] == last - first + 1
        covered += range(first, last + 1)
    assert sorted(covered) == list(range(100))
    assert len(requests_of(trace)) == 2                       # requests are always kept
    generate_subtree = [s for s in trace if s["name"] not in (S.ENGINE_INIT, S.CONFIG_LOAD, S.TOKENIZER_LOAD, S.MODEL_LOAD, S.KV_CACHE_ALLOCATE)]
    assert len(generate_subtree) <= max_spans
    return a, sorted(s["attributes"][S.STEP_INDEX] for s in steps), steps


def test_long_generations_keep_first_last_and_outlier_steps(qwen3_dir, monkeypatch):
    a, kept, steps = long_run(qwen3_dir, monkeypatch, max_spans=2000)
    assert set(range(16)) | {99 - i for i in range(8)} <= set(kept)
    assert a[S.TRACE_STEPS_OVER_BUDGET] == 0 and a[S.TRACE_SPANS_DROPPED] == 0
    reasons = {s["attributes"][S.STEP_INDEX]: s["attributes"][S.STEP_DETAIL_REASON] for s in steps}
    assert reasons[0] == "first"
    # The last steps are detailed as "last" unless another reason (a slow step) came first.
    assert {reasons[99 - i] for i in range(8)} <= {"last", "slow", "slowest_so_far"}
    assert set(reasons.values()) <= {"first", "last", "slow", "slowest_so_far"}
    assert "last 8 steps" in a[S.TRACE_POLICY]


def test_span_budget_caps_a_trace_and_counts_what_it_left_out(qwen3_dir, monkeypatch):
    a, kept, _ = long_run(qwen3_dir, monkeypatch, max_spans=120)
    assert a[S.TRACE_STEPS_OVER_BUDGET] > 0
    assert kept[:10] == list(range(10))                       # the earliest steps are the ones kept


def _timed_generate(model_dir, endpoint, timeout_s):
    llm = make_llm(model_dir, trace_level="off")
    start = time.perf_counter()
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    untraced = time.perf_counter() - start
    stderr = io.StringIO()
    session = configure(endpoint=endpoint, timeout_s=timeout_s)
    try:
        llm = make_llm(model_dir, trace_level="step")
        start = time.perf_counter()
        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        traced = time.perf_counter() - start
    finally:
        start = time.perf_counter()
        with redirect_stderr(stderr):
            report = session.shutdown()
        shutdown = time.perf_counter() - start
    return untraced, traced, shutdown, report.result["network"], stderr.getvalue(), outputs


def test_collector_down_does_not_stall_generation(qwen3_dir):
    untraced, traced, shutdown, stats, warning, outputs = _timed_generate(
        qwen3_dir, f"http://127.0.0.1:{closed_port()}", timeout_s=1.0)
    assert all(len(o.token_ids) == PARAMS.max_tokens for o in outputs)
    assert traced < untraced + 2.0
    assert shutdown < 6.0
    assert warning.count("otvllm: tracing:") == 1 and "not (" in warning
    assert stats is not None and (stats["failed"] > 0 or not stats["finished"])


def test_hanging_collector_does_not_stall_generation(qwen3_dir):
    with HangingReceiver() as receiver:
        untraced, traced, shutdown, stats, warning, outputs = _timed_generate(
            qwen3_dir, receiver.endpoint, timeout_s=1.0)
    assert all(len(o.token_ids) == PARAMS.max_tokens for o in outputs)
    assert traced < untraced + 2.0
    assert shutdown < 6.0
    assert warning.count("otvllm: tracing:") == 1


def test_configure_mode_spans_continue_the_callers_current_span(qwen3_dir):
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    caller = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(1))
    token = otel_context.attach(otel_trace.set_span_in_context(NonRecordingSpan(caller)))
    try:
        spans, _, _ = traced_run(qwen3_dir, level="request")
    finally:
        otel_context.detach(token)
    assert {s["trace_id"] for s in spans} == {f"{caller.trace_id:032x}"}
    for name in (S.ENGINE_INIT, S.GENERATE):
        assert by_name(spans, name)[0]["parent_span_id"] == f"{caller.span_id:016x}"
