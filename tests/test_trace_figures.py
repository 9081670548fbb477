"""Figures in the trace against what each test set up: the prefix-cache hit rate in tokens, when
the first token reached the host, why waiting requests were not admitted, what a preemption
needed, the blocks freed and their ids, and the links between steps and requests."""

import json

from transformers import AutoTokenizer

from otvllm import SamplingParams
from otvllm.tracing import schema as S
from tests.reference import hf_greedy, hf_logprobs
from tests import helpers
from tests.helpers import by_name, lines, traced

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def make_llm(model_dir, **kwargs):
    return helpers.make_llm(model_dir, **{"max_model_len": 128, "max_num_batched_tokens": 256, **kwargs})


def test_prefix_cache_hit_rate_counts_prompt_tokens(tmp_path, qwen3_dir):
    first = list(range(1, 49))                     # three full blocks
    second = first[:32] + list(range(100, 116))    # shares two blocks of three: 2/3 of its tokens

    def body():
        llm = make_llm(qwen3_dir)
        llm.generate([first], GREEDY, use_tqdm=False)
        llm.generate([second], GREEDY, use_tqdm=False)
    spans, summary = traced(tmp_path, body)
    later = max(by_name(spans, S.GENERATE), key=lambda s: s["start_ns"])["attributes"]
    assert later[S.GEN_PREFIX_HIT_RATE] == 32 / 48 and later[S.GEN_PREFIX_CACHED_TOKENS] == 32
    assert later[S.GEN_PREFIX_BLOCK_HIT_RATE] == 1.0   # both blocks looked up were hits
    assert ("prefix cache hit rate: 66.7% of prompt tokens (32 tokens); full-block lookups 100.0% hits "
            "(a sequence's lookups stop at its first miss)") in lines(summary)


def test_prefix_cache_hit_rate_leaves_out_recomputation_after_preemption(tmp_path, qwen3_dir):
    # A first call leaves [8] * 16 in the cache. Then 8 blocks of 16 for [7] * 30 and [8] * 30
    # with 60 tokens each: the second finds its first block cached (16 of the 60 prompt tokens),
    # is preempted when blocks run out, and is admitted again later with its prompt and generated
    # tokens, which find their own blocks: that recomputation is not a prompt's hit (vLLM counts
    # first admissions only).
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    def body():
        llm = make_llm(qwen3_dir, num_kvcache_blocks=8)
        llm.generate([[8] * 30], GREEDY, use_tqdm=False)
        llm.generate([[7] * 30, [8] * 30], params, use_tqdm=False)
    spans, summary = traced(tmp_path, body)
    later = max(by_name(spans, S.GENERATE), key=lambda s: s["start_ns"])["attributes"]
    assert later[S.GEN_PREEMPTIONS] >= 1
    assert later[S.GEN_PREFIX_CACHED_TOKENS] == 16 and later[S.GEN_PREFIX_HIT_RATE] == 16 / 60
    assert later[S.GEN_PREFIX_BLOCK_HIT_RATE] == 1 / 2   # [7]: a miss; [8]: a hit, then nothing cacheable
    assert ("prefix cache hit rate: 26.7% of prompt tokens (16 tokens); full-block lookups 50.0% hits "
            "(a sequence's lookups stop at its first miss); re-admissions after preemption not counted"
            ) in lines(summary)


def test_first_token_is_stamped_when_the_prefill_token_reaches_the_host(tmp_path, qwen3_dir):
    def body():
        make_llm(qwen3_dir).generate([[1, 2, 3], [4, 5, 6, 7]], GREEDY, use_tqdm=False)
    spans, _ = traced(tmp_path, body)
    steps = {s["attributes"][S.STEP_INDEX]: s for s in by_name(spans, S.STEP)}
    samples = {s["parent_span_id"]: s for s in by_name(spans, S.SAMPLE)}
    requests = [s for s in spans if S.REQUEST_TTFT_MS in s["attributes"]]
    assert len(requests) == 2
    for request in requests:
        first = next(e for e in request["events"] if e["name"] == S.EVENT_FIRST_TOKEN)
        prefill = steps[first["attributes"][S.EVENT_STEP]]
        assert prefill["attributes"][S.PHASE] == "prefill"
        # On CPU the token is on the host once sampled: within the prefill step, after its sampling,
        # not when the next step (a whole decode forward later) postprocesses it.
        sample = samples[prefill["span_id"]]
        assert sample["end_ns"] <= first["time_ns"] <= prefill["end_ns"]


