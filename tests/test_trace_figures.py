"""Figures in the trace against what each test set up: the prefix-cache hit rate in tokens, when
the first token reached the host, why waiting requests were not admitted, what a preemption
needed, the blocks freed and their ids, and the links between steps and requests."""

import json

from transformers import AutoTokenizer

from otvllm import LLM, SamplingParams
from otvllm.tracing import schema as S
from tests.reference import hf_greedy, hf_logprobs
from tests.test_failures import lines, traced

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def make_llm(model_dir, **kwargs):
    settings = dict(kvcache_block_size=BLOCK, max_model_len=128, max_num_batched_tokens=256, device="cpu")
    settings.update(kwargs)
    return LLM(model_dir, **settings)


def by_name(spans, name):
    return [s for s in spans if s["name"] == name]


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
