"""logit_bias and min_tokens: greedy outputs against transformers' generate (its sequence_bias
and min_new_tokens), through the engine's asynchronous steps, a batch of mixed settings and
preemption; bad values refused before any work; the CLI, prompt files and spans carry them."""

import json
import subprocess
import sys

import pytest
import torch

from otvllm import SamplingParams
from tests.helpers import make_llm, random_prompts
from tests.reference import hf_greedy

PROMPTS = random_prompts([5, 17, 9], vocab=64, seed=3)
TOKENS = 12


def greedy(**options) -> SamplingParams:
    options.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, max_tokens=TOKENS, **options)


def hf_biased(model_dir, prompt, bias: dict[int, float], max_new_tokens=TOKENS, **options) -> list[int]:
    """transformers' greedy generate with `bias` added to the logits (its sequence_bias, one token each)."""
    if bias:
        options["sequence_bias"] = [[[token], value] for token, value in bias.items()]
    return hf_greedy(model_dir, prompt, max_new_tokens, **options)


def test_logit_bias_matches_transformers_sequence_bias(qwen3_dir):
    llm = make_llm(qwen3_dir)
    plain = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    # ban each prompt's first greedy token and favour another: the outputs must change
    for prompt, before in zip(PROMPTS, plain):
        bias = {before.token_ids[0]: -100.0, (before.token_ids[0] + 7) % 64: 4.0}
        out = llm.generate([prompt], greedy(logit_bias=bias), use_tqdm=False)[0]
        assert out.token_ids == hf_biased(qwen3_dir, prompt, bias)
        assert out.token_ids[0] != before.token_ids[0]


def test_min_tokens_holds_back_eos_as_transformers_min_new_tokens(qwen3_dir):
    """EOS pushed to the top by a bias ends the output at once, unless min_tokens bans it until
    the output has that many tokens; the token after them is EOS."""
    llm = make_llm(qwen3_dir)
    eos = min(llm.engine.eos_token_ids)
    bias = {eos: 100.0}
    at_once = llm.generate(PROMPTS[:1], greedy(ignore_eos=False, logit_bias=bias), use_tqdm=False)[0]
    assert at_once.token_ids == [eos] and at_once.finish_reason == "stop"
    outputs = llm.generate(PROMPTS, greedy(ignore_eos=False, logit_bias=bias, min_tokens=5), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        expected = hf_biased(qwen3_dir, prompt, bias, eos_token_id=sorted(llm.engine.eos_token_ids),
                             min_new_tokens=5)
        assert out.token_ids == expected and len(expected) == 6 and expected[-1] == eos
        assert out.finish_reason == "stop"


def test_min_tokens_holds_back_stop_token_ids_too(qwen3_dir):
    llm = make_llm(qwen3_dir)
    stop = 33
    out = llm.generate(PROMPTS[:1], greedy(stop_token_ids=[stop], logit_bias={stop: 100.0}, min_tokens=3),
                       use_tqdm=False)[0]
    expected = hf_biased(qwen3_dir, PROMPTS[0], {stop: 100.0}, eos_token_id=stop, min_new_tokens=3)
    assert out.token_ids == expected and len(expected) == 4 and out.finish_reason == "stop"


def test_a_batch_of_mixed_settings_under_preemption_gives_each_request_its_own(qwen3_dir):
    """Rows with and without biases (and penalties) share steps; a KV cache too small for all
    of them preempts and recomputes some."""
    llm = make_llm(qwen3_dir)
    eos = min(llm.engine.eos_token_ids)
    settings = [dict(logit_bias={5: 6.0, 9: -100.0}), {}, dict(logit_bias={eos: 100.0}, min_tokens=7, ignore_eos=False),
                dict(logit_bias={11: 3.0}, repetition_penalty=1.5), dict(logit_bias={eos: 100.0}, min_tokens=3,
                                                                          ignore_eos=False)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(settings))]
    tight = make_llm(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=64)
    outputs = tight.generate(prompts, [greedy(**s) for s in settings], use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    for prompt, s, out in zip(prompts, settings, outputs):
        options = {}
        if "min_tokens" in s:
            options = dict(eos_token_id=sorted(llm.engine.eos_token_ids), min_new_tokens=s["min_tokens"])
        if "repetition_penalty" in s:
            options["repetition_penalty"] = s["repetition_penalty"]
        assert out.token_ids == hf_biased(qwen3_dir, prompt, s.get("logit_bias", {}), **options), s


@pytest.mark.parametrize("options, words", [
    (dict(logit_bias={"x": 1.0}), "logit_bias keys"),
    (dict(logit_bias={3: 100.5}), "[-100, 100]"),
    (dict(logit_bias={3: float("nan")}), "[-100, 100]"),
    (dict(logit_bias=[3]), "logit_bias must map"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=9, max_tokens=8), "min_tokens=9 is more than max_tokens=8"),
])
def test_bad_values_are_refused_naming_them(options, words):
    with pytest.raises(ValueError) as info:
        SamplingParams(**options)
    assert words in str(info.value)