def test_with_content_on_a_request_carries_its_tokens_and_logprobs(tmp_path, qwen3_dir, monkeypatch):
    """The "wrong output" recipe: the prompt, the output, their token ids and the top-N
    log-probabilities of each generated token, against transformers' own forward."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    n = 3
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=n)
    prompt = [3, 14, 15, 92, 65, 35]

    def body():
        make_llm(qwen3_dir).generate([prompt], params, use_tqdm=False)
    spans, _ = traced(tmp_path, body)
    request, = [s for s in spans if S.is_request(s["name"], s["attributes"])]
    a = request["attributes"]
    output = hf_greedy(qwen3_dir, prompt, params.max_tokens)
    assert a[S.REQUEST_PROMPT_TOKEN_IDS] == prompt and a[S.REQUEST_OUTPUT_TOKEN_IDS] == output
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    assert json.loads(a[S.GEN_AI_INPUT_MESSAGES])[0]["parts"][0]["content"] == tokenizer.decode(prompt)
    assert json.loads(a[S.GEN_AI_OUTPUT_MESSAGES])[0]["parts"][0]["content"] == tokenizer.decode(
        output, skip_special_tokens=True)
    ref = hf_logprobs(qwen3_dir, prompt + output)
    assert a[S.REQUEST_TOP_LOGPROBS_N] == n
    assert len(a[S.REQUEST_LOGPROBS]) == len(output)
    assert len(a[S.REQUEST_TOP_TOKEN_IDS]) == len(a[S.REQUEST_TOP_LOGPROBS]) == n * len(output)
    for step, token in enumerate(output):
        row = ref[len(prompt) - 1 + step]
        assert abs(a[S.REQUEST_LOGPROBS][step] - row[token].item()) < 1e-4
        top = row.topk(n)
        ids = a[S.REQUEST_TOP_TOKEN_IDS][step * n:(step + 1) * n]
        values = a[S.REQUEST_TOP_LOGPROBS][step * n:(step + 1) * n]
        assert ids == top.indices.tolist()
        assert max(abs(v - r) for v, r in zip(values, top.values.tolist())) < 1e-4


def test_the_summary_says_when_requests_carry_their_content(tmp_path, qwen3_dir, monkeypatch):
    asked = [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2), GREEDY]

    def body():
        make_llm(qwen3_dir).generate([[3, 14, 15], [92, 65]], asked, use_tqdm=False)
    _, summary = traced(tmp_path, body)
    assert not [line for line in lines(summary) if line.startswith("content captured")]   # off by default
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    spans, summary = traced(tmp_path, body)
    requests = [s["attributes"] for s in spans if S.is_request(s["name"], s["attributes"])]
    assert len(requests) == 2 and sum(S.REQUEST_LOGPROBS in a for a in requests) == 1
    assert ("content captured: 2 of 2 requests carry their prompt and output token ids and text; "
            "log-probabilities in 1 (top 2)") in lines(summary)


def test_the_summary_of_a_debug_trace_gives_the_time_of_each_part_of_the_forward(tmp_path, qwen3_dir):
    def body():
        make_llm(qwen3_dir, trace_level="debug").generate([[1] * 20, [2] * 5], GREEDY, use_tqdm=False)
    spans, summary = traced(tmp_path, body)
    # The reference: the receiver's spans, children of each model.forward, summed by name.
    forwards = {s["span_id"]: s for s in by_name(spans, S.FORWARD)}
    part_ms = {name: 0.0 for name in S.FORWARD_PART_SPANS}
    n_parts = 0
    for s in spans:
        if s["name"] in part_ms and s["parent_span_id"] in forwards:
            part_ms[s["name"]] += (s["end_ns"] - s["start_ns"]) / 1e6
            n_parts += 1
    forward_ms = sum((f["end_ns"] - f["start_ns"]) / 1e6 for f in forwards.values())
    assert n_parts and all(part_ms.values())
    text = lines(summary)
    head = next(i for i, line in enumerate(text) if line.startswith("time per forward part"))
    printed_total = float(text[head].split("(of ")[1].split(" ms")[0])
    assert f"in {len(forwards)} {S.FORWARD} spans" in text[head]
    slack = 0.001 * (n_parts + len(forwards)) + 0.01   # the file keeps microseconds, the receiver nanoseconds
    assert abs(printed_total - forward_ms) <= slack
    for line, name in zip(text[head + 1:], S.FORWARD_PART_SPANS):
        printed_name, ms, unit, share = line.split()
        assert printed_name == name and unit == "ms"
        assert abs(float(ms) - part_ms[name]) <= slack
        assert abs(float(share.rstrip("%")) - 100 * part_ms[name] / forward_ms) <= 0.2


def schedules(spans):
    """scheduler.schedule spans by the index of their step."""
    steps = {s["span_id"]: s["attributes"][S.STEP_INDEX] for s in by_name(spans, S.STEP)}
    return {steps[s["parent_span_id"]]: s["attributes"] for s in by_name(spans, S.SCHEDULE)}


def test_schedule_says_why_waiting_requests_were_not_admitted(tmp_path, qwen3_dir):
    prompts = {"max_num_seqs": ([[1] * 20, [2] * 20], dict(max_num_seqs=1)),
               # the first 64 tokens of the first prompt fill a budget of 64
               "max_num_batched_tokens": ([[3] * 100, [4] * 50], dict(max_num_batched_tokens=64, max_num_seqs=64)),
               # 10 blocks of 16: the first prompt takes 7, the second needs 4
               "kv_blocks": ([[5] * 100, [6] * 60], dict(num_kvcache_blocks=10))}
    for reason, (batch, settings) in prompts.items():
        def body():
            make_llm(qwen3_dir, **settings).generate(batch, GREEDY, use_tqdm=False)
        spans, _ = traced(tmp_path, body)
        first = schedules(spans)[0]
        assert first[S.NUM_WAITING] == 1 and first[S.NUM_SEQS] == 1
        assert first[S.WAITING_REASON] == reason
        if reason == "kv_blocks":
            assert first[S.WAITING_BLOCKS_NEEDED] == 4 and first[S.BLOCKS_FREE] == 3
        else:
            assert S.WAITING_BLOCKS_NEEDED not in first
        admitted = [a for i, a in sorted(schedules(spans).items()) if a[S.PHASE] == "prefill"][1]
        assert admitted[S.NUM_WAITING] == 0 and S.WAITING_REASON not in admitted


def test_a_preemption_names_who_needed_blocks_and_what_was_freed(tmp_path, qwen3_dir):
    # 8 blocks of 16 for two sequences of 30 + 60 tokens (6 blocks each): each prefill takes 2
    # blocks; both take a third at token 33 and a fourth at 49; at 65 the first needs a fifth,
    # none is free, and the newest (the second, 4 blocks) is preempted for it.
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    def body():
        make_llm(qwen3_dir, num_kvcache_blocks=8).generate([[7] * 30, [8] * 30], params, use_tqdm=False)
    spans, _ = traced(tmp_path, body)
    first, second = sorted((s for s in spans if S.is_request(s["name"], s["attributes"])),
                           key=lambda s: s["attributes"][S.SEQ_ID])
    ids = first["attributes"][S.SEQ_ID], second["attributes"][S.SEQ_ID]
    preempting = [a for a in schedules(spans).values() if a.get(S.NUM_PREEMPTED)]
    a = preempting[0]
    assert a[S.PREEMPTED_SEQ_IDS] == [ids[1]] and a[S.PREEMPTED_FOR] == [ids[0]]
    assert a[S.PREEMPTION_BLOCKS_NEEDED] == 1 and a[S.PREEMPTION_BLOCKS_FREE] == 0
    assert a[S.BLOCKS_FREED] == 4
    event = next(e for e in second["events"] if e["name"] == S.EVENT_PREEMPTED)
    assert event["attributes"][S.PREEMPTED_FOR] == ids[0]


def test_blocks_freed_and_at_debug_their_ids(tmp_path, qwen3_dir):
    prompts = [[1] * 10, [2] * 20]   # with 4 tokens each: one block and two blocks

    def body():
        make_llm(qwen3_dir, trace_level="debug").generate(prompts, GREEDY, use_tqdm=False)
    spans, _ = traced(tmp_path, body)
    allocations = [s["attributes"] for s in by_name(spans, S.BLOCK_ALLOCATE) if S.SEQ_ID in s["attributes"]]
    allocated = [a[S.BLOCK_IDS] for a in sorted(allocations, key=lambda a: a[S.SEQ_ID])]
    assert [len(ids) for ids in allocated] == [1, 2]
    assert len(set(allocated[0] + allocated[1])) == 3
    frees = [s["attributes"] for s in by_name(spans, S.POSTPROCESS) if s["attributes"].get(S.FINISHED_SEQS)]
    assert sum(a[S.BLOCKS_FREED] for a in frees) == 3
    assert sorted(i for a in frees for i in a[S.BLOCK_IDS_FREED]) == sorted(allocated[0] + allocated[1])


def test_block_ids_only_at_debug(tmp_path, qwen3_dir):
    def body():
        make_llm(qwen3_dir).generate([[1] * 10], GREEDY, use_tqdm=False)
    spans, _ = traced(tmp_path, body)
    keys = {k for s in spans for k in s["attributes"]}
    assert S.BLOCKS_FREED in keys and not keys & {S.BLOCK_IDS, S.BLOCK_IDS_NEW, S.BLOCK_IDS_FREED}


def test_the_summary_says_why_requests_waited_and_who_was_preempted(tmp_path, qwen3_dir):
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    def body():   # the preemption above, with one request more that waits for KV blocks
        make_llm(qwen3_dir, num_kvcache_blocks=8).generate([[7] * 30, [8] * 30, [9] * 65], params, use_tqdm=False)
    spans, summary = traced(tmp_path, body)
    ids = sorted(s["attributes"][S.SEQ_ID] for s in spans if S.is_request(s["name"], s["attributes"]))
    text = lines(summary)
    preemptions = next(line for line in text if line.startswith("preemptions:"))
    assert f"seq {ids[1]} preempted for seq {ids[0]}, which needed 1 block(s) with 0 free; 4 blocks freed" \
        in preemptions
    waiting = next(line for line in text if line.startswith("requests left waiting"))
    assert "kv_blocks in" in waiting


def test_steps_and_requests_of_a_generate_call_are_linked_both_ways(tmp_path, qwen3_dir):
    lengths = [2, 5, 3]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]

    def body():
        make_llm(qwen3_dir).generate([[1, 2], [3, 4, 5], [6]], params, use_tqdm=False)
    spans, _ = traced(tmp_path, body)
    requests = {s["span_id"]: s for s in spans if S.is_request(s["name"], s["attributes"])}
    steps = {s["span_id"]: s for s in by_name(spans, S.STEP)}
    assert len(steps) == max(lengths)

    def events(request):
        return {e["name"]: e["attributes"][S.EVENT_STEP] for e in request["events"]}

    # A request is in the batch of every step from the one that scheduled it to the one that
    # computed its last token.
    for step in steps.values():
        index = step["attributes"][S.STEP_INDEX]
        batch = {rid for rid, r in requests.items()
                 if events(r)[S.EVENT_SCHEDULED] <= index <= events(r)[S.EVENT_FINISHED]}
        assert sorted(step["attributes"][S.BATCH_SEQ_IDS]) == sorted(
            requests[rid]["attributes"][S.SEQ_ID] for rid in batch)
        assert {link["span_id"] for link in step["links"]} == batch
    for rid, request in requests.items():   # back from each request to the steps of its batch that ended before it
        linked = {link["span_id"] for link in request["links"]}
        assert linked == {sid for sid, s in steps.items() if rid in {link["span_id"] for link in s["links"]}
                          and s["end_ns"] <= request["end_ns"]}
        assert linked


def test_jaeger_rows_name_the_phase_and_group_the_requests(tmp_path, qwen3_dir, monkeypatch):
    monkeypatch.setenv("OTVLLM_TRACE_FIRST_STEPS", "2")
    monkeypatch.setenv("OTVLLM_TRACE_LAST_STEPS", "2")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def body():
        make_llm(qwen3_dir).generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)
    spans, _ = traced(tmp_path, body)
    steps, aggregates = by_name(spans, S.STEP), by_name(spans, S.STEPS)
    assert {s["name"] for s in steps} == {"engine.step prefill", "engine.step decode"}
    assert all(s["name"] == f"engine.step {s['attributes'][S.PHASE]}" for s in steps)
    assert aggregates and all(s["name"] == f"engine.steps {s['attributes'][S.PHASE]}" for s in aggregates)
    # The request spans are the children of one span under llm.generate, which covers them.
    generate, = by_name(spans, S.GENERATE)
    group, = by_name(spans, S.REQUESTS)
    requests = [s for s in spans if S.is_request(s["name"], s["attributes"])]
    assert group["parent_span_id"] == generate["span_id"] and group["attributes"][S.GEN_NUM_REQUESTS] == 2
    assert len(requests) == 2 and all(r["parent_span_id"] == group["span_id"] for r in requests)
    assert group["start_ns"] <= min(r["start_ns"] for r in requests)
    assert group["end_ns"] == max(r["end_ns"] for r in requests)
    assert not [s for s in spans if s["parent_span_id"] == generate["span_id"] and S.is_request(s["name"], s["attributes"])]
