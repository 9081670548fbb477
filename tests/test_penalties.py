"""Presence, frequency and repetition penalties: greedy outputs against transformers (its
generate's repetition_penalty; its forward, step by step, for OpenAI's presence and frequency
penalties), through the engine's asynchronous steps, a batch of mixed settings and preemption."""

import json
import subprocess
import sys

import pytest
import torch

from otvllm import SamplingParams
from tests.helpers import make_llm, random_prompts
from tests.reference import hf_greedy, hf_greedy_with_penalties

PROMPTS = random_prompts([5, 17, 9], vocab=64, seed=3)   # a small vocabulary: tokens recur
TOKENS = 16


def greedy(**penalties) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, **penalties)


def test_repetition_penalty_matches_transformers_generate(qwen3_dir):
    llm = make_llm(qwen3_dir)
    outputs = llm.generate(PROMPTS, greedy(repetition_penalty=1.8), use_tqdm=False)
    plain = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, TOKENS, repetition_penalty=1.8)
    assert [o.token_ids for o in outputs] != [o.token_ids for o in plain]   # the penalty changed something


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 1.2), (0.7, 0.9), (-1.0, 0.0)])
def test_presence_and_frequency_penalties_match_a_step_by_step_reference(qwen3_dir, presence, frequency):
    outputs = make_llm(qwen3_dir).generate(PROMPTS, greedy(presence_penalty=presence, frequency_penalty=frequency),
                                           use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy_with_penalties(qwen3_dir, prompt, TOKENS, presence, frequency)
    assert [o.token_ids for o in outputs] != [hf_greedy(qwen3_dir, p, TOKENS) for p in PROMPTS]   # they changed something


def test_a_batch_of_mixed_settings_under_preemption_gives_each_request_its_own(qwen3_dir):
    """Rows with and without penalties share steps; a KV cache too small for all of them preempts
    and recomputes some (their outputs so far become part of what is recomputed)."""
    settings = [dict(presence=1.5), {}, dict(frequency=1.2, repetition=1.3), dict(repetition=1.8),
                dict(presence=0.5, frequency=0.5, repetition=0.8)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(settings))]
    params = [greedy(**{f"{k}_penalty": v for k, v in s.items()}) for s in settings]
    tight = make_llm(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=5, max_model_len=64)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    for prompt, s, out in zip(prompts, settings, outputs):
        assert out.token_ids == hf_greedy_with_penalties(qwen3_dir, prompt, TOKENS, **s), s


@pytest.mark.parametrize("field, value, words", [
    ("presence_penalty", 2.5, "[-2, 2]"), ("frequency_penalty", -3.0, "[-2, 2]"),
    ("repetition_penalty", 0.0, "> 0"), ("presence_penalty", float("nan"), "finite"),
])
def test_bad_penalties_are_refused_naming_them(field, value, words):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value) and words in str(info.value)


def test_cli_refuses_a_bad_penalty_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "otvllm", "generate", "--prompt", "hi", "--repetition-penalty",
                             "-1", "--trace-file", str(tmp_path / "t.json")], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "repetition_penalty" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "t.json").exists()



def test_the_token_still_in_flight_is_penalised_too(qwen3_dir):
    """A step is prepared while the previous step's token is still on the device (asynchronous
    scheduling): the penalties read it there. A prompt whose plain greedy output repeats its first
    token at once shows it: the second token is chosen while the first is in flight."""
    llm = make_llm(qwen3_dir)
    candidates = random_prompts([6] * 64, vocab=64, seed=11)
    plain = llm.generate(candidates, greedy(), use_tqdm=False)
    prompt = next(p for p, o in zip(candidates, plain) if o.token_ids[0] == o.token_ids[1])
    expected = hf_greedy_with_penalties(qwen3_dir, prompt, TOKENS, presence=2.0, frequency=2.0)
    assert expected[1] != expected[0]
    out = llm.generate([prompt], greedy(presence_penalty=2.0, frequency_penalty=2.0), use_tqdm=False)[0]
    assert out.token_ids == expected


def test_cli_flags_and_prompt_file_lines_carry_the_penalties(qwen3_dir, tmp_path, capsys):
    from otvllm.cli import main
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps(entry) for entry in [
        {"prompt": PROMPTS[0]},                                             # the flags' penalties
        {"prompt": PROMPTS[1], "presence_penalty": 0.0, "repetition_penalty": 1.0},   # none, for this line
    ]) + "\n")
    assert main(["generate", "--model", qwen3_dir, "--device", "cpu", "--prompts-file", str(lines), "--max-tokens",
                 str(TOKENS), "--ignore-eos", "--presence-penalty", "1.5", "--repetition-penalty", "1.3", "--output",
                 "json", "--no-progress", "--trace-file", str(tmp_path / "t.json")]) == 0
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert first["token_ids"] == hf_greedy_with_penalties(qwen3_dir, PROMPTS[0], TOKENS, presence=1.5, repetition=1.3)
    assert second["token_ids"] == hf_greedy(qwen3_dir, PROMPTS[1], TOKENS)


def test_request_spans_carry_the_penalties_asked_for(qwen3_dir, tmp_path):
    from otvllm.tracing import schema as S
    from tests.helpers import traced

    params = [greedy(presence_penalty=1.5, frequency_penalty=-0.5, repetition_penalty=1.3), greedy()]
    spans, _ = traced(tmp_path, lambda: make_llm(qwen3_dir).generate(PROMPTS[:2], params, use_tqdm=False))
    requests = sorted((s["attributes"] for s in spans if S.is_request(s["name"], s["attributes"])),
                      key=lambda a: a[S.GEN_AI_USAGE_INPUT_TOKENS])
    penalised, plain = requests[0], requests[1]   # PROMPTS[0] is the shorter
    assert (penalised[S.GEN_AI_REQUEST_PRESENCE_PENALTY], penalised[S.GEN_AI_REQUEST_FREQUENCY_PENALTY],
            penalised[S.REQUEST_REPETITION_PENALTY]) == (1.5, -0.5, 1.3)
    assert not {S.GEN_AI_REQUEST_PRESENCE_PENALTY, S.GEN_AI_REQUEST_FREQUENCY_PENALTY,
                S.REQUEST_REPETITION_PENALTY} & set(plain)
    samples = [s["attributes"] for s in spans if s["name"] == S.SAMPLE]
    assert samples and all(a[S.SAMPLE_PENALIZED] == 1 for a in samples[:TOKENS - 1])   # one of the two rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_penalties_with_cuda_graphs_match_the_reference(qwen3_dir):
    """On CUDA (decode steps replayed from graphs, the penalties applied after them), float32."""
    settings = [dict(presence=1.5), {}, dict(frequency=1.2, repetition=1.3), dict(presence=0.5, repetition=0.8)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(settings))]
    params = [greedy(**{f"{k}_penalty": v for k, v in s.items()}) for s in settings]
    llm = make_llm(qwen3_dir, device="cuda", dtype="float32")
    assert llm.engine.runner.graphs
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, s, out in zip(prompts, settings, outputs):
        assert out.token_ids == hf_greedy_with_penalties(qwen3_dir, prompt, TOKENS, **s), s
