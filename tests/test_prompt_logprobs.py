"""prompt_logprobs: each prompt token's log-probability (and its N likeliest alternatives) against
transformers' forward over the same tokens, whole or in chunks, beside sampled rows, with a
warm prefix cache (which such a prompt must not use) and under preemption."""

import json

import pytest
import torch

from otvllm import SamplingParams
from tests.helpers import make_llm, random_prompts
from tests.reference import hf_logprobs

PROMPTS = random_prompts([7, 40, 19], seed=8)


def assert_prompt_logprobs(model_dir, prompt, entries, n, ranks=None):
    """entries[0] is None; entries[p] holds token p's log-probability given the tokens before it,
    and the n likeliest there, as transformers' forward gives them; ranks[p], token p's place
    among them all (1: the likeliest)."""
    reference = hf_logprobs(model_dir, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    if ranks is not None:
        assert ranks[0] is None
        assert ranks[1:] == [int((reference[p - 1] > reference[p - 1, prompt[p]]).sum()) + 1
                             for p in range(1, len(prompt))]
    for p in range(1, len(prompt)):
        expected = reference[p - 1]
        entry = entries[p]
        assert entry[prompt[p]] == pytest.approx(expected[prompt[p]].item(), abs=1e-4), p
        top = expected.topk(n)
        assert set(entry) == set(top.indices.tolist()) | {prompt[p]}, p
        for token, value in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[token] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("chunk", [None, 16])
def test_prompt_logprobs_match_transformers_whole_or_in_chunks(qwen3_dir, chunk, monkeypatch):
    from otvllm.core import model_runner
    monkeypatch.setattr(model_runner, "PROMPT_LOGITS_ROWS", 8)   # a step's prompt rows in several slices
    settings = {} if chunk is None else dict(max_num_batched_tokens=chunk, max_num_seqs=4)
    llm = make_llm(qwen3_dir, **settings)
    params = [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=n) for n in (2, 0, 5)]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, p, out in zip(PROMPTS, params, outputs):
        assert_prompt_logprobs(qwen3_dir, prompt, out.prompt_logprobs, p.prompt_logprobs, out.prompt_token_ranks)
    assert any(r > 1 for out in outputs for r in out.prompt_token_ranks[1:])   # not all the likeliest


def test_a_warm_prefix_cache_is_not_used_for_them(qwen3_dir):
    """The same prompt again: without prompt_logprobs it comes from the cache; with them it is
    computed whole, and the same entries come out."""
    llm = make_llm(qwen3_dir)
    prompt = PROMPTS[1]
    plain = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    first = llm.generate([prompt], plain, use_tqdm=False)[0]
    again = llm.generate([prompt], plain, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens > 0
    wanted = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=1),
                          use_tqdm=False)[0]
    assert wanted.num_cached_tokens == 0
    assert_prompt_logprobs(qwen3_dir, prompt, wanted.prompt_logprobs, 1)
    assert wanted.token_ids == first.token_ids


def test_under_preemption_each_request_keeps_its_own(qwen3_dir):
    prompts = random_prompts([30, 12, 25, 9], seed=9)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=None if i == 1 else 3)
              for i in range(len(prompts))]
    tight = make_llm(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=6, max_model_len=64,
                     max_num_batched_tokens=64, max_num_seqs=4)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    roomy = make_llm(qwen3_dir).generate(prompts, params, use_tqdm=False)
    for prompt, p, out, expected in zip(prompts, params, outputs, roomy):
        assert out.token_ids == expected.token_ids
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert_prompt_logprobs(qwen3_dir, prompt, out.prompt_logprobs, 3)


def test_two_tensor_parallel_ranks_give_them_too(qwen3_dir):
    """The prompt rows go through the vocabulary-parallel output head on every rank (gloo), in
    slices of PROMPT_LOGITS_ROWS that the ranks take in step."""
    from otvllm.core.model_runner import PROMPT_LOGITS_ROWS
    from tests.helpers import two_ranks
    prompt = random_prompts([PROMPT_LOGITS_ROWS + 100], seed=10)[0]
    with two_ranks(qwen3_dir, max_model_len=2048, max_num_batched_tokens=2048, max_num_seqs=4) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2),
                           use_tqdm=False)[0]
    assert_prompt_logprobs(qwen3_dir, prompt, out.prompt_logprobs, 2)


def test_a_one_token_prompt_has_only_the_none_entry(qwen3_dir):
    out = make_llm(qwen3_dir).generate([[5]], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2),
                                       use_tqdm=False)[0]
    assert out.prompt_logprobs == [None] and len(out.token_ids) == 2


@pytest.mark.parametrize("value, words", [(-1, "prompt_logprobs must be None or an integer >= 0"),
                                          (True, "prompt_logprobs must be None or an integer >= 0")])
def test_bad_values_are_refused(value, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(prompt_logprobs=value)


def test_more_than_max_logprobs_is_refused_before_any_work(qwen3_dir):
    llm = make_llm(qwen3_dir, max_logprobs=4)
    with pytest.raises(ValueError, match="prompt_logprobs=5 is more than the engine allows"):
        llm.generate(PROMPTS, SamplingParams(prompt_logprobs=5), use_tqdm=False)
    assert llm.engine.step_index == 0


def test_the_cli_prints_them_in_json(qwen3_dir, tmp_path, capsys):
    from otvllm.cli import main
    prompt = PROMPTS[0]
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps({"prompt": prompt}) + "\n")
    assert main(["generate", "--model", qwen3_dir, "--device", "cpu", "--prompts-file", str(lines), "--max-tokens",
                 "2", "--prompt-logprobs", "1", "--output", "json", "--no-progress",
                 "--trace-file", str(tmp_path / "t.json")]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    entries = out["prompt_logprobs"]
    assert entries[0] is None and [e["token_id"] for e in entries[1:]] == prompt[1:]
    reference = hf_logprobs(qwen3_dir, prompt)
    for p, e in enumerate(entries[1:], 1):
        assert e["logprob"] == pytest.approx(reference[p - 1, prompt[p]].item(), abs=1e-4)
        assert [t["token_id"] for t in e["top_logprobs"]] == [int(reference[p - 1].argmax())]


def test_spans_count_them(qwen3_dir, tmp_path):
    from otvllm.tracing import schema as S
    from tests.helpers import traced

    params = [SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3), SamplingParams(max_tokens=2)]
    spans, _ = traced(tmp_path, lambda: make_llm(qwen3_dir).generate(PROMPTS[:2], params, use_tqdm=False))
    requests = {a[S.GEN_AI_USAGE_INPUT_TOKENS]: a for s in spans if S.is_request(s["name"], a := s["attributes"])}
    assert requests[len(PROMPTS[0])][S.REQUEST_PROMPT_LOGPROBS] == 3
    assert S.REQUEST_PROMPT_LOGPROBS not in requests[len(PROMPTS[1])]
    samples = [s["attributes"] for s in spans if s["name"] == S.SAMPLE]
    assert sum(a[S.SAMPLE_PROMPT_LOGPROBS] for a in samples) == len(PROMPTS[0]) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_prompt_logprobs_with_prefill_graphs_match_transformers(qwen3_dir):
    llm = make_llm(qwen3_dir, device="cuda", dtype="float32")
    assert llm.engine.runner.prefill_graphs is not None
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        assert_prompt_logprobs(qwen3_dir, prompt, out.prompt_logprobs, 2)