def test_token_ids_as_json_gives_them_are_taken():
    assert SamplingParams(logit_bias={"12": 5, 3: -1}).logit_bias == {12: 5.0, 3: -1.0}
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_a_bias_outside_the_vocabulary_is_refused_before_any_work(qwen3_dir):
    llm = make_llm(qwen3_dir)
    vocab = llm.engine.spec.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias token id {vocab} is outside the vocabulary"):
        llm.generate(PROMPTS, [greedy(), greedy(logit_bias={vocab: 1.0}), greedy()], use_tqdm=False)
    assert llm.engine.step_index == 0


def test_cli_flags_and_prompt_file_lines_carry_them(qwen3_dir, tmp_path, capsys):
    from otvllm.cli import main
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps(entry) for entry in [
        {"prompt": PROMPTS[0]},                                     # the flags'
        {"prompt": PROMPTS[1], "logit_bias": {"20": 9.5, "21": -100}},   # its own, as a JSON object has them
    ]) + "\n")
    assert main(["generate", "--model", qwen3_dir, "--device", "cpu", "--prompts-file", str(lines), "--max-tokens",
                 str(TOKENS), "--ignore-eos", "--logit-bias", "7:8,1:-100", "--output", "json", "--no-progress",
                 "--trace-file", str(tmp_path / "t.json")]) == 0
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first["token_ids"] == hf_biased(qwen3_dir, PROMPTS[0], {7: 8.0, 1: -100.0})
    assert second["token_ids"] == hf_biased(qwen3_dir, PROMPTS[1], {20: 9.5, 21: -100.0})


@pytest.mark.parametrize("flags, words", [
    (["--logit-bias", "7=8"], "TOKEN_ID:BIAS"),
    (["--logit-bias", "7:200"], "[-100, 100]"),
    (["--min-tokens", "9", "--max-tokens", "8"], "min_tokens=9 is more than max_tokens=8"),
])
def test_cli_refuses_bad_values_before_any_work(tmp_path, flags, words):
    result = subprocess.run([sys.executable, "-m", "otvllm", "generate", "--prompt", "hi", *flags,
                             "--trace-file", str(tmp_path / "t.json")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert words in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "t.json").exists()


def test_spans_carry_them(qwen3_dir, tmp_path):
    from otvllm.tracing import schema as S
    from tests.helpers import traced

    params = [greedy(logit_bias={3: 1.0, 4: 2.0}, min_tokens=4), greedy(), greedy(min_tokens=2, ignore_eos=False)]
    spans, _ = traced(tmp_path, lambda: make_llm(qwen3_dir).generate(PROMPTS, params, use_tqdm=False))
    requests = {a[S.GEN_AI_USAGE_INPUT_TOKENS]: a for s in spans if S.is_request(s["name"], a := s["attributes"])}
    biased, plain, short = (requests[len(p)] for p in PROMPTS)
    assert (biased[S.REQUEST_LOGIT_BIAS_TOKENS], biased[S.REQUEST_MIN_TOKENS]) == (2, 4)
    assert short[S.REQUEST_MIN_TOKENS] == 2 and S.REQUEST_LOGIT_BIAS_TOKENS not in short
    assert not {S.REQUEST_LOGIT_BIAS_TOKENS, S.REQUEST_MIN_TOKENS} & set(plain)
    # the first request's row has a bias every step; the third's only while it is short of 2
    # tokens with EOS not ignored (its first two samples)
    counts = [s["attributes"][S.SAMPLE_BIASED] for s in sorted((s for s in spans if s["name"] == S.SAMPLE),
                                                               key=lambda s: s["start_ns"])]
    assert counts[:2] == [2, 2] and set(counts[2:]) == {1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_biases_with_cuda_graphs_match_the_reference(qwen3_dir):
    """On CUDA (decode steps replayed from graphs, the biases applied after them), float32."""
    llm = make_llm(qwen3_dir, device="cuda", dtype="float32")
    assert llm.engine.runner.graphs
    eos = min(llm.engine.eos_token_ids)
    settings = [dict(logit_bias={5: 6.0, 9: -100.0}), {}, dict(logit_bias={eos: 100.0}, min_tokens=7, ignore_eos=False)]
    outputs = llm.generate(PROMPTS, [greedy(**s) for s in settings], use_tqdm=False)
    for prompt, s, out in zip(PROMPTS, settings, outputs):
        options = dict(eos_token_id=sorted(llm.engine.eos_token_ids), min_new_tokens=7) if "min_tokens" in s else {}
        assert out.token_ids == hf_biased(qwen3_dir, prompt, s.get("logit_bias", {}), **options), s
